"""The derived vectors: PCA, the DBA graph and the store's index, always computed from the catalogue.

Generations. Whatever changes what the vectors mean (the first PCA fit, a refit, a new index kind, the
stored vectors' move to their projection, `ris reindex`, a derived file found damaged) builds the whole
set beside the current one, as `pca.G.npz`, `dba.G.npz`, `index.G.faiss` (and `reduced.G.f16`, see `Kept`)
of the next generation G,
and switches to it in one catalogue transaction (meta `derived`): searches keep working on the old set
until the switch and never pair one generation's PCA with another's index; nothing that works is deleted
first. A write that keeps the PCA updates the current generation's index and graph in place (each file
written beside and renamed: index first, so a crash in between redoes the same graph update).

With a Milvus store the vectors live in Milvus (one collection, recreated when a new generation changes
what its vectors mean); PCA and the graph stay here, with the same generations.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import RisError
from . import dba, faiss_index as index, idsets, milvus as milvus_store
from .catalog import Catalog, VectorFile, runs
from .reduce import Folded, Projection, Reducer, block_rows, fit_sample
from .stores import FaissStore, MilvusVectors, VectorStore

#: catalogue meta key: {"generation": G, "index": the factory/kind built, "dims": d} of the current set
DERIVED = "derived"


@dataclass
class Space:
    """raw features -> stored vectors (the projection, if any) -> reduced unit vectors (PCA, if fitted).

    A writer's space reads the projection on first use: only queries need it (the stored vectors are projected
    already), and reading it costs ~0.1 s (24 MB, 47 MB of fresh memory as float32) that every indexing run would
    pay at its end. A reader's snapshot reads it at once (Derived.snapshot): a writer in another process may
    project a collection that had no projection while the snapshot is in use."""

    load_projection: Callable[[], Projection | None]
    reducer: Reducer
    _fingerprint: str = ""
    _folded: Folded | None = field(default=None, repr=False)

    @functools.cached_property
    def projection(self) -> Projection | None:
        return self.load_projection()

    @property
    def dims(self) -> int:
        return self.reducer.dims

    def from_raw(self, raw: np.ndarray) -> np.ndarray:
        """A model's raw features (queries) to the vectors the index compares; projection and PCA in one product
        (Folded, made on first use) when there are both."""
        if self.projection is not None and raw.shape[1] == self.projection.raw_dims:
            if not self.reducer.fitted:
                return self.reducer(self.projection(raw))
            self._folded = self._folded or Folded(self.projection, self.reducer)
            return self._folded(raw)
        return self.reducer(raw)

    def from_stored(self, stored: np.ndarray) -> np.ndarray:
        return self.reducer(stored)

    @property
    def fingerprint(self) -> str:
        """Identifies the PCA the DBA graph's similarities and kept vectors belong to (computed once)."""
        if not self._fingerprint:
            self._fingerprint = dba.fingerprint(self.reducer)
        return self._fingerprint


class Kept(VectorFile):
    """`reduced.G.f16`: each image's plain reduced vector at row = its id (float16), kept beside an approximate
    index so that its candidates are re-scored from one 512-byte read each, not from the catalogue (a row
    lookup, a 2 KB stored vector and its PCA each: 10M images, 180 candidates, ~12 -> ~3 ms a query).

    An id names one content for life, so a row written for this generation's PCA stays right; new images
    get ids above every row written. Rows of removed images stay until the next generation (disk: 2 x dims
    bytes an id ever given); a row of zeros (an id that never was, or a write a crash lost) is read from
    the catalogue instead, as is an id past the end.
    """

    dtype = np.dtype(np.float16)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        return rows.astype(np.float32)

    def lookup(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, kept) of these ids; rows not kept are zeros."""
        out = self.read_or_zeros(ids)
        return out, out.any(axis=1)

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Write these ids' rows (ids sorted), one write per run of consecutive ids."""
        data = vectors.astype(np.float16)
        for lo, hi in runs(ids):
            self.write(int(ids[lo]), data[lo:hi])


@dataclass
class Snapshot:
    """One consistent generation, as a search reads it."""

    generation: int
    space: Space
    store: VectorStore
    graph: dba.Graph | None
    stamp: tuple = field(default=())
    augmented: bool = False  # the store serves DBA-augmented vectors (a graph was saved with this set)
    kept: Kept | None = None  # plain reduced vectors by id, beside an approximate index


def files(root: Path, generation: int) -> tuple[Path, Path, Path, Path]:
    """(pca, index, dba, kept reduced vectors) of a generation."""
    return (root / f"pca.{generation}.npz", root / f"index.{generation}.faiss", root / f"dba.{generation}.npz",
            root / f"reduced.{generation}.f16")  # fmt: skip


