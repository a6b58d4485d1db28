"""Run a FeatureNet fast where it runs: OpenVINO (or ONNX Runtime) on CPUs, PyTorch on GPUs.

On a CPU the graph is exported to ONNX once per (model, pooling, weights, precision) and cached.
`int8` is static QDQ quantization (ONNX Runtime's tools), calibrated on real photos (the bundled
sample set), per-channel weights. The default (EfficientNet-Lite0, grid3, int8) ships pre-built
(models.prebuilt): a first run only compiles it, without PyTorch. Preparing a model the first time
(export, calibration, compilation) reports its steps to `preparation_listener`s, so a command can
say what it is doing instead of showing a frozen progress bar. OpenVINO runs that same file about 1.3x faster than ONNX Runtime
end to end (Lite0 int8, 2 cores, `ris bench`: 335 vs 251 img/s, benchmarks/RESULTS.md), so it is the
CPU default when installed; RIS_CPU_RUNTIME=onnx picks ONNX Runtime.
"""

from __future__ import annotations

import glob
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .. import extras
from ..config import env
from ..errors import RisError
from ..files.atomic import replacing
from ..threads import cpu_threads
from . import registry as models

PRECISIONS = ("fp32", "int8", "bf16", "fp16")
#: OpenVINO streams an indexing run's batches go to (OpenVinoExtractor.submit): as many as batches in flight.
STREAMS = 2
DEVICES = ("auto", "cpu", "cuda")
#: bump when the exported graph or its quantization changes, to invalidate caches (4: calibrated on the
#: photos shipped in ris.samples instead of scikit-image's; 5: first conv in fp32, 7-bit weights in the
#: other dense convs, see quantize_int8)
EXPORT_VERSION = 5


class Extractor(Protocol):
    name: str
    input_size: int
    dim: int
    device: str

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...


def cuda_available() -> bool:
    """Whether PyTorch sees a CUDA GPU. On Linux without an NVIDIA device node the answer is known
    without importing PyTorch (1.4 s of a CLI search on a CPU machine)."""
    if sys.platform.startswith("linux") and "torch" not in sys.modules and not glob.glob("/dev/nvidia[0-9]*"):
        return False
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> str:
    """'auto' picks CUDA when PyTorch sees a GPU; asking for CUDA without one is a clear error."""
    if device not in DEVICES:
        raise RisError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    has_cuda = cuda_available() if device != "cpu" else False
    if device == "cuda" and not has_cuda:
        raise RisError("--device cuda asked for, but PyTorch sees no CUDA GPU (use --device cpu or auto)")
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    return device


def default_precision(device: str) -> str:
    """fp32 on CPUs (int8 is a collection's choice); bf16 autocast on GPUs, RIS_GPU_PRECISION overrides."""
    return env("RIS_GPU_PRECISION") if device == "cuda" else "fp32"


@dataclass(frozen=True)
class Preparing:
    """One step of a model's first-time preparation on this machine, for a progress display.

    step is "export", "calibrate", "compile" or, last, "ready" (with the seconds it all took). A step's
    start has total 0; then events with done/total follow where the step counts units (calibration batches).
    """

    model: str  # e.g. "efficientnet-lite0 (grid3, int8)"
    step: str
    index: int  # 1-based step number; steps: how many this preparation has
    steps: int
    done: int = 0
    total: int = 0
    seconds: float = 0.0


STEP_TEXT = {
    "export": "exporting the network to ONNX",
    "calibrate": "calibrating int8 on the sample photos",
    "compile": "compiling for this CPU (OpenVINO)",
}
_listeners: list[Callable[[Preparing], None]] = []


@contextmanager
def preparation_listener(listener: Callable[[Preparing], None]) -> Iterator[None]:
    """Have `listener` told about model preparations (export, calibration, compilation) while inside."""
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)


class _Preparation:
    """The steps one load_extractor call has to take, reported as they start (nothing when there are none)."""

    def __init__(self, model: str, steps: list[str]):
        self.model, self.steps, self.index, self.start = model, steps, 0, time.perf_counter()

    def _emit(self, step: str, done: int = 0, total: int = 0, seconds: float = 0.0) -> None:
        event = Preparing(self.model, step, self.index, len(self.steps), done, total, seconds)
        for listener in list(_listeners):
            listener(event)

    def begin(self, step: str) -> None:
        self.index += 1
        self._emit(step)

    def advance(self, done: int, total: int) -> None:
        self._emit(self.steps[self.index - 1], done, total)

    def finish(self) -> None:
        if self.steps:
            self._emit("ready", seconds=time.perf_counter() - self.start)


