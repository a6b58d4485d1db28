"""`ris dupes` on real Caltech images with generated copies (resized, JPEG q30, cropped, exact bytes, rotated
by 20-30 degrees and rescaled, blurred, brightened, bordered + captioned, padded, grey) among other photos
of the same classes (three a class)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest

from ris.collection import Collection
from ris.tools.dupes import (
    DUPE_INLIERS,
    RAW_THRESHOLD,
    candidate_pairs,
    default_threshold,
    find,
    find_duplicates,
    group_indices,
    group_pairs,
    similar_pairs,
    to_delete,
)

from .conftest import CALTECH, run_cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "dupes_precision.py"
N_ORIGINALS, COPIES_PER_KIND, CLASSES = 60, 4, 20


def _bench():
    """The benchmark module: the test and the benchmark generate and score copies the same way."""
    spec = importlib.util.spec_from_file_location("dupes_precision", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dupes_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """60 originals, three from each of 20 Caltech classes, plus 40 copies; indexed once."""
    if not CALTECH.is_dir():
        pytest.skip(f"Caltech-101 not found at {CALTECH}")
    root = tmp_path_factory.mktemp("dupes")
    origin = _bench().make_dataset(root / "images", N_ORIGINALS, COPIES_PER_KIND, seed=3, classes=CLASSES)
    with Collection.open_or_create(root / "c.ris") as coll:
        coll.index([root / "images"])
    return root / "c.ris", origin


def test_copies_are_found_with_high_precision_and_recall(dupes_set: tuple[Path, dict[str, str]]) -> None:
    path, origin = dupes_set
    bench = _bench()
    kinds = len(bench.COPY_KINDS)
    assert len(origin) == N_ORIGINALS + kinds * COPIES_PER_KIND
    with Collection.open(path) as coll:
        assert default_threshold(coll) == RAW_THRESHOLD  # 100 images: raw features, no PCA yet
        groups = find_duplicates(coll)
        plain = find_duplicates(coll, verify=False)
    precision, recall, _, ntrue = bench.pair_scores(groups, origin)
    assert ntrue == kinds * COPIES_PER_KIND
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert bench.kind_recall(groups, origin, "rotscale") >= 0.8  # rotated and rescaled: confirmed by keypoints
    assert bench.kind_recall(plain, origin, "rotscale") < bench.kind_recall(groups, origin, "rotscale")
    assert bench.kind_recall(groups, origin, "pad") >= 0.75  # on a screen-sized canvas: found by its content
    exact = [g for g in groups if g.kind == "exact"]
    exact_copies = {p for p, o in origin.items() if p != o and "_exact_" in Path(p).name}
    assert {r.path for g in exact for r in g.images} == exact_copies | {origin[p] for p in exact_copies}
    assert all(len(g.images) == 2 and g.similarity == 1.0 for g in exact)
    for g in groups:  # every member at the threshold against the representative, or confirmed a copy of it
        assert g.scores[0] == 1.0 and g.similarity == min(g.scores[1:]) <= 1.0
        for s, n in zip(g.scores[1:], g.inliers[1:], strict=True):
            assert s >= RAW_THRESHOLD - 1e-3 or (n or 0) >= DUPE_INLIERS


def test_different_photos_of_one_kind_are_not_grouped(dupes_set: tuple[Path, dict[str, str]]) -> None:
    """Three photos of each of 20 classes (faces, leopards, motorbikes on white, airplanes in side view...):
    no group holds two of them, though their keypoints are matched as candidates (nearest neighbours)."""
    path, origin = dupes_set
    originals = {p for p, o in origin.items() if p == o}
    with Collection.open(path) as coll:
        rows, vectors = coll.vectors()
        groups = find_duplicates(coll)
    paths = [r.path for r in rows]
    judged = [(paths[a], paths[b]) for a, b in candidate_pairs(vectors, RAW_THRESHOLD)
              if {paths[a], paths[b]} <= originals and Path(paths[a]).parent == Path(paths[b]).parent]  # fmt: skip
    assert len(judged) >= 10  # look-alikes the verification had to turn down
    for g in groups:
        assert len({origin[r.path] for r in g.images}) == 1, [r.path for r in g.images]


def test_a_copy_joins_the_original_it_matches_best() -> None:
    """Copy 2 of original 0 also passes against 0's look-alike 1, which has a copy of its own (3): each copy
    goes with the original it matches best, and neither group takes the look-alike pair (a representative
    taking all its near-duplicates, 2 or 1 here, would)."""
    pairs = {(0, 2): 0.85, (1, 2): 0.9, (1, 3): 0.95, (0, 1): 0.7}
    matches = {(0, 2): 150, (1, 2): 14, (1, 3): 200, (0, 1): 3}
    groups = group_pairs(4, [None] * 4, pairs, matches, 0.8)
    assert sorted(sorted(m) for m, _ in groups) == [[0, 2], [1, 3]]
    for members, sims in groups:  # the representative's own 1, the other's cosine to it
        assert sims == [1.0, pytest.approx(pairs[tuple(sorted(members))])]
    # a pair under the threshold needs DUPE_INLIERS matches; above it, a few
    assert group_pairs(2, [None] * 2, {(0, 1): 0.6}, {(0, 1): DUPE_INLIERS - 1}, 0.8) == []
    assert group_pairs(2, [None] * 2, {(0, 1): 0.6}, {(0, 1): DUPE_INLIERS}, 0.8) == [([0, 1], [1.0, 0.6])]


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


def test_groups_never_chain_look_alikes() -> None:
    """a~b and b~c but not a~c: b (two near-duplicates) represents {a, b, c}; with a third link c~d, d stays
    out of b's group (d !~ b) and forms none (its only partner is taken): no group holds a pair under the
    threshold against its representative."""
    angles = np.radians([0, 20, 40, 60])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)  # neighbours at cos 20 = 0.94
    groups = group_indices(4, [None] * 4, x, 0.9)
    assert len(groups) == 1
    members, sims = groups[0]
    assert members[0] in (1, 2) and len(members) == 3
    rep = members[0]
    assert all(float(x[rep] @ x[m]) >= 0.9 - 1e-6 for m in members)
    assert sims == pytest.approx([1.0] + [float(x[rep] @ x[m]) for m in members[1:]], abs=1e-5)
    # exact copies (one hash) are one image: 3 and its byte copy 4 stay together, as their own group here
    groups = group_indices(5, [None, None, None, "h", "h"], np.concatenate([x, x[3:4]]), 0.9)
    assert sorted(sorted(m) for m, _ in groups) == [[0, 1, 2], [3, 4]]


def test_cli_json_csv_and_listing(dupes_set: tuple[Path, dict[str, str]]) -> None:
    path, origin = dupes_set
    data = json.loads(run_cli("dupes", "-c", str(path), "--json").stdout)
    assert data["images"] == len(origin)
    assert {g["kind"] for g in data["groups"]} == {"exact", "near"}
    for g in data["groups"]:
        assert set(g) == {"kind", "representative", "images", "similarity"} and len(g["images"]) >= 2
        assert all(set(img) == {"path", "label", "similarity", "inliers"} for img in g["images"])
        assert g["images"][0]["path"] == g["representative"] and g["similarity"] == min(i["similarity"] for i in g["images"][1:])
    for p, others in data["duplicates"].items():  # per image: its duplicates with scores, most similar first
        assert p in origin and others and all(o["path"] in origin and o["path"] != p for o in others)
        assert [o["similarity"] for o in others] == sorted((o["similarity"] for o in others), reverse=True)
    grouped = {img["path"] for g in data["groups"] for img in g["images"]}
    assert grouped <= set(data["duplicates"])
    rows = list(csv.DictReader(io.StringIO(run_cli("dupes", "-c", str(path), "--csv").stdout)))
    assert rows and set(rows[0]) == {"group_id", "kind", "path", "similarity", "representative"}
    assert len({r["group_id"] for r in rows}) == len(data["groups"])
    assert sorted(r["path"] for r in rows) == sorted(img["path"] for g in data["groups"] for img in g["images"])
    listing = run_cli("dupes", "-c", str(path), "--threshold", "0.99").stdout
    assert listing.splitlines()[0].startswith("group 1: exact, 2 images, similarity 1.000")
    assert f"among {len(origin)} images" in listing.splitlines()[-1]
    bad = run_cli("dupes", "-c", str(path), "--threshold", "1.5", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ") and "Traceback" not in bad.stderr
    bad = run_cli("dupes", "-c", str(path), "--keep", "oldest", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().startswith("error: ") and "Traceback" not in bad.stderr


def test_review_page_and_a_list_to_delete_that_deletes_nothing(dupes_set: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    path, origin = dupes_set
    page = tmp_path / "review.html"
    proc = run_cli("dupes", "-c", str(path), "--html", str(page), "--keep", "largest")
    lines = [line.split("\t") for line in proc.stdout.splitlines()]
    with Collection.open(path) as coll:
        groups, _ = find(coll)
    assert len(lines) == sum(len(g.images) - 1 for g in groups) and all(len(parts) == 2 for parts in lines)
    assert all(Path(p).exists() for parts in lines for p in parts)  # listed, never deleted
    for g in groups:  # the kept one is the group's largest picture; the others are listed against it
        from PIL import Image

        sizes = {r.path: Image.open(r.path).size for r in g.images}
        kept = {k for d, k in lines if d in sizes}
        assert len(kept) == 1 and sizes[kept.pop()] == max(sizes.values(), key=lambda s: s[0] * s[1])
    text = page.read_text()
    assert text.count("<section>") == len(groups) and text.count("<img ") == sum(len(g.images) for g in groups)
    firsts = sorted(d for d, _ in to_delete(groups, "first"))
    assert firsts == sorted(r.path for g in groups for r in sorted(g.images, key=lambda r: r.path)[1:])
