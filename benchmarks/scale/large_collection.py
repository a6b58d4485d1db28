"""A collection of millions of images built and searched through ris's own write and search paths.

    python benchmarks/scale/large_collection.py --real REAL.ris --n 10000000 --out /tmp/tenm/10m.ris   # build
    python benchmarks/scale/large_collection.py --measure-only /tmp/tenm/10m.ris [--queries 500]        # measure
    python benchmarks/scale/large_collection.py --measure-only PATH --step search --nprobes 64,128 --refine 4,16

No image files: each image's stored vector (what the catalogue keeps: the 1,024-d stage-1 projection of
grid3 features) is drawn from a Gaussian mixture fitted once on a real collection's stored vectors (REAL.ris,
e.g. the full Caltech-101): one component per real image, centred on it, with the real data's per-axis
spread as covariance and a per-draw scale log-uniform over [sigma/2, 2 sigma], sigma calibrated once so that
synthetic neighbours are as close as real ones (benchmarks/scale/scale.py's Generator). The model's inputs are
saved beside the collection (PATH.gen.npz), so the measurement needs no real collection.

Build (resumable: a killed run goes on from the images it had committed): blocks of CHUNK images enter
through `Catalog.insert_done` (rows written 'ok' with their vector, one transaction a block) inside
`Catalog.bulk` (the hash index made once at the end), then `Derived.update` fits PCA and builds the index
exactly as `ris index` does (`--index auto`). Measure, each part in its own child process (RSS its own):
- truth: the exact top 10 of each query over every image's reduced vector (stored vectors read in slot
  order a block at a time, reduced with the collection's PCA), cached in PATH.truth.npz (--query-seed S: PATH.truthS.npz);
- search: --queries fresh vectors one at a time, reduced and searched through Collection.search_vectors
  (IVF candidates re-scored from the reduced vectors kept beside the index), at the default nprobe and at half
  and twice it, after --warm other queries: p50 / p99 latency, recall@10 against the truth, peak RSS;
- change (unless --no-change): add 1% (new images, then Derived.update) and remove 1% (Collection.remove_ids),
  each timed whole.
Prints one JSON object per step; disk use is the collection directory's size.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
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
CHUNK = 100_000
#: calibration sample: both sides' median nearest-neighbour similarity over this many vectors (9k: minutes).
CALIBRATE_ON = 3000


def gen_path(root: Path) -> Path:
    return root.with_name(root.name + ".gen.npz")


def make_generator(real: str, root: Path) -> None:
    """Fit the mixture once: the real stored vectors, and sigma calibrated on a sample of them."""
    with Collection.open(real) as coll:
        if coll.catalog.projection() is None:
            raise SystemExit(f"{real} keeps raw features (fewer than 2,048 images?): give a larger real collection")
        x = coll.catalog.vectors(coll.catalog.ok_ids())
        mean, components = coll.catalog.projection()
    sample = x[np.random.default_rng(0).choice(len(x), min(CALIBRATE_ON, len(x)), replace=False)]
    sigma = Generator(sample).sigma
    np.savez(gen_path(root), real=x, sigma=sigma, mean=mean, components=components)


class Mixture(Generator):
    """scale.py's mixture, its noise drawn as bytes: uniform with the same per-axis variance as the Gaussian (a
    quarter of the cost of normal draws, which were half the build's CPU time). The similarities the index and
    the PCA see are sums over 1,024 axes, Gaussian either way (central limit), so neighbours are as close."""

    def chunk(self, j: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, j + 1])
        src = rng.integers(0, len(self.real), n)
        scale = (self.sigma * 2.0 ** rng.uniform(-1, 1, n)).astype(np.float32)
        x = rng.integers(0, 256, (n, self.real.shape[1]), dtype=np.uint8).astype(np.float32)
        x -= 127.5
        x *= self.spread / np.float32(np.sqrt((256**2 - 1) / 12))  # unit variance, then the data's spread
        x *= scale[:, None]
        x += self.real[src]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, src


def generator(root: Path, seed: int) -> Generator:
    with np.load(gen_path(root)) as data:
        return Mixture(data["real"], seed=seed, sigma=float(data["sigma"]))


def files_for(lo: int, count: int) -> tuple[list[SourceFile], list[str]]:
    numbers = range(lo, lo + count)
    files = [SourceFile(f"/synthetic/{i // 10000:05d}/{i:09d}.jpg", 1000 + i % 997, i, f"c{i % 997}") for i in numbers]
    return files, [hashlib.sha256(b"%d" % i).hexdigest() for i in range(lo, lo + count)]


def inject(coll: Collection, gen: Generator, first: int, n: int, log=None, bulk: bool = True) -> None:
    """Images #first..first+n (deterministic per block: a resumed run draws the same ones) into the catalogue;
    bulk: as one bulk load (the build), else as ordinary writes that keep every index (adding 1%)."""
    done = coll.catalog.counts()["ok"] if first == 0 else 0  # resume the build where it stopped
    if done >= n:
        return
    with coll.catalog.bulk() if bulk else contextlib.nullcontext():
        for lo in range(first + done - done % CHUNK, first + n, CHUNK):
            t = time.perf_counter()
            count = min(CHUNK, first + n - lo)
            x, _ = gen.chunk(lo // CHUNK, count)
            files, hashes = files_for(lo, count)
            coll.catalog.insert_done(files, hashes, x)
            if log:
                log(f"{lo + count - first} images, block {time.perf_counter() - t:.1f} s")


def build(args: argparse.Namespace) -> dict:
    root = Path(args.out)
    log = lambda msg: print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)  # noqa: E731
    if not gen_path(root).exists():
        make_generator(args.real, root)
    with np.load(gen_path(root)) as data:
        mean, components = data["mean"], data["components"]
    coll = Collection.open(root) if root.exists() else Collection.create(root, verify=False)
    with coll:
        if coll.catalog.projection() is None:  # the collection has its projection already (fitted on its first images)
            with coll.catalog.db:
                coll.catalog._set_projection(mean, components)
        coll.lock()
        try:
            t = time.perf_counter()
            if args.step in ("all", "inject"):
                inject(coll, generator(root, 0), 0, args.n, log)
            inject_s = time.perf_counter() - t
            log(f"injected in {inject_s:.0f} s")
            t = time.perf_counter()
            if args.step in ("all", "index"):
                coll.derived.update()
                coll.record_built()
            index_s = time.perf_counter() - t
        finally:
            coll.unlock()
        info = coll.info()
    size = du(root)
    return {"n": info["images"], "inject_s": round(inject_s), "index_s": round(index_s), "index": info["index_built"],
            "peak_rss_mb": rss_mb(), "disk_bytes": size, "bytes_per_image": round(size / max(1, info["images"]))}  # fmt: skip


def queries_of(root: Path, n: int, seed: int = 1) -> np.ndarray:
    """Stored-space query vectors (the same every run): fresh draws of the mixture."""
    return generator(root, seed).chunk(0, n)[0]


def truth_path(root: Path, seed: int) -> Path:
    """Where the exact top 10 of the queries drawn with this seed are cached (seed 1: PATH.truth.npz)."""
    return root.with_name(root.name + (".truth.npz" if seed == 1 else f".truth{seed}.npz"))


def truth(args: argparse.Namespace) -> dict:
    """Exact top-K over all reduced vectors, the stored vectors read in slot order a block at a time."""
    root = Path(args.measure_only)
    with Collection.open(root) as coll:
        snap = coll.derived.snapshot()
        queries = snap.space.from_stored(queries_of(root, args.queries, args.query_seed))
        rows = coll.catalog.db.execute("SELECT id, slot FROM images WHERE status = 'ok' ORDER BY slot").fetchall()
        ids, slots = np.array(rows, dtype=np.int64).T
        del rows
        file = coll.catalog.vector_file()
        best_s = np.full((len(queries), K), -np.inf, np.float32)
        best_i = np.full((len(queries), K), -1, np.int64)
        t = time.perf_counter()
        for start in range(0, len(ids), CHUNK):
            sims = queries @ snap.space.from_stored(file.read(slots[start : start + CHUNK])).T
            s = np.concatenate([best_s, sims], axis=1)
            i = np.concatenate([best_i, np.broadcast_to(ids[start : start + CHUNK], sims.shape)], axis=1)
            top = np.argpartition(-s, K, axis=1)[:, :K]
            best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
        np.savez(truth_path(root, args.query_seed), ids=best_i, state=state_of(coll))
    return {"images": len(ids), "exact_s": round(time.perf_counter() - t), "peak_rss_mb": rss_mb()}


def search(args: argparse.Namespace) -> dict:
    """Latency and recall@10 at the default nprobe, half and twice it (IVF lists visited: the speed/recall knob)."""
    root = Path(args.measure_only)
    stored = queries_of(root, args.queries, args.query_seed)
    with np.load(truth_path(root, args.query_seed)) as data:
        expected, state = data["ids"], data["state"]
    out: dict = {}
    with Collection.open(root) as coll:
        if not np.array_equal(state, state_of(coll)):
            raise SystemExit(f"{root} changed since its exact top 10 were computed: run --step truth first")
        snap = coll.derived.snapshot()
        if args.baseline:  # the search path before 2026-12-05: no kept reduced vectors, FAISS's own fast-scan choice
            snap.kept, index.FAST_SCAN_LONE_QUERY = None, 0
        ivf = index._ivf(snap.store.faiss_index)
        default = index.default_nprobe(ivf.nlist) if ivf is not None else 0
        out["index"], out["rss_after_open_mb"] = coll.derived.state()["index"], rss_mb()
        probes = [int(n) for n in args.nprobes.split(",")] if args.nprobes else (
            list(dict.fromkeys((default, max(1, default // 2), 2 * default))) if default else [0])  # fmt: skip
        refines = [int(r) for r in args.refine.split(",")] if args.refine else [index.refine_factor(snap.store.faiss_index)]
        if args.warm:  # other queries first, as a server that has run a while (the index's lists, the kept vectors)
            t = time.perf_counter()
            for q in queries_of(root, args.warm, seed=2):
                coll.search_vectors(snap.space.from_stored(q[None]), K, ["warm"], nprobe=default or None)
            out["warm_up"] = {"queries": args.warm, "s": round(time.perf_counter() - t, 1)}
        for nprobe, refine in ((n, r) for n in probes for r in refines):
            index.REFINE_FACTOR = index.FAST_SCAN_REFINE_FACTOR = refine  # candidates re-scored: refine x (k + 8)
            coll.search_vectors(snap.space.from_stored(stored[:3]), K, ["warm"] * 3, nprobe=nprobe or None)
            times, cpu, found = [], [], []
            for q in stored:
                t, c = time.perf_counter(), time.process_time()
                result = coll.search_vectors(snap.space.from_stored(q[None]), K, ["q"], nprobe=nprobe or None)
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)  # under load, the CPU a query used tells more than its wall time
                found.append([m.id for m in result[0].matches])
            recall = np.mean([len(set(f) & set(e.tolist())) / K for f, e in zip(found, expected, strict=True)])
            ms = np.array(times) * 1000
            p50, p99 = (round(float(np.percentile(ms, p)), 2) for p in (50, 99))
            cpu_p50, recall = round(float(np.percentile(cpu, 50)) * 1000, 2), round(float(recall), 4)
            key = f"nprobe_{nprobe}" + (f"_refine_{refine}" if args.refine else "")
            out[key] = {"p50_ms": p50, "p99_ms": p99, "cpu_p50_ms": cpu_p50, "recall_at_10": recall}
        out["peak_rss_searching_mb"] = rss_mb()
    return {"queries": len(stored), "default_nprobe": default, **out, "disk_bytes": du(root)}


def change(args: argparse.Namespace) -> dict:
    """Add 1% new images (then the index update), and remove 1% of the images, each timed whole."""
    root = Path(args.measure_only)
    gen = generator(root, 2)
    with Collection.open(root) as coll:
        n = coll.catalog.counts()["ok"]
        coll.lock()
        try:
            t = time.perf_counter()
            first = 10**9 + int(coll.catalog.meta("last_id") or 0)  # names never used before: the step can be re-run
            inject(coll, gen, first, n // 100, bulk=False)
            coll.derived.update()
            coll.record_built()
            add_s = time.perf_counter() - t
        finally:
            coll.unlock()
        doomed = coll.catalog.ok_ids()[::100][: n // 100]
        t = time.perf_counter()
        coll.remove_ids(doomed.tolist())
        remove_s = time.perf_counter() - t
        images = coll.catalog.counts()["ok"]
    return {"add_images": n // 100, "add_1pct_s": round(add_s, 1), "removed": len(doomed), "remove_1pct_s": round(remove_s, 1),
            "images_after": images, "disk_bytes_after": du(root)}  # fmt: skip


def state_of(coll: Collection) -> np.ndarray:
    """What the exact top 10 depend on: the images (their count, the last id given) and the PCA's generation."""
    return np.array([coll.catalog.counts()["ok"], int(coll.catalog.meta("last_id") or 0), coll.derived.state()["generation"]])