class Derived:
    """Reads (Snapshot) and writes (update) a collection's derived vectors; the collection holds one."""

    def __init__(self, root: Path, catalog: Catalog, manifest: Callable, milvus: Callable[[], object | None]):
        self.root, self.catalog = root, catalog
        self._manifest, self._milvus = manifest, milvus  # callables: the current Manifest, the connected MilvusStore
        self._snapshot: Snapshot | None = None
        self._projection: tuple[str | None, Projection | None] = ("", None)

    # --- reading ---------------------------------------------------------------------------------

    def state(self) -> dict:
        """The current set's description (generation 0: none yet)."""
        text = self.catalog.meta(DERIVED)
        try:
            found = json.loads(text) if text else {}
            return {"generation": int(found.get("generation", 0)), "index": str(found.get("index", "")),
                    "dims": int(found.get("dims", 0))}  # fmt: skip
        except (ValueError, TypeError, AttributeError):
            raise RisError(f"collection {self.root}: the catalogue's record of its derived files is damaged; "
                           "run `ris reindex`") from None  # fmt: skip

    def projection(self) -> Projection | None:
        """The catalogue's stage-1 projection (cached until the vector file changes generation)."""
        name = self.catalog.meta("vectors")
        if self._projection[0] != name:
            found = self.catalog.projection()
            self._projection = (name, Projection(*found) if found is not None else None)
        return self._projection[1]

    def _store(self, generation: int, factory: str, writable: bool) -> VectorStore:
        client = self._milvus()
        if client is not None:
            return MilvusVectors(client)
        return FaissStore(files(self.root, generation)[1], factory, writable=writable)

    def snapshot(self) -> Snapshot:
        """The latest saved set, reloaded when a writer replaced any of it; a clear error when there is none or
        when a file is damaged (`ris reindex` rebuilds from the catalogue)."""
        state = self.state()
        g = state["generation"]
        if not g:
            raise RisError(f"collection {self.root} has no searchable images yet")
        pca_path, idx_path, dba_path, kept_path = files(self.root, g)
        stamp = (g, _mtime(idx_path), _mtime(dba_path), self.catalog.meta("vectors"))
        snap = self._snapshot
        if snap is not None and snap.stamp == stamp:
            return snap
        space = self._space(pca_path)
        space.projection  # noqa: B018 - read now, with this generation (see Space)
        store = snap.store if snap is not None and snap.generation == g and isinstance(snap.store, MilvusVectors) else None
        if store is None:
            store = self._store(g, state["index"], writable=False)
        if store.built() is None:
            raise RisError(f"collection {self.root} has no searchable images yet (its index is missing: run `ris reindex`)")
        if store.built()[0] != space.dims:
            raise RisError(f"collection {self.root}: its index and PCA disagree ({store.built()[0]} vs {space.dims} dims); "
                           "run `ris reindex`")  # fmt: skip
        graph = _graph_or_none(dba_path)
        kept = Kept(kept_path, space.dims) if kept_path.exists() else None
        self._snapshot = Snapshot(g, space, store, graph, stamp, dba_path.exists(), kept)
        return self._snapshot

    def _space(self, pca_path: Path) -> Space:
        width = self.catalog.width or self._manifest().raw_dims
        return Space(self.projection, Reducer.load(pca_path, width))

    def searchable(self) -> int:
        """How many images the current set's store holds (0: none, or unreadable: `ris info` then says so)."""
        try:
            return int(self.snapshot().store.ntotal) if self.state()["generation"] else 0
        except RisError:
            return 0

    def drop_cached(self) -> None:
        self._snapshot = None

    # --- writing (the caller holds the writer lock) ----------------------------------------------

    def update(self, refit: bool = False, rebuild: bool = False) -> Snapshot | None:
        """Bring the derived set in line with the catalogue: PCA when due (or asked), the DBA graph, the index.

        rebuild: a new generation from the catalogue whatever the current one holds (ris reindex).
        Returns what searches will read, or None while nothing is searchable.
        """
        m = self._manifest()
        ids = self.catalog.ok_ids()
        state = self.state()
        g = state["generation"]
        current = self._current_for_writing(g, state["index"]) if g and not rebuild else None
        width = self.catalog.width or m.raw_dims
        space = current.space if current is not None else Space(self.projection, Reducer(width))
        new = current is None
        if (not space.reducer.fitted or refit) and len(ids):
            fitted = Reducer.fit(self.catalog.vectors(fit_sample(ids, width)), m.pca_dims, overwrite=True)
            if fitted.fitted or refit:
                space, new = Space(self.projection, fitted), True
        kind = self._kind(m, len(ids), space.dims, None if new else state["index"])
        if current is not None and kind != state["index"]:
            new = True
        if not len(ids) and not g:
            return None
        target = g + 1 if new else g
        if new:  # leftovers of a build that crashed before its switch
            for path in files(self.root, target):
                path.unlink(missing_ok=True)
        store = self._store(target, kind, writable=True) if new or current is None else current.store
        old_graph = None if new or current is None else current.graph
        vectors_for, changed, graph = self._augmented(space, ids, old_graph)
        store.prepare(space.dims, kind, fresh=new)
        pca_path, _, dba_path, kept_path = files(self.root, target)
        kept = Kept(kept_path, space.dims) if graph is None and store.approximate() else None
        if kept is not None:
            covered, written = kept.count(), []
            vectors_for = _keeping(kept, vectors_for, covered, written)
        store.reconcile(ids, vectors_for, self.catalog.rows, changed)
        if kept is not None:
            self._keep_rest(kept, space, idsets.without(ids[ids >= covered], np.concatenate([[], *written])))
        else:
            kept_path.unlink(missing_ok=True)
        if new:
            space.reducer.save(pca_path)
        store.save()
        if graph is None:
            dba_path.unlink(missing_ok=True)
        elif new or old_graph is None or len(changed) or not np.array_equal(old_graph.ids, graph.ids):
            graph.save(dba_path)  # after the index: a crash in between redoes the same update
        if new:
            self._switch(g, target, kind, space.dims)
        self._snapshot = Snapshot(target, space, store, graph, (), graph is not None, kept)
        return self._snapshot

    def _keep_rest(self, kept: Kept, space: Space, rest: np.ndarray) -> None:
        """Rows for the ids past the kept file's end that the store already held (a collection written before
        the file existed: once, a block at a time), then all durable before the index names any of them."""
        rest = rest.astype(np.int64)
        step = block_rows(max(1, space.reducer.raw_dims)) * 16
        for start in range(0, len(rest), step):
            chunk = rest[start : start + step]
            kept.put(chunk, self.reduced(space, chunk))
        kept.sync()

    def _current_for_writing(self, g: int, kind: str) -> Snapshot | None:
        """The current generation loaded for changing in place, or None when any of it is unusable (damaged,
        or stored vectors of another width: the projection came): the next generation is then built anew."""
        pca_path, _, dba_path, _ = files(self.root, g)
        try:
            space = self._space(pca_path)
            store = self._store(g, kind, writable=True)
            found = store.built()
            if found is None or found[0] != space.dims:
                return None
        except RisError:
            return None
        graph = _graph_or_none(dba_path)
        return Snapshot(g, space, store, graph)

    def _kind(self, m, n: int, dims: int, built: str | None) -> str:
        """The index kind due for n images (FAISS factory string, or Milvus index type)."""
        if m.store:
            return milvus_store.resolve_index(m.index_factory, m.store)
        return index.resolve(m.index_factory, n, dims, built)

    def _switch(self, old: int, new: int, kind: str, dims: int) -> None:
        """Make generation `new` the one searches read (one transaction), then drop the old one's files."""
        self.catalog.set_meta(DERIVED, json.dumps({"generation": new, "index": kind, "dims": dims}))
        if old:
            for path in files(self.root, old):
                path.unlink(missing_ok=True)

    def _augmented(self, space: Space, ids: np.ndarray, old: dba.Graph | None):
        """(vectors_for, ids whose stored vector must be replaced, DBA graph to keep or None).

        Without DBA: the reduced vectors, nothing to replace (unless the index still holds augmented ones).
        With --dba N (up to dba.MAX_IMAGES images): the neighbour graph brought up to date (ris.vectors.dba.update,
        n x dims float32 in memory), and vectors derived from it. The graph keeps the plain reduced vectors,
        so a write reads the stored vectors of new images only.
        """
        plain = lambda chunk: self.reduced(space, chunk)  # noqa: E731
        neighbours = dba.active(self._manifest().dba, len(ids))
        if not neighbours:
            was = old.ids if old is not None else np.empty(0, np.int64)
            return plain, idsets.common(was, ids), None
        stored = old.stored_vectors(ids, space.fingerprint) if old is not None else None
        if stored is None:  # reduced a block at a time; the graph starts over
            x, old = plain(ids), None
        else:  # only the new images' stored vectors are read
            x, known = stored
            if not known.all():
                x[~known] = plain(ids[~known])
        graph, changed = dba.update(old, ids, x, neighbours, space.fingerprint)
        graph.x = x
        return (lambda chunk: graph.vectors(chunk, lambda need: x[np.searchsorted(ids, need)])), changed, graph

    def reduced(self, space: Space, ids: np.ndarray) -> np.ndarray:
        """Plain reduced vectors of these ids from the catalogue's stored vectors, a block at a time."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), space.dims), np.float32)
        step = block_rows(max(1, space.reducer.raw_dims))
        for start in range(0, len(ids), step):
            block = ids[start : start + step]
            out[start : start + len(block)] = space.from_stored(self.catalog.vectors(block))
        return out


def _keeping(kept: Kept, vectors_for: Callable[[np.ndarray], np.ndarray], covered: int,
             written: list[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:  # fmt: skip
    """vectors_for, also writing the rows of ids past `covered` to the kept file as the store asks for them
    (the new images: their vectors are computed once); the ids written go to `written`."""

    def both(chunk: np.ndarray) -> np.ndarray:
        x = vectors_for(chunk)
        chunk = np.asarray(chunk, dtype=np.int64)
        new = chunk >= covered
        if new.any() and np.all(np.diff(chunk) > 0):
            kept.put(chunk[new], x[new])
            written.append(chunk[new])
        return x

    return both


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _graph_or_none(path: Path) -> dba.Graph | None:
    """The DBA graph, or None when it is missing or damaged (searches then read plain vectors from the
    catalogue; the next write rebuilds it)."""
    try:
        return dba.Graph.load(path)
    except ValueError:
        return None
