"""From the model's raw features to the vectors the index compares, in two stages.

1. `Projection` (only for wide raw features, above PROJECT_ABOVE dimensions: grid3's 11,520, grid's 5,120,
   VGG16's 4,096): L2-normalised raw features projected onto the top PROJECTED_DIMS principal axes of the
   collection's first FIT_SAMPLE images. This is what the catalogue stores per image (2 KB in bfloat16
   instead of 23 KB), fitted once and kept in the catalogue; it keeps ~all the variance the final PCA
   uses, so PCA can be refitted at any size without re-extracting anything.
2. `Reducer`: PCA to `dims` (256), fitted on the stored vectors (pca.npz), applied to every vector and
   query. Vectors are L2-normalised before PCA (so no single high-energy image dominates the fit) and
   after it (so inner product is cosine similarity). Below `min_images_for(dims)` images a PCA would be
   fitted on too few samples to generalise to new queries, so small collections keep the stored vectors.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np

from ..errors import RisError
from ..files.atomic import write_with
from ..threads import cpu_threads, on_threads

DEFAULT_DIMS = 256


def min_images_for(dims: int) -> int:
    return 2 * dims


def l2_normalize(x: np.ndarray, in_place: bool = False) -> np.ndarray:
    """Rows scaled to unit length; in_place reuses x's memory when it is float32 and contiguous."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]  # 3x faster than np.linalg.norm on wide rows
    return np.divide(x, np.maximum(norms, 1e-12), out=x if in_place else None)


#: Up to this many raw dimensions the PCA is exact: the d x d covariance costs n*d^2 and its eigh d^3,
#: cheaper than randomized subspace iteration's ~10*n*d*k there (Lite0's 1280-d on 9,145 images: 0.3 s
#: exact vs 1.4 s randomized with QR on the tall side).
EXACT_MAX_DIMS = 2048
#: The PCA is fitted on at most this many images (evenly spaced): enough for 256 axes, bounded memory...
FIT_MAX_IMAGES = 200_000
#: ...and at most this many bytes of raw features (1,280-d: 105k images; the grid's 5,120-d: 26k), held once
#: (a collection's fit normalises them in place).
FIT_MAX_BYTES = 512 << 20
#: Raw bytes reduced at a time (1,638 rows of 5,120-d): the intermediate copies stay small whatever the
#: chunk asked for.
REDUCE_BLOCK_BYTES = 32 << 20


#: Raw features wider than this are stored projected (stage 1); narrower ones (rmac, gem, avg: 1,280) as they are.
PROJECT_ABOVE = 2048
#: Width of the stored projection: 4x the default PCA's, so refits choose among far more axes than they keep.
PROJECTED_DIMS = 1024
#: Raw features kept before the projection is fitted on them (and the images a new collection extracts
#: first, drawn at random from everything it was given): 2,048 x 11,520 bfloat16 = 47 MB at most.
FIT_SAMPLE = 2048


#: Products of fewer rows than this run on one BLAS thread: a search reduces one query and re-scores a few dozen
#: candidates, and BLAS threads cost more than they bring there (under load a 72 x 1,024 x 256 float32 product
#: took 150 ms on OpenBLAS's 2 threads and 1.5 ms on one; 40 rows: 145 vs 16 ms at load 16).
SINGLE_THREAD_ROWS = 2048
#: A search's projection of this many rows or fewer (a query and its second look's views) is split over two threads
#: (Projection._split); the extraction writer's batches of 32 and more stay on its own thread (split, they competed
#: with the model for the same 2 cores: Caltech-101 indexed 5-8% slower).
SPLIT_ROWS = 16


