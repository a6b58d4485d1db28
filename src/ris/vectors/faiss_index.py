"""The FAISS index over reduced vectors, keyed by image id, kept in step with the catalogue.

The catalogue is the truth; the index is derived. `reconcile` adds the ids the catalogue has and
the index lacks and removes the others, so a run killed between the two writes heals itself on the
next run, and incremental updates cost work proportional to the change.

Which index: a collection asks for a FAISS factory string or "auto" (the default). "auto" is exact
search below `APPROX_FROM` vectors and an inverted-file index with 4-bit fast-scan product quantisation above
(`ivf_factory`: PQ{d}x4fs, one 4-bit code a dimension, scanned 16 codes at a time from SIMD registers; from
HNSW_QUANTIZER_FROM vectors with 4x more lists, found through an HNSW graph of their centroids), whose candidates
(`refine_factor` x k) the collection re-scores exactly (`rerank`, from the reduced vectors kept beside it). Measured in
benchmarks/scale/scale.py on 2M synthetic 256-d vectors shaped like the real features (IVF4096 over an HNSW graph,
231 probes, one query, 2 cores): SQ6 recall@10 0.784 / 0.999 re-scoring 4 x k, 9.1 / 9.8 ms, 203 bytes a vector;
PQ256x4fs 0.400 / 0.989 re-scoring 10 x k, 2.3 / 3.6 ms, 143 bytes a vector. At 10M the lists probed, not the
codes, limit recall, so a 3-4x cheaper scan buys the probes (10M through ris, 461 probes, one query: recall@10
0.953 / 0.962 re-scoring 10 / 16 x k, p50 6.4 / 6.9 ms; benchmarks/RESULTS.md "Large collections").
Indexes of `MMAP_FROM_BYTES` or more are memory-mapped for searching (IVF lists and flat codes are; everything
else is read into RAM).

Where a search runs (`search`, `range_search`; `device` or RIS_SEARCH_DEVICE = auto | cpu | cuda):
- a FAISS GPU build (`faiss.get_num_gpus() > 0`): the index cloned to the GPUs once
  (`index_cpu_to_all_gpus`; flat and the IVF types FAISS's GPU code supports, else the CPU);
- otherwise, with a CUDA GPU visible to PyTorch, exact (flat) indexes are searched by a matrix product
  and top-k in PyTorch, in query blocks of BLOCK_BYTES of scores, the vectors resident on the GPU in
  float32 (exact: the same products as FAISS's up to summation order, as long as TF32 matmuls stay
  off, PyTorch's default; 1 KiB a 256-d vector, so 10M take 10 GiB of an 80-141 GiB card) or,
  with RIS_SEARCH_DTYPE=float16, half that, candidates re-scored in float32 (not exact: the vectors'
  rounding moves scores by up to ~2e-4, and ~1% of top-10 places swap between near-equal neighbours,
  measured on Caltech-101 vectors);
- otherwise, and for approximate indexes without a FAISS GPU build, FAISS on the CPU, as before
  (long rankings, k >= SORT_FROM_K and >= ntotal / 4, as `ris eval` asks: a product and a sort).
  An IVF index cannot be searched by a matrix product: its vectors exist only as lossy codes in
  inverted lists, and brute force over all of them would ignore nprobe (GPU brute force over decoded
  SQ6 codes is possible, but a single IVF query already takes ~2 ms on the CPU at 10M vectors).
  `ris eval` and `ris dupes` search the catalogue's exact vectors (`flat`), so they use the GPU
  whatever index the collection has.
"auto" picks the GPU only for work worth a trip there (`GPU_FROM_PAIRS` query x vector pairs, or an
index already resident): a small collection's search stays on the CPU and never initialises CUDA.
Asking for cuda without a GPU is a one-line RisError, like the extractor's `--device cuda`.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from ..config import env
from ..errors import RisError
from ..files.atomic import write_with

#: The index described FAISS-style (see faiss.index_factory); stored in the manifest.
EXACT_FACTORY = "IDMap2,Flat"
#: The size-based choice between exact and approximate search.
AUTO = "auto"
#: "auto" switches to IVF at this many vectors, and back to exact only below half of it (a collection
#: hovering at the threshold is not rebuilt). Exact search of one query is memory-bound, 0.1-0.2 us a
#: vector on 2 cores (212 ms at 1M, benchmarks/scale/scale.py): 10-20 ms here; IVF,SQ6 + rerank ~2 ms.
APPROX_FROM = 100_000
#: An HNSW graph over IVF centroids is searched with efSearch this many times the lists probed.
QUANTIZER_EF = 2
#: Indexes at least this large are memory-mapped when opened for searching.
MMAP_FROM_BYTES = 64 << 20
#: FAISS's fast-scan implementation for one query: 14 spreads its probes over the threads (`_fast_scan_for`).
FAST_SCAN_LONE_QUERY = 14
#: Approximate searches fetch this many times k candidates for `rerank` to re-score exactly (`refine_factor`):
#: 8-bit or 6-bit codes keep the order of near neighbours well, 4-bit codes (fast-scan PQ) need more candidates
#: (2M vectors, recall@10 after re-scoring: 4-bit PQ 0.845 from 4 x k candidates, 0.989 from 10 x k; 10M through
#: ris at 461 probes: 0.953 from 10 x k, 0.962 from 16 x k for 0.5 ms more).
REFINE_FACTOR = 4
FAST_SCAN_REFINE_FACTOR = 16
#: Fewer training vectors per IVF list than this and k-means is noisy; more costs time for nothing.
TRAIN_PER_LIST = 64
#: ...but at most this many (10M vectors: 16,384 lists; 32 a list are enough for a two-level k-means).
TRAIN_MAX = 524_288
#: From this many vectors "auto" puts an HNSW graph over the IVF centroids (FAISS's IVF{nlist}_HNSW32) and
#: uses 4x more lists: finding each added vector's or query's list among tens of thousands of centroids by
#: brute force costs nlist products a vector (10M x 16k x 256: hours on 2 cores), the graph a few hundred.
#: Such an index is trained by two-level k-means (sqrt(nlist) clusters, then each split; faiss.contrib).
HNSW_QUANTIZER_FROM = 2_000_000
#: Where searches may run (`device` argument, else the RIS_SEARCH_DEVICE environment variable).
SEARCH_DEVICES = ("auto", "cpu", "cuda")
#: "auto" goes to the GPU for at least this many query x vector pairs (or when the index is already
#: resident there). Below it FAISS answers on the CPU in ~10-25 ms on 2 cores (0.1-0.2 us a pair),
#: less than a first CUDA initialisation and upload would cost a one-off `ris search`.
GPU_FROM_PAIRS = 1 << 17
#: Score matrix bytes per query block on the device: memory stays bounded whatever the number of queries.
BLOCK_BYTES = 256 << 20
#: FAISS's GPU k-selection stops at this k; larger k (full rankings for `ris eval`) go to PyTorch.
FAISS_GPU_MAX_K = 2048
#: On the CPU, rankings this long and at least a quarter of the index are sorted, not heap-selected by FAISS.
SORT_FROM_K = 1024
#: float16 storage: candidates re-scored in float32 per query (a margin over k for fp16 rounding).
FP16_CANDIDATES = 16


def nlist_for(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest sqrt(n) (4 sqrt(n) from HNSW_QUANTIZER_FROM: shorter
    lists, found by the graph), with at least 39 vectors a list."""
    per_root = 4 if n >= HNSW_QUANTIZER_FROM else 1
    want = 2 ** round(math.log2(max(1.0, per_root * math.sqrt(n))))
    cap = 2 ** int(math.log2(max(1, n // 39))) if n >= 39 else 1
    return int(max(1, min(want, cap, 65536)))


def ivf_factory(n: int, dims: int) -> str:
    """IVF with a 4-bit fast-scan code a dimension; from HNSW_QUANTIZER_FROM vectors its centroids are found
    through an HNSW graph."""
    nlist = nlist_for(n)
    lists = f"IVF{nlist}_HNSW32" if n >= HNSW_QUANTIZER_FROM else f"IVF{nlist}"
    return f"{lists},PQ{dims}x4fs"


def default_nprobe(nlist: int) -> int:
    """Lists visited per query unless asked otherwise: 3.6 sqrt(nlist) (1,024 lists: 116; 16,384: 461), at least 16.

    Chosen for recall@10 >= 0.95 after re-scoring, measured on 1M vectors drawn like the real stored ones
    (benchmarks/scale/large_collection.py's mixture, reduced to 256-d): 0.95 took ~70 probes of 1,024 lists
    (16 / 32 / 64 / 128: 0.81 / 0.90 / 0.94 / 0.98), ~230 of 4,096 over an HNSW graph (128 / 256: 0.92 / 0.96);
    a fixed share of the lists over-probes fine lists. At 10M through ris (16,384 lists over an HNSW graph,
    searched with QUANTIZER_EF): 230 / 461 / 922 probes gave 0.951 / 0.978 / 0.994, p50 18 / 29 / 47 ms on 2 cores.
    """
    return max(1, min(nlist, max(16, math.ceil(3.6 * math.sqrt(nlist)))))


def _nlist_of(factory: str) -> int | None:
    found = re.search(r"IVF(\d+)", factory)
    return int(found.group(1)) if found else None


def resolve(requested: str, n: int, dims: int, built: str | None = None, approx_from: int | None = None) -> str:
    """The factory the index should have for n vectors, given what was asked and what is built.

    An explicit factory is itself. "auto" keeps what is built (`ris reindex` builds anew) unless the size calls for another
    kind: exact -> IVF at approx_from, IVF -> exact below approx_from / 2, IVF -> IVF with more lists
    once the list count due is 4x (the collection grew ~16x since training; rebuilding then keeps
    the amortised cost of additions proportional to their number).
    """
    if requested != AUTO:
        return requested
    approx_from = APPROX_FROM if approx_from is None else approx_from
    if not built:
        return ivf_factory(n, dims) if n >= approx_from else EXACT_FACTORY
    nlist = _nlist_of(built)
    if nlist is None:
        return ivf_factory(n, dims) if n >= approx_from else built
    if n < approx_from // 2:
        return EXACT_FACTORY
    due = nlist_for(n)
    return ivf_factory(n, dims) if due >= 4 * nlist or 4 * due <= nlist else built


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


def refine_factor(idx: faiss.Index) -> int:
    """Candidates re-scored per result wanted: FAST_SCAN_REFINE_FACTOR for 4-bit fast-scan codes, else REFINE_FACTOR."""
    ivf = _ivf(idx)
    return FAST_SCAN_REFINE_FACTOR if isinstance(ivf, faiss.IndexIVFFastScan) else REFINE_FACTOR


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
    return min(max(TRAIN_PER_LIST * (ivf.nlist if ivf is not None else 1), 65536), TRAIN_MAX)


def _train(index: faiss.Index, wanted: np.ndarray, vectors_for: Callable[[np.ndarray], np.ndarray]) -> None:
    """Train on a random sample of the wanted vectors (IVF centroids, quantiser ranges). An IVF over an HNSW
    graph gets its centroids from a two-level k-means first (a flat k-means of 16k centroids: 10 TFLOP)."""
    size = train_size(index)
    sample = wanted if len(wanted) <= size else np.sort(np.random.default_rng(0).choice(wanted, size, replace=False))
    x = np.ascontiguousarray(vectors_for(sample), dtype=np.float32)
    ivf = _ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW) and len(x) >= ivf.nlist:
        from faiss.contrib.clustering import two_level_clustering

        spherical = ivf.metric_type == faiss.METRIC_INNER_PRODUCT  # unit centroids: nearest by inner product
        centroids, _ = two_level_clustering(x, int(math.sqrt(ivf.nlist)), ivf.nlist, clustering_niter=10,
                                            spherical=spherical, seed=1234, min_points_per_centroid=16)  # fmt: skip
        ivf.quantizer.add(centroids)  # index.train then trains only the codes' quantiser
    index.train(x)


def reconcile(
    index: faiss.Index, wanted: np.ndarray, vectors_for: Callable[[np.ndarray], np.ndarray], chunk: int = 65536
) -> tuple[int, int]:
    """Make the index hold exactly the `wanted` ids; returns (added, removed): ids it did not hold before, and
    ids it no longer holds.

    An untrained index (a new IVF) is trained first on a sample of the wanted vectors. Types that
    cannot remove ids (HNSW) are emptied and refilled instead.
    """
    wanted = np.asarray(wanted, dtype=np.int64)
    have = ids_of(index)
    extra = np.setdiff1d(have, wanted, assume_unique=True)
    added = len(wanted) - (len(have) - len(extra))  # wanted ids are unique; have minus extra are all wanted
    if len(extra) and not _removed(index, extra):
        index.reset()  # emptied, still trained: refilled below
        have = np.empty(0, np.int64)
    missing = np.setdiff1d(wanted, have, assume_unique=True)
    if len(extra) or len(missing):
        _changed(index)
    if len(missing) and not index.is_trained:
        _train(index, wanted, vectors_for)
    for start in range(0, len(missing), chunk):
        ids = missing[start : start + chunk]
        index.add_with_ids(np.ascontiguousarray(vectors_for(ids), dtype=np.float32), ids)
    return added, len(extra)


def _removed(index: faiss.Index, extra: np.ndarray) -> bool:
    """Remove these ids in place where the index can (HNSW cannot: refilled instead)."""
    try:
        index.remove_ids(faiss.IDSelectorBatch(extra))
    except RuntimeError:
        return False
    ivf = _ivf(index)
    if isinstance(ivf, faiss.IndexIVFFastScan):
        _clear_block_tails(ivf)
    return True


def _clear_block_tails(ivf: faiss.IndexIVFFastScan) -> None:
    """Zero the unused slots of each list's last block of 4-bit codes.

    FAISS 1.15's fast-scan remove_ids repacks the kept codes but leaves the removed ones' nibbles behind the
    list's end, and a later add ORs new codes into them: 16k images, 1 in 7 removed, images added next found
    themselves 26% of the time (10M, five add/remove rounds: 47%).
    """
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    packer = ivf.get_CodePacker()
    per_block, block_size = lists.n_per_block, lists.block_size
    flat = np.zeros((per_block, ivf.code_size), np.uint8)
    for i in range(ivf.nlist):
        n = lists.list_size(i)
        if n % per_block:
            block = faiss.rev_swig_ptr(lists.get_codes(i), (n // per_block + 1) * block_size)[-block_size:]
            packer.unpack_all(faiss.swig_ptr(block), faiss.swig_ptr(flat))
            flat[n % per_block :] = 0
            packer.pack_all(faiss.swig_ptr(flat), faiss.swig_ptr(block))


def save(index: faiss.Index, path: Path) -> None:
    """Write to a temporary file and rename: readers see the old or the new index, never half.

    A reader that memory-mapped the old file keeps reading it (the rename leaves its inode alive).
    """
    write_with(path, lambda tmp: faiss.write_index(index, str(tmp)))


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
        return _probes_in_parallel(faiss.read_index(str(path)))
    with open(path, "rb") as fh:
        ivf = fh.read(2) == b"Iw"  # FAISS's IndexIVF* fourccs; IO_FLAG_MMAP_IFC would read their lists into RAM
    flags = (faiss.IO_FLAG_MMAP if ivf else faiss.IO_FLAG_MMAP_IFC) | faiss.IO_FLAG_READ_ONLY
    return _probes_in_parallel(faiss.read_index(str(path), flags))


def _probes_in_parallel(idx: faiss.Index) -> faiss.Index:
    """An IVF's lists are scanned on all threads, also for one query (FAISS's parallel_mode 1; its default splits
    the queries between threads, so a lone query ran on one): 10M images, 256 lists, one query 26.0 -> 15.7 ms,
    a batch of 200 unchanged (11.9 ms a query), same results."""
    ivf = _ivf(idx)
    if ivf is not None:
        ivf.parallel_mode = 1
    return idx


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
            lists = min(idx.nlist, nprobe or default_nprobe(idx.nlist))
            params = faiss.SearchParametersIVF(nprobe=lists, quantizer_params=build_quantizer(idx, lists))
        elif isinstance(idx, faiss.IndexHNSW) and nprobe:
            params = faiss.SearchParametersHNSW(efSearch=nprobe)
        else:
            params = None
        keep.append(params)
        return params

    def build_quantizer(ivf: faiss.IndexIVF, lists: int) -> faiss.SearchParameters | None:
        """An HNSW graph over the centroids finds about efSearch good lists, not `lists` (FAISS keeps its
        efSearch, 16): at 10M, 461 lists probed through efSearch 16 held 77% of the true neighbours' lists,
        against 98.5% for the 461 nearest centroids. So the graph is searched with efSearch QUANTIZER_EF x lists."""
        if not isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            return None
        params = faiss.SearchParametersHNSW(efSearch=QUANTIZER_EF * lists)
        keep.append(params)
        return params

    return build(index), keep


def rerank(
    queries: np.ndarray, ids: np.ndarray, vectors_for: Callable[[np.ndarray], np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for candidate ids (from vectors kept outside the index), best k per query kept.

    Approximate codes (SQ6: recall@10 0.73 at 10M) blur the order of near-equal neighbours; re-scoring refine_factor x k
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


# --- searching, on the CPU or a GPU --------------------------------------------------------------


def flat(vectors: np.ndarray) -> faiss.IndexFlatIP:
    """An exact inner-product index over a matrix (rows are the ids): what `ris eval`/`ris dupes` search."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    idx = faiss.IndexFlatIP(x.shape[1])
    idx.add(x)
    return idx


def search(
    index: faiss.Index, queries: np.ndarray, k: int, nprobe: int | None = None, device: str | None = None,
    *, dtype: str | None = None, block: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(scores, ids), each (n_queries, min(k, ntotal)), best first; missing neighbours have id -1.

    device: "auto" (default: RIS_SEARCH_DEVICE, else auto), "cpu" or "cuda" (see the module docstring);
    "torch:cpu" / "torch:cuda" force the PyTorch path (on CPU tensors it is the GPU code, testable
    anywhere). dtype: the PyTorch path's storage, "float32" (default: RIS_SEARCH_DTYPE) or "float16".
    block: queries per device block (default: as many as BLOCK_BYTES of scores hold).
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    if not index.ntotal:
        return np.full((len(queries), 1), -np.inf, np.float32), np.full((len(queries), 1), -1, np.int64)
    k = max(1, min(k, index.ntotal))
    where = search_plan(index, len(queries), k, device)
    if where == "faiss-gpu":
        gpu = _resident(index, where, None)
        if gpu is not None:
            ivf = _ivf(index)
            with gpu.lock:  # a GPU index takes nprobe as a setting, not per call
                if ivf is not None:
                    probes = min(ivf.nlist, nprobe or default_nprobe(ivf.nlist))
                    faiss.GpuParameterSpace().set_index_parameter(gpu.index, "nprobe", probes)
                return gpu.index.search(queries, k)
    elif where.startswith("torch:"):
        res = _resident(index, where, _dtype(dtype))
        if res is not None:
            scores, rows = _torch_topk(res.vectors, queries, k, block)
            return scores, (res.ids[rows] if res.ids is not None else rows)
    elif k >= SORT_FROM_K and 4 * k >= index.ntotal and _torch_searchable(index):
        return _sorted_product(index, queries, k, block)
    params, _keep = search_parameters(index, nprobe)
    _fast_scan_for(index, len(queries))
    return index.search(queries, k, params=params)


def _fast_scan_for(index: faiss.Index, n_queries: int) -> None:
    """A 4-bit fast-scan IVF scans a lone query's probes on all threads (FAISS's implem 14, "multithreaded over
    nq x nprobe"; its automatic choice gave one query one thread): 10M images, 461 probes, one query 6.3 ->
    4.4 ms; a batch of 200 keeps the automatic choice (2.0 ms a query, 2.3 with 14). Candidates 99% the same,
    so a search racing another's choice on the shared index only gets the other valid scan."""
    ivf = _ivf(index)
    if isinstance(ivf, faiss.IndexIVFFastScan):
        ivf.implem = FAST_SCAN_LONE_QUERY if n_queries == 1 else 0


def range_search(
    index: faiss.Index, queries: np.ndarray, radius: float, device: str | None = None,
    *, dtype: str | None = None, block: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Every indexed vector scoring above radius with each query, FAISS-style: (lims, scores, ids).

    Query i's hits are scores[lims[i]:lims[i + 1]] (in no particular order). Devices as `search`;
    FAISS's GPU indexes have no range search, so a FAISS GPU build uses PyTorch on the GPU for it.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    where = search_plan(index, len(queries), 1, device)
    if where == "faiss-gpu":
        where = "torch:cuda" if _cuda() else "faiss-cpu"
    if where.startswith("torch:") and index.ntotal:
        res = _resident(index, where, _dtype(dtype))
        if res is not None:
            lims, scores, rows = _torch_range(res.vectors, queries, float(radius), block)
            return lims, scores, (res.ids[rows] if res.ids is not None else rows)
    params, _keep = search_parameters(index, None)
    return index.range_search(queries, float(radius), params=params)


def search_plan(index: faiss.Index, n_queries: int, k: int, device: str | None = None) -> str:
    """Where a search of n_queries runs: "faiss-cpu", "faiss-gpu", "torch:cuda" or "torch:cpu"."""
    asked = device or env("RIS_SEARCH_DEVICE")
    if asked in ("torch:cpu", "torch:cuda"):
        if asked == "torch:cuda" and not _cuda():
            raise RisError("search device torch:cuda asked for, but PyTorch sees no CUDA GPU")
        return asked if _torch_searchable(index) else "faiss-cpu"
    if asked not in SEARCH_DEVICES:
        raise RisError(f"unknown search device {asked!r}; choose one of {', '.join(SEARCH_DEVICES)}")
    if asked == "cpu":
        return "faiss-cpu"
    if asked == "auto" and index not in _cache and n_queries * index.ntotal < GPU_FROM_PAIRS:
        return "faiss-cpu"
    if faiss.get_num_gpus() > 0 and k <= FAISS_GPU_MAX_K:
        return "faiss-gpu"
    if asked == "auto" and not _torch_searchable(index):  # an IVF goes to a GPU only through FAISS's own GPU build:
        return "faiss-cpu"  # no CUDA probe per query (it globbed /dev each time: ~2 ms of a 10M-image search)
    if not _cuda():
        if asked == "cuda" and faiss.get_num_gpus() == 0:
            raise RisError("search device cuda asked for, but PyTorch sees no CUDA GPU "
                           "(set RIS_SEARCH_DEVICE to cpu or auto)")  # fmt: skip
        return "faiss-cpu"
    return "torch:cuda" if _torch_searchable(index) else "faiss-cpu"


def release(index: faiss.Index) -> None:
    """Free the GPU copy of an index (it is freed anyway once the index object is garbage collected)."""
    with _lock:
        _cache.pop(index, None)


def _cuda() -> bool:
    """runtime.cuda_available: on a CPU-only Linux machine answered without importing PyTorch (1.4 s)."""
    from ..model.runtime import cuda_available

    return cuda_available()


def _dtype(dtype: str | None) -> str:
    dtype = dtype or env("RIS_SEARCH_DTYPE")
    if dtype not in ("float32", "float16"):
        raise RisError(f"unknown search dtype {dtype!r}; choose float32 or float16")
    return dtype


def _torch_searchable(index: faiss.Index) -> bool:
    """A flat inner-product index (maybe under an IDMap): its vectors are stored as they are."""
    inner = faiss.downcast_index(index)
    if _is_idmap(inner):
        inner = faiss.downcast_index(inner.index)
    return isinstance(inner, faiss.IndexFlat) and inner.metric_type == faiss.METRIC_INNER_PRODUCT


# Copies of indexes on a device, keyed by the index object (dropped with it) and checked against its
# ntotal and change count (bumped by reconcile), so a reconciled index is uploaded again.
_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_changes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _changed(index: faiss.Index) -> None:
    with _lock:
        _changes[index] = _changes.get(index, 0) + 1


@dataclass
class _Resident:
    key: tuple
    index: Any = None  # a FAISS GPU index, or
    vectors: Any = None  # a (ntotal, d) torch tensor on the device
    ids: np.ndarray | None = None  # the id of each row (None: rows are the ids)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _resident(index: faiss.Index, where: str, dtype: str | None) -> _Resident | None:
    """The index's copy on the device, uploaded on first use (None: it cannot go there; use the CPU)."""
    with _lock:
        key = (where, dtype, index.ntotal, _changes.get(index, 0))
        res = _cache.get(index)
        if res is None or res.key != key:
            _cache.pop(index, None)  # the stale copy goes before the new one is made
            res = _cache[index] = _Resident(key)
            try:
                if where == "faiss-gpu":
                    res.index = faiss.index_cpu_to_all_gpus(index)
                else:
                    res.vectors, res.ids = _upload(index, where.split(":")[1], dtype)
            except RuntimeError as exc:  # a type FAISS's GPU code lacks, or out of GPU memory: the CPU then
                warnings.warn(f"search stays on the CPU: {str(exc).strip().splitlines()[0]}", stacklevel=3)
        return res if (res.index is not None or res.vectors is not None) else None


def _flat_arrays(index: faiss.Index) -> tuple[np.ndarray, np.ndarray | None]:
    """A flat index's vectors (a view of FAISS's own buffer, maybe memory-mapped) and ids (None: rows are ids)."""
    inner, ids = faiss.downcast_index(index), None
    if _is_idmap(inner):
        ids = faiss.vector_to_array(inner.id_map).astype(np.int64)
        inner = faiss.downcast_index(inner.index)
    return faiss.rev_swig_ptr(inner.get_xb(), inner.ntotal * inner.d).reshape(inner.ntotal, inner.d), ids


def _sorted_product(index: faiss.Index, queries: np.ndarray, k: int, block: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Long rankings (k a large share of ntotal: `ris eval`'s full ones) on the CPU: a product and a stable
    sort per query block, 1.7x faster than FAISS's heap at k = ntotal (8.7k x 8.7k, 2 cores)."""
    xb, ids = _flat_arrays(index)
    rows_per = _block_rows(len(xb), 0, block)
    scores, found = [], []
    for start in range(0, len(queries), rows_per):
        sims = queries[start : start + rows_per] @ xb.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        scores.append(np.take_along_axis(sims, order, 1))
        found.append(order if ids is None else ids[order])
    return (scores[0], found[0]) if len(scores) == 1 else (np.concatenate(scores), np.concatenate(found))


def _upload(index: faiss.Index, device: str, dtype: str, chunk: int = 1 << 20):
    """A flat index's vectors as a torch tensor on the device (converted there, chunk by chunk) and its ids."""
    import torch

    xb, ids = _flat_arrays(index)
    n, d = xb.shape
    out = torch.empty((n, d), dtype=getattr(torch, dtype), device=device)
    for start in range(0, n, chunk):
        out[start : start + chunk] = torch.from_numpy(xb[start : start + chunk]).to(device)
    return out, ids


def _top(scores, k: int):
    """Best k per row, best first: a stable sort when k is a large share of the row, else top-k."""
    import torch

    if 4 * k >= scores.shape[1]:
        values, rows = torch.sort(scores, dim=1, descending=True, stable=True)
        return values[:, :k], rows[:, :k]
    return torch.topk(scores, k, dim=1, largest=True, sorted=True)


def _block_rows(n: int, per_row: int, block: int | None) -> int:
    return block or max(1, BLOCK_BYTES // (4 * max(n, per_row)))


def _torch_topk(x, queries: np.ndarray, k: int, block: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product against x (on its device), query block by query block.

    float16 storage: the best FP16_CANDIDATES + 2k by the float16 product are re-scored in float32
    (float16 products are rounded to ~5e-4; the re-scored ones carry only the vectors' rounding, ~2e-4).
    """
    import torch

    n = x.shape[0]
    exact = x.dtype == torch.float32
    cand = k if exact else min(n, 2 * k + FP16_CANDIDATES)
    rows_per = _block_rows(n, 0 if exact else cand * x.shape[1], block)
    scores, found = np.empty((len(queries), k), np.float32), np.empty((len(queries), k), np.int64)
    with torch.inference_mode():
        for start in range(0, len(queries), rows_per):
            q = torch.from_numpy(queries[start : start + rows_per]).to(x.device)
            if exact:
                s, r = _top(q @ x.T, k)
            else:
                _, c = _top(q.to(x.dtype) @ x.T, cand)
                s, j = _top(torch.einsum("qd,qcd->qc", q, x[c].float()), k)
                r = c.gather(1, j)
            scores[start : start + len(q)], found[start : start + len(q)] = s.cpu().numpy(), r.cpu().numpy()
    return scores, found


def _torch_range(x, queries: np.ndarray, radius: float, block: int | None) -> tuple[np.ndarray, ...]:
    """Every (query, row) scoring above radius; float16 storage re-scores near misses in float32."""
    import torch

    exact = x.dtype == torch.float32
    rows_per = _block_rows(x.shape[0], 0, block)
    counts, scores, found = [], [], []
    with torch.inference_mode():
        for start in range(0, len(queries), rows_per):
            q = torch.from_numpy(queries[start : start + rows_per]).to(x.device)
            sims = q @ x.T if exact else q.to(x.dtype) @ x.T
            qi, xi = torch.nonzero(sims > (radius if exact else radius - 2e-3), as_tuple=True)  # row-major
            s = sims[qi, xi] if exact else torch.einsum("pd,pd->p", q[qi], x[xi].float())
            if not exact:
                keep = s > radius
                qi, xi, s = qi[keep], xi[keep], s[keep]
            counts.append(torch.bincount(qi, minlength=len(q)).cpu().numpy())
            scores.append(s.float().cpu().numpy())
            found.append(xi.cpu().numpy())
    lims = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return lims, np.concatenate(scores), np.concatenate(found).astype(np.int64)
