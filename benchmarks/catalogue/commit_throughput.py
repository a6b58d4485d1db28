"""How fast the catalogue takes extracted features: Catalog.commit_batch alone, batches of 256.

Usage: python benchmarks/catalogue/commit_throughput.py [--dims 1024] [--images 18000] [--dir /tmp]
Random float vectors of `dims` dimensions (the default descriptor's stored vector: grid3 features projected
to 1,024-d, ris.vectors.reduce; stored as bfloat16; 11,520 = a small collection's raw grid3 features) for fresh images,
committed as the extraction's writer thread commits them, then a final WAL checkpoint (the copy into the main file),
timed together. Tells a slow disk (or fsync) from a slow pipeline: compare with `ris bench`'s write stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ris.files.sources import SourceFile
from ris.vectors.catalog import Catalog


def pooled_like(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random features with magnitudes spread over 1e-7..1, as pooled features' are (dark cells ~1e-6)."""
    return (rng.random(shape) * 10.0 ** rng.uniform(-7, 0, shape)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, default=1024)
    ap.add_argument("--images", type=int, default=18000)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--injected", action="store_true", help="Catalog.insert_done in a bulk load (features given, no files)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cat = Catalog(Path(tmp) / "catalog.sqlite")
        if args.injected:
            return report(args, injected(cat, args))
        with cat.db:
            cat.db.executemany("INSERT INTO images (path, size, mtime_ns, label, status) VALUES (?, 1, 1, 'x', 'pending')",
                               [(f"/img/{i}.jpg",) for i in range(args.images)])  # fmt: skip
        ids = [r[0] for r in cat.db.execute("SELECT id FROM images ORDER BY id")]
        feats = pooled_like(np.random.default_rng(0), (256, args.dims))
        start = time.perf_counter()
        for s in range(0, len(ids), 256):
            ok = [(i, hashlib.sha256(str(i).encode()).hexdigest()) for i in ids[s : s + 256]]  # random keys, as real hashes
            cat.commit_batch(ok, {sha: feats[k] for k, (_, sha) in enumerate(ok)}, [])
        cat.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        seconds = time.perf_counter() - start
        cat.close()
    report(args, seconds)


def injected(cat: Catalog, args: argparse.Namespace) -> float:
    """Seconds for the same images through insert_done (rows written 'ok' at once), blocks of 4,096, one bulk load."""
    feats = pooled_like(np.random.default_rng(0), (4096, args.dims))
    start = time.perf_counter()
    with cat.bulk():
        for s in range(0, args.images, 4096):
            n = min(4096, args.images - s)
            files = [SourceFile(f"/img/{i}.jpg", 1, 1, "x") for i in range(s, s + n)]
            cat.insert_done(files, [hashlib.sha256(str(i).encode()).hexdigest() for i in range(s, s + n)], feats[:n])
    cat.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    seconds = time.perf_counter() - start
    cat.close()
    return seconds


def report(args: argparse.Namespace, seconds: float) -> None:
    rate = args.images / seconds
    mb_per_s = round(rate * args.dims * 2 / 1e6)
    print(json.dumps({"dims": args.dims, "images": args.images, "injected": args.injected, "dir": args.dir,
                      "seconds": round(seconds, 2), "images_per_s": round(rate), "mb_per_s": mb_per_s}))  # fmt: skip


if __name__ == "__main__":
    main()
