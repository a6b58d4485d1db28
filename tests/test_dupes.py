"""`ris dupes` on real Caltech images with generated copies (resized, JPEG q30, cropped, exact bytes)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

from ris.collection import Collection
from ris.dupes import RAW_THRESHOLD, default_threshold, find_duplicates, group_indices, similar_pairs

from .conftest import CALTECH, run_cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "dupes_precision.py"
N_ORIGINALS, COPIES_PER_KIND = 60, 5


def _bench():
    """The benchmark module: the test and the benchmark generate and score copies the same way."""
    spec = importlib.util.spec_from_file_location("dupes_precision", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dupes_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """60 originals, one per Caltech class, plus 20 copies; indexed once."""
    if not CALTECH.is_dir():
        pytest.skip(f"Caltech-101 not found at {CALTECH}")
    root = tmp_path_factory.mktemp("dupes")
    origin = _bench().make_dataset(root / "images", N_ORIGINALS, COPIES_PER_KIND)
    with Collection.open_or_create(root / "c.ris") as coll:
        coll.index([root / "images"])
    return root / "c.ris", origin


def test_copies_are_found_with_high_precision_and_recall(dupes_set: tuple[Path, dict[str, str]]) -> None:
    path, origin = dupes_set
    bench = _bench()
    assert len(origin) == N_ORIGINALS + 4 * COPIES_PER_KIND
    with Collection.open(path) as coll:
        assert default_threshold(coll) == RAW_THRESHOLD  # 80 images: raw features, no PCA yet
        groups = find_duplicates(coll)
    precision, recall, _, ntrue = bench.pair_scores(groups, origin)
    assert ntrue == 4 * COPIES_PER_KIND
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    exact = [g for g in groups if g.kind == "exact"]
    exact_copies = {p for p, o in origin.items() if p != o and "_exact_" in Path(p).name}
    assert {r.path for g in exact for r in g.images} == exact_copies | {origin[p] for p in exact_copies}
    assert all(len(g.images) == 2 and g.similarity == 1.0 for g in exact)
    for g in groups:
        assert RAW_THRESHOLD - 1e-3 <= g.similarity <= 1.0
        assert [r.path for r in g.images] == sorted(r.path for r in g.images)


def test_a_higher_threshold_never_finds_more(dupes_set: tuple[Path, dict[str, str]]) -> None:
    path, origin = dupes_set
    bench = _bench()
    with Collection.open(path) as coll:
        loose = bench.predicted_pairs(find_duplicates(coll, 0.8))
        strict = bench.predicted_pairs(find_duplicates(coll, 0.97))
    assert strict <= loose
    # at 0.97 only the exact copies (and maybe a mild re-encode) remain
    assert {p for p in strict if any("_exact_" in x for x in p)} == {
        frozenset((p, o)) for p, o in origin.items() if "_exact_" in p
    }


def test_range_search_in_blocks_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 16)).astype(np.float32)
    x = np.concatenate([base, base[:10] + 0.05 * rng.normal(size=(10, 16)).astype(np.float32)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    i, j, s = similar_pairs(x, 0.9, block=7)
    sims = x @ x.T
    want = {(a, b) for a in range(len(x)) for b in range(a + 1, len(x)) if sims[a, b] >= 0.9}
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == want
    assert np.allclose(s, sims[i, j], atol=1e-5)
    groups = group_indices(len(x), [None] * len(x), x, 0.9)
    assert sorted(sorted(m) for m, _ in groups) == sorted(sorted(p) for p in want)  # here each pair is its own group


def test_cli_json_csv_and_listing(dupes_set: tuple[Path, dict[str, str]]) -> None:
    path, origin = dupes_set
    data = json.loads(run_cli("dupes", "-c", str(path), "--json").stdout)
    assert data["images"] == len(origin)
    assert {g["kind"] for g in data["groups"]} == {"exact", "near"}
    for g in data["groups"]:
        assert set(g) == {"kind", "images", "similarity"} and len(g["images"]) >= 2
        assert all(set(img) == {"path", "label"} for img in g["images"])
    rows = list(csv.DictReader(io.StringIO(run_cli("dupes", "-c", str(path), "--csv").stdout)))
    assert rows and set(rows[0]) == {"group_id", "kind", "path", "similarity"}
    assert len({r["group_id"] for r in rows}) == len(data["groups"])
    assert sorted(r["path"] for r in rows) == sorted(img["path"] for g in data["groups"] for img in g["images"])
    listing = run_cli("dupes", "-c", str(path), "--threshold", "0.99").stdout
    assert listing.splitlines()[0].startswith("group 1: exact, 2 images, similarity 1.000")
    assert f"among {len(origin)} images" in listing.splitlines()[-1]
    bad = run_cli("dupes", "-c", str(path), "--threshold", "1.5", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ") and "Traceback" not in bad.stderr
