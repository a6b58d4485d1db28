"""GPU-host probe: SQLite commit speed on /tmp vs /dev/shm, and a profile of one `Collection.index` run.

Usage: python benchmarks/gpu/gpu_probe.py [FOLDER]   (default /tmp/imgs, as made by gpu_run.sh; needs CUDA)

The commit test writes one fake 1280-d feature per file with an idle main thread: compared with the
writer's time inside a real run it shows how much the writer waits for the GIL rather than the disk.
The profile (all threads, cumulative and own time) shows the serial costs around extraction.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ris.collection import Collection
from ris.files.sources import scan
from ris.vectors.catalog import Catalog


def commit_seconds(folder: str, root: str) -> float:
    """Seconds to commit one feature per file of `folder` into a catalogue under `root`, 256 at a time."""
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        cat = Catalog(Path(tmp) / "c.sqlite")
        cat.sync(scan([folder]))
        todo = cat.pending()
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for i in range(0, len(todo), 256):
            ok = [(image_id, f"{image_id:064x}") for image_id, _ in todo[i : i + 256]]
            cat.commit_batch(ok, {sha: rng.random(1280, dtype=np.float32) for _, sha in ok}, [])
        seconds = time.perf_counter() - start
        cat.close()
        return round(seconds, 3)


def profile_index(folder: str) -> None:
    files = [f.path for f in scan([folder])]
    with tempfile.TemporaryDirectory() as tmp:
        coll = Collection.create(Path(tmp) / "b.ris")
        coll.extractor("cuda")(np.zeros((256, 224, 224, 3), np.uint8))  # load and warm up, untimed
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        report = coll.index(files, batch_size=256, workers=14, device="cuda")
        profiler.disable()
        wall = time.perf_counter() - start
        print("index", len(files), "wall", round(wall, 2), "img/s", round(len(files) / wall), report.times.as_dict())
        for order, lines in (("cumulative", 40), ("tottime", 20)):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(lines)
            print(out.getvalue())
        coll.close()


def main() -> None:
    folder = sys.argv[1] if len(sys.argv) > 1 else "/tmp/imgs"
    print("commit one feature per file: /tmp", commit_seconds(folder, "/tmp"), "s; /dev/shm",
          commit_seconds(folder, "/dev/shm"), "s", flush=True)  # fmt: skip
    profile_index(folder)


if __name__ == "__main__":
    main()
