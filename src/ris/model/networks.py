"""The networks, in PyTorch: what `models.build` assembles for each registered model.

Every model is wrapped as a `FeatureNet`: uint8 NHWC pixels in, one float32 vector per image out.
Normalisation lives inside the network, so decode workers ship compact uint8 arrays and the same
graph runs in PyTorch (GPU) and, exported once, in OpenVINO / ONNX Runtime (CPU). Kept apart from the
registry (`models`) so that a CPU process running a cached export never imports PyTorch (1.4 s).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .. import extras
from ..errors import RisError
from .registry import (
    CAFFE_MEAN_BGR,
    GEM_P,
    GRID_CELLS,
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    KERAS_CONV_LAYERS,
    POOLINGS,
    RMAC_LEVELS,
    VGG16_CFG,
    is_hdf5,
    lite_weights_path,
    resolve_vgg16_weights,
    weights_digest,
)


class FeatureNet(nn.Module):
    """uint8 NHWC -> normalised float NCHW -> backbone -> (B, D) features."""

    def __init__(self, backbone: nn.Module, mean: list[float], std: list[float], bgr: bool = False):
        super().__init__()
        self.backbone = backbone
        self.bgr = bgr
        self.channels_last = True  # faster for plain convs on CPUs and tensor cores; see benchmarks
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).to(self.mean.dtype)
        if self.bgr:
            x = x.flip(1)
        x = (x - self.mean) / self.std
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return self.backbone(x.contiguous(memory_format=fmt))


class PooledConv(nn.Module):
    """A convolutional trunk's last feature map pooled to one vector (average, GeM, R-MAC or an n x n grid)."""

    def __init__(self, trunk: Callable[[torch.Tensor], torch.Tensor], pooling: str):
        super().__init__()
        if pooling not in POOLINGS:
            raise RisError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.trunk = trunk
        self.pooling = pooling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(x).float()
        if self.pooling == "gem":
            return _gem(fmap)
        if self.pooling == "rmac":
            return regional_gem(fmap)
        if self.pooling in GRID_CELLS:
            return grid_gem(fmap, GRID_CELLS[self.pooling])
        return fmap.mean(dim=(2, 3))


