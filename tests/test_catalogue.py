"""The compact catalogue (format 2) and the derived files' generations, on real images and the real model.

The thresholds are lowered for a 60-image subset (reduce.FIT_SAMPLE 40, PROJECTED_DIMS 24, PCA 16), so the
switch to projected vectors, the upgrade of a format-1 collection, and damaged or missing derived files all
happen as they do at full size.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from ris.collection import Collection
from ris.errors import RisError
from ris.files.sources import SourceFile, scan
from ris.vectors import reduce
from tests.conftest import derived_file, run_cli


@pytest.fixture
def small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reduce, "FIT_SAMPLE", 40)
    monkeypatch.setattr(reduce, "PROJECTED_DIMS", 24)


def _self_hits(coll: Collection, n: int = 12) -> float:
    """Share of indexed images (every 5th) that find themselves first."""
    rows = coll.catalog.all_rows()[::5][:n]
    results = coll.search_many([r.path for r in rows], k=1, verify=False)
    return float(np.mean([res.matches[0].id == r.id for res, r in zip(results, rows, strict=True)]))


def test_a_collection_switches_to_projected_vectors_once_large_enough(subset_dir: Path, tmp_path: Path, small_thresholds) -> None:
    with Collection.create(tmp_path / "c.ris", dims=16) as coll:
        coll.index([subset_dir / "cup", subset_dir / "panda"])  # 20 images: raw features kept
        assert coll.catalog.width == coll.manifest.raw_dims and coll.catalog.projection() is None
        read, projection = [], coll.catalog.projection
        coll.catalog.projection = lambda: read.append(projection()) or read[-1]  # type: ignore[method-assign]
        coll.add([subset_dir])  # 60: the projection is fitted on the first 40 and every vector stored projected
        assert read == [None]  # the run's end read no projection back: only queries need it (read below)
        del coll.catalog.projection
        assert coll.catalog.width == 24 and coll.catalog.projection() is not None
        assert len(coll.catalog.live_slots()) == coll.catalog.used_slots() == 60
        info = coll.info()
        assert info["stored_dims"] == 24 and info["dims"] == 16 and info["searchable"] == 60 and info["pca"]
        assert _self_hits(coll) == 1.0
        # refits need no re-extraction: PCA is fitted on the stored vectors
        before = coll.info()["generation"]
        coll.reindex(refit_pca=True)
        assert coll.info()["generation"] == before + 1 and _self_hits(coll) == 1.0
        assert sorted(p.name for p in coll.path.glob("*.[0-9]*.*")) == sorted(
            f"{kind}.{before + 1}.{ext}" for kind, ext in (("pca", "npz"), ("dba", "npz"), ("index", "faiss"))
        ) + ["signatures.3.u8", "vectors.3.bf16"]  # one generation of derived files; the stored ones compacted by each reindex
        _assert_signatures(coll)  # carried through both rewrites (projection, compaction) to each content's new slot


def _assert_signatures(coll: Collection, where: slice = slice(None)) -> None:
    """Every indexed image (or those in `where`, by id order) has the signature of its file's model input."""
    from ris.images import signature
    from ris.images.decode import decode_file

    ids, sigs = coll.catalog.signatures()
    rows = coll.catalog.rows(ids.tolist())
    for image_id, sig in list(zip(ids.tolist(), sigs, strict=True))[where]:
        pixels = decode_file(rows[image_id].path, coll.manifest.input_size).pixels
        assert np.array_equal(sig, signature.of_pixels(pixels)), rows[image_id].path


