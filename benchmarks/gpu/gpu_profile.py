"""Where a GPU run spends its time (run on a CUDA machine; JSON to argv[2]).

Model only: lite0 and vgg16 at batch 256 on uint8 input already on the GPU, per precision and
memory format. Decoding: nvJPEG batch decode + resize vs PIL in CPU worker processes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

from ris.images import decode
from ris.model import registry as models, torch_runtime


def model_only(name: str, precision: str, channels_last: bool, batch: int = 256, iters: int = 20) -> float:
    net, _ = models.build(name, weights=os.environ.get("VGG_WEIGHTS") if name == "vgg16" else None)
    ext = torch_runtime.TorchExtractor(net, name, 224, 0, "cuda", precision, channels_last=channels_last)
    size = models.get_spec(name).input_size
    x = torch.randint(0, 255, (batch, size, size, 3), dtype=torch.uint8, device="cuda")
    for _ in range(3):
        ext.run_tensor(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        ext.run_tensor(x)
    torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - start)


def _pil(path: str):
    return decode.decode_file(path, 224).pixels


def main() -> None:
    folder, out = sys.argv[1], sys.argv[2]
    files = sorted(str(p) for p in Path(folder).rglob("*.jpg"))[:4096]
    res: dict = {"gpu": torch.cuda.get_device_name(0)}
    for name in ("efficientnet-lite0", "vgg16"):
        for precision in ("bf16", "fp16", "fp32"):
            for cl in (True, False):
                key = f"model_{name}_{precision}_{'cl' if cl else 'nchw'}"
                try:
                    res[key] = round(model_only(name, precision, cl), 1)
                except Exception as exc:  # noqa: BLE001 - record and go on
                    res[key] = f"failed: {exc}"[:200]
                print(key, res[key], flush=True)
    datas = [Path(f).read_bytes() for f in files]
    for bs in (256,):
        decode.decode_jpegs_on_device(datas[:bs], 224, "cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(datas), bs):
            decode.decode_jpegs_on_device(datas[i : i + bs], 224, "cuda")
        torch.cuda.synchronize()
        res["decode_nvjpeg_img_s"] = round(len(datas) / (time.perf_counter() - start), 1)
    for workers in (8, 14):
        with mp.get_context("fork").Pool(workers) as pool:
            pool.map(_pil, files[:256], chunksize=16)
            start = time.perf_counter()
            pool.map(_pil, files, chunksize=16)
            res[f"decode_pil_{workers}proc_img_s"] = round(len(files) / (time.perf_counter() - start), 1)
    print(json.dumps(res, indent=1), flush=True)
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    main()
