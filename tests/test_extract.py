"""The extraction pipeline's plumbing: decode workers' shared-memory slots and the writer thread."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ris.extract import pipeline as extract
from ris.images.decode import decode_file

from .conftest import caltech_files


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """27 real Caltech images and one broken file among them (so one batch has a hole)."""
    paths = [str(p) for p in caltech_files("ant", 14) + caltech_files("camera", 13)]
    broken = tmp_path_factory.mktemp("bad") / "broken.jpg"
    broken.write_bytes(Path(paths[0]).read_bytes()[:300])
    return paths[:9] + [str(broken)] + paths[9:]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_carry_each_files_own_pixels_through_the_slot_ring(files: list[str], workers: int) -> None:
    """7 batches through a ring of 5 slots: every id gets its own file's pixels, the broken one a reason;
    a batch's pixels are still intact two batches later (the ring's promise to the GPU's async copies)."""
    times = extract.StageTimes()
    held: list[extract.Batch] = []
    got: dict[int, np.ndarray] = {}
    failed: dict[int, str] = {}

    def check(batch: extract.Batch) -> None:
        for (image_id, _), pixels in zip(batch.ok, batch.pixels if batch.pixels is not None else [], strict=True):
            got[image_id] = pixels.copy()

    for batch in extract.decoded_batches(list(enumerate(files)), 96, 4, workers, times, prefetch=3):
        assert len(batch.ok) == (0 if batch.pixels is None else len(batch.pixels))
        failed.update(batch.failed)
        held.append(batch)
        if len(held) == 3:  # checked while the consumer holds the second batch after it
            check(held.pop(0))
    for batch in held:
        check(batch)
    assert sorted(failed) == [9] and ("truncated" in failed[9] or "corrupt" in failed[9])
    assert sorted(got) == [i for i in range(len(files)) if i != 9]
    for image_id, pixels in got.items():
        assert np.array_equal(pixels, decode_file(files[image_id], 96).pixels), files[image_id]
    assert times.decode > 0


def test_a_finished_run_leaves_its_workers_to_the_next_and_an_abandoned_one_ends_them(files: list[str]) -> None:
    """Forking once a process: the parent's pages written while workers live are copied on write (a warm
    model's buffers, ~0.15 s per fork). A run that stopped early may leave workers writing its slots, so
    its pool is ended, never reused; the next run decodes each file's own pixels again."""
    items = list(enumerate(files))

    def pixels_of(run) -> dict[int, np.ndarray]:  # copied as each batch comes: the slots are a ring
        return {i: p for b in run for (i, _), p in zip(b.ok, b.pixels.copy(), strict=True)}

    first = pixels_of(extract.decoded_batches(items, 96, 4, 2, extract.StageTimes()))
    kept = extract._KEPT
    assert kept is not None and not kept.busy
    pids = sorted(w.pid for w in kept.pool._pool)
    again = pixels_of(extract.decoded_batches(items, 96, 4, 2, extract.StageTimes(), prefetch=3))
    assert extract._KEPT is kept and sorted(w.pid for w in kept.pool._pool) == pids  # the same processes
    assert sorted(again) == sorted(first) and all(np.array_equal(again[i], first[i]) for i in first)
    assert all(np.array_equal(again[i], decode_file(files[i], 96).pixels) for i in (0, 13, 26))
    stopped = extract.decoded_batches(items, 96, 4, 2, extract.StageTimes())
    next(stopped)
    stopped.close()  # abandoned with batches in flight
    assert extract._KEPT is None and not any(w.is_alive() for w in kept.pool._pool)
    fresh = pixels_of(extract.decoded_batches(items, 96, 4, 2, extract.StageTimes()))
    assert sorted(fresh) == sorted(again) and all(np.array_equal(fresh[i], again[i]) for i in fresh)


def test_decode_processes_share_the_cores_with_a_cpu_model_and_take_all_but_two_beside_a_gpu() -> None:
    """Beside a model on the CPU one decode process a core (a camera's photos make decoding the bound, small images
    leave the workers waiting); beside a GPU decoding is the bound (one core feeds the model, one commits)."""
    assert [extract.default_workers(n) for n in (1, 2, 16)] == [1, 2, 16]
    assert [extract.default_workers(n, "cuda") for n in (1, 2, 16)] == [1, 1, 14]


def _decoder_faults() -> tuple[int, int]:
    """(page faults decoding 100 Caltech files with the allocator as it comes, after extract.decoder_process)."""
    import resource

    files = [str(p) for p in caltech_files("airplanes", 50) + caltech_files("Faces_easy", 50)]

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for f in files:
            decode_file(f, 224)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults()  # warm: imports, first buffers
    plain = faults()
    extract.decoder_process()
    faults()
    return plain, faults()


def _heap_tuned() -> int:
    return extract.decoder_process.cache_info().currsize


def test_decode_workers_keep_their_heap_instead_of_faulting_fresh_pages_at_every_image(files: list[str]) -> None:
    """A decode worker's buffers (file bytes, decoded photo, resized copy) are reused from a heap it keeps, instead of
    mapped anew and faulted in page by page at every image (full Caltech-101: 0.59 ms of CPU an image instead of
    0.65). Measured in a process of its own (a pytest process keeps its allocator), then the pool's wiring."""
    import multiprocessing as mp
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's mallopt")
    with mp.get_context("spawn").Pool(1) as pool:
        plain, tuned = pool.apply(_decoder_faults)
    assert tuned * 4 < plain, (plain, tuned)
    list(extract.decoded_batches(list(enumerate(files)), 96, 4, 2, extract.StageTimes()))
    kept = extract._KEPT
    assert kept is not None
    assert kept.pool.apply(_heap_tuned) == 1  # the workers ran it when they started


