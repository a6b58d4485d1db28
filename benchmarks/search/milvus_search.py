"""Search latency with the vectors in Milvus against index.faiss, for the same collection.

    python benchmarks/search/milvus_search.py --collection PATH.ris [--queries 200] [-k 5]

The catalogue and PCA of an existing collection (PATH.ris, left untouched) are copied into new collections
that differ only in their store: the FAISS file (exact), milvus-lite FLAT (embedded), milvus-lite's own gRPC
server on loopback with FLAT and HNSW, and a real Milvus server (PyPI's `milvus` standalone, started as
tests/test_milvus_server.py starts it, from .venv-milvus or RIS_MILVUS_SERVER) with FLAT and HNSW. Each is
filled from the catalogue (`rebuild_index`, timed), then searched with --queries reduced vectors of indexed
images, one at a time (latency percentiles) and as one batch, through `Collection.search_vectors` (what
`ris search` and `ris serve` call after the model), by a reader that opened the collection afresh (as a `ris serve`
replica does); top-k ids are compared with the FAISS answers. writer_p50_ms: the writing process's own searches
right after its writes (20 queries; Milvus answers those with Strong consistency).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ris.collection import Collection


def copy_collection(src: Path, dest: Path, store: str, index: str = "auto") -> Collection:
    """A new collection at dest with src's catalogue and PCA, its vectors (re)built into `store`."""
    m = json.loads((src / "manifest.json").read_text())
    Collection.create(dest, model=m["model"], pooling=m["pooling"], precision=m["precision"], dims=m["pca_dims"],
                      store=store, index_factory=index).close()  # fmt: skip
    with sqlite3.connect(src / "catalog.sqlite") as source, sqlite3.connect(dest / "catalog.sqlite") as target:
        source.backup(target)
    if (src / "pca.npz").exists():
        shutil.copy2(src / "pca.npz", dest / "pca.npz")
    return Collection.open(dest)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def measure(coll: Collection, queries: np.ndarray, k: int) -> tuple[dict, list[list[int]]]:
    names = ["q"] * len(queries)
    coll.search_vectors(queries[:5], k, names[:5])  # warm-up: loads the index / the Milvus collection
    times = []
    for q in queries:
        start = time.perf_counter()
        coll.search_vectors(q[None], k, ["q"])
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    results = coll.search_vectors(queries, k, names)
    batch = time.perf_counter() - start
    ms = np.array(times) * 1000
    return (
        {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
         "batch_ms_per_query": round(batch * 1000 / len(queries), 3)},
        [[m.id for m in r.matches] for r in results],
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--collection", type=Path, required=True, help="An existing collection (only read).")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("-k", type=int, default=5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ris-milvus-bench-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(work / "server.db"),
                               "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL)  # fmt: skip
    time.sleep(3)
    setups = [("faiss (index.faiss, exact)", "", "auto"), ("milvus-lite FLAT", f"milvus-lite://{work / 'lite.db'}", "auto"),
              ("milvus-lite gRPC server FLAT", f"milvus://127.0.0.1:{port}", "FLAT"),
              ("milvus-lite gRPC server HNSW", f"milvus://127.0.0.1:{port}", "auto")]  # fmt: skip
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_milvus_server import milvus_server_command, start_milvus, stop_milvus

    real = None
    if command := milvus_server_command():
        (work / "real").mkdir()
        start = time.perf_counter()
        real, uri = start_milvus(command, work / "real")
        print(f"Milvus server ({command}) ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        setups += [("Milvus 2.3.5 server FLAT", uri, "FLAT"), ("Milvus 2.3.5 server HNSW", uri, "auto")]
    report, reference = [], None
    try:
        for n, (name, store, index) in enumerate(setups):
            coll = copy_collection(args.collection, work / f"c{n}.ris", store, index)
            start = time.perf_counter()
            coll.reindex()
            fill = time.perf_counter() - start
            rows, vectors = coll.vectors()
            pick = np.random.default_rng(0).choice(len(rows), min(args.queries, len(rows)), replace=False)
            # the writer's own searches (Milvus: Strong consistency after it wrote), then a reader's, as `ris serve`
            # replicas search (a fresh open: Bounded consistency)
            writer_p50 = measure(coll, vectors[pick[:20]], args.k)[0]["p50_ms"]
            coll.close()
            coll = Collection.open(work / f"c{n}.ris")
            figures, ids = measure(coll, vectors[pick], args.k)
            figures["writer_p50_ms"] = writer_p50
            reference = reference or ids
            agree = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids, reference, strict=True)])
            info = coll.info()
            coll.close()
            size = du(work / "lite.db") if "lite" in store else du(work / f"c{n}.ris" / "index.faiss") if not store else None
            report.append({"store": name, "images": info["images"], "dims": info["dims"], "index": info["index_built"],
                           "fill_s": round(fill, 2), **figures, "topk_agreement_with_faiss": round(float(agree), 4),
                           "bytes_per_image": round(size / info["images"]) if size else None})  # fmt: skip
    finally:
        server.terminate()
        server.wait(30)
        if real is not None:
            stop_milvus(real)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "queries": args.queries, "k": args.k,
                      "results": report}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
