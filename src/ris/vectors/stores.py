"""One contract for where a collection's searchable vectors live: `index.faiss` in the collection, or Milvus.

The collection never asks which one it holds. A store keeps, for each searchable image id, the vector
the index serves (reduced, or DBA-augmented); `reconcile` makes it hold exactly the catalogue's ids,
`search` answers the nearest ids with their scores (and the rows it knows: Milvus keeps paths and labels),
and `approximate` says whether its candidates need re-scoring with exact vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import RisError
from . import faiss_index as index, idsets
from .catalog import ImageRow

VectorsFor = Callable[[np.ndarray], np.ndarray]
RowsFor = Callable[[Sequence[int]], dict[int, ImageRow]]


class VectorStore(Protocol):
    """What Derived (the upkeep) and the ranking need from a store."""

    def built(self) -> tuple[int, str] | None:
        """(dims, index kind) of what is built, or None while nothing is."""
        ...

    @property
    def ntotal(self) -> int: ...

    def approximate(self) -> bool:
        """Whether search scores are approximate (the ranking re-scores candidates with exact vectors)."""
        ...

    def candidates(self, k: int) -> int:
        """How many candidates to fetch for k results: k when exact, more for the ranking to re-score when approximate."""
        ...

    def prepare(self, dims: int, kind: str, fresh: bool = False) -> None:
        """Start over (empty) when what is built is not `dims`/`kind`, or when fresh (the vectors' meaning changed)."""
        ...

    def reconcile(self, wanted: np.ndarray, vectors_for: VectorsFor, rows_for: RowsFor, replace: np.ndarray) -> bool:
        """Hold exactly the `wanted` ids (the `replace` ids with their vectors anew); True when anything changed."""
        ...

    def search(self, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray, dict[int, ImageRow]]:
        """(scores, ids, rows it knows) of the k nearest per query; id -1 where none."""
        ...

    def save(self) -> None:
        """Make the changes durable (index.faiss: written beside and renamed)."""
        ...

    def close(self) -> None: ...


class FaissStore:
    """index.faiss (or its generation's file): FAISS over the served vectors, keyed by image id."""

    def __init__(self, path: Path, factory: str, writable: bool = False):
        self.path, self.factory = path, factory
        self._index = None
        self.mtime: int | None = None
        if path.exists():
            try:
                self._index = index.load(path, mmap=False if writable else None)
            except RuntimeError:
                raise RisError(f"collection {path.parent}: its index (generation {path.name.split('.')[1]}) is damaged; "
                               "run `ris reindex` to rebuild it from the catalogue") from None  # fmt: skip
            self.mtime = path.stat().st_mtime_ns
        self._dirty = False

    @property
    def faiss_index(self):
        return self._index

    def built(self) -> tuple[int, str] | None:
        return (self._index.d, self.factory) if self._index is not None else None

    @property
    def ntotal(self) -> int:
        return self._index.ntotal if self._index is not None else 0

    def approximate(self) -> bool:
        return self._index is not None and index.is_approximate(self._index)

    def candidates(self, k: int) -> int:
        return min(self.ntotal, k * index.refine_factor(self._index)) if self.approximate() else k

    def prepare(self, dims: int, kind: str, fresh: bool = False) -> None:
        idx = self._index
        exact = kind == index.EXACT_FACTORY
        if fresh or idx is None or idx.d != dims or self.factory != kind or index.is_approximate(idx) == exact:
            self._index, self.factory, self._dirty = index.create(dims, kind), kind, True

    def reconcile(self, wanted: np.ndarray, vectors_for: VectorsFor, rows_for: RowsFor, replace: np.ndarray) -> bool:
        idx = self._index
        if idx is None:
            raise RisError("the FAISS store was not prepared")
        replaced = any(index.reconcile(idx, idsets.without(wanted, replace), vectors_for)) if len(replace) else False
        changed = any(index.reconcile(idx, wanted, vectors_for))
        self._dirty |= replaced or changed
        return replaced or changed

    def search(self, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray, dict[int, ImageRow]]:
        if self._index is None or not self._index.ntotal:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.float32), empty.astype(np.int64), {}
        scores, ids = index.search(self._index, queries, min(k, self._index.ntotal), nprobe)
        return scores, ids, {}

    def save(self) -> None:
        """Written only when changed (a 10M-vector IVF over 4-bit codes is 1.4 GiB)."""
        if self._index is not None and (self._dirty or not self.path.exists()):
            index.save(self._index, self.path)
            self.mtime, self._dirty = self.path.stat().st_mtime_ns, False

    def close(self) -> None:
        self._index = None


class MilvusVectors:
    """A Milvus collection as a VectorStore (ris.vectors.milvus is the client): it keeps paths and labels too,
    so its search answers rows; its scores are exact inner products (no re-scoring)."""

    def __init__(self, client):
        self.client = client  # ris.vectors.milvus.MilvusStore

    def built(self) -> tuple[int, str] | None:
        return self.client.describe(fresh=True)

    @property
    def ntotal(self) -> int:
        return self.client.ntotal

    def approximate(self) -> bool:
        return False

    def candidates(self, k: int) -> int:
        return k

    def prepare(self, dims: int, kind: str, fresh: bool = False) -> None:
        """Not atomic, unlike index.faiss's generations: searches fail while a refit recreates the collection."""
        found = self.client.describe(fresh=True)
        if found is not None and (fresh or found != (dims, kind)):
            self.client.drop()
        if self.client.describe() is None:
            self.client.create(dims, kind)

    def reconcile(self, wanted: np.ndarray, vectors_for: VectorsFor, rows_for: RowsFor, replace: np.ndarray) -> bool:
        changed = any(self.client.reconcile(wanted, vectors_for, rows_for))
        replace = idsets.common(replace, wanted)
        if len(replace):  # by upsert: a replica searching meanwhile sees each image's old or new vector, never none
            self.client.replace(replace, vectors_for, rows_for)
        return changed or bool(len(replace))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None) -> tuple[np.ndarray, np.ndarray, dict[int, ImageRow]]:
        return self.client.search(queries, k, nprobe)

    def save(self) -> None:
        """Milvus persists every reconcile itself (flushed)."""

    def close(self) -> None:
        self.client.close()
