"""Every environment knob of ris in one table: name, default, allowed values, and what it does.

Code reads a knob only through `env(name)`, which checks it against the table (a bad value is one clear
error naming the knob), so this table is also the documentation (`docs/configuration.md` is written from it:
`ris settings`). Collection options (model, pooling, DBA, ...) are not here: they are
`ris.manifest.Options`, recorded per collection.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .errors import RisError


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    help: str
    choices: tuple[str, ...] = ()  # empty: any value (a path, a number, a secret)


SETTINGS: tuple[Setting, ...] = (
    Setting("RIS_CACHE_DIR", "", "Exported models, compiled OpenVINO blobs and downloaded weights (default: "
            "$XDG_CACHE_HOME/ris or ~/.cache/ris)."),  # fmt: skip
    Setting("RIS_CPU_RUNTIME", "", "CPU runtime of new collections: openvino (default where installed) or onnx "
            "(ONNX Runtime); a collection keeps the runtime it was built with.", ("", "openvino", "onnx")),  # fmt: skip
    Setting("RIS_GPU_PRECISION", "bf16", "Model precision on a CUDA GPU.", ("bf16", "fp16", "fp32")),
    Setting("RIS_CHANNELS_LAST", "1", "Channels-last tensors on the GPU.", ("0", "1")),
    Setting("RIS_CUDA_GRAPHS", "1", "Replay the GPU forward pass as a CUDA graph.", ("0", "1")),
    Setting("RIS_DECODE", "cpu", "device: decode JPEGs on the GPU (nvJPEG) instead of CPU worker processes.", ("cpu", "device")),
    Setting("RIS_SEARCH_DEVICE", "auto", "Where exact searches run: auto (a CUDA GPU for large ones), cpu or cuda.",
            ("auto", "cpu", "cuda")),  # fmt: skip
    Setting("RIS_SEARCH_DTYPE", "float32", "Vectors resident on the GPU: float32 (exact) or float16 (half the memory).",
            ("float32", "float16")),  # fmt: skip
    Setting("RIS_MILVUS_TOKEN", "", "user:password (or token) of a Milvus server; never written to the manifest."),
    Setting("RIS_MAX_FILE_MB", "100", "The largest file read, in megabytes (checked before reading; larger files are skipped "
            "with a reason, a larger query is refused)."),  # fmt: skip
    Setting("RIS_TOKEN", "", "`ris serve --token`: enables add/remove over the REST API."),
    Setting("RIS_KEYPOINT_CACHE_MB", "256", "Memory for indexed images' keypoints kept between searches (geometric "
            "verification; ~20 KB an image). `ris serve` fills it after start (slowly under load), then indexes them "
            "for keypoint votes (as much memory again); 0: none kept."),  # fmt: skip
)
_BY_NAME = {s.name: s for s in SETTINGS}


def env(name: str) -> str:
    """The knob's value (its default when unset or empty), checked against its allowed values."""
    setting = _BY_NAME[name]
    value = os.environ.get(name, "") or setting.default
    if setting.choices and value not in setting.choices:
        allowed = ", ".join(c for c in setting.choices if c)
        raise RisError(f"{name}={value!r} is not one of: {allowed}")
    return value


def megabytes(name: str, zero: bool = False) -> int:
    """The knob as a number of megabytes, in bytes: a positive number (or 0, where zero is allowed)."""
    raw = env(name).strip()
    try:
        mb = float(raw)
    except ValueError:
        mb = -1.0
    if not (math.isfinite(mb) and (mb > 0 or (zero and mb == 0))):
        kind = "number of megabytes (or 0)" if zero else "positive number of megabytes"
        raise RisError(f"{name} must be a {kind}, not {raw!r}")
    return int(mb * 2**20)


def markdown() -> str:
    """The table as docs/configuration.md shows it."""
    rows = [f"| `{s.name}` | {s.default or '—'} | {', '.join(c for c in s.choices if c) or 'any'} | {s.help} |" for s in SETTINGS]
    return "| variable | default | values | what it does |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