def test_a_collection_stored_before_signatures_searches_and_keeps_new_ones(subset_dir: Path, tmp_path: Path) -> None:
    """A collection indexed before signatures were kept has no signature file: it searches as before, and images
    added later get theirs (the contents stored before read as having none)."""
    with Collection.create(tmp_path / "c.ris") as coll:
        coll.index([subset_dir / "cup", subset_dir / "panda"])
        files = list(coll.path.glob("signatures.*.u8"))
        assert len(files) == 1 and files[0].stat().st_size == 20 * 256
        files[0].unlink()
    with Collection.open(tmp_path / "c.ris") as coll:
        query = coll.catalog.all_rows()[3]
        assert coll.search(query.path, k=3).matches[0].id == query.id
        assert not coll.catalog.signatures()[1].any()
        first = set(coll.catalog.signatures()[0].tolist())
        coll.add([subset_dir / "sunflower"])
        ids, sigs = coll.catalog.signatures()
        new = np.array([i not in first for i in ids.tolist()])
        assert new.sum() == 10 and (sigs.any(axis=1) == new).all()
        _assert_signatures(coll, slice(20, None))
        sunflower = coll.catalog.all_rows()[-1]
        assert coll.search(sunflower.path, k=3).matches[0].id == sunflower.id


def test_a_large_run_extracts_a_random_sample_first(subset_dir: Path, tmp_path: Path, small_thresholds) -> None:
    """One `ris index` of all 60: the projection is fitted mid-run on a random 40, not the first folders' images."""
    with Collection.create(tmp_path / "c.ris", dims=16) as coll:
        sink = coll.sink()
        coll.catalog.sync(scan([subset_dir]))
        order = sink.sample_first(coll.catalog.pending())
        labels = {Path(p).parent.name for _, p in order[:40]}
        assert len(labels) == 6  # every class among the fit sample
        report = coll.index([subset_dir])
        assert report.images == 60 and coll.catalog.width == 24 and _self_hits(coll) == 1.0


def _as_format_1(src: Path, dst: Path) -> None:
    """A format-1 collection with the same images: raw float16 features in a `features` table, root-level files."""
    shutil.copytree(src, dst)
    with Collection.open(dst) as coll:
        raw = coll.catalog.vectors(coll.catalog.ok_ids())
        rows = [(r.sha256, v.astype(np.float16).tobytes()) for r, v in zip(coll.catalog.all_rows(), raw, strict=True)]
    db = sqlite3.connect(dst / "catalog.sqlite")
    with db:
        db.execute("CREATE TABLE features (sha256 TEXT PRIMARY KEY, vec BLOB NOT NULL)")
        db.executemany("INSERT OR IGNORE INTO features VALUES (?, ?)", rows)
        db.execute("DROP INDEX images_hkey")
        db.execute("ALTER TABLE images DROP COLUMN hkey")
        db.execute("ALTER TABLE images DROP COLUMN slot")
        db.execute("CREATE INDEX images_sha256 ON images(sha256)")
        db.execute("DROP TABLE projection")
        db.execute("DELETE FROM meta WHERE key IN ('vectors', 'width', 'slots', 'derived')")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    db.close()
    for f in dst.glob("*.[0-9]*.*"):
        f.unlink()
    (dst / "index.faiss").write_bytes(b"format 1's index")  # removed by the upgrade
    manifest = json.loads((dst / "manifest.json").read_text())
    (dst / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))


def test_a_format_1_collection_is_upgraded_in_place(subset_collection: Path, tmp_path: Path, small_thresholds) -> None:
    old = tmp_path / "old.ris"
    _as_format_1(subset_collection, old)
    with Collection.open(old) as coll:  # in this process the thresholds are lowered: the upgrade projects
        info = coll.info()
        assert info["format_version"] == 2 and info["images"] == info["searchable"] == 60 and info["stored_dims"] == 24
        assert _self_hits(coll) == 1.0
    assert not (old / "index.faiss").exists() and not sqlite3.connect(old / "catalog.sqlite").execute(
        "SELECT name FROM sqlite_master WHERE name = 'features'").fetchall()  # fmt: skip
    cli = tmp_path / "cli.ris"  # through the CLI (full-size thresholds: 60 images keep raw features)
    _as_format_1(subset_collection, cli)
    proc = run_cli("info", "-c", str(cli), "--json")
    info = json.loads(proc.stdout)
    assert "upgrading collection" in proc.stderr and info["format_version"] == 2 and info["searchable"] == 60
    assert info["stored_dims"] == info["raw_dims"]
    # a read-only format-1 collection says how to upgrade it, in one line
    other = tmp_path / "ro.ris"
    _as_format_1(subset_collection, other)
    other.chmod(0o555)
    try:
        proc = run_cli("info", "-c", str(other), check=False)
        if proc.returncode == 0:  # running as root: the mode does not stop writes
            pytest.skip("root ignores directory modes")
        assert "must be upgraded once where it can be written" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        other.chmod(0o755)


