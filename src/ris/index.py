"""The FAISS index over reduced vectors, keyed by image id, kept in step with the catalogue.

The catalogue is the truth; the index is derived. `reconcile` adds the ids the catalogue has and
the index lacks and removes the others, so a run killed between the two writes heals itself on the
next run, and incremental updates cost work proportional to the change.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

#: The index described FAISS-style (see faiss.index_factory); stored in the manifest.
EXACT_FACTORY = "IDMap2,Flat"


def create(dims: int, factory: str = EXACT_FACTORY) -> faiss.Index:
    return faiss.index_factory(dims, factory, faiss.METRIC_INNER_PRODUCT)


def ids_of(index: faiss.Index) -> np.ndarray:
    return faiss.vector_to_array(faiss.downcast_index(index).id_map).astype(np.int64)


def reconcile(
    index: faiss.Index, wanted: np.ndarray, vectors_for: Callable[[np.ndarray], np.ndarray], chunk: int = 65536
) -> tuple[int, int]:
    """Make the index hold exactly the `wanted` ids; returns (added, removed)."""
    have = ids_of(index)
    extra = np.setdiff1d(have, wanted, assume_unique=True)
    missing = np.setdiff1d(wanted, have, assume_unique=True)
    if len(extra):
        index.remove_ids(faiss.IDSelectorBatch(extra))
    for start in range(0, len(missing), chunk):
        ids = missing[start : start + chunk]
        index.add_with_ids(vectors_for(ids), ids)
    return len(missing), len(extra)


def save(index: faiss.Index, path: Path) -> None:
    """Write to a temporary file and rename: readers see the old or the new index, never half."""
    tmp = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load(path: Path) -> faiss.Index:
    return faiss.read_index(str(path))


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids), each (n_queries, k); missing neighbours have id -1."""
    k = max(1, min(k, index.ntotal)) if index.ntotal else 1
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
