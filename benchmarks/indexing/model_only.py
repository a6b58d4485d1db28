"""ONNX Runtime throughput of the cached EfficientNet-Lite0 exports alone (no decoding), and int8 fidelity.

Usage: python benchmarks/indexing/model_only.py CALTECH_DIR [--threads 2]
Per pooling x precision: img/s at batch 32 and 64 on 256 real images already decoded; then the cosine of
int8 to fp32 features on 200 images (every 45th file).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ris.images.decode import decode_file
from ris.model import runtime
from ris.tools.bench import machine


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    files = sorted(str(p) for p in args.folder.glob("*/*.jpg"))
    pixels = np.stack([decode_file(f, 224).pixels for f in files[::30][:256]])
    m = machine()
    print(f"# {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, ORT threads {args.threads}")
    print("| pooling | precision | batch 32 | batch 64 |\n|---|---|---|---|")
    for pooling in ("avg", "gem"):
        for precision in ("int8", "fp32"):
            ext, _ = runtime.load_extractor(pooling=pooling, precision=precision, device="cpu", threads=args.threads)
            rates = []
            for bs in (32, 64):
                ext(pixels[:bs])
                start = time.perf_counter()
                for i in range(0, len(pixels), bs):
                    ext(pixels[i : i + bs])
                rates.append(len(pixels) / (time.perf_counter() - start))
            print(f"| {pooling} | {precision} | {rates[0]:.0f} | {rates[1]:.0f} |", flush=True)
    sample = np.stack([decode_file(f, 224).pixels for f in files[::45][:200]])
    for pooling in ("gem", "avg"):
        fp32, _ = runtime.load_extractor(pooling=pooling, precision="fp32", device="cpu")
        int8, _ = runtime.load_extractor(pooling=pooling, precision="int8", device="cpu")
        c = cosine(int8(sample), fp32(sample))
        print(f"{pooling}: int8 vs fp32 cosine on {len(sample)} images: mean {c.mean():.4f}, min {c.min():.4f}")


if __name__ == "__main__":
    main()
