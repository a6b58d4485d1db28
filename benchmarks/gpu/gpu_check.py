"""GPU checks for `ris` (run on a CUDA machine): GPU vs CPU features, GPU decode, utilisation.

Usage: python benchmarks/gpu/gpu_check.py IMAGES_DIR OUT_JSON
Prints and writes: per-image cosine between the GPU path (nvJPEG decode + bf16 autocast) and the CPU
path (PIL decode + ONNX Runtime fp32) for the same files, and how many files each decoder took.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

from ris.extract import pipeline as extract
from ris.files.sources import scan
from ris.model import runtime


def features(items, ext, size: int) -> dict[int, np.ndarray]:
    got: dict[int, np.ndarray] = {}

    def keep(batch, feats):
        for image_id, sha in batch.ok:
            got[image_id] = feats[sha]

    extract.run(items, ext, size, keep, batch_size=64, workers=4)
    return got


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    files = [f.path for f in scan([folder])][::7][:512]
    items = list(enumerate(files))
    result: dict = {"gpu": torch.cuda.get_device_name(0), "images": len(items)}
    for model in ("efficientnet-lite0",):
        gpu, _ = runtime.load_extractor(model, device="cuda")
        cpu, _ = runtime.load_extractor(model, device="cpu", precision="fp32", threads=8)
        start = time.perf_counter()
        fg = features(items, gpu, 224)
        result[f"{model}_gpu_s"] = round(time.perf_counter() - start, 3)
        fc = features(items, cpu, 224)
        common = sorted(set(fg) & set(fc))
        a = np.stack([fg[i] for i in common])
        b = np.stack([fc[i] for i in common])
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        result[model] = {"compared": len(common), "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                         "share_below_0.99": float((cos < 0.99).mean())}  # fmt: skip
    print(json.dumps(result, indent=1))
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
