"""`ris export` on the real subset collection: what other tools read back equals what ris searches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ris.collection import Collection
from ris.errors import RisError
from ris.tools.export import export

from .conftest import PER_CLASS, SUBSET_CLASSES, run_cli


def test_npy_folder_holds_vectors_ids_and_metadata(subset_collection: Path, tmp_path: Path) -> None:
    out = tmp_path / "npy"
    proc = run_cli("export", "-c", str(subset_collection), "--format", "npy", "--out", str(out))
    assert f"exported {len(SUBSET_CLASSES) * PER_CLASS} images" in proc.stderr
    features, stored, ids = (np.load(out / f"{n}.npy") for n in ("features", "stored_vectors", "ids"))
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    n = len(SUBSET_CLASSES) * PER_CLASS
    assert features.dtype == stored.dtype == np.float32 and ids.dtype == np.int64
    assert len(features) == len(stored) == len(ids) == len(meta) == n
    assert [m["id"] for m in meta] == ids.tolist()
    assert all(set(m) == {"id", "path", "label", "sha256"} and len(m["sha256"]) == 64 for m in meta)
    assert {m["label"] for m in meta} == set(SUBSET_CLASSES)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((subset_collection / "manifest.json").read_text())
    with Collection.open(subset_collection) as coll:
        rows, vectors = coll.vectors()
        assert [r.id for r in rows] == ids.tolist()
        assert np.allclose(features, vectors, atol=1e-6)
        assert stored.shape[1] == coll.catalog.width == coll.manifest.raw_dims  # a small collection keeps raw features
        assert np.allclose(coll.reduce(stored), features, atol=1e-5)  # raw -> reduced as ris does it
        # an exported vector finds its own image in the index
        hit = coll.search_vectors(features[5:6], 1, ["q"])[0].matches[0]
    assert hit.path == meta[5]["path"] and not list(out.glob(".*.tmp"))


def test_parquet_file_has_one_row_per_image(subset_collection: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "sub" / "vectors.parquet"
    run_cli("export", "-c", str(subset_collection), "--format", "parquet", "--out", str(out))
    table = pq.read_table(out)
    assert table.column_names == ["id", "path", "label", "sha256", "vector"]
    vtype = table.schema.field("vector").type
    assert str(vtype).startswith("list<") and str(vtype.value_type) == "float"
    assert table.num_rows == len(SUBSET_CLASSES) * PER_CLASS
    manifest = json.loads(table.schema.metadata[b"ris_manifest"])
    with Collection.open(subset_collection) as coll:
        rows, vectors = coll.vectors()
    assert manifest["dims"] == vectors.shape[1]
    assert table.column("id").to_pylist() == [r.id for r in rows]
    assert table.column("path").to_pylist() == [r.path for r in rows]
    assert np.allclose(np.array(table.column("vector").to_pylist(), dtype=np.float32), vectors, atol=1e-6)


def test_bad_format_and_missing_pyarrow_are_one_line_errors(subset_collection: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    proc = run_cli("export", "-c", str(subset_collection), "--format", "csv", "--out", str(tmp_path / "x"), check=False)
    assert proc.returncode != 0 and proc.stderr.strip() == "error: --format must be one of npy, parquet, not 'csv'"
    import builtins

    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    needs = r'^parquet export needs pyarrow, which is not installed: pip install "ris\[parquet\]"'
    with Collection.open(subset_collection) as coll, pytest.raises(RisError, match=needs):
        export(coll, tmp_path / "v.parquet", "parquet")
