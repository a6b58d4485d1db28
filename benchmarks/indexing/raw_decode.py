"""What a camera RAW file costs to decode into model input, against the same photo as a JPEG, in one run.

Usage: python benchmarks/indexing/raw_decode.py PHOTO [--megapixels 24] [--rounds 5]
The RAW files are DNGs written by the tests' writer (tests/rawfiles.py: a 12-bit Bayer mosaic, uncompressed, as
many cameras' DNGs are) at the given sensor size: without a preview (developed at half size), with a 1,620-px
preview (as many cameras embed) and with a full-size one. Prints the median ms per file (JSON), hashing included.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

from ris.images.decode import decode_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.rawfiles import dng  # noqa: E402 (the tests' DNG writer: one writer of test RAW files)


def _ms(data: bytes, rounds: int) -> float:
    decode_bytes(data, 224)  # LibRaw's import and first use are not the steady cost
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        decode_bytes(data, 224)
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("photo")
    ap.add_argument("--megapixels", type=float, default=24)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    src = Image.open(args.photo).convert("RGB")
    # dng() writes a mosaic of twice the photo's size: a photo of a quarter of the sensor's pixels
    scale = (args.megapixels * 1e6 / 4 / (src.width * src.height)) ** 0.5
    photo = src.resize((round(src.width * scale), round(src.height * scale)), Image.Resampling.BICUBIC)
    jpeg = io.BytesIO()
    photo.resize((photo.width * 2, photo.height * 2)).save(jpeg, "JPEG", quality=92)
    files = {
        "jpeg (the same photo at the sensor's size, quality 92)": jpeg.getvalue(),
        "dng, developed (no preview)": dng(photo),
        "dng, 1,620-px preview": dng(photo, preview=1620),
        "dng, full-size preview": dng(photo, preview=2 * max(photo.size)),
    }
    out = {"sensor": f"{photo.width * 2} x {photo.height * 2}", "ms_per_file": {}, "mb_per_file": {}}
    for name, data in files.items():
        out["ms_per_file"][name] = _ms(data, args.rounds)
        out["mb_per_file"][name] = round(len(data) / 1e6, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