@pytest.fixture(scope="module")
def pca_collection(subset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The subset with a 16-d PCA (60 images fit one): every kind of derived file exists."""
    path = tmp_path_factory.mktemp("pca") / "c.ris"
    with Collection.create(path, dims=16) as coll:
        coll.index([subset_dir])
    return path


@pytest.mark.parametrize("kind", ["pca", "dba", "index"])
def test_a_damaged_derived_file_is_reported_then_healed_by_reindex(pca_collection: Path, tmp_path: Path, kind: str) -> None:
    path = tmp_path / "c.ris"
    shutil.copytree(pca_collection, path)
    query = str(Collection.open(path).catalog.all_rows()[7].path)
    damaged = derived_file(path, kind)
    damaged.write_bytes(damaged.read_bytes()[: len(damaged.read_bytes()) // 3])
    proc = run_cli("search", query, "-c", str(path), "--json", check=False)
    assert "Traceback" not in proc.stderr
    if kind == "dba":  # searches fall back to the catalogue's plain vectors: still answered
        assert proc.returncode == 0 and json.loads(proc.stdout)["matches"][0]["path"] == query
    else:
        assert proc.returncode == 1 and "damaged" in proc.stderr and "ris reindex" in proc.stderr
    run_cli("reindex", "-c", str(path))
    assert json.loads(run_cli("search", query, "-c", str(path), "--json").stdout)["matches"][0]["path"] == query


def test_a_damaged_manifest_or_a_lost_catalogue_is_one_clear_line(subset_collection: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.ris"
    shutil.copytree(subset_collection, path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "dba": "ten"}))
    proc = run_cli("info", "-c", str(path), check=False)
    assert proc.returncode == 1 and "field 'dba'" in proc.stderr and "Traceback" not in proc.stderr
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "catalog.sqlite").write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        (path / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
    proc = run_cli("info", "-c", str(path), check=False)
    assert proc.returncode == 1 and "catalogue" in proc.stderr and "missing or empty" in proc.stderr
    proc = run_cli("reindex", "-c", str(path), check=False)  # never wipes what is left
    assert proc.returncode == 1 and list(path.glob("index.*.faiss")) and list(path.glob("vectors.*.bf16"))


def test_searches_keep_working_while_reindex_builds_the_next_generation(subset_collection: Path, tmp_path: Path) -> None:
    path = tmp_path / "c.ris"
    shutil.copytree(subset_collection, path)
    with Collection.open(path) as reader:
        rows = reader.catalog.all_rows()[:6]
        vectors = reader.embed([r.path for r in rows])
        stop, failures, done = threading.Event(), [], [0]

        def search_loop() -> None:
            while not stop.is_set():
                try:
                    found = reader.search_vectors(vectors, 1, ["q"] * len(rows))
                    assert [f.matches[0].id for f in found] == [r.id for r in rows]
                    done[0] += 1
                except (RisError, AssertionError) as exc:  # pragma: no cover - what this test looks for
                    failures.append(repr(exc))

        thread = threading.Thread(target=search_loop)
        thread.start()
        try:
            for _ in range(3):
                run_cli("reindex", "-c", str(path), "--refit-pca")
        finally:
            stop.set()
            thread.join()
    assert failures == [] and done[0] > 3


def test_info_says_when_the_index_lags_the_catalogue(subset_collection: Path, tmp_path: Path) -> None:
    """A crash between a catalogue commit and the index write: info says so; the next write heals it."""
    path = tmp_path / "c.ris"
    shutil.copytree(subset_collection, path)
    with Collection.open(path) as coll:
        snap = coll.derived.snapshot()
        idx = snap.store.faiss_index
        gone = np.array([int(i) for i in coll.catalog.ok_ids()[:5]], np.int64)
        import faiss

        idx.remove_ids(faiss.IDSelectorBatch(gone))
        faiss.write_index(idx, str(derived_file(path, "index")))
    info = json.loads(run_cli("info", "-c", str(path), "--json").stdout)
    assert info["searchable"] == 55 and "55 of 60" in info["index_lag"]
    run_cli("remove", "/no/such/image.jpg", "-c", str(path))  # any write (here: removes nothing) brings it in line
    info = json.loads(run_cli("info", "-c", str(path), "--json").stdout)
    assert info["searchable"] == 60 and info["index_lag"] == ""


def _hash_index(coll: Collection) -> bool:
    q = "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'images_hkey'"
    return coll.catalog.db.execute(q).fetchone() is not None


def test_injected_features_are_searchable_and_a_bulk_load_restores_its_index(subset_collection: Path, tmp_path: Path) -> None:
    """Catalog.insert_done (features given through the Python API, no files) inside Catalog.bulk: rows go in
    'ok', the derived set takes them, and the hash index dropped meanwhile is back after it, or after a crash."""
    path = shutil.copytree(subset_collection, tmp_path / "c.ris", ignore=shutil.ignore_patterns("lock"))
    with Collection.open(path) as coll:
        ids = coll.catalog.ok_ids()[:10]
        stored = coll.catalog.vectors(ids)
        files = [SourceFile(f"/injected/{i}.jpg", 1, 1, "injected") for i in range(10)]
        hashes = [f"{i:064x}" for i in range(10)]
        coll.lock()
        with coll.catalog.bulk():
            assert not _hash_index(coll)
            new = coll.catalog.insert_done(files, hashes, stored)
            with pytest.raises(RisError, match="already in the collection"):
                coll.catalog.insert_done(files[:1], hashes[:1], stored[:1])  # a path catalogued: nothing kept
        assert _hash_index(coll)
        coll.derived.update()
        coll.unlock()
        assert coll.catalog.counts()["ok"] == len(coll.catalog.ok_ids()) and set(new) <= set(coll.catalog.ok_ids())
        assert np.array_equal(coll.catalog.vectors(new), stored)
        found = coll.search_vectors(coll.derived.snapshot().space.from_stored(stored[:3]), 2, ["q"] * 3)
        assert all({m.id for m in r.matches} == {int(a), int(b)} for r, a, b in zip(found, ids, new, strict=False))
        coll.catalog.db.execute("DROP INDEX images_hkey")  # as a bulk load killed inside leaves it
    with Collection.open(path) as coll:
        coll.catalog.sync([])
        assert _hash_index(coll)


def test_ok_ids_are_every_indexed_id_ascending_whatever_the_span_read_at_once(subset_collection: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Catalog.ok_ids reads the ids as texts a span of ids at a time (SQLite caps a string at 1 GB: ~100M ids)."""
    from ris.vectors import catalog

    path = shutil.copytree(subset_collection, tmp_path / "c.ris", ignore=shutil.ignore_patterns("lock"))
    with Collection.open(path) as coll:
        db = coll.catalog.db
        gone = [r[0] for r in db.execute("SELECT id FROM images WHERE status = 'ok' ORDER BY id").fetchall()[3:20:4]]
        coll.catalog.remove_ids(gone)
        db.execute("UPDATE images SET status = 'skipped' WHERE id = (SELECT min(id) FROM images WHERE status = 'ok')")
        db.commit()
        want = [r[0] for r in db.execute("SELECT id FROM images WHERE status = 'ok' ORDER BY id")]
        for span in (7, 1, 10**9):
            monkeypatch.setattr(catalog, "OK_IDS_SPAN", span)
            got = coll.catalog.ok_ids()
            assert got.dtype == np.int64 and got.tolist() == want
        db.execute("DELETE FROM images")
        db.commit()
        assert coll.catalog.ok_ids().tolist() == []


def test_the_vector_file_reads_rows_in_any_order_and_keeps_an_unlinked_generation(tmp_path: Path) -> None:
    """Positioned reads: any slots, repeats, runs; a reader keeps the file it opened after a rewrite unlinks it;
    a file shorter than the catalogue says is one clear error."""
    from ris.vectors.catalog import VectorFile, as_stored, from_stored

    rows = np.random.default_rng(0).standard_normal((1000, 24)).astype(np.float32)
    stored = as_stored(rows)
    path = tmp_path / "vectors.1.bf16"
    writer = VectorFile(path, 24)
    writer.write(0, stored[:600])
    writer.write(600, stored[600:])
    reader = VectorFile(path, 24)
    slots = np.array([999, 3, 4, 5, 3, 0, 512, 513, 998])
    np.testing.assert_array_equal(reader.read(slots), from_stored(stored[slots]))
    assert reader.read(np.zeros(0, np.int64)).shape == (0, 24)
    path.unlink()  # what Catalog.rewrite does to the old generation once it has switched
    np.testing.assert_array_equal(reader.read(np.arange(1000)), from_stored(stored))
    path.write_bytes(stored[:10].tobytes())
    with pytest.raises(RisError, match="damaged: it holds 10 vectors, the catalogue uses 12"):
        VectorFile(path, 24).read(np.array([11]))


def test_a_run_fits_on_the_sample_it_kept_as_a_resumed_run_does_on_the_stored_one(
    subset_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer fits the projection on the raw features its run stored, kept in memory, and stores them projected
    from the fit itself; a run resuming one that stored raw features reads them back and projects them. The same
    vectors either way, in the same slots."""
    from ris.images.decode import decode_file
    from ris.vectors.catalog import Catalog
    from ris.vectors.sink import CatalogSink

    monkeypatch.setattr(reduce, "FIT_SAMPLE", 20)
    monkeypatch.setattr(reduce, "PROJECTED_DIMS", 12)
    with Collection.create(tmp_path / "c.ris") as coll:
        paths = sorted(f.path for f in scan([subset_dir]))[::2]  # 30, of every class
        raw = coll.extractor()(np.stack([decode_file(p, coll.manifest.input_size).pixels for p in paths]))
    shas = [f"{i:064x}" for i in range(1, 31)]
    batches = [list(range(start, min(start + 8, 30))) for start in range(0, 30, 8)]  # the fit comes with the third

    def catalog(name: str) -> Catalog:
        (tmp_path / name).mkdir()
        cat = Catalog(tmp_path / name / "catalog.sqlite")
        with cat.db:
            cat.db.executemany("INSERT INTO images (path, size, mtime_ns, label, status) VALUES (?, 1, 1, 'x', 'pending')",
                               [(p,) for p in paths])  # fmt: skip
        return cat

    def commit(sink: CatalogSink, batch: list[int]) -> None:
        sink.commit([(i + 1, shas[i]) for i in batch], {shas[i]: raw[i] for i in batch}, [])

    one_run, resumed = catalog("one"), catalog("resumed")
    sink = CatalogSink(one_run, raw.shape[1], None)
    for batch in batches:
        commit(sink, batch)
    commit(CatalogSink(resumed, raw.shape[1], None), batches[0])  # a run that stopped before the fit
    sink = CatalogSink(resumed, raw.shape[1], None)
    for batch in batches[1:]:
        commit(sink, batch)
    ids = list(range(1, 31))
    a, b = one_run.vectors(ids), resumed.vectors(ids)
    assert one_run.width == resumed.width == 12 and len(one_run.live_slots()) == 30
    assert np.abs(a - b).max() < 2**-7 * np.abs(b).max()  # bfloat16's rounding apart
    np.testing.assert_array_equal(one_run.projection()[1], resumed.projection()[1])
