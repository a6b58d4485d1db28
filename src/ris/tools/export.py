"""`ris export`: a collection's vectors and metadata in formats other tools read without ris.

npy: a folder with features.npy (the reduced float32 vectors the index compares), stored_vectors.npy
(what the catalogue keeps per image, float32: the model's raw features in a small collection, their
stage-1 projection in a larger one; see ris.vectors.reduce), ids.npy, metadata.jsonl (id, path, label, sha256; one line
per row, in the arrays' order) and a copy of manifest.json. parquet: one file with columns id, path, label,
sha256, vector (list<float32>), the manifest in the schema metadata. Files are written to a
temporary name and renamed, so an interrupted export never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import RisError
from ..extras import install_hint
from ..files.atomic import write_with
from ..vectors.catalog import displayed

FORMATS = ("npy", "parquet")


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    write_with(path, write)


def export_npy(coll, out: Path) -> Path:
    """Write the npy folder; returns it."""
    if out.exists() and not out.is_dir():
        raise RisError(f"{out} exists and is not a folder (npy export writes a folder)")
    rows, vectors = coll.vectors()
    ids = np.array([r.id for r in rows], dtype=np.int64)
    stored = coll.catalog.vectors(ids)
    out.mkdir(parents=True, exist_ok=True)
    _save_npy(out / "features.npy", np.ascontiguousarray(vectors, dtype=np.float32))
    _save_npy(out / "stored_vectors.npy", stored)
    _save_npy(out / "ids.npy", ids)
    lines = "".join(json.dumps({"id": r.id, "path": r.path, "label": r.label, "sha256": r.sha256}) + "\n" for r in rows)
    write_with(out / "metadata.jsonl", lambda tmp: tmp.write_text(lines, encoding="utf-8"))
    write_with(out / "manifest.json", lambda tmp: shutil.copyfile(coll.path / "manifest.json", tmp))
    return out


def export_parquet(coll, out: Path) -> Path:
    """Write one parquet file; returns it."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RisError(f"parquet export needs pyarrow, which is not installed: {install_hint('parquet')}") from None
    if out.is_dir():
        raise RisError(f"{out} is a folder; parquet export writes one file (e.g. --out vectors.parquet)")
    rows, vectors = coll.vectors()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dims = vectors.shape if len(rows) else (0, coll.manifest.dims)
    offsets = pa.array(np.arange(0, n * dims + 1, dims, dtype=np.int32) if n else np.zeros(1, np.int32))
    table = pa.table({
        "id": pa.array([r.id for r in rows], type=pa.int64()),
        "path": pa.array([displayed(r.path) for r in rows], type=pa.string()),  # names that are not UTF-8: \xNN
        "label": pa.array([displayed(r.label) for r in rows], type=pa.string()),
        "sha256": pa.array([r.sha256 for r in rows], type=pa.string()),
        "vector": pa.ListArray.from_arrays(offsets, pa.array(vectors.ravel(), type=pa.float32())),
    })  # fmt: skip
    table = table.replace_schema_metadata({"ris_manifest": (coll.path / "manifest.json").read_text()})
    out.parent.mkdir(parents=True, exist_ok=True)
    write_with(out, lambda tmp: pq.write_table(table, tmp))
    return out


def export(coll, out: str | os.PathLike, fmt: str = "npy") -> Path:
    """Export the collection's searchable images to `out` in `fmt` (npy or parquet)."""
    if fmt not in FORMATS:
        raise RisError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return (export_npy if fmt == "npy" else export_parquet)(coll, Path(out))