class OnnxExtractor:
    """ONNX Runtime on the CPU with a fixed thread budget (the decode workers get the rest)."""

    device = "cpu"

    def __init__(self, path: Path, name: str, input_size: int, dim: int, threads: int):
        ort = extras.require("onnxruntime", "the ONNX Runtime (RIS_CPU_RUNTIME=onnx)", "models")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        # Spinning threads steal the core a decode worker needs: measured 146 vs 129 img/s end to end.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.name, self.input_size, self.dim = name, input_size, dim

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(pixels)})[0]


class OpenVinoExtractor:
    """OpenVINO on the CPU, on the same ONNX file, compiled with a dynamic batch axis.

    One compiled model for every batch size: a static-shape compilation was 2% faster but computes
    differently (cosine down to 0.984 against the dynamic one), and an image must get the same
    features whether it was indexed in a batch of 32 or searched alone. Compiled models are cached on
    disk (a new process compiles in ~0.3 s instead of ~1 s). Calls are serialised: one infer request
    on every thread, for a query's latency; an indexing run's batches go to `submit` instead.
    """

    device = "cpu"

    def __init__(self, path: Path, name: str, input_size: int, dim: int, threads: int, precision: str):
        import openvino as ov

        core = ov.Core()
        cache = models.cache_dir() / "openvino"
        cache.mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache)})
        config = {
            "INFERENCE_NUM_THREADS": max(1, threads),
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,  # the decode workers share these cores
            # fp32 stays fp32 (OpenVINO would otherwise use bf16 where the CPU has it)
            **({"INFERENCE_PRECISION_HINT": "f32"} if precision == "fp32" else {}),
        }
        model = core.read_model(str(path))
        model.reshape({model.inputs[0].get_any_name(): [-1, input_size, input_size, 3]})
        self.request = core.compile_model(model, "CPU", config).create_infer_request()
        self.lock = threading.Lock()
        self.name, self.input_size, self.dim = name, input_size, dim
        self.streams = min(STREAMS, max(1, threads))
        # an indexing run's batches in flight: two queued behind the streams' own (see submit)
        self.in_flight = self.streams + 2 if self.streams > 1 else 1
        streamed = {**config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": self.streams}
        self._compile_streams = lambda: core.compile_model(model, "CPU", streamed)
        self._requests: list = []
        self._submitting = threading.Lock()
        self._fetch: list[Callable[[], np.ndarray]] = []
        self._turn = 0
        self._core, self._precision = core, precision

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:  # the request reuses its output buffer: copy before the next call
            return self.request.infer({0: np.ascontiguousarray(pixels)})[0].copy()

    def submit(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        """Start an indexing run's batch on `streams` streams of one thread each (compiled on first use), through
        the next of `in_flight` infer requests; the returned call waits for its features (the pipeline keeps
        `in_flight` batches submitted, ris.extract.pipeline).

        With every thread on one request, a thread that the decode worker or the writer took its core from
        keeps the others waiting at each layer; a stream of one thread runs on alone. Full Caltech-101 on 2
        cores (AMD EPYC Zen 4): 27.2-27.4 s instead of 28.8-29.5 (`ris bench`), the same features to the bit.
        Two requests more than streams wait in OpenVINO's queue, so a stream that ends a batch starts the next
        at once, not when the main thread, which projects, hashes signatures and hands batches to the writer on
        cores the streams share, comes back to submit: 24.2-26.5 s instead of 25.2-26.7 (the same machine, same
        features to the bit; one more request only: 24.7-26.8 s)."""
        if self.streams < 2 or len(pixels) < 2:
            out = self(pixels)
            return lambda: out
        with self._submitting:  # not self.lock: a query must not wait for an indexing run's batch
            if not self._requests:
                compiled = self._compile_streams()
                self._requests = [compiled.create_infer_request() for _ in range(self.in_flight)]
                self._fetch = [lambda: np.zeros((0, self.dim), np.float32)] * self.in_flight
            slot = self._turn % self.in_flight
            self._turn += 1
            self._fetch[slot]()  # the batch it ran before, kept before the request is reused
            request = self._requests[slot]
            request.start_async({0: np.ascontiguousarray(pixels)})  # inputs are copied (share_inputs=False)
            kept: list[np.ndarray] = []
            once = threading.Lock()  # one caller copies the output; the request is reused only after that

            def fetch() -> np.ndarray:
                with once:
                    if not kept:
                        request.wait()
                        kept.append(request.get_output_tensor(0).data.copy())
                return kept[0]

            self._fetch[slot] = fetch
            return fetch

    def projecting(self, current: Callable[[], Any]) -> ProjectingOpenVino:
        """This extractor, delivering an indexing run's features projected by whatever `current()` returns at each
        batch (a ris.vectors.reduce.Projection, or None: raw features), as ris.model.torch_runtime does on a GPU."""
        return ProjectingOpenVino(self, current)


class ProjectingOpenVino:
    """An OpenVINO extractor's batches projected onto the collection's fitted axes by OpenVINO itself: one MatMul,
    compiled once the projection exists, on one thread, in bfloat16 where the CPU has it (as the int8 model's
    own layers are) and the collection's model is not fp32; the rows it takes are the projection's `centred` ones.

    On the writer's thread NumPy took 11.4 ms for a batch of 32 (11,520 -> 1,024); this 4.9 ms (AMD EPYC Zen 4,
    AVX-512 BF16; 8.6 in fp32): ~1.4 core-seconds of a 2-core Caltech-101 run. The rows are centred in float32;
    the product's error (~0.2% of the largest value) is the stored bfloat16's own.
    Queries go through the original extractor and keep getting raw features."""

    def __init__(self, base: OpenVinoExtractor, current: Callable[[], Any]):
        self.base, self._current = base, current
        self._projector: tuple[Any, Any] | None = None  # (projection, infer request)
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.base, name)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._project(self.base(pixels))

    def submit(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        fetch, kept = self.base.submit(pixels), []

        def projected() -> np.ndarray:
            if not kept:
                kept.append(self._project(fetch()))
            return kept[0]

        return projected

    def _project(self, raw: np.ndarray) -> np.ndarray:
        projection = self._current()
        if projection is None or not len(raw):
            return raw
        with self._lock:
            if self._projector is None or self._projector[0] is not projection:
                self._projector = (projection, self._compile(projection.components))
            return self._projector[1].infer({0: np.ascontiguousarray(projection.centred(raw), np.float32)})[0].copy()

    def _compile(self, components: np.ndarray) -> Any:
        import openvino as ov
        from openvino import opset13 as ops

        rows = ops.parameter([-1, components.shape[1]], np.float32)
        product = ops.matmul(rows, ops.constant(np.ascontiguousarray(components, np.float32)), False, True)
        config = {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1, "ENABLE_CPU_PINNING": False,
                  "INFERENCE_PRECISION_HINT": "f32" if self.base._precision == "fp32" else "bf16"}  # fmt: skip
        return self.base._core.compile_model(ov.Model([product], [rows]), "CPU", config).create_infer_request()


def has_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_runtime() -> str:
    """The CPU runtime for new collections: OpenVINO when installed, else ONNX Runtime.

    RIS_CPU_RUNTIME=onnx|openvino chooses. A collection records its runtime and keeps it, so its
    queries get features from the same kernels as its images.
    """
    wanted = env("RIS_CPU_RUNTIME")
    return wanted or ("openvino" if has_openvino() else "onnx")


def export_onnx(net, input_size: int, path: Path) -> None:
    """Trace the FeatureNet to ONNX with a dynamic batch axis; written atomically."""
    import torch

    warnings.filterwarnings("ignore", module="torch.onnx")
    warnings.filterwarnings("ignore", message="Constant folding")
    # the poolings read the map's size as Python ints: constants by design (a model has one input size)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    dummy = torch.zeros(2, input_size, input_size, 3, dtype=torch.uint8)
    with replacing(path, ".onnx") as tmp:
        torch.onnx.export(
            net.float().to(memory_format=torch.contiguous_format), (dummy,), str(tmp),
            input_names=["pixels"], output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17, dynamo=False,
        )  # fmt: skip


CALIBRATION_IMAGES = 64
CALIBRATION_BATCH = 16


def calibration_batches(input_size: int, count: int = CALIBRATION_IMAGES, batch: int = CALIBRATION_BATCH) -> Iterator[np.ndarray]:
    """Real photos (the bundled samples) under crops and flips: what int8 scales are fitted to."""
    from ..images.decode import resize
    from ..tools.demo import sample_images

    rng = np.random.default_rng(0)
    images = [img for _, img in sample_images()]
    out: list[np.ndarray] = []
    for i in range(count):
        img = images[i % len(images)]
        w, h = img.size
        if i >= len(images):
            fx, fy = rng.uniform(0.5, 0.9, size=2)
            x0, y0 = int(rng.uniform(0, 1 - fx) * w), int(rng.uniform(0, 1 - fy) * h)
            img = img.crop((x0, y0, x0 + int(fx * w), y0 + int(fy * h)))
            if rng.random() < 0.5:
                img = img.transpose(0)  # mirror
        out.append(resize(img, input_size))
        if len(out) == batch:
            yield np.stack(out)
            out = []
    if out:
        yield np.stack(out)


def _int8_plan(fp32_path: Path) -> tuple[list[str], dict[str, list[dict]]]:
    """(nodes left in fp32, weight overrides) that keep int8 faithful on CPUs without VNNI.

    Those CPUs (AVX2, e.g. this project's AMD EPYC) multiply u8 activations by s8 weights with
    vpmaddubsw, which adds products in pairs into int16 and saturates: with 8-bit weights the features
    fell to cosine 0.86 (mean; min 0.57) to fp32, while the same file computed exactly (fake-quantized)
    gave 0.99. Pairs stay in range with 7-bit weights, which dense convs (group 1) get here; depthwise
    convs do not saturate and keep 8 bits (7 there cost precision: 0.93 vs 0.94 with the stem alone
    fixed). The first conv, whose inputs are raw pixels and which saturated worst, runs in fp32: cheap
    (3 input channels) and more faithful than 7 bits (0.980 vs 0.973). Measured on 204 Caltech-101 images.
    """
    import onnx

    convs = [n for n in onnx.load(str(fp32_path), load_external_data=False).graph.node if n.op_type == "Conv"]
    group = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in convs}
    overrides = {n.input[1]: [{"reduce_range": True, "axis": 0}] for n in convs[1:] if group[n.name] == 1}
    return [convs[0].name], overrides


def quantize_int8(fp32_path: Path, path: Path, input_size: int, progress: Callable[[int, int], None] | None = None) -> None:
    """Static QDQ int8, per-channel weights, calibrated on real images; written atomically.

    Every op type is quantized: quantizing only Conv/MatMul left float islands between QDQ pairs,
    which was both slower (159 vs 328 img/s) and less faithful. The first conv stays fp32 and the
    other dense convs get 7-bit weights (_int8_plan: int16 saturation on CPUs without VNNI).
    progress(done, total) is called as calibration batches are consumed.
    """
    quantization = extras.require("onnxruntime.quantization", "int8 calibration of a model ris does not ship", "models")
    from onnxruntime.quantization.shape_inference import quant_pre_process

    total = -(-CALIBRATION_IMAGES // CALIBRATION_BATCH)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = calibration_batches(input_size)
            self.done = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            if progress:  # asked for batch n+1: n are done
                progress(self.done if batch is not None else total, total)
            self.done += 1
            return None if batch is None else {"pixels": batch}

    with replacing(path, ".onnx") as tmp:
        pre = tmp.with_name(f"{tmp.name}.pre.onnx")  # the shape-inferred fp32 model quantize_static reads
        try:
            quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
            fp32_nodes, overrides = _int8_plan(pre)
            quantization.quantize_static(
                str(pre), str(tmp), Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8, weight_type=quantization.QuantType.QInt8,
                nodes_to_exclude=fp32_nodes, extra_options={"TensorQuantOverrides": overrides},
            )  # fmt: skip
        finally:
            pre.unlink(missing_ok=True)


def onnx_model_path(name: str, pooling: str, weights_sha: str, precision: str) -> Path:
    root = models.cache_dir() / "onnx"
    root.mkdir(exist_ok=True)
    return root / f"{name}-{pooling}-{weights_sha[:16]}-v{EXPORT_VERSION}-{precision}.onnx"


def model_file(name: str, pooling: str, digest: str, precision: str) -> Path:
    """The ONNX file a CPU runtime runs: the shipped one where it matches, else its place in the cache."""
    shipped = models.prebuilt(name, pooling, precision, digest, EXPORT_VERSION)
    return shipped or onnx_model_path(name, pooling, digest, precision)


def export_model(name: str, pooling: str, weights: str | None, digest: str, precision: str,
                 prep: _Preparation | None = None) -> Path:  # fmt: skip
    """model_file(), exported (and calibrated for int8) into the cache first when it is not there.

    prep: where to report the "export" and "calibrate" steps as they start.
    """
    path = model_file(name, pooling, digest, precision)
    if path.exists():
        return path
    input_size = models.get_spec(name).input_size
    fp32 = onnx_model_path(name, pooling, digest, "fp32")
    if not fp32.exists():
        if prep:
            prep.begin("export")
        net, _ = models.build(name, pooling, weights)
        export_onnx(net, input_size, fp32)
    if precision == "int8":
        if prep:
            prep.begin("calibrate")
        quantize_int8(fp32, path, input_size, progress=prep.advance if prep else None)
    return path


def _compiled_marker(path: Path, threads: int, precision: str) -> Path:
    """A file saying OpenVINO compiled this model here once (its cache then holds the compiled blob)."""
    import openvino

    version = re.sub(r"[^\w.-]", "_", openvino.__version__)  # e.g. 2026.4.1-22982-e213a147257-releases/2026/4
    return models.cache_dir() / "openvino" / f"{path.stem}-ov{version}-t{threads}-{precision}.compiled"


def _steps(name: str, pooling: str, digest: str, precision: str, runtime: str, threads: int) -> list[str]:
    """What preparing this model still takes on this machine (nothing when all of it is cached)."""
    path = model_file(name, pooling, digest, precision)
    steps = []
    if not path.exists():
        if not onnx_model_path(name, pooling, digest, "fp32").exists():
            steps.append("export")
        if precision == "int8":
            steps.append("calibrate")
    if runtime == "openvino" and not _compiled_marker(path, threads, precision).exists():
        steps.append("compile")
    return steps


def load_extractor(
    name: str = models.DEFAULT_MODEL,
    pooling: str = models.DEFAULT_POOLING,
    weights: str | None = None,
    device: str = "auto",
    precision: str | None = None,
    runtime: str | None = None,
    threads: int | None = None,
) -> tuple[Extractor, str]:
    """The fastest runner for this machine, and the weights' SHA-256 (recorded in the manifest).

    runtime: 'openvino' or 'onnx' (CPU; see cpu_runtime) or 'torch' (GPU default; also the eager baseline on CPU).
    A first call for a model on this machine reports its preparation to the preparation listeners.
    """
    spec = models.get_spec(name)
    device = resolve_device(device)
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise RisError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    runtime = runtime or ("torch" if device == "cuda" else cpu_runtime())
    if runtime == "openvino" and not has_openvino():
        runtime = "onnx"  # same ONNX file, features within ~0.997 cosine
    if runtime in ("onnx", "openvino") and device != "cpu":
        raise RisError(f"the {runtime} runtime runs on the CPU here; use --device cpu or the torch runtime")
    if runtime in ("onnx", "openvino") and precision not in ("fp32", "int8"):
        raise RisError(f"precision {precision} needs a GPU; on the CPU use fp32 or int8")
    if runtime == "torch" and precision == "int8":
        raise RisError("int8 runs through OpenVINO / ONNX Runtime on the CPU (--device cpu)")
    pooling = pooling if spec.pooled else "fc2"
    dim = models.feature_dims(name, pooling)
    if runtime == "torch":
        import torch

        from .torch_runtime import TorchExtractor

        net, digest = models.build(name, pooling, weights)
        if device == "cpu":
            torch.set_num_threads(threads or cpu_threads())
        return TorchExtractor(net, name, spec.input_size, dim, device, precision), digest
    # a shipped or cached export needs only the weights' digest: no network built, no PyTorch imported
    threads = threads or cpu_threads()
    digest = models.weights_digest(name, weights)
    prep = _Preparation(f"{name} ({pooling}, {precision})", _steps(name, pooling, digest, precision, runtime, threads))
    path = export_model(name, pooling, weights, digest, precision, prep)
    extractor: Extractor
    if runtime == "openvino":
        if "compile" in prep.steps:
            prep.begin("compile")
        extractor = OpenVinoExtractor(path, name, spec.input_size, dim, threads, precision)
        _compiled_marker(path, threads, precision).touch()
    else:
        extractor = OnnxExtractor(path, name, spec.input_size, dim, threads)
    prep.finish()
    return extractor, digest
