"""Device-aware search (ris.vectors.faiss_index.search / range_search): device choice, the PyTorch path against FAISS.

The PyTorch path is the GPU's code; here it runs on CPU tensors ("torch:cpu"), and also on CUDA
("torch:cuda") where PyTorch sees a GPU. Real FAISS indexes, real vectors of real images.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from ris.collection import Collection
from ris.errors import RisError
from ris.tools import evaluate
from ris.tools.dupes import similar_pairs
from ris.vectors import faiss_index as index

from .test_index import _clustered, _filled

TORCH_DEVICES = ["torch:cpu"] + (["torch:cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def real(subset_collection: Path) -> tuple[faiss.Index, np.ndarray, np.ndarray, list[str]]:
    """The subset collection's IDMap2,Flat index (ids are catalogue ids), its vectors, their ids and labels."""
    with Collection.open(subset_collection) as coll:
        idx = coll.derived.snapshot().store.faiss_index
        rows, vectors = coll.vectors()
    return idx, vectors, np.array([r.id for r in rows], np.int64), [r.label for r in rows]


def _queries(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    """The vectors themselves and noisy copies: near and far neighbours both."""
    noisy = vectors + 0.05 * np.random.default_rng(seed).standard_normal(vectors.shape).astype(np.float32)
    q = np.concatenate([vectors, noisy])
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _same_ranking(scores: np.ndarray, ids: np.ndarray, want_scores: np.ndarray, want_ids: np.ndarray,
                  atol: float = 1e-5) -> None:  # fmt: skip
    """Scores equal within atol; ids equal, except that neighbours scoring within atol may swap places."""
    assert scores.shape == want_scores.shape and ids.shape == want_ids.shape
    assert np.abs(scores - want_scores).max() <= atol
    for s, got, want in zip(want_scores, ids, want_ids, strict=True):
        differ = got != want
        if differ.any():  # a swap among near-equal scores, or a near tie at the k-th place
            assert np.all(np.abs(s[differ] - s[differ][:, None]).min(axis=1) <= 2 * atol) or (
                np.abs(s[differ] - s[-1]).max() <= 2 * atol
            ), (got, want, s)


def test_auto_and_cpu_search_on_the_cpu_here(real, monkeypatch: pytest.MonkeyPatch) -> None:
    idx, vectors, _, _ = real
    if torch.cuda.is_available() or faiss.get_num_gpus():
        pytest.skip("a GPU is visible: auto does not stay on the CPU here")
    monkeypatch.delenv("RIS_SEARCH_DEVICE", raising=False)
    assert index.search_plan(idx, 1, 5) == "faiss-cpu"
    assert index.search_plan(idx, 10**6, 5) == "faiss-cpu"  # big enough for a GPU, but there is none
    assert index.search_plan(idx, 10**6, 5, "cpu") == "faiss-cpu"
    with pytest.raises(RisError, match="cuda asked for, but PyTorch sees no CUDA GPU") as caught:
        index.search(idx, vectors[:2], 5, device="cuda")
    assert "\n" not in str(caught.value)
    monkeypatch.setenv("RIS_SEARCH_DEVICE", "cuda")  # the environment variable is the same knob
    with pytest.raises(RisError, match="no CUDA GPU"):
        index.search(idx, vectors[:2], 5)
    monkeypatch.setenv("RIS_SEARCH_DEVICE", "cpu")
    assert index.search(idx, vectors[:2], 5)[1].shape == (2, 5)


def test_unknown_device_or_dtype_is_a_clear_error(real) -> None:
    idx, vectors, _, _ = real
    with pytest.raises(RisError, match="unknown search device 'gpu'; choose one of auto, cpu, cuda"):
        index.search(idx, vectors[:1], 5, device="gpu")
    with pytest.raises(RisError, match="unknown search dtype 'bfloat16'"):
        index.search(idx, vectors[:1], 5, device="torch:cpu", dtype="bfloat16")


def test_small_searches_stay_on_the_cpu_in_auto(real) -> None:
    """auto never takes a small search to a GPU (so a one-off `ris search` never initialises CUDA)."""
    idx, _, _, _ = real
    assert idx.ntotal * 1 < index.GPU_FROM_PAIRS
    assert index.search_plan(idx, 1, 5, "auto") == "faiss-cpu"


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_torch_matches_faiss_on_real_vectors(real, device: str) -> None:
    idx, vectors, ids, _ = real
    q = _queries(vectors)
    for k in (1, 5, 17, idx.ntotal, idx.ntotal + 40):  # k > ntotal: every vector, ntotal columns
        want = idx.search(q, min(k, idx.ntotal))
        for block in (None, 1, 7, 64):  # query blocks: one, every query alone, uneven, a partial last
            scores, found = index.search(idx, q, k, device=device, block=block)
            _same_ranking(scores, found, *want)
            assert np.isin(found, ids).all()  # IDMap2 ids (catalogue ids), not rows
    assert index._cache[idx].vectors.dtype == torch.float32


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_float16_storage_keeps_scores_within_1e_3(real, device: str) -> None:
    idx, vectors, _, _ = real
    q = _queries(vectors, seed=1)
    want_scores, want_ids = idx.search(q, 10)
    scores, found = index.search(idx, q, 10, device=device, dtype="float16", block=9)
    assert index._cache[idx].vectors.dtype == torch.float16
    assert scores.dtype == np.float32 and np.abs(scores - want_scores).max() < 1e-3
    # re-scored in float32 against the float16-rounded vectors (not rounded again as float16 products)
    held, held_ids = index._flat_arrays(idx)  # what the index holds, row by row
    rows = np.argsort(held_ids)[np.searchsorted(held_ids, found, sorter=np.argsort(held_ids))]
    rounded = held.astype(np.float16).astype(np.float32)[rows]
    assert np.abs(scores - np.einsum("qd,qkd->qk", q, rounded)).max() < 1e-6
    all_scores, all_ids = idx.search(q, idx.ntotal)  # every vector's exact score, per query
    for got, want, kth, row_s, row_i in zip(found, want_ids, want_scores[:, -1], all_scores, all_ids, strict=True):
        extra = np.setdiff1d(got, want)  # found only with float16: must score within 1e-3 of the true k-th
        assert (row_s[np.isin(row_i, extra)] >= kth - 1e-3).all()
    # the float32 copy comes back when asked for again: one resident copy per index
    index.search(idx, q, 10, device=device)
    assert index._cache[idx].vectors.dtype == torch.float32


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_blocks_ids_and_long_rankings_on_clustered_vectors(device: str) -> None:
    x = _clustered(3000)
    ids = np.arange(3000, dtype=np.int64) * 7 + 3
    idx = _filled(index.EXACT_FACTORY, x, ids)
    q = _clustered(300, seed=1)
    for k in (10, 1500, 3000):  # top-k and (k >= ntotal / 4) sorted rankings
        want = idx.search(q, k)
        _same_ranking(*index.search(idx, q, k, device=device, block=128), *want)
        if k >= index.SORT_FROM_K:  # the CPU's product-and-sort for long rankings agrees with FAISS too
            _same_ranking(*index.search(idx, q, k, device="cpu"), *want)


def test_a_reconciled_index_is_uploaded_again() -> None:
    x = _clustered(500)
    ids = np.arange(500, dtype=np.int64)
    lookup = dict(zip(ids.tolist(), range(500), strict=True))
    idx = _filled(index.EXACT_FACTORY, x[:400], ids[:400])
    assert index.search(idx, x[399:400], 1, device="torch:cpu")[1][0, 0] == 399
    # as many out as in: ntotal unchanged, the change count tells the copy is stale
    assert index.reconcile(idx, ids[1:401], lambda chunk: x[[lookup[int(i)] for i in chunk]]) == (1, 1)
    assert idx.ntotal == 400
    _, found = index.search(idx, x[[0, 400]], 1, device="torch:cpu")
    assert found[0, 0] != 0 and found[1, 0] == 400
    idx.add_with_ids(x[401:403], ids[401:403])  # a change outside reconcile: ntotal tells
    assert index.search(idx, x[402:403], 1, device="torch:cpu")[1][0, 0] == 402
    index.release(idx)
    assert idx not in index._cache


def test_memory_mapped_and_empty_indexes(tmp_path: Path) -> None:
    x = _clustered(1000)
    ids = np.arange(1000, dtype=np.int64) + 10
    path = tmp_path / "flat.faiss"
    index.save(_filled(index.EXACT_FACTORY, x, ids), path)
    mapped = index.load(path, mmap=True)  # the vectors are uploaded from the mapped file
    _same_ranking(*index.search(mapped, x[:50], 8, device="torch:cpu"), *mapped.search(x[:50], 8))
    empty = index.create(64)
    scores, found = index.search(empty, x[:3], 5, device="torch:cpu")
    assert found.tolist() == [[-1]] * 3 and np.isneginf(scores).all()


def test_approximate_indexes_stay_on_faiss() -> None:
    x = _clustered(2000)
    ivf = _filled("IVF16,SQ8", x, np.arange(2000, dtype=np.int64))
    assert index.search_plan(ivf, 10**6, 10, "torch:cpu") == "faiss-cpu"
    assert np.array_equal(index.search(ivf, x[:20], 5, device="torch:cpu")[1], index.search(ivf, x[:20], 5)[1])


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_range_search_matches_faiss(real, device: str) -> None:
    idx, vectors, _, _ = real
    q = _queries(vectors, seed=2)
    for radius in (0.3, 0.6):
        lims, scores, found = index.range_search(idx, q, radius, device=device, block=11)
        want_lims, want_scores, want_ids = idx.range_search(q, radius)
        assert np.array_equal(lims, want_lims)
        for i in range(len(q)):
            got = dict(zip(found[lims[i] : lims[i + 1]].tolist(), scores[lims[i] : lims[i + 1]].tolist(), strict=True))
            want = dict(zip(want_ids[lims[i] : lims[i + 1]].tolist(), want_scores[lims[i] : lims[i + 1]].tolist(),
                            strict=True))  # fmt: skip
            assert got.keys() == want.keys()
            assert all(abs(got[j] - want[j]) <= 1e-5 for j in got)
        lims16, scores16, _ = index.range_search(idx, q, radius, device=device, dtype="float16")
        assert abs(int(lims16[-1]) - int(want_lims[-1])) <= 0.01 * want_lims[-1] + 2  # pairs near the radius may differ
        assert (scores16 > radius).all()


@pytest.mark.parametrize("device", TORCH_DEVICES)
def test_eval_and_dupes_give_the_same_figures_on_either_path(real, device: str) -> None:
    _, vectors, _, labels = real
    for qe in (0, 2):
        cpu = evaluate.leave_one_out(vectors, labels, qe=qe, device="cpu", block=16)
        dev = evaluate.leave_one_out(vectors, labels, qe=qe, device=device, block=16)
        assert dev.precision == pytest.approx(cpu.precision, abs=1e-6) and dev.map == pytest.approx(cpu.map, abs=1e-6)
    against = [evaluate.queries_against(vectors[:20], labels[:20], vectors[20:], labels[20:], device=d, block=6)
               for d in ("cpu", device)]  # fmt: skip
    assert against[1].map == pytest.approx(against[0].map, abs=1e-6)
    pairs = [similar_pairs(vectors, 0.6, block=13, device=d) for d in ("cpu", device)]
    assert len(pairs[0][0]) > 0
    assert set(zip(pairs[0][0].tolist(), pairs[0][1].tolist(), strict=True)) == set(
        zip(pairs[1][0].tolist(), pairs[1][1].tolist(), strict=True)
    )
