"""The core Collection on real Caltech images with the real bundled model, SQLite and FAISS."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from ris.collection import Collection
from ris.errors import CollectionLocked, RisError
from ris.tools import evaluate

from .conftest import PER_CLASS, SUBSET_CLASSES, caltech_files


def _copy_subset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def test_search_finds_the_original_of_a_transformed_copy(subset_collection: Path, subset_dir: Path, tmp_path: Path) -> None:
    original = sorted((subset_dir / "panda").glob("*.jpg"))[3]
    query = tmp_path / "panda-copy.png"
    ImageOps.mirror(Image.open(original).convert("RGB")).crop((10, 10, 200, 160)).save(query)
    with Collection.open(subset_collection) as coll:
        assert coll.manifest.dba and coll.manifest.verify  # the defaults: DBA-served order, verified first result
        result = coll.search(str(query), k=5)
        query_vector = coll.embed([str(query)])[0]
        rows, vectors = coll.vectors()
    assert result.matches[0].path == str(original)
    assert result.matches[0].label == "panda"
    assert [m.rank for m in result.matches] == [1, 2, 3, 4, 5]
    # similarity: the plain cosine of query and image (the first is the plain nearest); score: what ranked it,
    # never increasing down the list
    sims, scores = [m.similarity for m in result.matches], [m.score for m in result.matches]
    plain = dict(zip([r.id for r in rows], vectors @ query_vector, strict=True))
    assert sims == pytest.approx([float(plain[m.id]) for m in result.matches], abs=1e-4)
    assert sims[0] == max(sims) and 0.5 < sims[0] <= 1.0001
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1.0001 for s in scores)


def test_labels_and_precision_on_the_subset(subset_collection: Path) -> None:
    with Collection.open(subset_collection) as coll:
        info = coll.info()
        rows, vectors = coll.vectors()
    assert info["images"] == len(SUBSET_CLASSES) * PER_CLASS
    assert {r.label for r in rows} == set(SUBSET_CLASSES)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    report = evaluate.leave_one_out(vectors, [r.label for r in rows])
    assert report.precision[1] >= 0.9 and report.precision[5] >= 0.8 and report.map >= 0.7


def test_search_many_equals_one_by_one(subset_collection: Path, subset_dir: Path) -> None:
    queries = [str(p) for p in sorted((subset_dir / "cup").glob("*.jpg"))[:3]]
    with Collection.open(subset_collection) as coll:
        batched = coll.search_many(queries, k=4)
        single = [coll.search(q, k=4) for q in queries]
    for a, b in zip(batched, single, strict=True):
        assert [m.path for m in a.matches] == [m.path for m in b.matches]
        assert np.allclose([m.score for m in a.matches], [m.score for m in b.matches], atol=1e-4)
        assert a.matches[0].path == a.query  # an indexed image finds itself first


def test_resync_is_incremental(subset_dir: Path, tmp_path: Path) -> None:
    photos = _copy_subset(subset_dir, tmp_path / "photos")
    with Collection.open_or_create(tmp_path / "c.ris") as coll:
        first = coll.index([photos])
        assert first.extracted == len(SUBSET_CLASSES) * PER_CLASS and first.new == first.images
        again = coll.index([photos])
        assert (again.new, again.changed, again.removed, again.extracted) == (0, 0, 0, 0)
        # one new file, one changed file, one deleted file
        shutil.copy2(caltech_files("cup", 1, start=PER_CLASS)[0], photos / "cup" / "new.jpg")
        changed = sorted((photos / "panda").glob("*.jpg"))[0]
        ImageOps.mirror(Image.open(changed).convert("RGB")).save(changed, "JPEG")
        os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
        deleted = sorted((photos / "scissors").glob("*.jpg"))[0]
        deleted.unlink()
        third = coll.index([photos])
        assert (third.new, third.changed, third.removed, third.extracted) == (1, 1, 1, 2)
        assert third.images == first.images
        paths = {r.path for r in coll.catalog.all_rows()}
        assert str(photos / "cup" / "new.jpg") in paths and str(deleted) not in paths
        # the index follows the catalogue exactly
        from ris.vectors import faiss_index as index

        idx = coll.derived.snapshot().store.faiss_index
        assert sorted(index.ids_of(idx)) == sorted(coll.catalog.ok_ids())
        assert coll.search(str(changed), k=1).matches[0].path == str(changed)


def test_ids_are_never_reused_so_a_changed_last_file_is_served_anew(subset_dir: Path, tmp_path: Path) -> None:
    """SQLite alone gives a deleted largest rowid to the next insert: a changed file that held the largest
    id got it back, and index.faiss (and the DBA graph), which trust the vectors they hold by id, kept
    serving the old content. Ids now come from above every id ever given."""
    photos = _copy_subset(subset_dir, tmp_path / "photos")
    with Collection.open_or_create(tmp_path / "c.ris") as coll:
        coll.index([photos])
        rows, plain = coll.vectors()
        last = max(rows, key=lambda r: r.id)
        before = plain[rows.index(last)]
        other = caltech_files("cup" if last.label != "cup" else "panda", 1, start=PER_CLASS)[0]
        shutil.copy(other, last.path)  # new content, new size and mtime
        os.utime(last.path, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert coll.index([photos]).changed == 1
        now = coll.catalog.row_by_path(last.path)
        assert now is not None and now.id > last.id and now.sha256 != last.sha256
        idx = coll.derived.snapshot().store.faiss_index
        served = idx.reconstruct(now.id)  # DBA-augmented: near its own plain vector, not the old image's
        rows, plain = coll.vectors()
        assert float(served @ plain[[r.id for r in rows].index(now.id)]) > max(0.9, float(served @ before) + 0.1)
        assert coll.search(last.path, k=1).matches[0].path == last.path
        # the old content's vector is no longer used (its row is dropped when `ris reindex` compacts the file)
        assert len(coll.catalog.live_slots()) == len({r.sha256 for r in rows})
        coll.remove_ids([now.id])
        coll.index([photos])
        assert coll.catalog.row_by_path(last.path).id > now.id


def test_resync_of_one_folder_keeps_the_others(subset_dir: Path, tmp_path: Path) -> None:
    with Collection.open_or_create(tmp_path / "c.ris") as coll:
        coll.index([subset_dir / "cup"])
        report = coll.index([subset_dir / "panda"])
        assert report.removed == 0 and report.images == 2 * PER_CLASS


def test_identical_files_are_extracted_once(subset_dir: Path, tmp_path: Path) -> None:
    photos = tmp_path / "dups"
    photos.mkdir()
    src = sorted((subset_dir / "sunflower").glob("*.jpg"))[:3]
    for f in src:
        shutil.copy2(f, photos / f.name)
        shutil.copy2(f, photos / ("copy_" + f.name))
    with Collection.open_or_create(tmp_path / "c.ris") as coll:
        report = coll.index([photos])
        assert report.images == 6 and report.extracted == 3
        assert len(coll.catalog.live_slots()) == coll.catalog.used_slots() == 3


def test_add_and_remove(subset_dir: Path, tmp_path: Path) -> None:
    with Collection.open_or_create(tmp_path / "c.ris") as coll:
        coll.index([subset_dir / "cup"])
        assert coll.add([subset_dir / "panda"]).images == 2 * PER_CLASS
        assert coll.remove([str(subset_dir / "cup")]) == PER_CLASS
        assert coll.remove([str(subset_dir / "panda" / "*_0001.jpg")]) == 1
        assert coll.info()["images"] == PER_CLASS - 1
        result = coll.search(str(caltech_files("cup", 1)[0]), k=50)
        assert all(m.label == "panda" for m in result.matches) and len(result.matches) == PER_CLASS - 1


def test_bad_files_are_skipped_recorded_and_never_abort(subset_dir: Path, tmp_path: Path) -> None:
    photos = _copy_subset(subset_dir / "cup", tmp_path / "photos" / "cup")
    good = sorted(photos.glob("*.jpg"))[0].read_bytes()
    bad = {
        "zero.jpg": b"",
        "notes.jpg": b"hello, not a picture\n",
        "truncated.jpg": good[: len(good) // 4],
        "garbage.png": b"\x89PNG\r\n\x1a\n" + os.urandom(300),
    }
    for name, data in bad.items():
        (photos / name).write_bytes(data)
    with Collection.open_or_create(tmp_path / "c.ris") as coll:
        report = coll.index([photos])
        assert report.images == PER_CLASS and report.skipped == len(bad)
        reasons = {Path(s["path"]).name: s["reason"] for s in coll.info()["skipped_files"]}
        assert set(reasons) == set(bad)
        assert reasons["zero.jpg"] == "empty file" and "not an image" in reasons["notes.jpg"]
        assert "truncated" in reasons["truncated.jpg"]
        # skipped files are not retried while unchanged, and good data is kept
        assert coll.index([photos]).extracted == 0 and coll.info()["images"] == PER_CLASS


def test_second_writer_is_refused_while_readers_work(subset_collection: Path) -> None:
    writer = Collection.open(subset_collection)
    writer.lock()
    try:
        other = Collection.open(subset_collection)
        with pytest.raises(CollectionLocked, match=f"locked by PID {os.getpid()}"):
            other.remove(["/nowhere"])
        assert other.search(str(caltech_files("cup", 1)[0]), k=1).matches  # a reader is not blocked
        other.close()
    finally:
        writer.close()


def test_collection_made_with_another_model_is_a_clear_error(subset_collection: Path) -> None:
    with pytest.raises(RisError, match="built with model efficientnet-lite0, not efficientnet-lite2"):
        Collection.open_or_create(subset_collection, model="efficientnet-lite2")


def test_newer_format_is_refused(tmp_path: Path) -> None:
    coll = Collection.create(tmp_path / "c.ris")
    coll.close()
    manifest = json.loads((tmp_path / "c.ris" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "c.ris" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RisError, match="newer ris"):
        Collection.open(tmp_path / "c.ris")
    db = sqlite3.connect(tmp_path / "c.ris" / "catalog.sqlite")
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.commit()
    db.close()
    from ris.vectors.catalog import Catalog

    with pytest.raises(RisError, match="newer ris"):
        Catalog(tmp_path / "c.ris" / "catalog.sqlite")


def test_pca_is_fitted_once_large_enough_and_refit_on_demand(subset_dir: Path, tmp_path: Path) -> None:
    with Collection.open_or_create(tmp_path / "c.ris", dims=16) as coll:  # 32 images fit a 16-d PCA
        coll.index([subset_dir / "cup", subset_dir / "panda"])
        assert not coll.info()["pca"] and coll.info()["dims"] == coll.manifest.raw_dims == 11520  # 20 images: raw
        coll.add([subset_dir / "airplanes", subset_dir / "sunflower"])
        info = coll.info()
        assert info["pca"] and info["dims"] == 16 and info["images"] == 4 * PER_CLASS
        before = coll.search(str(caltech_files("panda", 1)[0]), k=3)
        coll.reindex(refit_pca=True)
        after = coll.search(str(caltech_files("panda", 1)[0]), k=3)
        assert before.matches[0].path == after.matches[0].path


def test_features_keep_order_and_repeats(subset_collection: Path) -> None:
    """Neighbour lookups ask for the same image several times (query expansion, re-scoring)."""
    with Collection.open(subset_collection) as coll:
        ids = [int(i) for i in coll.catalog.ok_ids()[:3]]
        once = coll.catalog.vectors(ids)
        repeated = coll.catalog.vectors([ids[2], ids[0], ids[2], ids[1], ids[0]])
        assert np.array_equal(repeated, once[[2, 0, 2, 1, 0]]) and once.shape == (3, coll.catalog.width)
        assert not coll.catalog.vectors([10**9]).any()  # unknown id: zeros, never garbage
        expanded = coll.expand(coll.vectors()[1][:8], 5)
        assert np.isfinite(expanded).all() and np.allclose(np.linalg.norm(expanded, axis=1), 1, atol=1e-4)


def test_vectors_are_stored_as_bfloat16_rounded_to_nearest(tmp_path: Path) -> None:
    """ris.vectors.catalog.as_stored: bfloat16 bits (float32's top half, rounded to nearest even), float32's range kept
    (GeM's ~1e-6 dark cells are not flushed); a committed batch reads back as exactly that."""
    from ris.vectors.catalog import Catalog, as_stored, from_stored

    x = np.array([[0.5, 1e-6, -3e-5, 2.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.25, 123.456]], np.float32)
    got = as_stored(x)
    assert got.dtype == np.uint16 and as_stored([], 6).shape == (0, 6)
    back = from_stored(got)[0]
    np.testing.assert_allclose(back, x[0], rtol=2**-8)  # 8 bits of mantissa
    assert back[1] > 0 and back[4] == 1.0 and back[5] == 1.0 + 4 * 2**-8  # ties to even, small values kept
    cat = Catalog(tmp_path / "c.sqlite")
    with cat.db:
        cat.db.execute("INSERT INTO images (path, size, mtime_ns, label, status) VALUES ('/a.jpg', 1, 1, 'a', 'pending')")
    (image_id,) = cat.db.execute("SELECT id FROM images").fetchone()
    cat.commit_batch([(image_id, "ab" * 32)], {"ab" * 32: x[0]}, [])
    np.testing.assert_array_equal(cat.vectors([image_id]), from_stored(got))
    cat.close()
