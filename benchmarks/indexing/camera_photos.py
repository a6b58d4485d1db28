"""A folder of camera-sized photos made from Caltech-101's, for indexing figures where decoding is the bound.

Usage: python benchmarks/indexing/camera_photos.py CALTECH_DIR OUT [--count 240] [--format jpeg|heic] [--thumbnail]
Each photo is a Caltech image at 4032 x 3024 (a phone's 12 MP, 4:3) with sensor-like noise (Gaussian, sigma 5), so
that it compresses as a camera's does: JPEG quality 92 (~2.4 MB) or HEIC quality 80 (~3.7 MB), with a 320-px
embedded thumbnail as phones write one when --thumbnail. Then time `ris index OUT` (RESULTS.md section 2).
"""

from __future__ import annotations

import argparse
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from pillow_heif import register_heif_opener

SIZE = (4032, 3024)


def _make(job: tuple[int, str, str, str, bool]) -> None:
    i, src, out, fmt, thumbnail = job
    img = Image.open(src).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
    noise = np.random.default_rng(i).normal(0, 5, (SIZE[1], SIZE[0], 3))
    photo = Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))
    if fmt == "heic":
        photo.save(Path(out) / f"IMG_{i:04d}.HEIC", quality=80, thumbnails=[320] if thumbnail else [])
    else:
        photo.save(Path(out) / f"IMG_{i:04d}.jpg", quality=92)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("caltech")
    ap.add_argument("out")
    ap.add_argument("--count", type=int, default=240)
    ap.add_argument("--format", choices=["jpeg", "heic"], default="jpeg")
    ap.add_argument("--thumbnail", action="store_true", help="HEIC only: embed a 320-px thumbnail")
    args = ap.parse_args()
    register_heif_opener()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p) for p in Path(args.caltech).glob("*/image_000[1-3].jpg"))[: args.count]
    jobs = [(i, src, args.out, args.format, args.thumbnail) for i, src in enumerate(sources)]
    with ProcessPoolExecutor() as pool:
        list(pool.map(_make, jobs, chunksize=4))
    print(f"{len(jobs)} photos in {args.out}")


if __name__ == "__main__":
    main()
