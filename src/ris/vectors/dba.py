"""Database-side augmentation (αDBA, Radenović et al. 2018): each indexed vector is replaced by the
sim^α-weighted mean of itself and its N nearest indexed images; queries are left as they are.

The neighbour graph (every image's N nearest others, by the un-augmented reduced vectors) is derived
data kept beside the index (`dba.npz`), so a write updates only the images it touches:

- a new image gets its N nearest among all images;
- an existing image takes a new image into its list when it is nearer than its N-th neighbour;
- an image that lost a neighbour (removed) gets its list recomputed against all images.

That keeps the graph exactly what a from-scratch computation gives (exact search, ties aside). The cost
is a product of the changed images against all n images (n x dims float32 held in memory): the first
build is n^2 (9,145 Lite0 images: see benchmarks/RESULTS.md), a later add of m images m x n.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files.atomic import write_with
from . import faiss_index as index, idsets

#: Neighbour weight exponent (sim^α; the vector's own weight is 1). Chosen on Caltech-101 (RESULTS.md).
DBA_ALPHA = 3.0
#: More neighbours than this blur classes together (and cost n x N memory in the graph).
MAX_NEIGHBOURS = 100
#: New collections' setting: 10 neighbours (the default descriptor's best P@5 and mAP, RESULTS.md).
DEFAULT_NEIGHBOURS = 10
#: Score matrix bytes a block when a write compares the images it redoes with all others.
BLOCK_BYTES = 64 << 20
#: Above this many images DBA is off (plain vectors served): the exact graph costs n^2 x dims flops,
#: ~30 s at 100k on 2 cores but ~1 h at 1M, and each add m x n. Collections this large are searched
#: by an approximate index anyway (index.APPROX_FROM).
MAX_IMAGES = 100_000


def active(neighbours: int, images: int) -> int:
    """The neighbours DBA uses for a collection of this many images with this setting (0: off)."""
    return neighbours if images <= MAX_IMAGES else 0


def neighbours(x: np.ndarray, n: int, rows: np.ndarray | None = None, block: int = 4096,
               device: str | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(sims, positions) of the n nearest other rows of x for each of x[rows] (default: all), nearest first.

    Fewer than n others: the missing columns are position -1, similarity 0.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, dtype=np.int64)
    sims = np.zeros((len(rows), n), np.float32)
    pos = np.full((len(rows), n), -1, np.int64)
    want = min(n + 1, len(x))
    if len(rows) == 0 or want < 2:
        return sims, pos
    db = index.flat(x)
    for start in range(0, len(rows), block):
        own = rows[start : start + block]
        s, p = index.search(db, x[own], want, device=device)
        gone = p == own[:, None]
        gone[:, -1] |= ~gone.any(axis=1)  # self not found (ties with duplicates): drop the last instead
        keep = want - 1
        sims[start : start + len(own), :keep] = s[~gone].reshape(len(own), keep)
        pos[start : start + len(own), :keep] = p[~gone].reshape(len(own), keep)
    return sims, pos


def weights(sims: np.ndarray, alpha: float = DBA_ALPHA) -> np.ndarray:
    return np.clip(sims, 0, None) ** alpha


def augment(x: np.ndarray, sims: np.ndarray, pos: np.ndarray, rows: np.ndarray | None = None,
            alpha: float = DBA_ALPHA) -> np.ndarray:  # fmt: skip
    """Unit vectors x[rows] + sum of w * x[neighbour] (positions -1 are skipped)."""
    rows = np.arange(len(x)) if rows is None else np.asarray(rows, dtype=np.int64)
    w = np.where(pos >= 0, weights(sims, alpha), 0).astype(np.float32)
    agg = x[rows] + np.einsum("nk,nkd->nd", w, x[np.maximum(pos, 0)])
    return agg / np.maximum(np.linalg.norm(agg, axis=1, keepdims=True), 1e-12)


# --- the stored graph ------------------------------------------------------------------------


@dataclass
class Graph:
    """Each image's n nearest other images (by image id), for one PCA."""

    ids: np.ndarray  # sorted image ids
    nbrs: np.ndarray  # (len(ids), n) image ids, -1 = none
    sims: np.ndarray  # (len(ids), n) float32, nearest first
    pca: str  # fingerprint of the reducer the similarities were computed with
    x: np.ndarray | None = None  # the images' plain reduced vectors (rows in ids' order): a write reduces only new ones

    @property
    def n(self) -> int:
        return self.nbrs.shape[1]

    def save(self, path: Path) -> None:
        extra = {} if self.x is None else {"x": self.x}
        write_with(path, lambda tmp: np.savez(tmp, ids=self.ids, nbrs=self.nbrs, sims=self.sims, pca=np.array(self.pca), **extra),
                   suffix=".npz")  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> Graph | None:
        """The saved graph (None: none saved); ValueError when the file is damaged or inconsistent."""
        if not path.exists():
            return None
        try:
            with np.load(path) as data:
                x = data["x"] if "x" in data.files else None  # older files: no vectors
                graph = cls(data["ids"], data["nbrs"], data["sims"], str(data["pca"]), x)
        except Exception as exc:  # truncated or foreign: zipfile.BadZipFile, OSError, EOFError, KeyError...
            raise ValueError(f"{path} is damaged: {type(exc).__name__}") from None
        n = len(graph.ids)
        if graph.nbrs.shape != graph.sims.shape or len(graph.nbrs) != n or (graph.x is not None and len(graph.x) != n):
            raise ValueError(f"{path} is inconsistent")
        return graph

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(each id's row in the graph, whether the graph holds it); rows of ids it lacks are meaningless."""
        ids = np.asarray(ids, dtype=np.int64)
        if not len(self.ids):
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        at = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return at, self.ids[at] == ids

    def stored_vectors(self, ids: np.ndarray, pca: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(the plain vectors kept for these ids, which ids the graph holds: the other rows are meaningless),
        or None when it keeps none for this PCA. An id names one content for life (the catalogue never
        reuses ids), so a kept vector is current."""
        if self.x is None or self.pca != pca or not len(self.ids):
            return None
        at, known = self.locate(ids)
        return self.x[at], known

    def plain(self, ids: np.ndarray, pca: str) -> np.ndarray | None:
        """The kept plain vectors of these ids, when the graph holds every one of them for this PCA."""
        stored = self.stored_vectors(ids, pca)
        return stored[0] if stored is not None and stored[1].all() else None

    def vectors(self, chunk: np.ndarray, reduced_for, alpha: float = DBA_ALPHA) -> np.ndarray:
        """The augmented vectors of these image ids; reduced_for(ids) gives un-augmented reduced vectors."""
        chunk = np.asarray(chunk, dtype=np.int64)
        if not len(self.ids):
            return reduced_for(chunk)
        at, known = self.locate(chunk)  # an id the graph does not know keeps its plain vector
        nb = np.where(known[:, None], self.nbrs[at], -1)
        s = np.where(known[:, None], self.sims[at], 0)
        need = idsets.unique(np.concatenate([chunk, nb[nb >= 0]]))
        x = reduced_for(need)
        pos = np.where(nb >= 0, np.searchsorted(need, nb), -1)
        return augment(x, s, pos, np.searchsorted(need, chunk), alpha)


def fingerprint(reducer) -> str:
    """Identifies the PCA (or its absence) the graph's similarities belong to."""
    digest = hashlib.sha256(str(reducer.raw_dims).encode())
    if reducer.components is not None:  # the arrays' own buffers: no 12 MB copy per write
        digest.update(np.ascontiguousarray(reducer.mean))
        digest.update(np.ascontiguousarray(reducer.components))
    return digest.hexdigest()[:16]


def update(graph: Graph | None, ids: np.ndarray, x: np.ndarray, n: int, pca: str) -> tuple[Graph, np.ndarray]:
    """The graph for images `ids` (sorted) with reduced vectors x (rows in ids' order), and the ids whose
    augmented vector changed since `graph` (all of them when there is no usable graph).

    The images to redo (new ones, and those that lost a neighbour) are compared with all n images in
    one product a block at a time: its rows give their own lists, and its columns tell which existing
    images take in a new one (one nearer than their N-th neighbour).
    """
    ids = np.asarray(ids, dtype=np.int64)
    if graph is None or graph.n != n or graph.pca != pca or not len(graph.ids):
        sims, pos = neighbours(x, n)
        return Graph(ids, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1), sims, pca), ids
    at, held = graph.locate(ids)
    out_nbrs = np.where(held[:, None], graph.nbrs[at], -1)
    out_sims = np.where(held[:, None], graph.sims[at], 0).astype(np.float32)
    removed = np.setdiff1d(graph.ids, ids, assume_unique=True)
    lost = np.isin(out_nbrs, removed).any(axis=1) if len(removed) else np.zeros(len(ids), bool)
    redo = np.flatnonzero(~held | lost)  # new images, and those that lost a neighbour
    if not len(redo):
        return Graph(ids, out_nbrs, out_sims, pca), np.empty(0, np.int64)
    # an existing list takes in a new image only when it beats the list's N-th neighbour (strictly: on a tie
    # the old neighbour stays, as a from-scratch sort would keep it first)
    floor = np.where(out_nbrs[:, -1] >= 0, out_sims[:, -1], -np.inf).astype(np.float32)
    floor[redo] = np.inf  # recomputed whole
    pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (existing row, new image's row, similarity)
    step = max(1, BLOCK_BYTES // (4 * len(x)))
    for start in range(0, len(redo), step):
        rows = redo[start : start + step]
        scores = x[rows] @ x.T
        scores[np.arange(len(rows)), rows] = -np.inf  # not its own neighbour
        s, p = top_rows(scores, n)  # fewer than n columns in a tiny collection: the rest stays -1
        out_nbrs[rows], out_sims[rows] = -1, 0
        out_nbrs[rows, : s.shape[1]] = np.where(np.isfinite(s), ids[p], -1)
        out_sims[rows, : s.shape[1]] = np.where(np.isfinite(s), s, 0)
        fresh = ~held[rows]  # new images (the others lost a neighbour)
        ours = scores if fresh.all() else scores[fresh]  # an add: no copy
        r, j = np.nonzero(ours > floor)
        pairs.append((j, rows[fresh][r], ours[r, j]))
    took = _take_in(out_nbrs, out_sims, ids, *(np.concatenate(c) for c in zip(*pairs, strict=True)))
    return Graph(ids, out_nbrs, out_sims, pca), idsets.either(ids[redo], ids[took])


def _take_in(nbrs: np.ndarray, sims: np.ndarray, ids: np.ndarray, rows: np.ndarray, new: np.ndarray,
             s: np.ndarray) -> np.ndarray:  # fmt: skip
    """Merge candidates (row takes image at row `new` with similarity s) into those rows' lists, in place;
    returns the rows whose list changed. Old neighbours first among equals (a stable sort)."""
    touched = idsets.unique(rows)
    if not len(touched):
        return touched
    n = nbrs.shape[1]
    old_ids, old_s = nbrs[touched], np.where(nbrs[touched] >= 0, sims[touched], -np.inf)
    row = np.concatenate([np.repeat(touched, n), rows])
    cand = np.concatenate([old_ids.ravel(), ids[new]])
    score = np.concatenate([old_s.ravel(), s])
    order = np.lexsort((-score, row))  # by row, then nearest first; stable: old entries before new ones
    row, cand, score = row[order], cand[order], score[order]
    first = np.searchsorted(row, touched)
    take = first[:, None] + np.arange(n)
    nbrs[touched] = np.where(np.isfinite(score[take]), cand[take], -1)
    sims[touched] = np.where(np.isfinite(score[take]), score[take], 0)
    return touched


def top_rows(scores: np.ndarray, k: int, stride: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(values, columns) of each row's k largest scores, largest first (lower column first among equals).

    A strided sample of the columns bounds each row's k-th largest from below, so only the few scores
    above that bound are sorted: 3x faster than np.argpartition on 270 x 27k scores.
    """
    k = min(k, scores.shape[1])
    if scores.shape[1] < 4 * k * stride:
        cols = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, cols, axis=1), cols
    bound = np.partition(scores[:, ::stride], -k, axis=1)[:, -k]
    r, c = np.nonzero(scores >= bound[:, None])
    v = scores[r, c]
    order = np.lexsort((c, -v, r))
    take = np.searchsorted(r[order], np.arange(len(scores)))[:, None] + np.arange(k)
    return v[order][take], c[order][take]


# --- fair leave-one-out ----------------------------------------------------------------------


def without_query(x: np.ndarray, n: int, labelled: int, alpha: float = DBA_ALPHA, device: str | None = None):
    """For leave-one-out over x[:labelled] against an augmented database of x (all rows take part as
    neighbours): the database vectors, and a function fixing a block's scores so that no database vector
    contains the query itself.

    A database vector j whose n neighbours include query i is, for that query, rebuilt from its n+1
    nearest minus i: what the collection would have held had i never been indexed. Only those (i, j)
    pairs differ (at most n per database vector), so they are patched after the block's product:
    with U_j the sum over j's n+1 nearest, x_i.(U_j - w x_i) / |U_j - w x_i|.
    """
    sims, pos = neighbours(x, n + 1, device=device)
    db = augment(x, sims[:, :n], pos[:, :n], alpha=alpha)
    w_all = np.where(pos >= 0, weights(sims, alpha), 0).astype(np.float32)
    u = x + np.einsum("nk,nkd->nd", w_all, x[np.maximum(pos, 0)])
    uu = np.einsum("nd,nd->n", u, u)
    # the pairs: query i = pos[j, t] (t < n, i labelled), database vector j; dropping i leaves U_j - w_{j,t} x_i
    j_idx, t_idx = np.nonzero((pos[:labelled, :n] >= 0) & (pos[:labelled, :n] < labelled))
    i_idx = pos[j_idx, t_idx]
    w_t = w_all[j_idx, t_idx]
    xi_u = np.einsum("pd,pd->p", x[i_idx], u[j_idx])
    fixed = (xi_u - w_t) / np.sqrt(np.maximum(uu[j_idx] - 2 * w_t * xi_u + w_t**2, 1e-12))
    order = np.argsort(i_idx, kind="stable")
    i_idx, j_idx, fixed = i_idx[order], j_idx[order], fixed[order]
    bounds = np.searchsorted(i_idx, np.arange(labelled + 1))

    def patch(scores: np.ndarray, start: int, stop: int) -> None:
        """scores[r, j] (dense, rows = queries start..stop-1) corrected in place."""
        a, b = bounds[start], bounds[stop]
        scores[i_idx[a:b] - start, j_idx[a:b]] = fixed[a:b]

    return db, patch
