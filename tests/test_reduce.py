"""PCA: the randomized path (wide features, e.g. the grid pooling's 5,120-d) against an exact one."""

from __future__ import annotations

import numpy as np

from ris.vectors import reduce


def _structured(n: int, d: int, rank: int, seed: int = 0) -> np.ndarray:
    """Low-rank signal with decaying variances, an offset mean and a little noise (not i.i.d. noise)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0]
    coeffs = rng.standard_normal((n, rank)) * np.linspace(10, 1, rank)
    return (coeffs @ basis.T + 3.0 + 0.01 * rng.standard_normal((n, d))).astype(np.float32)


def test_randomized_pca_finds_the_exact_axes_without_a_centred_copy() -> None:
    x = _structured(1500, reduce.EXACT_MAX_DIMS + 952, rank=40)
    mean, comps, ratio = reduce.pca(x, 16)
    xc = x.astype(np.float64) - x.mean(axis=0)
    evals, vecs = np.linalg.eigh(xc.T @ xc)
    exact = vecs[:, np.argsort(evals)[::-1][:16]].T
    cosines = np.abs(np.sum(comps * exact, axis=1))  # each axis, up to its sign
    assert cosines.min() > 0.999
    assert np.allclose(mean, x.mean(axis=0), atol=1e-4)
    assert np.allclose(ratio, np.sort(evals)[::-1][:16] / evals.sum(), rtol=1e-3)


def test_reducer_gives_the_same_vectors_in_blocks(monkeypatch) -> None:
    x = _structured(700, 300, rank=20, seed=1)
    r = reduce.Reducer.fit(x, 32)
    whole = r(x)
    monkeypatch.setattr(reduce, "REDUCE_BLOCK_BYTES", 64 * 4 * 300)  # 64 rows a block
    assert np.allclose(r(x), whole, atol=1e-6)
    assert np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)


def test_fit_sample_is_bounded_by_bytes() -> None:
    ids = np.arange(1_000_000)
    wide = reduce.fit_sample(ids, 5120)
    assert len(wide) * 5120 * 4 <= reduce.FIT_MAX_BYTES and wide[0] == 0 and wide[-1] == ids[-1]
    assert abs(len(reduce.fit_sample(ids, 1280)) - 4 * len(wide)) <= 4  # a quarter of the width, 4x the images
    assert len(reduce.fit_sample(ids[:1000], 5120)) == 1000


def test_the_projection_gives_an_image_the_same_vector_alone_and_in_any_batch() -> None:
    """Stored vectors come from batches of any size (padded to 8 rows inside), queries from one row or a few views."""
    raw = np.abs(_structured(600, 2048, rank=60, seed=3))
    proj = reduce.Projection.fit(raw[:300], 256)
    whole = proj(raw)
    for n in (1, 2, 7, 8, 9, 31, 33):
        part = proj(raw[100 : 100 + n])
        assert part.shape == (n, 256)
        np.testing.assert_allclose(part, whole[100 : 100 + n], rtol=0, atol=1e-5)
    x = raw[:13] - 0.5
    np.testing.assert_allclose(reduce.onto_rows(x, proj.components), x @ proj.components.T, rtol=0, atol=1e-5)


def test_a_query_projected_and_reduced_in_one_product_gets_the_two_steps_vectors(monkeypatch) -> None:
    """Folded (a query's projection and PCA as one product) against the stored path's two steps, alone, in batches and
    in blocks: within cosine 1e-4 where the projected norm's share is taken within 2x of the true one (here ~1)."""
    raw = np.abs(_structured(900, 2048, rank=80, seed=4))
    proj = reduce.Projection.fit(raw[:400], 256)
    reducer = reduce.Reducer.fit(proj(raw[:600]), 32)
    two_steps = reducer(proj(raw))
    for share in (reduce.PROJECTED_SHARE, 1.0):
        monkeypatch.setattr(reduce, "PROJECTED_SHARE", share)
        folded = reduce.Folded(proj, reducer)
        whole = folded(raw)
        assert whole.shape == two_steps.shape and np.allclose(np.linalg.norm(whole, axis=1), 1.0, atol=1e-5)
        assert np.einsum("ij,ij->i", whole, two_steps).min() > 1 - 1e-4
        for n in (1, 9):
            np.testing.assert_allclose(folded(raw[50 : 50 + n]), whole[50 : 50 + n], rtol=0, atol=1e-5)
    monkeypatch.setattr(reduce, "REDUCE_BLOCK_BYTES", 64 * 4 * 2048)  # 64 rows a block
    np.testing.assert_allclose(folded(raw), whole, rtol=0, atol=1e-6)
