"""How to split 2 cores between decode workers and the model: extraction only (no SQLite), per setting.

Usage: python benchmarks/indexing/pipeline_split.py IMAGE_DIR [--images 960]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ris.extract import pipeline as extract
from ris.model import runtime
from ris.tools.bench import machine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--images", type=int, default=960)
    args = ap.parse_args()
    items = list(enumerate(sorted(str(p) for p in args.folder.glob("*/*.jpg"))[: args.images]))
    print(f"# {machine()['cpu']}, {len(items)} images, efficientnet-lite0 GeM int8")
    print("| ORT threads | decode workers | batch | img/s | model s | decode worker-s | model waited s |")
    print("|---|---|---|---|---|---|---|")
    for threads, workers, batch in ((2, 1, 32), (2, 2, 32), (2, 1, 64), (1, 1, 32)):
        ext, _ = runtime.load_extractor(device="cpu", precision="int8", threads=threads)
        t = extract.run(items, ext, 224, lambda batch_, feats: None, batch_size=batch, workers=workers)
        print(f"| {threads} | {workers} | {batch} | {len(items) / t.wall:.0f} | {t.model:.2f} | {t.decode:.2f} | {t.wait:.2f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