def test_a_writer_error_reaches_the_caller_after_what_was_queued(files: list[str]) -> None:
    """The writer thread commits in order; its first error is raised in the extracting thread."""
    committed: list[int] = []

    def on_batch(batch: extract.Batch, features: dict[str, np.ndarray]) -> None:
        if len(committed) >= 8:
            raise OSError("disk full")
        committed.extend(image_id for image_id, _ in batch.ok)

    def model(pixels: np.ndarray) -> np.ndarray:
        return pixels.reshape(len(pixels), -1)[:, :8].astype(np.float32)

    with pytest.raises(OSError, match="disk full"):
        extract.run(list(enumerate(files)), model, 64, on_batch, batch_size=4, workers=1)
    assert committed and committed == sorted(committed)


def test_batches_wait_in_the_models_queue_while_the_main_thread_hands_earlier_ones_on(files: list[str]) -> None:
    """With OpenVINO's streams the pipeline keeps the extractor's `in_flight` batches submitted (two more than its
    streams), so a stream that ends one starts the next at once; each image still gets the features a query of it
    gets, and the writer commits the batches in order."""
    from ris.model import runtime

    ext, _ = runtime.load_extractor(device="cpu", runtime="openvino", threads=2)

    class Counted:  # the real extractor, counting the batches submitted and not yet fetched
        device, in_flight, submitted, most = "cpu", ext.in_flight, 0, 0

        def __call__(self, pixels: np.ndarray) -> np.ndarray:
            return ext(pixels)

        def submit(self, pixels: np.ndarray):
            fetch, kept = ext.submit(pixels), []
            self.submitted += 1
            self.most = max(self.most, self.submitted)

            def result() -> np.ndarray:
                if not kept:
                    kept.append(fetch())
                    self.submitted -= 1
                return kept[0]

            return result

    counted, committed = Counted(), []
    on_batch = lambda batch, features: committed.append((batch.ok, features))  # noqa: E731
    extract.run(list(enumerate(files)), counted, 224, on_batch, batch_size=4, workers=1)
    assert counted.most == ext.in_flight == 4 and counted.submitted == 0
    ids = [image_id for ok, _ in committed for image_id, _ in ok]
    assert ids == [i for i in range(len(files)) if i != 9]
    features = {sha: f for _, feats in committed for sha, f in feats.items()}
    for image_id, sha in [item for ok, _ in committed for item in ok][::5]:
        np.testing.assert_array_equal(features[sha], ext(decode_file(files[image_id], 224).pixels[None])[0])


def test_the_torch_engine_projects_on_its_device_as_the_sink_would(tmp_path: Path) -> None:
    """A GPU engine hands the writer stored vectors (ris.model.torch_runtime projects there); run here on the CPU with
    the real network: the same numbers as the sink's projection on the host, raw features before the fit, raw
    features for queries through the original extractor, and a merged batch of both widths stored as one."""
    pytest.importorskip("torch")
    from ris.model import registry as models
    from ris.model.torch_runtime import TorchExtractor
    from ris.vectors import reduce
    from ris.vectors.catalog import Catalog
    from ris.vectors.sink import CatalogSink

    net, _ = models.build("efficientnet-lite0")
    ext = TorchExtractor(net, "efficientnet-lite0", 224, 11520)
    pixels = np.stack([decode_file(str(f), 224).pixels for f in caltech_files("ant", 6) + caltech_files("camera", 6)])
    raw = ext(pixels)
    fitted: list[reduce.Projection] = []
    projecting = ext.projecting(lambda: fitted[0] if fitted else None)
    assert np.array_equal(projecting(pixels[:2]), raw[:2])  # nothing fitted yet: raw
    fitted.append(reduce.Projection.fit(raw, 8))
    on_device, on_host = projecting(pixels), fitted[0](raw)
    assert on_device.shape == (12, 8) and np.abs(on_device - on_host).max() < 1e-4 * np.abs(on_host).max()
    assert ext(pixels[:1]).shape == (1, 11520)  # the original still gives raw features

    catalog = Catalog(tmp_path / "catalog.sqlite")
    with catalog.db:
        catalog.db.executemany("INSERT INTO images (path, size, mtime_ns, label, status) VALUES (?, 1, 1, 'x', 'pending')",
                               [(f"/img/{i}.jpg",) for i in range(4)])  # fmt: skip
    sink = CatalogSink(catalog, 11520, fitted[0])
    assert sink.projecting(ext)._projection_of() is fitted[0]
    shas = [f"{i:064x}" for i in range(1, 5)]
    sink.commit(list(zip(range(1, 5), shas, strict=True)), {shas[0]: raw[0], shas[1]: raw[1], shas[2]: on_device[2],
                shas[3]: on_device[3]}, [])  # fmt: skip
    stored = catalog.vectors([1, 2, 3, 4])
    assert catalog.width == 8 and np.allclose(stored, on_host[:4], atol=0.01 * np.abs(on_host).max())
