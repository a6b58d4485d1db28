"""The extraction pipeline's writer under load: extract.run with a stand-in model (random features of
--dims, no model work), so decoding, hand-off and the catalogue's commits are all that run.

Usage: python benchmarks/catalogue/pipeline_writer.py FOLDER [--dims 11520] [--workers 14] [--batch-size 256]
Variants in one run: as ris runs it; without the main thread's per-batch lookup of known hashes (a second
SQLite connection reading while the writer commits); without commits (what the rest can carry); with half
the decode workers; with 1,280-d features; with decoding stood in too (each worker reads and hashes its files as
ris does, then copies one image decoded beforehand into the batch's slot): what the hand-off, the main thread and the
writer carry when decoding costs nothing, i.e. whether anything but decoding would hold a GPU.
Compare the write stage with benchmarks/catalogue/commit_throughput.py (the same commits with nothing else running).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from commit_throughput import pooled_like  # this folder (run as a script)

from ris.extract import pipeline as extract
from ris.files.sources import scan
from ris.images.decode import decode_file, read_file
from ris.vectors.catalog import Catalog


class StandIn:
    """Features at once, drawn beforehand: the model costs nothing (drawing pooled-like features per batch took the main
    thread ~30 us an image), so the rest of the pipeline is what is timed."""

    device = "cpu"

    def __init__(self, dims: int, batch: int):
        rng = np.random.default_rng(0)
        self.drawn = [pooled_like(rng, (batch, dims)) for _ in range(4)]
        self.calls = 0

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.drawn[self.calls % len(self.drawn)][: len(pixels)]


_DECODE_JOB = extract._decode_job
_DECODED: dict[str, np.ndarray] = {}  # the one image the stood-in decoding copies, made before the workers fork


def _read_and_copy(job: tuple) -> tuple:
    """extract._decode_job without the decoding: the file read and hashed, the prepared pixels copied to the slot."""
    image_id, path, _, run, slot, row = job
    start = time.perf_counter()
    sha = hashlib.sha256(read_file(path)).hexdigest()
    extract._SLOTS[run][slot, row] = _DECODED["pixels"]
    return image_id, sha, None, None, time.perf_counter() - start


def one_run(files, dims: int, workers: int, batch: int, lookup: bool = True, write: bool = True,
            decode: bool = True) -> dict:  # fmt: skip
    extract._decode_job = _DECODE_JOB if decode else _read_and_copy
    with tempfile.TemporaryDirectory() as tmp:
        cat = Catalog(Path(tmp) / "catalog.sqlite")
        cat.sync(files)
        todo = cat.pending()
        start = time.perf_counter()
        commit = (lambda b, f: cat.commit_batch(b.ok, f, b.failed)) if write else (lambda b, f: None)
        times = extract.run(todo, StandIn(dims, batch), 224, commit,
                            known=cat.known_hashes if lookup else (lambda hashes: set()),
                            batch_size=batch, workers=workers)  # fmt: skip
        wall = time.perf_counter() - start
        cat.close()
    extract._decode_job = _DECODE_JOB
    return {"dims": dims, "workers": workers, "lookup": lookup, "write": write, "decode": decode, "images": len(todo),
            "wall_s": round(wall, 2), "images_per_s": round(len(todo) / wall), "write_s": round(times.write, 2),
            "waiting_for_writer_s": round(times.backlog, 2), "waiting_for_decode_s": round(times.wait, 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("--dims", type=int, default=11520)
    ap.add_argument("--workers", type=int, default=14)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    files = scan([args.folder])
    files = files[: args.limit] if args.limit else files
    _DECODED["pixels"] = decode_file(files[0].path, 224).pixels
    variants = [  # as ris runs; no hash lookup; no commits (the rest's capacity); half the workers; 1,280-d; no decoding
        (args.dims, args.workers, True, True, True), (args.dims, args.workers, False, True, True),
        (args.dims, args.workers, True, False, True), (args.dims, max(1, args.workers // 2), True, True, True),
        (1280, args.workers, True, True, True), (args.dims, args.workers, True, True, False),
    ]  # fmt: skip
    for dims, workers, lookup, write, decode in variants:
        print(json.dumps(one_run(files, dims, workers, args.batch_size, lookup, write, decode)), flush=True)


if __name__ == "__main__":
    main()
