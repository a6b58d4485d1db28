"""`ris bench`: end-to-end indexing throughput beside the tutorial's loop, measured in the same run.

Ours: image files on disk -> features in a fresh collection (scan, decode workers, batched model,
SQLite commits, PCA, FAISS index), timed as a whole and per stage. The baseline is the tutorial's
method on the same model and images: one image at a time, PIL load + resize, one forward per image
in eager fp32 (PyTorch, or the tutorial's Keras loop itself with --baseline keras).
"""

from __future__ import annotations

import importlib
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import RisError
from ..files.sources import scan
from ..model import registry as models, runtime

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def machine() -> dict[str, Any]:
    """CPU model and the flags that decide kernel choice, cores, GPU: printed with every figure."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    torch = _module("torch")  # an extra: the default install has none
    gpu = torch.cuda.get_device_name(0) if torch is not None and torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_flags": [f for f in INTERESTING_FLAGS if f in flags],
        "cores": runtime.cpu_threads(),
        "gpu": gpu,
        "torch": None if torch is None else torch.__version__,
        **{name: _version(name) for name in ("openvino", "onnxruntime")},
        "python": platform.python_version(),
    }


def _module(name: str) -> Any:
    """The module, or None when it cannot be imported (an extra that is not installed)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def _version(package: str) -> str | None:
    """An installed package's version; None when it is not installed (onnxruntime is an extra)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


class GpuUtilisation:
    """Samples the GPU's busy percentage (NVML) every 50 ms while the timed run goes on."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuUtilisation:
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (CPU machine, or no nvidia-ml-py): nothing to sample
            return self

        def sample() -> None:
            while not self._stop.wait(0.05):
                self.samples.append(int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def mean(self) -> float | None:
        steady = self.samples[len(self.samples) // 5 :]  # drop the ramp-up
        return round(sum(steady) / len(steady), 1) if steady else None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tutorial_loop(files: list[str], model: str, weights: str | None, device: str) -> float:
    """The tutorial's extraction: per image, PIL load + resize, one eager fp32 forward. Images/s."""
    import torch

    spec = models.get_spec(model)
    net, _ = models.build(model, models.DEFAULT_POOLING, weights)
    net = net.to(device).eval()
    size = spec.input_size
    with torch.inference_mode():
        net(torch.zeros(1, size, size, 3, dtype=torch.uint8, device=device))  # warm-up, as Keras' first predict
        start = time.perf_counter()
        for path in files:
            img = Image.open(path).convert("RGB").resize((size, size), Image.Resampling.NEAREST)  # keras load_img
            x = torch.from_numpy(np.array(img))[None].to(device)
            net(x).cpu().numpy()
        return len(files) / (time.perf_counter() - start)


def check_baseline(baseline: str, weights: str | None) -> None:
    """Refuse a baseline that cannot run here before the long indexing run, not after it."""
    if baseline == "keras":
        if _module("keras") is None:
            raise RisError("--baseline keras needs TensorFlow/Keras installed (pip install tensorflow-cpu)")
        if not weights or not models.is_hdf5(weights):
            raise RisError("--baseline keras needs --baseline-weights vgg16_weights_tf_dim_ordering_tf_kernels.h5")
    elif baseline == "torch":
        if _module("torch") is None:
            raise RisError("--baseline torch needs PyTorch (pip install 'ris[torch]'); or --baseline keras, or none")
    elif baseline != "none":
        raise RisError(f"--baseline is torch, keras or none, not {baseline!r}")


def keras_loop(files: list[str], weights: str | None) -> float:
    """The tutorial's own code path: Keras VGG16 up to fc2, one `predict` per image. Images/s."""
    import keras
    from keras.applications.vgg16 import VGG16, preprocess_input

    base = VGG16(weights=weights, include_top=True)
    feat = keras.Model(inputs=base.input, outputs=base.get_layer("fc2").output)
    load = keras.utils.load_img
    feat.predict(np.zeros((1, 224, 224, 3), np.float32), verbose=0)
    start = time.perf_counter()
    for path in files:
        x = preprocess_input(np.expand_dims(keras.utils.img_to_array(load(path, target_size=(224, 224))), 0))
        feat.predict(x, verbose=0)
    return len(files) / (time.perf_counter() - start)


def run_bench(
    folder: str,
    *,
    model: str = models.DEFAULT_MODEL,
    weights: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    limit: int | None = None,
    baseline: str = "torch",
    baseline_limit: int = 100,
    baseline_weights: str | None = None,
    pooling: str = models.DEFAULT_POOLING,
) -> dict[str, Any]:
    """Index `folder` into a throwaway collection and run the baseline on a prefix of the same files."""
    from ..collection import Collection

    check_baseline(baseline, baseline_weights or weights if baseline == "keras" else weights)
    files = [f.path for f in scan([folder])]
    if limit:
        files = files[:: max(1, len(files) // limit)][:limit]  # spread over every class, not the first few
    dev = runtime.resolve_device(device)
    precision = precision or ("int8" if dev == "cpu" else "fp32")
    with tempfile.TemporaryDirectory(prefix="ris-bench-") as tmp:
        coll = Collection.create(Path(tmp) / "bench.ris", weights, model=model, pooling=pooling, precision=precision)
        load_start = time.perf_counter()
        ext = coll.extractor(dev)  # export / quantize / upload once, outside the timed run
        size = models.get_spec(model).input_size
        ext(np.zeros((batch_size, size, size, 3), np.uint8))  # and warm up (cuDNN autotuning) likewise
        load_s = time.perf_counter() - load_start
        start = time.perf_counter()
        with GpuUtilisation() as gpu_busy:
            report = coll.index(files, batch_size=batch_size, workers=workers, device=dev)
        wall = time.perf_counter() - start
        ours_rss = peak_rss_mb()
        coll.close()
    sample = files[:: max(1, len(files) // baseline_limit)][:baseline_limit]
    if baseline == "keras":  # always the tutorial's VGG16, whatever model ours runs
        base_rate = keras_loop(sample, baseline_weights or weights)
    elif baseline == "torch":
        base_rate = tutorial_loop(sample, model, weights, dev)
    else:
        base_rate, sample = None, []
    ours = len(files) / wall
    t = report.times
    return {
        "model": model,
        "pooling": pooling if models.get_spec(model).pooled else "fc2",
        "precision": precision if dev == "cpu" else "bf16 autocast",
        "device": dev,
        "images": len(files),
        "indexed": report.images,
        "skipped": report.skipped,
        "seconds": round(wall, 2),
        "images_per_s": round(ours, 1),
        "baseline": {"keras": "the tutorial's Keras VGG16 fc2 loop (1 predict per image)", "none": None}.get(
            baseline, f"tutorial loop on {model} (eager PyTorch fp32, 1 image per forward)"),
        "baseline_images": len(sample),
        "baseline_images_per_s": None if base_rate is None else round(base_rate, 2),
        "ratio": None if base_rate is None else round(ours / base_rate, 1),
        "stages_s": {"read+decode (worker-seconds)": round(t.decode, 2), "model": round(t.model, 2),
                     "write": round(t.write, 2), "model waiting for decode": round(t.wait, 2),
                     "model waiting for the writer": round(t.backlog, 2),
                     "scan+pca+index (rest)": round(wall - t.wall, 2)},  # fmt: skip
        "model_load_s": round(load_s, 2),
        "batch_size": batch_size,
        "peak_rss_mb": round(ours_rss, 0),
        "gpu_util_pct": gpu_busy.mean(),
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
