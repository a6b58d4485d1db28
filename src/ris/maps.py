"""A 2-D map of a collection: every image's thumbnail placed where t-SNE (or PCA) puts its vector.

This is the tutorial's closing picture. scikit-learn's t-SNE is used when it is installed (it is
not a dependency of ris); without it the map falls back to the top two principal components,
which keeps the command working, only less clustered.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .decode import thumbnail
from .errors import RisError

METHODS = ("tsne", "pca")
MIN_IMAGES = 3  # t-SNE needs perplexity < n - 1; fewer points make no map anyway
SAMPLE_SEED = 0


def tsne_available() -> bool:
    try:
        import sklearn.manifold  # noqa: F401
    except ImportError:
        return False
    return True


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The two leading principal components (numpy SVD), signs fixed so reruns give the same picture."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    coords = np.zeros((len(x), 2))
    k = min(2, len(s))
    coords[:, :k] = u[:, :k] * s[:k]
    signs = np.sign(vt[:k, np.argmax(np.abs(vt[:k]), axis=1)].diagonal())
    coords[:, :k] *= np.where(signs == 0, 1.0, signs)
    return coords


def tsne_2d(vectors: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.manifold import TSNE

    n = len(vectors)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))  # sklearn requires perplexity < n
    tsne = TSNE(n_components=2, perplexity=min(perplexity, n - 1.5), init="pca", learning_rate="auto",
                random_state=seed)  # fmt: skip
    return tsne.fit_transform(np.asarray(vectors, dtype=np.float32)).astype(np.float64)


def layout(vectors: np.ndarray, method: str = "tsne", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates for n vectors: t-SNE (falls back to PCA without scikit-learn) or PCA."""
    if method not in METHODS:
        raise RisError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) < MIN_IMAGES:
        raise RisError(f"a map needs at least {MIN_IMAGES} images, got {len(vectors)}")
    if method == "tsne":
        if tsne_available():
            return tsne_2d(vectors, seed)
        warnings.warn("scikit-learn is not installed; the map uses PCA instead of t-SNE", stacklevel=2)
    return pca_2d(vectors)


def _normalise(coords: np.ndarray) -> np.ndarray:
    """Coordinates scaled into [0, 1] per axis (a constant axis sits in the middle)."""
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, (coords - lo) / span, 0.5)


def _path_of(row: object) -> str:
    return str(row.path) if hasattr(row, "path") else os.fspath(row)  # type: ignore[arg-type]


def draw_map(rows: Sequence[object], coords: np.ndarray, out: str | os.PathLike, thumb: int = 48,
             canvas: int = 2000) -> Path:  # fmt: skip
    """Paste each row's thumbnail centred at its normalised coordinate on a white canvas; write a PNG.

    rows are catalogue rows (anything with .path) or paths, in the order of coords.
    """
    coords = np.asarray(coords, dtype=np.float64)
    if len(rows) != len(coords):
        raise RisError(f"{len(rows)} images but {len(coords)} coordinates")
    if thumb < 1 or canvas <= thumb:
        raise RisError("the canvas must be larger than a thumbnail")
    image = Image.new("RGB", (canvas, canvas), (255, 255, 255))
    room = canvas - thumb
    for row, (x, y) in zip(rows, _normalise(coords), strict=True):
        tile = thumbnail(_path_of(row), thumb)
        left = int(round(x * room)) + (thumb - tile.width) // 2
        top = int(round((1.0 - y) * room)) + (thumb - tile.height) // 2  # y grows upwards, like a plot
        image.paste(tile, (left, top))
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "PNG")
    except OSError as exc:
        raise RisError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def sample_indices(n: int, limit: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """All of range(n), or `limit` of them drawn with a fixed seed (the same map on every run)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def map_command(collection: str | os.PathLike, out_file: str | os.PathLike, method: str = "tsne",
                limit: int = 2000) -> Path:  # fmt: skip
    """`ris map`: the collection (at most `limit` images) as a PNG of thumbnails."""
    from rich.console import Console

    from .collection import Collection

    err = Console(stderr=True, soft_wrap=True)
    if method not in METHODS:
        raise RisError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if limit < MIN_IMAGES:
        raise RisError(f"--limit must be at least {MIN_IMAGES}")
    with Collection.open(collection) as coll:
        rows, vectors = coll.vectors()
    if len(rows) < MIN_IMAGES:
        raise RisError(f"a map needs at least {MIN_IMAGES} images; {collection} has {len(rows)}")
    if method == "tsne" and not tsne_available():
        err.print("note: scikit-learn is not installed; placing images by PCA instead of t-SNE", highlight=False)
        method = "pca"
    pick = sample_indices(len(rows), limit)
    coords = layout(vectors[pick], method)
    path = draw_map([rows[i] for i in pick], coords, out_file)
    err.print(f"wrote {path} ({len(pick)} of {len(rows)} images, {method})", highlight=False, markup=False)
    return path