def rss_mb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", help="a real collection with a stored projection (to fit the mixture on; build only)")
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--out", default="/tmp/tenm/10m.ris", help="the collection to build")
    ap.add_argument("--measure-only", metavar="PATH", help="measure this built collection (truth, search, change)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--query-seed", type=int, default=1,
                    help="draw the measured queries with this seed (1: the set the defaults were chosen on; 2 is the warm-up)")
    ap.add_argument("--no-change", action="store_true", help="measure without adding and removing 1%%")
    ap.add_argument("--nprobes", help="search: IVF lists visited, comma-separated (default: the default, half, twice)")
    ap.add_argument("--refine", help="search: re-scoring factors to try, comma-separated (default: index.refine_factor)")
    ap.add_argument("--warm", type=int, default=300, help="search: other queries run first, untimed (0: a cold start)")
    ap.add_argument("--baseline", action="store_true",
                    help="search: as before 2026-12-05 (candidates re-scored from the catalogue; one thread a lone query)")
    ap.add_argument("--step", choices=("all", "inject", "index", "truth", "search", "change"), default="all")
    args = ap.parse_args()
    steps = {"truth": truth, "search": search, "change": change}
    if args.step in steps:
        print(json.dumps(steps[args.step](args)), flush=True)
        return
    if not args.measure_only:
        print(json.dumps(build(args)), flush=True)
        return
    out = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "load": os.getloadavg()[0]}
    for step in ("truth", "search") + (() if args.no_change else ("change",)):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--step", step], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{step} failed:\n{proc.stderr[-3000:]}")
        out[step] = {**json.loads(proc.stdout), "wall_s": round(time.perf_counter() - t)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
