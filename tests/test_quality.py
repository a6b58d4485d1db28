"""Database-side augmentation (--dba) and R-MAC pooling on the real model and real Caltech-101 images.

A DBA collection records its neighbour count, holds exactly the augmented vectors a from-scratch
computation gives (after adds and removes too, in index.faiss, IVF and Milvus), still finds each image
from its own file, and `ris eval` ranks against it fairly (no database vector holds the query).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ris.collection import Collection
from ris.search.ranking import ANCHOR_POOL, stands_out
from ris.tools import evaluate
from ris.vectors import dba, faiss_index as index
from tests.conftest import PER_CLASS, SUBSET_CLASSES, caltech_files, copy_classes, derived_file, run_cli

N = 5


def fresh_dba(coll: Collection) -> tuple[np.ndarray, np.ndarray]:
    """(ids, augmented vectors) computed from scratch from the collection's plain vectors."""
    rows, vectors = coll.vectors()
    return np.array([r.id for r in rows]), dba.augment(vectors, *dba.neighbours(vectors, N))


def held(coll: Collection, ids: np.ndarray) -> np.ndarray:
    idx = coll.derived.snapshot().store.faiss_index
    return np.vstack([idx.reconstruct(int(i)) for i in ids])


@pytest.fixture(scope="module")
def dba_collection(subset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dba") / "dba.ris"
    run_cli("index", str(subset_dir), "-c", str(path), "--dba", str(N), "--json")
    return path


def test_dba_is_recorded_and_the_index_holds_augmented_vectors(dba_collection: Path) -> None:
    info = json.loads(run_cli("info", "-c", str(dba_collection), "--json").stdout)
    assert info["dba"] == N
    assert json.loads((dba_collection / "manifest.json").read_text())["dba"] == N
    with Collection.open(dba_collection) as coll:
        ids, want = fresh_dba(coll)
        _, plain = coll.vectors()
        got = held(coll, ids)
    np.testing.assert_allclose(got, want, atol=1e-5)
    moved = np.linalg.norm(got - plain, axis=1)
    assert moved.min() > 0.1  # the index does not hold the plain vectors: every one moved (min 0.15 here)


def test_dba_finds_each_image_from_its_own_file(dba_collection: Path, subset_dir: Path) -> None:
    files = sorted(subset_dir.glob("*/*.jpg"))
    with Collection.open(dba_collection) as coll:
        results = coll.search_many([str(f) for f in files], k=1)
    assert [r.matches[0].path for r in results] == [str(f.absolute()) for f in files]


def test_leave_one_out_with_dba_never_lets_the_query_help_itself(dba_collection: Path) -> None:
    """The patched ranking equals a brute force one: for each query, the database augmented without it."""
    with Collection.open(dba_collection) as coll:
        rows, x = coll.vectors()
    labels = [r.label for r in rows]
    report = evaluate.leave_one_out(x, labels, ks=(1, 5), dba=N)
    names, y = np.unique(labels, return_inverse=True)
    p5, aps = [], []
    for i in range(len(x)):
        rest = np.delete(np.arange(len(x)), i)
        db = dba.augment(x[rest], *dba.neighbours(x[rest], N))
        order = rest[np.argsort(-(db @ x[i]), kind="stable")]
        rel = y[order] == y[i]
        prec, ap = evaluate._score_rankings(rel[None], np.array([rel.sum()]), (5,))
        p5.append(prec[5][0])
        aps.append(ap[0])
    assert report.precision[5] == pytest.approx(np.mean(p5), abs=1e-6)
    assert report.map == pytest.approx(np.mean(aps), abs=1e-6)
    plain = evaluate.leave_one_out(x, labels, ks=(1, 5))
    assert report.map >= plain.map - 0.02  # DBA does not break class retrieval on the subset
    # `ris eval` reports the collection as served: the first result anchored to the plain nearest where it stands out
    served = evaluate.leave_one_out(x, labels, ks=(1, 5), dba=N, anchor=ANCHOR_POOL, served=True)
    out = json.loads(run_cli("eval", "-c", str(dba_collection), "--json").stdout)
    assert out["map"] == pytest.approx(served.map, abs=1e-4)
    assert out["precision@1"] == pytest.approx(served.precision[1], abs=1e-4)
    off = json.loads(run_cli("eval", "-c", str(dba_collection), "--dba", "0", "--json").stdout)
    assert off["map"] == pytest.approx(plain.map, abs=1e-4)


def test_an_unconfirmed_plain_nearest_goes_first_only_where_it_stands_out(dba_collection: Path) -> None:
    """Without a confirmed copy, the plain nearest is put before the served (DBA) first only where it stands out (its
    plain cosine ANCHOR_MARGIN over the served first's, or SAME_PICTURE high): a copy's original stands out so, an
    image of the same kind rarely does. Other photos of the collection's classes meet both cases; `ris eval` ranks
    the same way (anchor_first)."""
    files = [f for c in SUBSET_CLASSES for f in caltech_files(c, 3 * PER_CLASS)[PER_CLASS:]]  # not indexed
    with Collection.open(dba_collection) as coll:
        rows, x = coll.vectors()
        q = coll.embed([str(f) for f in files])
        _, served, _ = coll.ranker.nearest(coll.derived.snapshot(), q, ANCHOR_POOL, None)
        results = coll.search_vectors(q, 5, [f.name for f in files])
    by_id = {r.id: v for r, v in zip(rows, x, strict=True)}
    moved = kept = 0
    for i, result in enumerate(results):
        pool = [int(j) for j in served[i][:ANCHOR_POOL] if j >= 0]
        sims = np.array([by_id[j] @ q[i] for j in pool])
        out = bool(stands_out(sims.max(), sims[0]))
        assert result.matches[0].id == (pool[int(sims.argmax())] if out else pool[0]), files[i]
        moved += out and int(sims.argmax()) != 0
        kept += not out and int(sims.argmax()) != 0
    assert moved and kept  # both met (2 and 12 of 120 when written): the plain nearest put first, the served first kept
    order = np.argsort(-(x @ x[:12].T).T, axis=1, kind="stable")  # each image first, then its plain nearest
    swapped = order[:, [1, 0, *range(2, order.shape[1])]]  # the nearest other image served before the image itself
    np.testing.assert_array_equal(evaluate.anchor_first(swapped, x[:12], x, 8, served=True), order)  # the same picture
    others = order[:, 1:]  # leave-one-out: the image itself not indexed
    flipped = others[:, [1, 0, *range(2, others.shape[1])]]  # its second nearest served first
    out = stands_out(np.einsum("nd,nd->n", x[:12], x[others[:, 0]]), np.einsum("nd,nd->n", x[:12], x[others[:, 1]]))
    anchored = evaluate.anchor_first(flipped, x[:12], x, 8, served=True)
    np.testing.assert_array_equal(anchored, np.where(out[:, None], others, flipped))


def test_the_first_result_is_the_plain_nearest_and_the_rest_keep_the_served_order(dba_collection: Path) -> None:
    """Anchoring (ris.tools.evaluate.anchor_first, as Collection.search_vectors serves): with a pool covering
    every image, precision@1 is exactly the plain vectors' and ranks 2.. are the DBA ranking's."""
    with Collection.open(dba_collection) as coll:
        rows, x = coll.vectors()
        labels = [r.label for r in rows]
        n = len(x)
        anchored = evaluate.leave_one_out(x, labels, ks=(1, 5), dba=N, anchor=n)
        plain = evaluate.leave_one_out(x, labels, ks=(1, 5))
        assert anchored.precision[1] == pytest.approx(plain.precision[1], abs=1e-9)
        order = np.argsort(-(x @ x[:3].T).T, axis=1, kind="stable")
        pinned = evaluate.anchor_first(order[:, 1:], x[:3], x, n)  # each query's own row left out
        np.testing.assert_array_equal(pinned, order[:, 1:])  # already first: the order is kept
        swapped = evaluate.anchor_first(order[:, [2, 1, *range(3, n)]], x[:3], x, n)
        np.testing.assert_array_equal(swapped, order[:, 1:])
        # a search of an image's own vector: itself first (plain cosine 1), then the served ranking
        served_scores, served, _ = coll.ranker.nearest(coll.derived.snapshot(), x[:1], 8, None)
        result = coll.search_vectors(x[:1], 5, ["q"])[0]
    assert result.matches[0].id == rows[0].id and result.matches[0].similarity == pytest.approx(1.0, abs=1e-4)
    scores = [m.score for m in result.matches]  # what ranked them: never increasing down the list
    assert scores == sorted(scores, reverse=True)
    assert [m.id for m in result.matches[1:]] == [int(i) for i in served[0] if i != rows[0].id][:4]


def test_verification_is_a_collection_setting(dba_collection: Path, subset_dir: Path, tmp_path: Path) -> None:
    """New collections verify (manifest `verify`); `ris index --no-verify` records the other default."""
    path = tmp_path / "c.ris"
    shutil.copytree(dba_collection, path)
    assert json.loads((path / "manifest.json").read_text())["verify"] is True
    run_cli("index", str(subset_dir), "-c", str(path), "--no-verify", "--json")  # a resync: nothing extracted
    assert json.loads(run_cli("info", "-c", str(path), "--json").stdout)["verify"] is False
    with Collection.open(path) as coll:
        assert coll.manifest.verify is False and coll.ranker._verifier is None
        coll.search(str(sorted((subset_dir / "panda").glob("*.jpg"))[0]), k=3)
        assert coll.ranker._verifier is None  # not verified
        coll.search(str(sorted((subset_dir / "panda").glob("*.jpg"))[0]), k=3, verify=True)
        assert coll.ranker._verifier is not None


def test_dba_switches_off_above_its_size_limit(subset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above dba.MAX_IMAGES the exact graph (n^2) is not built: plain vectors are served, no dba.npz."""
    monkeypatch.setattr(dba, "MAX_IMAGES", 15)
    path = tmp_path / "c.ris"
    with Collection.create(path, dba=N) as coll:
        coll.index([subset_dir / "cup"])  # 10 images: DBA on
        assert derived_file(path, "dba").exists() and coll.info()["dba_active"] == N
        coll.add([subset_dir / "panda"])  # 20: off, the index back to plain vectors
        assert not derived_file(path, "dba").exists() and coll.info()["dba_active"] == 0
        rows, plain = coll.vectors()
        np.testing.assert_allclose(held(coll, [r.id for r in rows]), plain, atol=1e-5)


def test_the_graph_keeps_plain_vectors_and_starts_over_for_another_pca(dba_collection: Path, tmp_path: Path) -> None:
    """dba.npz stores the plain reduced vectors (a write reads only new images' raw features, a search its
    candidates'); vectors kept for another PCA are not trusted: the graph starts over from the catalogue."""
    path = tmp_path / "c.ris"
    shutil.copytree(dba_collection, path)
    with Collection.open(path) as coll:
        rows, plain = coll.vectors()
        graph = dba.Graph.load(derived_file(path, "dba"))
        np.testing.assert_array_equal(graph.ids, [r.id for r in rows])
        np.testing.assert_allclose(graph.x, plain, atol=1e-6)
        snap = coll.derived.snapshot()  # searches read candidates' plain vectors from that copy
        some = np.array([r.id for r in rows[::7]])
        np.testing.assert_allclose(coll.ranker.plain(snap, some), coll.derived.reduced(snap.space, some), atol=1e-6)
        graph.x[0], graph.pca = -graph.x[0], "another pca"
        graph.save(derived_file(path, "dba"))
        coll.remove_ids([])  # a write: the graph is rebuilt from the catalogue, not from the stale rows
        ids, want = fresh_dba(coll)
        np.testing.assert_allclose(held(coll, ids), want, atol=1e-5)
        np.testing.assert_allclose(dba.Graph.load(derived_file(path, "dba")).x, plain, atol=1e-6)


def test_adds_and_removes_keep_the_augmented_index_exact(tmp_path: Path) -> None:
    """Incremental upkeep (ris.vectors.dba.update) gives the from-scratch vectors, in an exact and an IVF index."""
    images = copy_classes(tmp_path / "img", SUBSET_CLASSES, 6)
    later = SUBSET_CLASSES[3:]
    shutil.move(str(images / later[0]), tmp_path / later[0])  # a class added afterwards
    for factory in (index.EXACT_FACTORY, "IVF2,Flat"):
        path = tmp_path / f"{factory.replace(',', '_')}.ris"
        with Collection.create(path, dba=N, index_factory=factory) as coll:
            coll.index([images])
            coll.add([tmp_path / later[0]])
            ids, want = fresh_dba(coll)
            if factory == index.EXACT_FACTORY:
                np.testing.assert_allclose(held(coll, ids), want, atol=1e-5)
            gone = [r.id for r in coll.catalog.all_rows() if r.label == later[1]]
            coll.remove_ids(gone)
            ids, want = fresh_dba(coll)
            assert not np.isin(gone, ids).any()
            if factory == index.EXACT_FACTORY:
                np.testing.assert_allclose(held(coll, ids), want, atol=1e-5)
            graph = dba.Graph.load(derived_file(path, "dba"))
            np.testing.assert_array_equal(graph.ids, ids)
            # the served ranking (IVF: candidates re-scored with the augmented vectors) scores what a fresh DBA gives
            scores, found, _ = coll.ranker.nearest(coll.derived.snapshot(), want[:3], 3, None)
            for row, s, f in zip(want[:3], scores, found, strict=True):
                assert f[0] == ids[int(np.argmax(want @ row))] and s[0] == pytest.approx(1.0, abs=1e-4)
        # switched off: the index goes back to the plain vectors, the graph file goes
        with Collection.open_or_create(path, dba=0) as coll:
            coll.remove_ids([])
            rows, plain = coll.vectors()
            assert not derived_file(path, "dba").exists()
            if factory == index.EXACT_FACTORY:
                np.testing.assert_allclose(held(coll, np.array([r.id for r in rows])), plain, atol=1e-5)


def test_graph_update_equals_a_fresh_graph_at_a_size_that_samples_scores(dba_collection: Path) -> None:
    """dba.update (one product of the redone images against all, a sampled bound for each row's top-k,
    thresholds for the lists that take in new images) equals the graph computed from scratch, on 1,500
    vectors: real features and noisy copies of them (clusters of near-duplicates, as re-encodings make)."""
    with Collection.open(dba_collection) as coll:
        _, plain = coll.vectors()
    rng = np.random.default_rng(0)
    x = np.concatenate([plain + 0.02 * i * rng.standard_normal(plain.shape, dtype=np.float32) for i in range(25)])[:1500]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = np.arange(len(x)) * 3 + 7  # ids with gaps, as after removals
    scores = x[:40] @ x.T
    v, c = dba.top_rows(scores, 8)  # the sampled path: 1,500 columns >= 4 x 8 x stride
    want = np.argsort(-scores, axis=1, kind="stable")[:, :8]
    np.testing.assert_array_equal(c, want)
    np.testing.assert_array_equal(v, np.take_along_axis(scores, want, axis=1))
    before = rng.random(len(x)) < 0.9  # 10% new
    after = before.copy()
    after[rng.choice(np.flatnonzero(before), 40, replace=False)] = False  # and some removed
    after |= ~before
    graph, _ = dba.update(None, ids[before], x[before], N, "pca")
    updated, changed = dba.update(graph, ids[after], x[after], N, "pca")
    fresh, _ = dba.update(None, ids[after], x[after], N, "pca")
    np.testing.assert_array_equal(updated.nbrs, fresh.nbrs)
    np.testing.assert_allclose(updated.sims, fresh.sims, atol=1e-6)
    at, held = graph.locate(updated.ids)
    differs = ~held | (graph.nbrs[at] != updated.nbrs).any(axis=1)
    np.testing.assert_array_equal(changed, updated.ids[differs])  # exactly the lists that moved, and new images
    same, none = dba.update(updated, ids[after], x[after], N, "pca")
    assert not len(none) and (same.nbrs == updated.nbrs).all()


def test_milvus_store_holds_the_augmented_vectors(dba_collection: Path, subset_dir: Path, tmp_path: Path) -> None:
    """Indexed in two steps (the second replaces the vectors that gained a neighbour), Milvus answers what
    the index.faiss collection indexed in one step does."""
    pytest.importorskip("pymilvus", reason='needs pip install -e ".[milvus]"')
    pytest.importorskip("milvus_lite", reason='needs pip install -e ".[milvus]"')
    first, later = tmp_path / "img", tmp_path / "later"
    copy_classes(first, SUBSET_CLASSES[:-1], 10)
    copy_classes(later, SUBSET_CLASSES[-1:], 10)
    queries = [str(sorted((subset_dir / cls).glob("*.jpg"))[3]) for cls in SUBSET_CLASSES]
    with Collection.create(tmp_path / "m.ris", store=f"milvus-lite://{tmp_path / 'v.db'}", dba=N) as milvus_coll:
        milvus_coll.index([first])
        milvus_coll.add([later])
        got = milvus_coll.search_many(queries, k=5)
    with Collection.open(dba_collection) as faiss_coll:
        want = faiss_coll.search_many(queries, k=5)
    for g, w in zip(got, want, strict=True):
        assert [Path(m.path).parts[-2:] for m in g.matches] == [Path(m.path).parts[-2:] for m in w.matches]
        np.testing.assert_allclose([m.score for m in g.matches], [m.score for m in w.matches], atol=1e-4)


def test_copy_detection_with_verification(subset_collection: Path) -> None:
    out = json.loads(run_cli("eval", "-c", str(subset_collection), "--copies", "4", "--verify", "--json").stdout)
    assert out["transforms"]["all"]["recall@1"] >= 0.9


def test_copy_detection_refuses_another_dba(dba_collection: Path) -> None:
    proc = run_cli("eval", "-c", str(dba_collection), "--copies", "5", "--dba", "3", check=False)
    assert proc.returncode == 1 and "ris index" in proc.stderr


@pytest.mark.parametrize("transform", ["rotate10", "gray", "flip", "border", "crop"])
def test_verification_puts_a_copy_s_original_first(subset_dir: Path, transform: str) -> None:
    from ris.images.decode import open_image, read_file
    from ris.search.verify import Verifier
    from ris.tools.demo import TRANSFORMS

    files = [str(f) for f in sorted((subset_dir / "airplanes").glob("*.jpg"))]
    copy = TRANSFORMS[transform](open_image(read_file(files[0])))
    v = Verifier()
    assert v.look(copy, [files[1], files[2], files[0]]).first == 2  # confirmed: moves up
    assert v.look(copy, [files[0], files[1], files[2]]).first == 0  # already first
    assert v.look(copy, [files[1], files[2], files[3]]).first == 0  # no candidate confirmed: order kept
    # a batch, on threads (as search_many verifies): the same answers, in the queries' order
    jobs = [(lambda: copy, [files[1], files[2], files[0]]), (lambda: copy, [files[1], files[2], files[3]]),
            (lambda: copy, [files[0]]), (lambda: copy, [files[3], files[0], files[1]])]  # fmt: skip
    assert [look.first for look in Verifier().looks(jobs, threads=2)] == [2, 0, 0, 1]


def test_rmac_regions_cover_the_map() -> None:
    from ris.model.networks import rmac_regions

    regions = rmac_regions(7, 7)
    assert regions[0] == (0, 0, 7) and len(regions) == 14
    assert all(0 <= t and 0 <= left and t + s <= 7 and left + s <= 7 for t, left, s in regions)


def test_search_with_verification_keeps_the_top_set_and_puts_the_original_first(
    subset_collection: Path, subset_dir: Path, tmp_path: Path
) -> None:
    """`ris search --verify`: same top 5 as without, re-ranked 1..5, a rotated copy's original first."""
    from ris.images.decode import open_image, read_file
    from ris.tools.demo import TRANSFORMS

    original = str(sorted((subset_dir / "airplanes").glob("*.jpg"))[0])
    copy = tmp_path / "copy.jpg"
    TRANSFORMS["rotate10"](open_image(read_file(original))).save(copy, "JPEG", quality=90)
    runs = {flag: json.loads(run_cli("search", str(copy), "-c", str(subset_collection), "--json", *flag).stdout)
            for flag in (("--no-verify",), ("--verify",), ())}  # fmt: skip
    plain, verified = runs[("--no-verify",)]["matches"], runs[("--verify",)]["matches"]
    assert runs[()]["matches"] == verified  # verification is the collection's default
    assert len(plain) == len(verified) == 5 and [m["rank"] for m in verified] == [1, 2, 3, 4, 5]
    assert verified[0]["path"] == original
    # only the first place is chosen by verification; the rest keeps the served order
    rest = [m["path"] for m in verified[1:]]
    assert [p for p in (m["path"] for m in plain[1:]) if p in rest] == [p for p in rest if p in {m["path"] for m in plain[1:]}]


def test_grid_pooling_keeps_the_layout_and_indexes_end_to_end(subset_dir: Path, tmp_path: Path) -> None:
    """`--pooling grid`: 4 GeM cells of the real Lite0 map (5,120-d raw, recorded in the manifest); a
    mirrored photo's top-left cell matches the original's top-right best; each image finds itself."""
    import torch
    from PIL import ImageOps

    from ris.images.decode import open_image, read_file, resize
    from ris.model import registry as models

    net, _ = models.build("efficientnet-lite0", "grid")
    photo = open_image(read_file(str(sorted((subset_dir / "airplanes").glob("*.jpg"))[0])))
    pixels = np.stack([resize(img, 224) for img in (photo, ImageOps.mirror(photo))])
    with torch.inference_mode():
        cells = net(torch.from_numpy(pixels)).numpy().reshape(2, 4, -1)
    cells /= np.linalg.norm(cells, axis=2, keepdims=True)
    mirrored_tl = cells[1, 0]
    assert cells.shape == (2, 4, 1280)
    assert mirrored_tl @ cells[0, 1] > max(mirrored_tl @ cells[0, c] for c in (0, 2, 3))

    path = tmp_path / "grid.ris"
    run_cli("index", str(subset_dir), "-c", str(path), "--pooling", "grid", "--precision", "fp32", "--json")
    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["pooling"], manifest["raw_dims"]) == ("grid", 5120)
    with Collection.open(path) as coll:
        files = sorted(str(p) for p in subset_dir.glob("*/*.jpg"))[::7]
        results = coll.search_many(files, k=1, device="cpu")
        assert [r.matches[0].path for r in results] == files


def test_grid3_cells_tile_a_7x7_map() -> None:
    """`--pooling grid3`: 3x3 cells of side 3 at rows/columns 0, 2 and 4 of Lite0's 7x7 map, 9 x 1280 raw."""
    import torch

    from ris.model import registry as models
    from ris.model.networks import _gem, grid_gem

    fmap = torch.rand(2, 8, 7, 7)
    want = torch.cat([_gem(fmap[:, :, t : t + 3, c : c + 3]) for t in (0, 2, 4) for c in (0, 2, 4)], dim=1)
    torch.testing.assert_close(grid_gem(fmap, 3), want)  # one pooling pass: the same up to summation order
    uneven = torch.rand(2, 8, 8, 6)  # rows 0, 2 and 5 of an 8-high map (not evenly spaced: cell by cell)
    want = torch.cat([_gem(uneven[:, :, t : t + 3, c : c + 2]) for t in (0, 2, 5) for c in (0, 2, 4)], dim=1)
    torch.testing.assert_close(grid_gem(uneven, 3), want)
    assert models.feature_dims("efficientnet-lite0", "grid3") == 9 * 1280
    assert models.feature_dims("vgg16", "grid3") == 4096  # fc2 is not pooled


# --- copies under harsh edits (ris.images.edits, ris.copies) -------------------------------------------


def test_copy_sets_are_seeded_and_the_held_out_set_is_apart(subset_collection: Path) -> None:
    from ris.images.decode import open_image, read_file
    from ris.images.edits import FRESH, HARSH, HELDOUT, JOINED, TURNED, UNSEEN

    families = [set(HARSH), set(HELDOUT), set(UNSEEN), set(FRESH), set(TURNED), set(JOINED)]
    assert sum(map(len, families)) == len(set().union(*families))  # no edit in two families
    with Collection.open(subset_collection) as coll:
        rows = coll.catalog.all_rows()
    load = lambda p: open_image(read_file(p))  # noqa: E731
    picked, a = evaluate.make_copies(rows, 3, 7, "all", load)
    picked2, b = evaluate.make_copies(rows, 3, 7, "all", load)
    _, c = evaluate.make_copies(rows, 3, 8, "harsh", load)
    assert [r.id for r in picked] == [r.id for r in picked2]
    assert set(a) == set().union(*families) | set(evaluate.copy_edits("mild"))
    for name in a:
        same = [x.mode == "RGB" and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a[name], b[name], strict=True)]
        assert all(same), name
    assert any(not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a["rotate"], c["rotate"], strict=True))


