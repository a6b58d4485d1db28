"""How fast the decode stage alone can feed a model: `extract.decoded_batches` with no model behind it.

Usage: python benchmarks/indexing/decode_throughput.py FOLDER [--workers 14] [--batch-size 256] [--limit N]
Prints images/s and the worker-seconds per image (JSON). On a GPU host this is the ceiling for CPU
decoding; compare it with the model alone (benchmarks/gpu/gpu_profile.py) to see which one limits a run.
"""

from __future__ import annotations

import argparse
import json
import time

from ris.extract import pipeline as extract
from ris.files.sources import scan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    files = [f.path for f in scan([args.folder])]
    files = files[: args.limit] if args.limit else files
    times = extract.StageTimes()
    start = time.perf_counter()
    n = sum(len(b.ok) + len(b.failed) for b in extract.decoded_batches(
        list(enumerate(files)), args.size, args.batch_size, args.workers, times))  # fmt: skip
    wall = time.perf_counter() - start
    print(json.dumps({"images": n, "workers": args.workers, "batch_size": args.batch_size,
                      "images_per_s": round(n / wall, 1), "worker_ms_per_image": round(1000 * times.decode / n, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