@functools.cache
def _blas() -> object:
    """threadpoolctl's view of the loaded BLAS libraries (inspecting them costs ~50 ms: done once)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def small_product(rows: int) -> AbstractContextManager:
    """Within: BLAS on one thread when `rows` make a small product (see SINGLE_THREAD_ROWS), else as it is."""
    return _blas().limit(limits=1, user_api="blas") if rows < SINGLE_THREAD_ROWS else nullcontext()


def projects(raw_dims: int) -> bool:
    """Whether a collection with raw features this wide stores them projected (once it has FIT_SAMPLE images)."""
    return raw_dims > PROJECT_ABOVE


def block_rows(raw_dims: int) -> int:
    return max(64, REDUCE_BLOCK_BYTES // (4 * raw_dims))


def fit_sample(ids: np.ndarray, raw_dims: int, limit: int = FIT_MAX_IMAGES) -> np.ndarray:
    """The ids the PCA is fitted on: all of them, or as many as the limits allow, spread evenly."""
    limit = min(limit, FIT_MAX_BYTES // (4 * raw_dims))
    if len(ids) <= limit:
        return ids
    return ids[np.linspace(0, len(ids) - 1, limit).astype(np.int64)]


def _sum_of_squares(x: np.ndarray) -> float:
    """Row sums in float32, their total in float64: no float64 copy of x."""
    return float(np.einsum("ij,ij->i", x, x).sum(dtype=np.float64))


def pca(x: np.ndarray, dims: int, oversample: int = 16, power_iters: int = 2, seed: int = 0):
    """Top `dims` principal axes of x: returns (mean, components (dims, d), explained variance ratio).

    Exact (eigh of the covariance) up to EXACT_MAX_DIMS dimensions; above (VGG16's 4096-d fc2, where a
    full eigendecomposition took 41 s) randomized subspace iteration (Halko et al. 2011), orthonormalised
    on the small d side, then Rayleigh-Ritz to order the axes. Two power iterations: on grid3's 11,520-d
    Caltech-101 features 4 kept 62.6% of the variance and 2 kept 62.3%, with the same P@5 and mAP to the
    third decimal, in 2.7 s instead of 4.4 s.
    """
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
    if x.shape[1] <= EXACT_MAX_DIMS:
        xc = x - mean
        total = _sum_of_squares(xc)
        basis = None
        evals, vecs = np.linalg.eigh((xc.T @ xc).astype(np.float64))
    else:  # centred products without a centred copy of x: (x - m) @ b = x @ b - m @ b
        total = _sum_of_squares(x) - len(x) * float(mean.astype(np.float64) @ mean)
        rng = np.random.default_rng(seed)
        basis = rng.standard_normal((x.shape[1], dims + oversample), dtype=np.float32)
        for _ in range(power_iters + 1):
            y = x @ basis - mean @ basis
            basis = np.linalg.qr(x.T @ y - np.outer(mean, y.sum(axis=0)))[0]
        y = x @ basis - mean @ basis
        evals, vecs = np.linalg.eigh((y.T @ y).astype(np.float64))
    order = np.argsort(evals)[::-1][:dims]
    axes = vecs[:, order].astype(np.float32)
    components = axes.T if basis is None else (basis @ axes).T
    return mean, np.ascontiguousarray(components, np.float32), np.clip(evals[order], 0, None) / total


def onto_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """x @ rows.T, computed as rows @ x.T over x padded to a multiple of 8 rows: OpenBLAS then streams the wide
    matrix once instead of packing it for every call (one thread, 11,520 -> 1,024, Intel Xeon: 7 rows 8.1 -> 4.3 ms,
    32 rows 11.2 -> 8.7 ms, the same numbers). One row stays a matrix-vector product."""
    n = len(x)
    if n < 2:
        return x @ rows.T
    if n % 8:
        x = np.concatenate([x, np.zeros((-n % 8, x.shape[1]), x.dtype)])
    return (rows @ x.T).T[:n]


class Projection:
    """Stage 1: unit-normalised raw features -> their coordinates on the fit's top principal axes (not re-normalised).

    Fitted through the Gram matrix (n x n, n = FIT_SAMPLE rows, cheaper than d x d covariance for d = 11,520:
    ~1 s on 2 cores), so all n - 1 axes are exact.
    """

    def __init__(self, mean: np.ndarray, components: np.ndarray):
        self.mean, self.components = mean, components

    @property
    def raw_dims(self) -> int:
        return self.components.shape[1]

    @property
    def dims(self) -> int:
        return len(self.components)

    @classmethod
    def fit(cls, raw: np.ndarray, dims: int = PROJECTED_DIMS) -> Projection:
        return cls.fit_projecting(raw, dims)[0]

    @classmethod
    def fit_projecting(cls, raw: np.ndarray, dims: int = PROJECTED_DIMS,
                       overwrite: bool = False) -> tuple[Projection, np.ndarray]:  # fmt: skip
        """The fitted projection and `raw` projected by it, which the fit has already: X X^T U / s = U s (the
        extraction's writer stores its sample so without a second 11,520 -> 1,024 product). overwrite: raw may
        be normalised in place."""
        x = l2_normalize(raw, in_place=overwrite)
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        x -= mean
        evals, vecs = np.linalg.eigh((x @ x.T).astype(np.float64))
        order = np.argsort(evals)[::-1][: min(dims, len(x) - 1)]
        scale = np.sqrt(np.clip(evals[order], 1e-12, None))
        components = (vecs[:, order] / scale).T.astype(np.float32) @ x  # unit axes: U^T X / s
        return cls(mean, np.ascontiguousarray(components, np.float32)), (vecs[:, order] * scale).astype(np.float32)

    def centred(self, raw: np.ndarray) -> np.ndarray:
        """Raw features as the axes take them: unit rows, less the fit's mean (an engine projecting on its own
        device applies the axes to these, ris.model.runtime)."""
        return l2_normalize(raw) - self.mean

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if len(raw) <= SPLIT_ROWS:
            return self._split(self.centred(raw))
        out = np.empty((len(raw), self.dims), np.float32)
        step = block_rows(self.raw_dims)
        with small_product(len(raw)):
            for start in range(0, len(raw), step):
                out[start : start + step] = onto_rows(self.centred(raw[start : start + step]), self.components)
        return out

    def _split(self, x: np.ndarray) -> np.ndarray:
        """A few rows (a query, its views) projected on ris.threads' threads, each axis block on single-threaded BLAS:
        the same numbers as one product, and a bounded wait under load where BLAS's own threads were not (see
        SINGLE_THREAD_ROWS). The 47 MB matrix is read by two cores: 1 row 3.1 -> 2.3 ms, 9 rows 7.9 -> 4.4 ms."""
        blocks = np.array_split(np.arange(self.dims), max(1, min(cpu_threads(), self.dims)))
        with small_product(len(x)):
            parts = on_threads(lambda b: onto_rows(x, self.components[b[0] : b[-1] + 1]), blocks, cpu_threads())
        return np.hstack(parts)


#: The share of a centred unit feature's energy taken to lie on the projection's axes (Folded).
PROJECTED_SHARE = 0.5


class Folded:
    """A query's projection (raw -> PROJECTED_DIMS axes, not re-normalised) and PCA (which normalises its input first)
    as one raw -> dims product: a fourth of the projection's 47 MB read (a served outside query projects itself and
    ~9 views: 2.4 + 4.4 ms). The PCA divides by the projected norm, unknown without the projection: it is taken as
    sqrt(PROJECTED_SHARE) x the centred input's. Only the PCA's mean term feels that, and it lies nearly orthogonal
    to the PCA's axes (Caltech-101, grid3: 0.016 against 0.85), so vectors stay within cosine 1e-4 of the two steps
    where the true share is within 2x of it (Caltech-101 queries and views, shares 0.42-0.78: within 1e-5)."""

    def __init__(self, projection: Projection, reducer: Reducer):
        assert reducer.components is not None and reducer.mean is not None
        self.mean = projection.mean
        self.matrix = np.ascontiguousarray(reducer.components @ projection.components, np.float32)  # dims x raw dims
        self.offset = (reducer.mean @ reducer.components.T).astype(np.float32)

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        out = np.empty((len(raw), len(self.matrix)), np.float32)
        step = block_rows(raw.shape[1])
        with small_product(len(raw)):
            for start in range(0, len(raw), step):
                z = l2_normalize(raw[start : start + step]) - self.mean
                norms = np.sqrt(np.einsum("ij,ij->i", z, z) * PROJECTED_SHARE)[:, None]
                out[start : start + step] = l2_normalize(onto_rows(z, self.matrix) / np.maximum(norms, 1e-12) - self.offset)
        return out


class Reducer:
    """raw features -> unit vectors of `dims` dimensions (PCA when fitted, identity otherwise)."""

    def __init__(self, raw_dims: int, mean: np.ndarray | None = None, components: np.ndarray | None = None,
                 ratio: np.ndarray | None = None):  # fmt: skip
        self.raw_dims = raw_dims
        self.mean, self.components, self.ratio = mean, components, ratio

    @property
    def fitted(self) -> bool:
        return self.components is not None

    @property
    def dims(self) -> int:
        return len(self.components) if self.components is not None else self.raw_dims

    @classmethod
    def fit(cls, raw: np.ndarray, dims: int = DEFAULT_DIMS, overwrite: bool = False) -> Reducer:
        """overwrite: raw may be L2-normalised in place (no second copy of the fit's features; reducing
        them again afterwards gives the same vectors, since normalising is idempotent)."""
        n, raw_dims = raw.shape
        if dims <= 0 or dims >= raw_dims or n < min_images_for(dims):
            return cls(raw_dims)
        return cls(raw_dims, *pca(l2_normalize(raw, in_place=overwrite), dims))

    def explained_variance(self) -> np.ndarray | None:
        """Fraction of variance kept by each component (for plots and the notebook)."""
        return self.ratio

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.components is None:
            return l2_normalize(raw)
        out = np.empty((len(raw), self.dims), np.float32)
        step = block_rows(self.raw_dims)
        with small_product(len(raw)):
            for start in range(0, len(raw), step):
                x = l2_normalize(raw[start : start + step])
                out[start : start + step] = l2_normalize((x - self.mean) @ self.components.T)
        return out

    def save(self, path: Path) -> None:
        if self.components is None:
            path.unlink(missing_ok=True)
            return
        write_with(path, lambda tmp: np.savez(tmp, mean=self.mean, components=self.components, ratio=self.ratio), suffix=".npz")

    @classmethod
    def load(cls, path: Path, raw_dims: int) -> Reducer:
        """The saved PCA (none saved: the identity), checked against the vectors it reduces."""
        if not path.exists():
            return cls(raw_dims)
        try:
            with np.load(path) as data:
                mean, components, ratio = data["mean"], data["components"], data["ratio"]
        except Exception as exc:  # a truncated or foreign file: zipfile, OSError, ValueError, KeyError...
            raise RisError(f"{path} is damaged ({type(exc).__name__}); run `ris reindex` to refit it") from None
        fits = components.ndim == 2 and components.shape[1] == raw_dims and mean.shape == (raw_dims,)
        if not fits or not np.isfinite(components).all():
            raise RisError(f"{path} does not fit this collection's vectors ({components.shape} for {raw_dims}-d); "
                           "run `ris reindex`")  # fmt: skip
        return cls(raw_dims, mean, components, ratio)
