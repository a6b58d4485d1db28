"""PCA: fitted on the collection's raw features, stored with it, applied to every vector and query.

Vectors are L2-normalised before PCA (so no single high-energy image dominates the fit) and after
it (so inner product is cosine similarity). Below `min_images_for(dims)` images a PCA would be fitted
on too few samples to generalise to new queries, so small collections keep the raw features.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

DEFAULT_DIMS = 256


def min_images_for(dims: int) -> int:
    return 2 * dims


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class Reducer:
    """raw features -> unit vectors of `dims` dimensions (PCA when fitted, identity otherwise)."""

    def __init__(self, raw_dims: int, pca: faiss.PCAMatrix | None = None):
        self.raw_dims = raw_dims
        self.pca = pca

    @property
    def dims(self) -> int:
        return self.pca.d_out if self.pca is not None else self.raw_dims

    @classmethod
    def fit(cls, raw: np.ndarray, dims: int = DEFAULT_DIMS) -> Reducer:
        n, raw_dims = raw.shape
        if dims <= 0 or dims >= raw_dims or n < min_images_for(dims):
            return cls(raw_dims)
        pca = faiss.PCAMatrix(raw_dims, dims)
        pca.train(l2_normalize(raw))
        return cls(raw_dims, pca)

    def explained_variance(self) -> np.ndarray | None:
        """Fraction of variance kept by each component (for plots and the notebook)."""
        if self.pca is None:
            return None
        eig = faiss.vector_to_array(self.pca.eigenvalues)
        return eig[: self.dims] / eig.sum()

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        x = l2_normalize(raw)
        if self.pca is not None:
            x = l2_normalize(self.pca.apply(x))
        return x

    def save(self, path: Path) -> None:
        if self.pca is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_VectorTransform(self.pca, str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, raw_dims: int) -> Reducer:
        if not path.exists():
            return cls(raw_dims)
        return cls(raw_dims, faiss.read_VectorTransform(str(path)))  # already the PCAMatrix subclass
