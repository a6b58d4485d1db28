"""PyTorch as a runtime: the GPU path (bf16 autocast, channels-last, CUDA graphs, asynchronous batches)
and the eager baseline on CPUs. Imported only when PyTorch runs the model.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import env


@dataclass
class TorchExtractor:
    """Eager PyTorch: channels-last, inference mode, autocast to bf16/fp16 on GPUs."""

    net: torch.nn.Module
    name: str
    input_size: int
    dim: int
    device: str = "cpu"
    precision: str = "fp32"
    #: On a GPU, JPEGs can be decoded there (nvJPEG, RIS_DECODE=device); measured on an H200 with 16 cores,
    #: CPU worker processes fed the model faster (3,108 vs 1,276 img/s end to end), so they are the default.
    decode_on_device: bool = field(default_factory=lambda: env("RIS_DECODE") == "device")
    channels_last: bool = field(default_factory=lambda: env("RIS_CHANNELS_LAST") == "1")

    #: On a GPU the forward pass is captured once per batch shape as a CUDA graph and replayed: eager
    #: launching of Lite0's ~200 modules took ~15 ms of CPU a batch (more than the GPU's 13 ms for 256
    #: images) and held the GIL the writer thread needs. RIS_CUDA_GRAPHS=0 runs eagerly.
    cuda_graphs: bool = field(default_factory=lambda: env("RIS_CUDA_GRAPHS") == "1")

    def __post_init__(self) -> None:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.net.channels_last = self.channels_last
        self.net = self.net.to(self.device, memory_format=fmt).eval()
        self._largest = 0
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._projection_of: Callable[[], Any] = lambda: None
        self._projection: tuple[Any, torch.Tensor, torch.Tensor] | None = None
        if self.device == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick the fastest kernels

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with (
            torch.inference_mode(),
            torch.autocast(self.device, dtype=dtype or torch.float32, enabled=bool(dtype), cache_enabled=False),
        ):
            return self.net(pixels).float()

    def _graph(self, like: torch.Tensor, size: int):
        """The forward pass captured for batches of `size` (after warm-up runs on a side stream, as
        PyTorch's CUDA-graph recipe asks), or None where capture fails (eager from then on)."""
        if size not in self._graphs:
            try:
                static_in = like.new_zeros((size, *like.shape[1:]))
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(2):
                        self._forward(static_in)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_out = self._forward(static_in)
                self._graphs[size] = (graph, static_in, static_out)
            except RuntimeError as exc:
                warnings.warn(f"CUDA graph capture failed ({exc}); running eagerly", stacklevel=2)
                self.cuda_graphs = False
                return None
        return self._graphs[size]

    def run_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC tensor already on the device -> float32 features on the device.

        On a GPU a short batch is padded to the largest batch seen: cuDNN's autotuner (benchmark
        mode) would otherwise tune every new shape again, which cost seconds per run (and each shape
        would need a graph of its own).
        """
        n = len(pixels)
        if self.device != "cuda":
            return self._forward(pixels)
        self._largest = max(self._largest, n)
        captured = self._graph(pixels, self._largest) if self.cuda_graphs else None
        if captured is not None:
            graph, static_in, static_out = captured
            static_in[:n].copy_(pixels)  # rows past n keep stale images: their outputs are dropped
            graph.replay()
            return static_out[:n].clone()  # the next replay overwrites static_out
        if n < self._largest:
            pixels = torch.cat([pixels, pixels.new_zeros((self._largest - n, *pixels.shape[1:]))])
        return self._forward(pixels)[:n]

    def projecting(self, current: Callable[[], Any]) -> TorchExtractor:
        """This extractor, delivering features already projected by whatever `current()` returns at each batch
        (a ris.vectors.reduce.Projection, or None: raw features).

        On a GPU the stage-1 projection is one small matrix product there, where on the host it cost the writer
        thread ~3 GFLOP a batch of 256 (grid3), more than the model's own time per batch, and the features cross
        to the host at a eleventh of their width. A view: the network and its CUDA graphs are shared, and query
        extraction through the original keeps getting raw features.
        """
        view = copy.copy(self)
        view._projection_of, view._projection = current, None
        return view

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        """ris.vectors.reduce.Projection's formula on the device: unit rows, centred, onto the fitted axes."""
        projection = self._projection_of()
        if projection is None:
            return features
        if self._projection is None or self._projection[0] is not projection:
            mean = torch.from_numpy(projection.mean).to(features.device)
            axes = torch.from_numpy(projection.components.T.copy()).to(features.device)
            self._projection = (projection, mean, axes)
        _, mean, axes = self._projection
        return (torch.nn.functional.normalize(features, dim=1, eps=1e-12) - mean) @ axes

    def register_host_memory(self, buffer: np.ndarray) -> Callable[[], None]:
        """Page-lock a buffer the decode workers fill (CUDA only): batches in it then copy to the GPU
        asynchronously, without a staging copy on the main thread. Returns the undo (which first waits
        for the GPU: a copy may still be reading the buffer)."""
        if self.device != "cuda":
            return lambda: None
        cudart = torch.cuda.cudart()
        try:
            if int(cudart.cudaHostRegister(buffer.ctypes.data, buffer.nbytes, 0)) != 0:
                return lambda: None
        except (AttributeError, RuntimeError, TypeError):  # no binding: the staging copy it is
            return lambda: None

        def release() -> None:
            torch.cuda.synchronize()
            cudart.cudaHostUnregister(buffer.ctypes.data)

        return release

    def submit(self, pixels: np.ndarray | torch.Tensor) -> Callable[[], np.ndarray]:
        """Start the forward pass; the returned call waits for the features.

        On a GPU everything is queued asynchronously (copy in from pinned memory, forward, copy out to
        pinned memory), so the caller can decode and submit the next batch while this one runs.
        """
        tensor = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
        if self.device != "cuda":
            out = self._project(self.run_tensor(tensor)).numpy()
            return lambda: out
        if tensor.device.type != "cuda":
            tensor = (tensor if tensor.is_pinned() else tensor.pin_memory()).to("cuda", non_blocking=True)
        out = self._project(self.run_tensor(tensor))
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def result() -> np.ndarray:
            done.synchronize()
            return host.numpy()

        return result

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        return self.submit(pixels)()