def _gem(fmap: torch.Tensor, p: float = GEM_P) -> torch.Tensor:
    return fmap.clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def rmac_regions(h: int, w: int, levels: int = RMAC_LEVELS) -> list[tuple[int, int, int]]:
    """(top, left, side) of the R-MAC regions of an h x w map: the whole map's square, then finer grids."""
    regions = []
    for level in range(1, levels + 1):
        side = max(1, min(h, w, round(2 * min(h, w) / (level + 1))))
        tops = sorted({round(t) for t in np.linspace(0, h - side, level)}) if level > 1 else [(h - side) // 2]
        lefts = sorted({round(t) for t in np.linspace(0, w - side, level)}) if level > 1 else [(w - side) // 2]
        regions += [(t, left, side) for t in tops for left in lefts]
    return regions


def regional_gem(fmap: torch.Tensor) -> torch.Tensor:
    """R-MAC with GeM regions: the sum of the L2-normalised GeM vectors of the map's regions (the map
    is one region among them), so a crop of an image shares regions with the image itself."""
    h, w = int(fmap.shape[2]), int(fmap.shape[3])
    cubed = fmap.clamp(min=1e-6).pow(GEM_P)  # once for the whole map; each region only averages it
    out = 0
    for top, left, side in rmac_regions(h, w):
        v = cubed[:, :, top : top + side, left : left + side].mean(dim=(2, 3)).pow(1.0 / GEM_P)
        out = out + v / v.norm(dim=1, keepdim=True).clamp(min=1e-6)
    return out


def grid_gem(fmap: torch.Tensor, n: int = 2, p: float = GEM_P) -> torch.Tensor:
    """GeM vectors of the cells of an n x n grid on the map (side ceil(h/n), spread evenly: on a 7x7 map
    n=2 gives 4x4 cells overlapping on the middle row and column, n=3 3x3 cells overlapping on two),
    concatenated row by row, left to right: the layout kept, n*n times the size."""
    h, w = int(fmap.shape[2]), int(fmap.shape[3])
    sh, sw = -(-h // n), -(-w // n)
    tops = [round(t) for t in np.linspace(0, h - sh, n)]
    lefts = [round(t) for t in np.linspace(0, w - sw, n)]
    dy, dx = max(1, tops[-1] // max(1, n - 1)), max(1, lefts[-1] // max(1, n - 1))
    if tops == list(range(0, n * dy, dy)) and lefts == list(range(0, n * dx, dx)):
        # evenly spaced (7x7: n=2 and n=3): one pooling pass, the power taken once per map position
        cells = F.avg_pool2d(fmap.clamp(min=1e-6).pow(p), (sh, sw), (dy, dx)).pow(1.0 / p)
        return cells.permute(0, 2, 3, 1).flatten(1)
    return torch.cat([_gem(fmap[:, :, t : t + sh, left : left + sw], p) for t in tops for left in lefts], dim=1)


# --- EfficientNet-Lite ---------------------------------------------------------------------------


def _build_lite(name: str, pooling: str, weights: str | None) -> tuple[nn.Module, str]:
    EfficientNet = extras.require("efficientnet_lite_pytorch", f"building {name}", "torch").EfficientNet

    path = weights or lite_weights_path(name)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line; ours is a --json stdout
        net = EfficientNet.from_pretrained(name, weights_path=path)
    trunk = PooledConv(net.extract_features, pooling)
    trunk.net = net  # register as a submodule so .to()/.eval() reach it
    return FeatureNet(trunk, mean=[127.0] * 3, std=[128.0] * 3), weights_digest(name, str(path))


# --- VGG16 ---------------------------------------------------------------------------------------


class VGG16(nn.Module):
    """torchvision's VGG16 layout (so its state dict loads as is); forward returns fc2 after ReLU."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = int(item)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 1000),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier[:5](x)  # fc1, relu, dropout, fc2, relu: Keras' "fc2" output


def conv_indices() -> list[int]:
    return [i for i, m in enumerate(VGG16().features) if isinstance(m, nn.Conv2d)]


def _h5_layer_arrays(h5file, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of one Keras layer, whatever the Keras version's dataset naming."""
    group = h5file[layer]
    names = [n.decode() if isinstance(n, bytes) else n for n in group.attrs.get("weight_names", [])]
    if not names:
        found: list[str] = []
        group.visit(lambda n: found.append(n) if hasattr(group[n], "shape") else None)
        names = sorted(found, key=lambda n: ("bias" in n or "_b" in n, n))
    arrays = [np.asarray(group[n]) for n in names]
    kernel = next(a for a in arrays if a.ndim > 1)
    bias = next(a for a in arrays if a.ndim == 1)
    return kernel, bias


def keras_vgg16_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Map Keras' channels-last VGG16 weights onto the torchvision layout.

    Conv kernels go (kh, kw, in, out) -> (out, in, kh, kw). fc1's rows are in Keras' flatten order
    (h, w, c) and must be permuted to PyTorch's (c, h, w); dense kernels are transposed.
    """
    import h5py

    state: dict[str, torch.Tensor] = {}
    with h5py.File(path, "r") as h5:
        root = h5["model_weights"] if "model_weights" in h5 else h5
        for idx, layer in zip(conv_indices(), KERAS_CONV_LAYERS, strict=True):
            kernel, bias = _h5_layer_arrays(root, layer)
            state[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
            state[f"features.{idx}.bias"] = torch.from_numpy(bias.copy())
        kernel, bias = _h5_layer_arrays(root, "fc1")
        fc1 = kernel.reshape(7, 7, 512, -1).transpose(2, 0, 1, 3).reshape(512 * 49, -1)
        state["classifier.0.weight"] = torch.from_numpy(np.ascontiguousarray(fc1.T))
        state["classifier.0.bias"] = torch.from_numpy(bias.copy())
        for layer, idx in (("fc2", 3), ("predictions", 6)):
            kernel, bias = _h5_layer_arrays(root, layer)
            state[f"classifier.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.T))
            state[f"classifier.{idx}.bias"] = torch.from_numpy(bias.copy())
    return state


def load_vgg16(weights: str | None) -> tuple[VGG16, bool, str]:
    """(network, weights are Keras', weights SHA-256)."""
    path = resolve_vgg16_weights(weights)
    keras = is_hdf5(path)
    if keras:
        extras.require("h5py", "VGG16 weights in Keras' .h5 format", "keras")
    try:
        state = keras_vgg16_state_dict(path) if keras else torch.load(path, map_location="cpu", weights_only=True)
        net = VGG16()
        net.load_state_dict(state)
    except Exception as exc:  # pickle, h5py and shape errors alike mean "not usable weights"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise RisError(f"{path} is not a VGG16 weights file (torchvision .pth or Keras .h5): {reason}") from None
    return net, keras, weights_digest("vgg16", str(path))


def _build_vgg16(name: str, pooling: str, weights: str | None) -> tuple[nn.Module, str]:
    net, keras, digest = load_vgg16(weights)
    if keras:  # Keras 'caffe' preprocessing: BGR, mean subtracted, no scaling
        return FeatureNet(net, mean=CAFFE_MEAN_BGR, std=[1.0] * 3, bgr=True), digest
    return FeatureNet(net, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB), digest


BUILDERS: dict[str, Callable[[str, str, str | None], tuple[nn.Module, str]]] = {
    "lite": _build_lite,
    "vgg16": _build_vgg16,
}
