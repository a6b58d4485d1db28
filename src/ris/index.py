"""The FAISS index over reduced vectors, keyed by image id, kept in step with the catalogue.

The catalogue is the truth; the index is derived. `reconcile` adds the ids the catalogue has and
the index lacks and removes the others, so a run killed between the two writes heals itself on the
next run, and incremental updates cost work proportional to the change.

Which index: a collection asks for a FAISS factory string or "auto" (the default). "auto" is exact
search below `APPROX_FROM` vectors and an inverted-file index with 6-bit scalar quantisation above
(`ivf_factory`), whose candidates (REFINE_FACTOR x k) the collection re-scores with exact vectors
from its catalogue (`rerank`). Measured in benchmarks/scale.py on 10M synthetic 256-d vectors shaped
like the real features, recall@10 without / with re-scoring: SQ4 0.33 / 0.68, SQ6 0.73 / 0.99,
SQ8 0.92 / -; IVF,SQ6 is 201 bytes a vector (1.9 GiB for 10M), SQ8 265. Indexes of
`MMAP_FROM_BYTES` or more are memory-mapped for searching (IVF lists and flat codes are; everything
else is read into RAM).
A GPU index is not used: search stays on the CPU.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from .errors import RisError

#: The index described FAISS-style (see faiss.index_factory); stored in the manifest.
EXACT_FACTORY = "IDMap2,Flat"
#: The size-based choice between exact and approximate search.
AUTO = "auto"
#: "auto" switches to IVF at this many vectors, and back to exact only below half of it (a collection
#: hovering at the threshold is not rebuilt). Exact search of one query is memory-bound, 0.1-0.2 us a
#: vector on 2 cores (212 ms at 1M, benchmarks/scale.py): 10-20 ms here; IVF,SQ6 + rerank ~2 ms.
APPROX_FROM = 100_000
#: Indexes at least this large are memory-mapped when opened for searching.
MMAP_FROM_BYTES = 64 << 20
#: Approximate searches fetch this many times k candidates for `rerank` to re-score exactly.
REFINE_FACTOR = 4
#: Fewer training vectors per IVF list than this and k-means is noisy; more costs time for nothing.
TRAIN_PER_LIST = 64


def nlist_for(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest sqrt(n), with at least 39 vectors a list."""
    want = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    cap = 2 ** int(math.log2(max(1, n // 39))) if n >= 39 else 1
    return int(max(1, min(want, cap, 65536)))


def ivf_factory(n: int) -> str:
    return f"IVF{nlist_for(n)},SQ6"


def default_nprobe(nlist: int) -> int:
    """Lists visited per query unless asked otherwise. On the scale benchmark recall stops rising at 8
    (1024 and 4096 lists); 16 leaves a margin for real collections, less clustered than that data."""
    return max(1, min(nlist, max(16, nlist // 256)))


def _nlist_of(factory: str) -> int | None:
    found = re.search(r"IVF(\d+)", factory)
    return int(found.group(1)) if found else None


def resolve(requested: str, n: int, built: str | None = None, approx_from: int | None = None) -> str:
    """The factory the index should have for n vectors, given what was asked and what is built.

    An explicit factory is itself. "auto" keeps what is built unless the size calls for another
    kind: exact -> IVF at approx_from, IVF -> exact below approx_from / 2, IVF -> IVF with more lists
    once the list count due is 4x (the collection grew ~16x since training; rebuilding then keeps
    the amortised cost of additions proportional to their number).
    """
    if requested != AUTO:
        return requested
    approx_from = APPROX_FROM if approx_from is None else approx_from
    if not built:
        return ivf_factory(n) if n >= approx_from else EXACT_FACTORY
    nlist = _nlist_of(built)
    if nlist is None:
        return ivf_factory(n) if n >= approx_from else built
    if n < approx_from // 2:
        return EXACT_FACTORY
    due = nlist_for(n)
    return ivf_factory(n) if due >= 4 * nlist or 4 * due <= nlist else built


def check_args(factory: str, nprobe: int, dims: int) -> None:
    """Reject a factory FAISS cannot build at these dims, or a negative nprobe, before anything is written."""
    if nprobe < 0:
        raise RisError("nprobe must be 0 (the default) or more")
    if factory == AUTO:
        return
    try:
        create(dims, factory)
    except RuntimeError as exc:
        raise RisError(f"bad FAISS index factory {factory!r}: {str(exc).strip().splitlines()[-1]}") from None


def create(dims: int, factory: str = EXACT_FACTORY) -> faiss.Index:
    """A new empty index; wrapped in IDMap2 when the type cannot store ids itself (HNSW, Refine, ...)."""
    idx = faiss.index_factory(dims, factory, faiss.METRIC_INNER_PRODUCT)
    if _ivf(idx) is None and not _is_idmap(idx):
        idx = faiss.IndexIDMap2(idx)
    return idx


def _is_idmap(idx: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(idx), (faiss.IndexIDMap, faiss.IndexIDMap2))


def _ivf(idx: faiss.Index) -> faiss.IndexIVF | None:
    """The inverted-file index inside idx (possibly under a pre-transform), if idx stores ids in one."""
    idx = faiss.downcast_index(idx)
    if isinstance(idx, faiss.IndexPreTransform):
        return _ivf(idx.index)
    return idx if isinstance(idx, faiss.IndexIVF) else None


def is_approximate(idx: faiss.Index) -> bool:
    inner = faiss.downcast_index(idx)
    if _is_idmap(inner):
        inner = faiss.downcast_index(inner.index)
    return not isinstance(inner, faiss.IndexFlat)


def ids_of(index: faiss.Index) -> np.ndarray:
    """Every id the index holds (IDMap's id map, or collected from the IVF's inverted lists)."""
    if _is_idmap(index):
        return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)
    ivf = _ivf(index)
    if ivf is None:
        raise TypeError(f"cannot list the ids of a {type(faiss.downcast_index(index)).__name__}")
    lists = ivf.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
             for i in range(ivf.nlist) if lists.list_size(i)]  # fmt: skip
    return np.concatenate(parts).astype(np.int64) if parts else np.empty(0, np.int64)


def train_size(index: faiss.Index) -> int:
    ivf = _ivf(index)
    return max(TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 1), 65536)


def _train(index: faiss.Index, wanted: np.ndarray, vectors_for: Callable[[np.ndarray], np.ndarray]) -> None:
    """Train on a random sample of the wanted vectors (IVF centroids, quantiser ranges)."""
    size = train_size(index)
    sample = wanted if len(wanted) <= size else np.sort(np.random.default_rng(0).choice(wanted, size, replace=False))
    index.train(np.ascontiguousarray(vectors_for(sample), dtype=np.float32))


def reconcile(
    index: faiss.Index, wanted: np.ndarray, vectors_for: Callable[[np.ndarray], np.ndarray], chunk: int = 65536
) -> tuple[int, int]:
    """Make the index hold exactly the `wanted` ids; returns (added, removed).

    An untrained index (a new IVF) is trained first on a sample of the wanted vectors. Types that
    cannot remove ids (HNSW) are emptied and refilled instead.
    """
    wanted = np.asarray(wanted, dtype=np.int64)
    have = ids_of(index)
    extra = np.setdiff1d(have, wanted, assume_unique=True)
    if len(extra):
        try:
            index.remove_ids(faiss.IDSelectorBatch(extra))
        except RuntimeError:
            index.reset()
            have = np.empty(0, np.int64)
    missing = np.setdiff1d(wanted, have, assume_unique=True)
    if len(missing) and not index.is_trained:
        _train(index, wanted, vectors_for)
    for start in range(0, len(missing), chunk):
        ids = missing[start : start + chunk]
        index.add_with_ids(np.ascontiguousarray(vectors_for(ids), dtype=np.float32), ids)
    return len(missing), len(extra)


def save(index: faiss.Index, path: Path) -> None:
    """Write to a temporary file and rename: readers see the old or the new index, never half.

    A reader that memory-mapped the old file keeps reading it (the rename leaves its inode alive).
    """
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path, mmap: bool | None = None) -> faiss.Index:
    """Read an index; mmap (default: when the file is MMAP_FROM_BYTES or more) maps it read-only.

    Mapped: IVF inverted lists and flat codes stay on disk and the OS pages them in as searched.
    The rest (IVF centroids, IDMap id maps, HNSW graphs, and the lists of an IVF under a
    pre-transform such as OPQ) is read into RAM. Mapped indexes cannot be
    changed: writers load with mmap=False.
    """
    if mmap is None:
        mmap = path.stat().st_size >= MMAP_FROM_BYTES
    if not mmap:
        return faiss.read_index(str(path))
    with open(path, "rb") as fh:
        ivf = fh.read(2) == b"Iw"  # FAISS's IndexIVF* fourccs; IO_FLAG_MMAP_IFC would read their lists into RAM
    return faiss.read_index(str(path), (faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY)


def search_parameters(index: faiss.Index, nprobe: int | None = None) -> tuple[faiss.SearchParameters | None, list]:
    """Per-call search parameters (thread-safe, unlike setting index.nprobe), plus what keeps them alive.

    nprobe is the IVF lists visited (default: default_nprobe) or HNSW's efSearch (default: FAISS's).
    """
    keep: list = []

    def build(idx: faiss.Index) -> faiss.SearchParameters | None:
        idx = faiss.downcast_index(idx)
        if isinstance(idx, (faiss.IndexIDMap, faiss.IndexIDMap2)):
            return build(idx.index)
        if isinstance(idx, faiss.IndexPreTransform):
            inner = build(idx.index)
            params = faiss.SearchParametersPreTransform(index_params=inner) if inner is not None else None
        elif isinstance(idx, faiss.IndexRefine):
            inner = build(idx.base_index)
            params = faiss.IndexRefineSearchParameters(k_factor=idx.k_factor, base_index_params=inner)
        elif isinstance(idx, faiss.IndexIVF):
            params = faiss.SearchParametersIVF(nprobe=min(idx.nlist, nprobe or default_nprobe(idx.nlist)))
        elif isinstance(idx, faiss.IndexHNSW) and nprobe:
            params = faiss.SearchParametersHNSW(efSearch=nprobe)
        else:
            params = None
        keep.append(params)
        return params

    return build(index), keep


def rerank(
    queries: np.ndarray, ids: np.ndarray, vectors_for: Callable[[np.ndarray], np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for candidate ids (from vectors kept outside the index), best k per query kept.

    Approximate codes (SQ6: recall@10 0.73 at 10M) blur the order of near-equal neighbours; re-scoring REFINE_FACTOR x k
    candidates with exact vectors restores it for the cost of reading those vectors from disk,
    where FAISS's own refine stage would hold every exact vector in RAM.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    known = np.unique(ids[ids >= 0])
    if not len(known):
        return np.full(ids.shape, -np.inf, np.float32)[:, :k], ids[:, :k]
    vectors = np.ascontiguousarray(vectors_for(known), dtype=np.float32)
    rows = np.searchsorted(known, np.where(ids >= 0, ids, known[0]))
    scores = np.einsum("qd,qcd->qc", queries, vectors[rows])
    scores[ids < 0] = -np.inf
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, best, 1), np.take_along_axis(np.where(ids >= 0, ids, -1), best, 1)


def search(index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries, k); missing neighbours have id -1."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not index.ntotal:
        return np.full((len(queries), 1), -np.inf, np.float32), np.full((len(queries), 1), -1, np.int64)
    k = max(1, min(k, index.ntotal))
    params, _keep = search_parameters(index, nprobe)
    return index.search(queries, k, params=params)
