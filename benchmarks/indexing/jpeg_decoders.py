"""Per-image cost of ris's JPEG decode (PIL draft + OpenCV resize) against simplejpeg's DCT-scaled decode.

    pip install simplejpeg && python benchmarks/indexing/jpeg_decoders.py CALTECH_DIR [--images 1000] [--rounds 3]

One process, one core, files read into memory first, both decoders interleaved per round (the
machine's noise hits both). Both include the SHA-256 that ris computes per file. Also reports how far
simplejpeg's pixels are from ris's: libjpeg-turbo scales by M/8 (not only 1/2, 1/4, 1/8), so a
500x360 photo is decoded at 5/8 scale before the resize instead of at full size — other pixels, not
wrong ones. The decode stage bounds the GPU run (issue 5): this says what a switch would buy.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import cv2
import numpy as np

from ris.images.decode import decode_bytes, read_file
from ris.tools.bench import machine


def simplejpeg_decode(data: bytes, size: int) -> np.ndarray:
    import simplejpeg

    hashlib.sha256(data).hexdigest()
    img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=size, min_width=size)
    return img if img.shape[:2] == (size, size) else cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    files = sorted(args.folder.glob("*/*.jpg"))
    files = files[:: max(1, len(files) // args.images)][: args.images]
    datas = [read_file(str(f)) for f in files]
    decoders = {"ris (PIL draft + cv2)": lambda d: decode_bytes(d, args.size).pixels,
                "simplejpeg (DCT-scaled) + cv2": lambda d: simplejpeg_decode(d, args.size)}  # fmt: skip
    ms: dict[str, list[float]] = {name: [] for name in decoders}
    for _ in range(args.rounds):
        for name, fn in decoders.items():
            start = time.perf_counter()
            for d in datas:
                fn(d)
            ms[name].append(1e3 * (time.perf_counter() - start) / len(datas))
    m = machine()
    print(f"{m['cpu']} ({', '.join(m['cpu_flags'])}), {len(datas)} Caltech JPEGs, {time.strftime('%Y-%m-%d %H:%M')}")
    for name, runs in ms.items():
        print(f"{name}: {min(runs):.3f} ms/image (best of {args.rounds}; all: {', '.join(f'{r:.3f}' for r in runs)})")
    base, new = (min(v) for v in ms.values())
    diffs = [np.abs(decode_bytes(d, args.size).pixels.astype(np.int16) - simplejpeg_decode(d, args.size)) for d in datas]
    print(f"speed-up {base / new:.2f}x; pixels: mean |diff| {np.mean([x.mean() for x in diffs]):.2f} grey levels, "
          f"{np.mean([x.max() > 20 for x in diffs]):.1%} of images with some pixel off by > 20")  # fmt: skip


if __name__ == "__main__":
    main()
