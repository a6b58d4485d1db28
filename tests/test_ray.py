"""Extraction on a local Ray instance (2 CPUs) gives what the local pipeline gives, and resumes by shard."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ris.collection import Collection
from ris.extract import ray as distributed
from ris.extract.ray import plan_shards, ray_extract
from ris.files.sources import scan
from ris.images import signature
from ris.images.decode import decode_file

from .conftest import copy_classes

CLASSES = ("airplanes", "panda", "cup")
PER_CLASS = 8
SHARD = 10  # ids 1..27: shards of ids 1-9, 10-19, 20-27
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data"),  # Ray's own deprecated settings
    pytest.mark.filterwarnings("error::DeprecationWarning:ris.extract.ray"),  # but ris calls no deprecated Ray API
]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "180")  # a loaded 2-core runner starts slowly (default 60 s)
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k.startswith("RIS_")}
    for attempt in range(2):  # Ray >= 2.5x waits a fixed 30 s for its raylet (the variable above is gone): once
        try:  # in a CI run it did not register in time (not reproduced alone), so a second start is allowed
            ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, object_store_memory=200 * 2**20,
                     runtime_env={"env_vars": env}, log_to_driver=False)  # fmt: skip
            break
        except Exception as exc:
            ray.shutdown()
            if attempt or "timed out during startup" not in str(exc):
                raise
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def make_images(root: Path) -> Path:
    """CLASSES × PER_CLASS Caltech images and three bad files (not an image, empty, truncated)."""
    copy_classes(root, CLASSES, PER_CLASS)
    good = next((root / "cup").glob("*.jpg")).read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "notes.jpg").write_text("not an image")
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "truncated.jpg").write_bytes(good[: len(good) // 4])
    return root


def local_build(images: Path, where: Path) -> tuple[dict[str, np.ndarray], list]:
    """The reference: the same files through the local pipeline (features by path, skipped files)."""
    with Collection.open_or_create(where) as coll:
        coll.index([images])
        return _features_by_path(coll), coll.catalog.skipped_files()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("ray-images"))


@pytest.fixture(scope="module")
def local_features(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, np.ndarray], list]:
    return local_build(images, tmp_path_factory.mktemp("local") / "c.ris")


def _features_by_path(coll: Collection) -> dict[str, np.ndarray]:
    rows = coll.catalog.all_rows()
    raw = coll.catalog.vectors([r.id for r in rows])
    return {r.path: v for r, v in zip(rows, raw, strict=True)}


def _ray_collection(path: Path, images: Path) -> tuple[Collection, list[tuple[int, str]]]:
    coll = Collection.open_or_create(path)
    coll.lock()
    coll.catalog.sync(scan([images]))
    return coll, coll.catalog.pending()


def _extract(coll: Collection, items: list[tuple[int, str]]):
    return ray_extract(items, coll.model_settings(), coll.sink(), coll.path / distributed.SHARD_DIR, address=None,
                       batch_size=8, shard_size=SHARD)  # fmt: skip


def assert_same(coll: Collection, local: tuple[dict[str, np.ndarray], list]) -> None:
    ref, ref_skipped = local
    got = _features_by_path(coll)
    assert set(got) == set(ref) and len(got) == len(CLASSES) * PER_CLASS
    for path, vec in got.items():
        cos = float(vec @ ref[path] / (np.linalg.norm(vec) * np.linalg.norm(ref[path])))
        assert cos >= 0.999, (path, cos)
    assert coll.catalog.skipped_files() == ref_skipped and len(ref_skipped) == 3
    assert coll.catalog.counts()["pending"] == 0
    assert not any((coll.path / distributed.SHARD_DIR).iterdir())  # every shard merged, none left behind
    ids, sigs = coll.catalog.signatures()  # made on the decode tasks' nodes, as the local pipeline makes them
    rows = coll.catalog.rows(ids.tolist())
    for image_id, sig in zip(ids.tolist(), sigs, strict=True):
        pixels = decode_file(rows[image_id].path, coll.manifest.input_size).pixels
        assert np.array_equal(sig, signature.of_pixels(pixels)), rows[image_id].path


def test_ray_matches_the_local_pipeline(ray_local: None, images: Path, local_features, tmp_path: Path) -> None:
    coll, items = _ray_collection(tmp_path / "ray.ris", images)
    with coll:
        times = _extract(coll, items)
        coll.derived.update()
        assert (times.images, times.extracted, times.skipped) == (len(items), len(CLASSES) * PER_CLASS, 3)
        assert times.model > 0 and times.decode > 0
        [(node, counts)] = times.nodes.items()  # one local node did everything
        assert counts == {"decoded": len(items), "extracted": len(CLASSES) * PER_CLASS}, node
        assert_same(coll, local_features)
        hits = coll.search(str(next((images / "panda").glob("*.jpg"))), k=1)
        assert hits.matches[0].label == "panda"


def test_a_crash_resumes_from_the_written_shards(
    ray_local: None, images: Path, local_features, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    coll, items = _ray_collection(tmp_path / "ray.ris", images)
    real_merge, computed = distributed.merge_shard, []

    def crash_after_first(c, shard: distributed.Shard) -> int:
        if computed:  # the second shard: die after it was written, before its merge
            raise KeyboardInterrupt
        computed.append(shard)
        return real_merge(c, shard)

    with coll:
        monkeypatch.setattr(distributed, "merge_shard", crash_after_first)
        with pytest.raises(KeyboardInterrupt):
            _extract(coll, items)
        written = {p.name for p in (coll.path / distributed.SHARD_DIR).iterdir()}
        assert len(written) == 1 and computed[0].name not in written  # one shard merged (and gone), one on disk
        monkeypatch.setattr(distributed, "merge_shard", real_merge)
        rows: list[int] = []
        real_build = distributed._build_dataset

        def spy(shards: list[distributed.Shard], *args: object):
            rows.append(sum(len(s.items) for s in shards))
            return real_build(shards, *args)

        monkeypatch.setattr(distributed, "_build_dataset", spy)
        pending = coll.catalog.pending()
        assert len(pending) == len(items) - len(computed[0].items)
        times = _extract(coll, pending)
        planned = plan_shards(pending, SHARD, distributed._identity(coll.model_settings()))
        written_shard = next(s for s in planned if s.name in written)
        assert rows == [len(pending) - len(written_shard.items)]  # the written shard was merged, not recomputed
        assert times.images == len(pending)
        coll.derived.update()
        assert_same(coll, local_features)


def test_shards_keep_their_names_when_other_shards_are_done() -> None:
    items = [(i, f"/img/{i}.jpg") for i in range(1, 40)]
    before = plan_shards(items, 16, "model")
    after = plan_shards([it for it in items if it[0] >= 16], 16, "model")
    assert [s.name for s in after] == [s.name for s in before[1:]]
    assert plan_shards(items, 16, "other model")[1].name != before[1].name