def test_eval_reports_recall_per_harsh_edit(subset_collection: Path) -> None:
    from ris.images.edits import HARSH

    out = json.loads(run_cli("eval", "-c", str(subset_collection), "--copies", "3", "--harsh", "--json").stdout)
    assert out["copy_set"] == "harsh" and set(out["transforms"]) == set(HARSH) | {"all"}
    assert all(0 <= v["recall@1"] <= v["recall@5"] <= 1 for v in out["transforms"].values())
    assert out["transforms"]["mirror_crop_jpeg"]["recall@1"] == 1.0 and out["transforms"]["all"]["recall@5"] >= 0.6
    bad = run_cli("eval", "-c", str(subset_collection), "--copies", "3", "--copy-set", "nasty", check=False)
    assert bad.returncode != 0 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_verification_keeps_candidates_keypoints_within_its_memory_and_prepares_them_ahead_of_searches(subset_dir: Path) -> None:
    """The cache is bounded by bytes (least recently used out first); `prepare` fills nine tenths of it ahead of
    searches, slows down to a share of the time while searches run (never to a stop: a busy server must get its
    keypoints too), stops when asked, and a search then finds the same answers."""
    import threading
    import time

    from ris.images.decode import open_image, read_file
    from ris.search.verify import KEYPOINT_BYTES, Verifier, _nbytes
    from ris.tools.demo import TRANSFORMS

    files = [str(f) for f in sorted(subset_dir.glob("*/*.jpg"))][:12]
    small = Verifier(cache_bytes=3 * KEYPOINT_BYTES)
    for f in files[:6]:
        small._candidate(f)
    assert 1 <= small.cached() <= 3 and small._bytes == sum(_nbytes(x) for x in small._cache.values()) <= small.budget
    assert list(small._cache) == [f for f in files[:6] if f in small._cache][-small.cached() :]  # the latest kept

    v, idle, stop = Verifier(cache_bytes=100 * KEYPOINT_BYTES), threading.Event(), threading.Event()
    done: list[int] = []
    worker = threading.Thread(target=lambda: done.append(v.prepare(files, idle.is_set, stop.is_set, busy_share=0.001)))
    worker.start()
    deadline = time.monotonic() + 30
    while v.cached() < 1 and time.monotonic() < deadline:  # its first image at once, however slow this machine is
        time.sleep(0.01)
    worker.join(0.2)
    assert worker.is_alive() and v.cached() == 1  # a search is running: one image, then a thousand times its time
    idle.set()
    worker.join(60)
    assert done == [len(files)] and v.cached() == len(files)
    busy = Verifier(cache_bytes=100 * KEYPOINT_BYTES)  # searches never stop: it still goes on, at a tenth of the time
    assert busy.prepare(files, lambda: False, lambda: False) == len(files) == busy.cached()
    assert Verifier(cache_bytes=0).prepare(files, lambda: True, lambda: False) == 0  # no memory for it: nothing
    stop.set()
    assert Verifier(cache_bytes=100 * KEYPOINT_BYTES).prepare(files, lambda: False, stop.is_set) == 0
    copy = TRANSFORMS["rotate10"](open_image(read_file(files[0])))
    assert v.look(copy, [files[1], files[2], files[0]]).first == Verifier().look(copy, [files[1], files[2], files[0]]).first == 2
