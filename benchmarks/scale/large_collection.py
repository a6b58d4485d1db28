"""A collection of millions of images built and searched through ris's own write and search paths.

    python benchmarks/scale/large_collection.py --real REAL.ris --n 10000000 --dir /tmp/large [--queries 200]

No image files: each image's stored vector (what the catalogue keeps: the 1,024-d stage-1 projection of
grid3 features) is drawn like a real one, from the stored vectors of a real collection (REAL.ris, e.g. the
full Caltech-101) plus Gaussian noise shaped like their per-component spread, its scale calibrated so that
near neighbours are as close as in the real data (benchmarks/scale/scale.py's Generator). They enter through the
same path an extraction engine uses (Catalog.sync of the file list, then the collection's Sink, which an
engine that projects on its device also feeds), then `Derived.update` builds PCA and the index exactly as
`ris index` does. Then, each in a child process (so RSS is its own):
- search: --queries fresh vectors one at a time through Collection.search_vectors (re-scoring included),
  p50 / p99 latency, recall@10 against the exact top 10 over all reduced vectors, peak RSS;
- add 1% (new images, the same path) and remove 1% (Collection.remove_ids), each timed whole.
Prints one JSON object; disk use is the collection directory's size over the image count.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from scale import Generator  # this folder (run as a script)

from ris.collection import Collection
from ris.files.sources import SourceFile
from ris.vectors import faiss_index as index

K = 10
CHUNK = 200_000
BATCH = 4096


def stored_of(real: str) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """A real collection's stored vectors and its projection (mean, components)."""
    with Collection.open(real) as coll:
        projection = coll.catalog.projection()
        if projection is None:
            raise SystemExit(f"{real} keeps raw features (fewer than 2,048 images?): give a larger real collection")
        return coll.catalog.vectors(coll.catalog.ok_ids()), projection


def inject(coll: Collection, gen: Generator, first: int, n: int) -> float:
    """n synthetic images #first.. through sync + the collection's Sink; returns seconds."""
    start = time.perf_counter()
    coll.lock()
    sink = coll.sink()
    for lo in range(first, first + n, CHUNK):
        count = min(CHUNK, first + n - lo)
        files = [SourceFile(f"/synthetic/{i // 10000:04d}/{i:09d}.jpg", 1000 + i % 997, i, f"c{i % 997}")
                 for i in range(lo, lo + count)]  # fmt: skip
        coll.catalog.sync(files)
        pending = coll.catalog.pending()
        x, _ = gen.chunk(lo // CHUNK, count)
        for b in range(0, count, BATCH):
            ids = [image_id for image_id, _ in pending[b : b + BATCH]]
            done = [(image_id, hashlib.sha256(b"%d" % (lo + b + j)).hexdigest()) for j, image_id in enumerate(ids)]
            sink.commit(done, {sha: x[b + j] for j, (_, sha) in enumerate(done)}, [])
    coll.derived.update()
    coll.unlock()
    return time.perf_counter() - start


def build(args: argparse.Namespace) -> dict:
    real, (mean, components) = stored_of(args.real)
    gen = Generator(real)
    root = Path(args.dir) / "large.ris"
    shutil.rmtree(root, ignore_errors=True)
    with Collection.create(root, verify=False) as coll:
        with coll.catalog.db:  # a collection that has its projection already (fitted on its first images)
            coll.catalog._set_projection(mean, components)
        seconds = inject(coll, gen, 0, args.n)
        info = coll.info()
    queries, _ = Generator(real, seed=1).chunk(0, args.queries)
    np.save(Path(args.dir) / "queries.npy", queries)
    return {"n": args.n, "build_s": round(seconds, 1), "images_per_s": round(args.n / seconds),
            "index": info["index_built"], "disk_bytes": du(root), "bytes_per_image": round(du(root) / args.n)}  # fmt: skip


def exact_top(coll: Collection, queries: np.ndarray) -> np.ndarray:
    """Exact top-K ids by the reduced vectors, a block of stored vectors at a time (never all in RAM)."""
    snap = coll.derived.snapshot()
    ids = coll.catalog.ok_ids()
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.full((len(queries), K), -1, np.int64)
    for start in range(0, len(ids), CHUNK):
        block = ids[start : start + CHUNK]
        sims = queries @ coll.derived.reduced(snap.space, block).T
        s = np.concatenate([best_s, sims], axis=1)
        i = np.concatenate([best_i, np.broadcast_to(block, sims.shape)], axis=1)
        top = np.argsort(-s, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    return best_i


def search(args: argparse.Namespace) -> dict:
    """Latency and recall@10 at the default nprobe and at 2x and 4x it (IVF lists visited: the speed/recall knob)."""
    root = Path(args.dir) / "large.ris"
    stored = np.load(Path(args.dir) / "queries.npy")
    out: dict = {}
    with Collection.open(root) as coll:
        snap = coll.derived.snapshot()
        queries = snap.space.from_stored(stored)
        truth = exact_top(coll, queries)
        default = index.default_nprobe(index._ivf(snap.store.faiss_index).nlist)
        out["rss_after_open_mb"] = rss_mb()
        for nprobe in (default, 2 * default, 4 * default):
            coll.search_vectors(queries[:3], K, ["warm"] * 3, nprobe=nprobe)
            times, found = [], []
            for q in queries:
                t = time.perf_counter()
                found.append([m.id for m in coll.search_vectors(q[None], K, ["q"], nprobe=nprobe)[0].matches])
                times.append(time.perf_counter() - t)
            recall = np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, truth, strict=True)])
            ms = np.array(times) * 1000
            out[f"nprobe_{nprobe}"] = {
                "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
                "recall_at_10": round(float(recall), 4),
            }  # fmt: skip
        out["peak_rss_searching_mb"] = rss_mb()
    return {"queries": len(queries), **out}


def change(args: argparse.Namespace) -> dict:
    root = Path(args.dir) / "large.ris"
    real, _ = stored_of(args.real)
    gen = Generator(real, seed=2)
    with Collection.open(root) as coll:
        n = coll.catalog.counts()["ok"]
        add_s = inject(coll, gen, 10**9, n // 100)
        doomed = coll.catalog.ok_ids()[:: 100][: n // 100]
        t = time.perf_counter()
        coll.remove_ids(doomed.tolist())
        remove_s = time.perf_counter() - t
    return {"add_1pct_s": round(add_s, 1), "remove_1pct_s": round(remove_s, 1), "disk_bytes_after": du(root)}


def rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", required=True)
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--dir", default="/tmp/large")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--step", choices=("all", "build", "search", "change"), default="all")
    ap.add_argument("--steps", default="build,search,change", help="with --step all: which, in order")
    args = ap.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    if args.step != "all":
        print(json.dumps({"build": build, "search": search, "change": change}[args.step](args)), flush=True)
        return
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    for step in args.steps.split(","):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--step", step, *sys.argv[1:]], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{step} failed:\n{proc.stderr[-3000:]}")
        key = step if step not in out else f"{step}_after_change"
        out[key] = {**json.loads(proc.stdout), "wall_s": round(time.perf_counter() - t)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
