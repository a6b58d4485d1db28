"""The core: a persistent, searchable collection of images. CLI, API and server are thin over it.

On disk a collection is a directory:
    manifest.json   format version, model, pooling, precision, weights hash, dims, index factory
    catalog.sqlite  images (path, size, mtime, hash, label, status, error) and raw features
    pca.npz         the PCA fitted on the collection (absent while it is too small for one)
    dba.npz         with --dba N: each image's N nearest others, from which the index's vectors are derived
    index.faiss     the FAISS index over reduced vectors, keyed by image id (unless the manifest names a
                    Milvus store: then the vectors, paths and labels are kept in Milvus, see milvus_store)
    lock            held (flock) by the one writer; it holds the writer's PID
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import __version__, dba, index, milvus_store, models, sources
from .dba import DEFAULT_NEIGHBOURS as DEFAULT_DBA
from .decode import open_image, read_file, resize
from .errors import CollectionLocked, DecodeError, RisError
from .extract import StageTimes, default_workers
from .milvus_store import MilvusStore
from .reduce import DEFAULT_DIMS, Reducer, block_rows, fit_sample
from .runtime import cpu_runtime
from .search import Match, SearchResult
from .store import Catalog

FORMAT_VERSION = 1
Query = str | os.PathLike | Image.Image | np.ndarray | bytes

#: With DBA or αQE, the first result is the plain nearest among this many served candidates (Collection.search_vectors).
ANCHOR_POOL = 32
#: Writer-lock descriptors this process holds. A forked child (a decode worker) closes its copies at
#: once: flock belongs to the open file, so a worker outliving a killed writer would otherwise keep
#: the collection locked.
_HELD_LOCKS: set[int] = set()


def _close_locks_in_child() -> None:
    for fd in _HELD_LOCKS:
        os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)


@dataclass(frozen=True)
class Manifest:
    model: str
    pooling: str
    precision: str
    weights_sha256: str
    input_size: int
    raw_dims: int
    dims: int
    pca_dims: int
    query_expansion: int = 0  # αQE: queries averaged with their top-n neighbours before the final search
    dba: int = 0  # αDBA: the index holds each image's vector averaged with its n nearest images (ris.dba)
    verify: bool = False  # searches verify the first result geometrically (ris.verify), unless asked not to
    index_factory: str = index.AUTO  # a FAISS factory string, or "auto": exact when small, IVF when large
    index_built: str = ""  # the factory index.faiss was built with ("auto" resolved); "" = index_factory
    nprobe: int = 0  # IVF lists visited per query (HNSW: efSearch); 0 = index.default_nprobe
    store: str = ""  # where the vectors live: "" = index.faiss; "milvus-lite:///abs/x.db" or "milvus://host:port"
    store_collection: str = ""  # the Milvus collection holding them (a Milvus store only)
    cpu_runtime: str = "onnx"  # "openvino" or "onnx": queries on a CPU use the images' runtime
    format_version: int = FORMAT_VERSION
    created: str = ""
    ris_version: str = __version__

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RisError(f"{path.parent} is not a ris collection (unreadable manifest: {exc})") from None
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise RisError(f"{path.parent} was written by a newer ris (format {data['format_version']}); upgrade ris to open it")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)


@dataclass
class IndexReport:
    """What one `index`/`add` run did."""

    scanned: int
    new: int
    changed: int
    removed: int
    extracted: int
    skipped: int
    images: int
    times: StageTimes
    skipped_files: list[dict[str, str]]


class Collection:
    """A directory of images' features, searchable by image. See the module docstring for the layout."""

    def __init__(self, path: Path, manifest: Manifest, weights: str | None = None):
        self.path = path
        self.manifest = manifest
        self.weights = weights  # a weights file the model is loaded from (vgg16); checked against the manifest
        self.catalog = Catalog(path / "catalog.sqlite")
        self._lock_fd: int | None = None
        self._extractor = None
        self._extractor_key: tuple | None = None
        self._index = None  # a faiss.Index, or the MilvusStore when the manifest names one
        self._index_mtime: int | None = None
        self._reducer: Reducer | None = None
        self._verifier = None  # ris.verify.Verifier, made on the first verified search (keeps keypoints)
        self._milvus: MilvusStore | None = None
        self._graph: dba.Graph | None = None  # the DBA graph re-scoring reads (dba.npz), and its mtime
        self._graph_mtime: int | None = None
        self._fingerprint: tuple[Reducer, str] | None = None  # the searched PCA's dba.fingerprint, computed once
        self._copies = None  # ris.copies.CopyStore, made on the first verified search; _copy_index as of _copies_key
        self._copy_index = None
        self._copies_key: int | None = None

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        model: str = models.DEFAULT_MODEL,
        pooling: str = models.DEFAULT_POOLING,
        precision: str = "int8",
        weights: str | None = None,
        dims: int = DEFAULT_DIMS,
        index_factory: str = index.AUTO,
        nprobe: int = 0,
        store: str = "",
        dba: int = DEFAULT_DBA,
        verify: bool = True,
    ) -> Collection:
        """A new, empty collection. Loads the model once to record its weights' hash.

        dba: database-side augmentation, each indexed vector averaged with its `dba` nearest images (ris.dba).
        verify: searches confirm their first result geometrically by default (ris.verify; ~20-45 ms a query).

        store: "" (or "faiss") keeps the vectors in index.faiss; "milvus://HOST:PORT" on a Milvus server,
        "milvus-lite://PATH.db" in an embedded milvus-lite file (a relative PATH is made absolute).
        """
        root = Path(path)
        if (root / "manifest.json").exists():
            raise RisError(f"{root} already holds a collection; open it instead")
        if root.exists() and not root.is_dir():
            raise RisError(f"{root} exists and is not a directory")
        spec = models.get_spec(model)
        if precision not in ("fp32", "int8"):
            raise RisError("a collection's precision is fp32 or int8")
        _check_dba(dba)
        store = milvus_store.normalize(store)
        raw_dims = models.feature_dims(model, pooling)
        if store:
            milvus_store.check_index(index_factory, nprobe, store)
        else:
            index.check_args(index_factory, nprobe, dims if 0 < dims < raw_dims else raw_dims)
        _, digest = models.build(model, pooling, weights)
        # a store that cannot be reached fails here, before a manifest naming it exists
        connected = MilvusStore(store, milvus_store.collection_name(root)) if store else None
        try:
            root.mkdir(parents=True, exist_ok=True)
            manifest = Manifest(
                model=model, pooling=pooling if spec.pooled else "fc2", precision=precision, weights_sha256=digest,
                input_size=spec.input_size, raw_dims=raw_dims, dims=raw_dims, pca_dims=dims,
                index_factory=index_factory, nprobe=nprobe, store=store, dba=dba, verify=verify,
                store_collection=connected.name if connected else "", cpu_runtime=cpu_runtime(),
                created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            )  # fmt: skip
            manifest.write(root / "manifest.json")
        except BaseException:
            if connected is not None:
                connected.close()
            raise
        coll = cls(root, manifest, weights)
        coll._milvus = connected
        return coll

    @classmethod
    def open(cls, path: str | os.PathLike, weights: str | None = None) -> Collection:
        root = Path(path)
        if not (root / "manifest.json").exists():
            raise RisError(f"no collection at {root} (create one with `ris index FOLDER --collection {root}`)")
        return cls(root, Manifest.read(root / "manifest.json"), weights)

    @classmethod
    def open_or_create(
        cls,
        path: str | os.PathLike,
        model: str | None = None,
        pooling: str | None = None,
        precision: str | None = None,
        weights: str | None = None,
        dims: int | None = None,
        index_factory: str | None = None,
        nprobe: int | None = None,
        store: str | None = None,
        dba: int | None = None,
        verify: bool | None = None,
    ) -> Collection:
        """Open an existing collection (checking it matches what was asked) or create one.

        An index_factory, nprobe, dba or verify other than the manifest's is recorded there; the next
        index/add/remove run rebuilds the index to match. The store is fixed at creation.
        """
        root = Path(path)
        if not (root / "manifest.json").exists():
            return cls.create(
                root, model or models.DEFAULT_MODEL, pooling or models.DEFAULT_POOLING,
                precision or "int8", weights, DEFAULT_DIMS if dims is None else dims,
                index_factory or index.AUTO, nprobe or 0, store or "", DEFAULT_DBA if dba is None else dba,
                True if verify is None else verify,
            )  # fmt: skip
        coll = cls.open(root, weights)
        m = coll.manifest
        if store is not None and milvus_store.normalize(store) != m.store:
            raise RisError(f"collection {root} keeps its vectors in {m.store or 'faiss'}, not {store}; "
                           "the store is chosen when a collection is created (use another --collection)")  # fmt: skip
        for asked, have, what in ((model, m.model, "model"), (pooling, m.pooling, "pooling"),
                                  (precision, m.precision, "precision")):  # fmt: skip
            if asked is not None and asked != have and not (what == "pooling" and have == "fc2"):
                raise RisError(f"collection {root} was built with {what} {have}, not {asked}; use another --collection")
        _check_dba(dba or 0)
        changes = {k: v for k, v in (("index_factory", index_factory), ("nprobe", nprobe), ("dba", dba), ("verify", verify))
                   if v is not None and v != getattr(m, k)}  # fmt: skip
        if changes:
            if m.store:
                milvus_store.check_index(changes.get("index_factory", m.index_factory), changes.get("nprobe", m.nprobe), m.store)
            else:
                index.check_args(changes.get("index_factory", m.index_factory), changes.get("nprobe", m.nprobe), m.dims)
            coll.manifest = Manifest(**{**asdict(m), **changes})
            coll.manifest.write(root / "manifest.json")
        return coll

    def close(self) -> None:
        self.unlock()
        self.catalog.close()
        if self._milvus is not None:
            self._milvus.close()
            self._milvus = self._index = None

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writer lock ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Become the one writer, or fail at once naming the process that is."""
        if self._lock_fd is not None:
            return
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CollectionLocked(f"collection {self.path} is locked by PID {holder} (another ris is writing)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd
        _HELD_LOCKS.add(fd)
        try:  # a writer connects to its vector store now: one out of reach fails the run before any change
            self._vector_store()
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        if self._lock_fd is not None:
            _HELD_LOCKS.discard(self._lock_fd)
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    # --- the model -----------------------------------------------------------------------------

    def extractor(self, device: str = "auto", threads: int | None = None):
        """The model for this collection's manifest, loaded once and shared (thread-safe to call)."""
        from . import runtime

        dev = runtime.resolve_device(device)
        threads = threads or runtime.cpu_threads()
        key = (dev, threads)
        if self._extractor is None or self._extractor_key != key:
            m = self.manifest
            precision = m.precision if dev == "cpu" else None
            ext, digest = runtime.load_extractor(
                m.model, m.pooling, self.weights, device=dev, precision=precision, threads=threads,
                runtime=m.cpu_runtime if dev == "cpu" else None,
            )  # fmt: skip
            if digest != m.weights_sha256:
                raise RisError(
                    f"collection {self.path} was built with other {m.model} weights "
                    f"(sha256 {m.weights_sha256[:12]}…, these are {digest[:12]}…); pass the same --weights"
                )
            self._extractor, self._extractor_key = ext, key
        return self._extractor

    # --- indexing ------------------------------------------------------------------------------

    def index(
        self,
        paths: Iterable[str | os.PathLike],
        resync: bool = True,
        batch_size: int = 32,
        workers: int | None = None,
        device: str = "auto",
        threads: int | None = None,
        progress: Callable[[int, int], Callable[[int], None]] | None = None,
        ray: str | None = None,
        shard_size: int = 1024,
    ) -> IndexReport:
        """Bring the collection in line with these folders/files.

        resync=True (`ris index`): files gone from these paths are dropped. resync=False (`ris add`):
        only adds or updates. Committed batches survive a crash; the next run resumes after them.
        ray: a Ray address ("local", "auto", "ray://host:10001") to extract on a cluster instead.
        """
        from . import extract, runtime

        paths = list(paths)
        files = sources.scan(paths)
        self.lock()
        try:
            roots = [str(Path(p).expanduser().absolute()) for p in paths] if resync else []
            report = self.catalog.sync(files, drop_under=roots)
            todo = self.catalog.pending()
            times = StageTimes()
            if todo:
                tick = progress(len(todo), len(files)) if progress else None
                if ray is not None:  # device and workers are the cluster's
                    from .distributed import ray_extract

                    times = ray_extract(self, todo, ray, batch_size=batch_size, shard_size=shard_size, progress=tick)
                else:
                    cores = threads or runtime.cpu_threads()
                    ext = self.extractor(device, threads=cores)
                    nworkers = default_workers(cores) if workers is None else workers
                    times = extract.run(
                        todo, ext, self.manifest.input_size, self._store_batch, known=self.catalog.known_hashes,
                        batch_size=batch_size, workers=nworkers, progress=tick,
                    )  # fmt: skip
            self.catalog.drop_orphan_features()
            self._finish()
            counts = self.catalog.counts()
            return IndexReport(
                scanned=len(files), new=report.new, changed=report.changed, removed=report.removed,
                extracted=times.extracted, skipped=counts["skipped"], images=counts["ok"], times=times,
                skipped_files=self.catalog.skipped_files(),
            )  # fmt: skip
        finally:
            self.unlock()

    def add(self, paths: Iterable[str | os.PathLike], **kwargs: Any) -> IndexReport:
        return self.index(paths, resync=False, **kwargs)

    def remove(self, patterns: Iterable[str]) -> int:
        """Drop images by path, folder or glob; returns how many went."""
        pats = [str(Path(p).expanduser().absolute()) if not any(c in str(p) for c in "*?[") else str(p)
                for p in patterns]  # fmt: skip
        return self._write(lambda: self.catalog.remove(pats))

    def remove_ids(self, ids: Iterable[int]) -> int:
        """Drop images by id (exact, whatever characters their paths hold)."""
        return self._write(lambda: self.catalog.remove_ids(list(ids)))

    def _write(self, change: Callable[[], int]) -> int:
        """Apply a catalogue change under the writer lock, then bring the index in line."""
        self.lock()
        try:
            result = change()
            self._finish()
            return result
        finally:
            self.unlock()

    def _store_batch(self, batch, features: dict[str, np.ndarray]) -> None:
        self.catalog.commit_batch(batch.ok, features, batch.failed)  # on extract's writer thread

    def connect(self) -> None:
        """Connect to the vector store now (a Milvus store; index.faiss needs nothing), so that a store out of
        reach, or a milvus-lite file another process holds, fails at once rather than at the first search."""
        self._vector_store()

    def _vector_store(self) -> MilvusStore | None:
        """The Milvus store holding the vectors, connected on first use; None when they are in index.faiss."""
        if self.manifest.store and self._milvus is None:
            self._milvus = MilvusStore(self.manifest.store, self.manifest.store_collection)
        return self._milvus

    def _drop_vectors(self) -> None:
        """Forget the derived vectors (index.faiss, or the Milvus collection); _finish rebuilds them."""
        store = self._vector_store()
        if store is None:
            (self.path / "index.faiss").unlink(missing_ok=True)
        else:
            store.drop()

    def _finish(self, refit_pca: bool = False) -> None:
        """Fit PCA when due, then bring index.faiss (or the Milvus store) in line with the catalogue."""
        ids = self.catalog.ok_ids()
        m = self.manifest
        pca_path = self.path / "pca.npz"
        reducer = Reducer.load(pca_path, m.raw_dims)
        raw = None  # every image's raw features, when the fit read them all: the index reuses them
        if (not reducer.fitted or refit_pca) and len(ids):
            sample = fit_sample(ids, m.raw_dims)
            fit_raw = self.catalog.features(sample, m.raw_dims)
            raw = fit_raw if len(sample) == len(ids) else None
            fitted = Reducer.fit(fit_raw, m.pca_dims, overwrite=True)  # fit_raw (= raw) is normalised in place
            if fitted.fitted or refit_pca:
                reducer = fitted
                # old index first: a crash in between must not pair old vectors with a new PCA
                self._drop_vectors()
                reducer.save(pca_path)
        vectors_for, changed, graph = self._augmented(reducer, ids, raw)
        store = self._vector_store()
        if store is not None:
            self._finish_milvus(store, ids, reducer, vectors_for, changed)
            self._keep_graph(graph)
            return
        idx_path = self.path / "index.faiss"
        # the index written before the manifest: after a crash in between, the manifest names the older
        # factory and the index is rebuilt, never used as the wrong kind
        built = m.index_built or (m.index_factory if m.index_factory != index.AUTO else index.EXACT_FACTORY)
        target = index.resolve(m.index_factory, len(ids), built if idx_path.exists() else None)
        idx = index.load(idx_path, mmap=False) if idx_path.exists() and target == built else None
        if idx is None or idx.d != reducer.dims or index.is_approximate(idx) != (target != index.EXACT_FACTORY):
            idx = index.create(reducer.dims, target)
        fresh = not idx_path.exists() or idx.ntotal == 0
        # vectors that changed (DBA: a new neighbour) leave first and come back with their new value
        replaced = any(index.reconcile(idx, np.setdiff1d(ids, changed), vectors_for)) if len(changed) else False
        if any(index.reconcile(idx, ids, vectors_for)) or replaced or fresh:
            index.save(idx, idx_path)  # unchanged: not rewritten (a 10M-vector IVF,SQ6 is 1.9 GiB)
        self._keep_graph(graph)  # after the index: a crash in between redoes the same replacements
        if m.dims != reducer.dims or m.index_built != target:
            self.manifest = Manifest(**{**asdict(m), "dims": reducer.dims, "index_built": target})
            self.manifest.write(self.path / "manifest.json")
        self._index, self._reducer = idx, reducer
        self._index_mtime = idx_path.stat().st_mtime_ns

    def _augmented(self, reducer: Reducer, ids: np.ndarray, raw: np.ndarray | None):
        """(vectors_for, ids whose stored vector must be replaced, DBA graph to keep or None).

        Without DBA: the reduced vectors, nothing to replace (unless the index still holds augmented ones).
        With --dba N (up to dba.MAX_IMAGES images): the neighbour graph brought up to date (ris.dba.update,
        n x dims float32 in memory), and vectors derived from it. The graph file keeps the plain reduced
        vectors, so a write reads the raw features of new images only.
        """
        plain = self._vectors_for(reducer, ids, raw)
        graph_path = self.path / "dba.npz"
        old = self._current_graph() if self.manifest.dba else dba.Graph.load(graph_path)  # in a process that wrote it: cached
        neighbours = dba.active(self.manifest.dba, len(ids))
        if not neighbours:
            was = old.ids if old is not None else np.empty(0, np.int64)
            return plain, np.intersect1d(was, ids), None
        pca = self._pca_fingerprint(reducer)
        stored = old.stored_vectors(ids, pca) if old is not None else None
        if stored is None:  # reduced a block at a time (Reducer, _reduced_blocks); the graph starts over
            x, old = plain(ids), None
        else:  # only the new images' raw features are read (23 KB each for grid3: the rest stays on disk)
            x, known = stored
            if not known.all():
                x[~known] = plain(ids[~known])
        graph, changed = dba.update(old, ids, x, neighbours, pca)
        graph.x = x
        return (lambda chunk: graph.vectors(chunk, lambda need: x[np.searchsorted(ids, need)])), changed, graph

    def _keep_graph(self, graph: dba.Graph | None) -> None:
        """Write the DBA graph the index now reflects (or drop it: DBA is off)."""
        path = self.path / "dba.npz"
        if graph is None:
            path.unlink(missing_ok=True)
        else:
            graph.save(path)
        self._graph, self._graph_mtime = graph, path.stat().st_mtime_ns if graph is not None else None

    def _served(self, reducer: Reducer) -> Callable[[np.ndarray], np.ndarray]:
        """What the index holds for a chunk of ids, rebuilt from the catalogue (re-scoring approximate
        indexes' candidates): reduced vectors, or with DBA their augmented form (graph from dba.npz)."""
        plain = lambda c: self._plain_of(reducer, c)  # noqa: E731
        graph = self._current_graph()
        return plain if graph is None else (lambda c: graph.vectors(c, plain))

    def _current_graph(self) -> dba.Graph | None:
        """The DBA graph as last written (dba.npz, reloaded when a writer replaced it); None without DBA."""
        if not self.manifest.dba:
            return None
        path = self.path / "dba.npz"
        mtime = path.stat().st_mtime_ns if path.exists() else None
        if self._graph is None or self._graph_mtime != mtime:
            self._graph, self._graph_mtime = dba.Graph.load(path), mtime
        return self._graph

    def _plain_of(self, reducer: Reducer, ids: np.ndarray) -> np.ndarray:
        """Plain reduced vectors of these ids, from the DBA graph's copy when it holds them all for this PCA
        (no raw features read: 32 candidates of grid3 are 0.7 MB, ~6 ms), else from the catalogue."""
        ids = np.asarray(ids, dtype=np.int64)
        graph = self._current_graph()
        if graph is not None and graph.x is not None and len(ids):
            stored = graph.plain(ids, self._pca_fingerprint(reducer))
            if stored is not None:
                return stored
        return self._read_reduced(reducer, ids)

    def _pca_fingerprint(self, reducer: Reducer) -> str:
        """dba.fingerprint of this reducer, computed once per reducer (searches and writes both ask)."""
        if self._fingerprint is None or self._fingerprint[0] is not reducer:
            self._fingerprint = (reducer, dba.fingerprint(reducer))
        return self._fingerprint[1]

    def _vectors_for(self, reducer: Reducer, ids: np.ndarray, raw: np.ndarray | None) -> Callable[[np.ndarray], np.ndarray]:
        """Reduced vectors for a chunk of ids: from `raw` (rows in `ids`' sorted order) when the PCA fit
        already read them, else from the catalogue."""
        if raw is None:
            return lambda chunk: self._read_reduced(reducer, chunk)
        return lambda chunk: self._reduced_blocks(reducer, chunk, lambda block: raw[np.searchsorted(ids, block)])

    def _read_reduced(self, reducer: Reducer, ids: np.ndarray) -> np.ndarray:
        return self._reduced_blocks(reducer, ids, lambda block: self.catalog.features(block, self.manifest.raw_dims))

    @staticmethod
    def _reduced_blocks(reducer: Reducer, ids: np.ndarray, raw_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        """Reduced vectors of these ids, their raw features fetched a block at a time (the grid's are 5,120-d)."""
        out = np.empty((len(ids), reducer.dims), np.float32)
        step = block_rows(reducer.raw_dims)
        for start in range(0, len(ids), step):
            block = ids[start : start + step]
            out[start : start + len(block)] = reducer(raw_of(block))
        return out

    def _finish_milvus(self, store: MilvusStore, ids: np.ndarray, reducer: Reducer,
                       vectors_for: Callable[[np.ndarray], np.ndarray], changed: np.ndarray) -> None:  # fmt: skip
        """The Milvus counterpart of index.faiss's upkeep: recreated when its dims or index type are not
        what is due, then reconciled (ids, vectors, paths and labels) with the catalogue; `changed` ids
        (DBA) are deleted and inserted again with their new vectors."""
        m = self.manifest
        target = milvus_store.resolve_index(m.index_factory, m.store)
        found = store.describe(fresh=True)
        if found is not None and found != (reducer.dims, target):
            store.drop()
        if store.describe() is None:
            store.create(reducer.dims, target)
        if len(changed):
            store.reconcile(np.setdiff1d(ids, changed), vectors_for, self.catalog.rows)
        store.reconcile(ids, vectors_for, self.catalog.rows)
        if m.dims != reducer.dims or m.index_built != target:
            self.manifest = Manifest(**{**asdict(m), "dims": reducer.dims, "index_built": target})
            self.manifest.write(self.path / "manifest.json")
        self._index, self._reducer, self._index_mtime = store, reducer, self._pca_stamp()

    def _pca_stamp(self) -> int:
        """When pca.npz last changed (0: none yet): a Milvus-backed reader reloads its PCA when this moves."""
        pca_path = self.path / "pca.npz"
        return pca_path.stat().st_mtime_ns if pca_path.exists() else 0

    def rebuild_index(self) -> None:
        """Rebuild index.faiss (or the Milvus collection) from the stored raw features with the stored PCA."""
        self._write(lambda: self._drop_vectors() or 0)

    def refit_pca(self) -> None:
        """Refit PCA on the stored raw features (no re-extraction) and rebuild the index."""
        self.lock()
        try:
            self._finish(refit_pca=True)
        finally:
            self.unlock()

    # --- searching -----------------------------------------------------------------------------

    def _searchable(self):
        """The latest saved index and PCA (reloaded when a writer replaced them; large indexes memory-mapped).

        With a Milvus store, the index is the MilvusStore (always current) and the PCA is reloaded when
        pca.npz changes.
        """
        store = self._vector_store()
        if store is not None:
            stamp = self._pca_stamp()
            if self._index is None or self._index_mtime != stamp:
                found = store.describe(fresh=True)
                if found is None:
                    raise RisError(f"collection {self.path} has no searchable images yet")
                reducer = Reducer.load(self.path / "pca.npz", self.manifest.raw_dims)
                if found[0] != reducer.dims:
                    raise RisError(f"collection {self.path}: Milvus and PCA disagree ({found[0]} vs {reducer.dims} "
                                   "dims); run `ris reindex`")  # fmt: skip
                self._index, self._reducer, self._index_mtime = store, reducer, stamp
            return self._index, self._reducer
        idx_path = self.path / "index.faiss"
        if not idx_path.exists():
            raise RisError(f"collection {self.path} has no searchable images yet")
        mtime = idx_path.stat().st_mtime_ns
        if self._index is None or self._index_mtime != mtime:
            self._index = index.load(idx_path)
            self._index_mtime = mtime
            self._reducer = Reducer.load(self.path / "pca.npz", self.manifest.raw_dims)
            if self._index.d != self._reducer.dims:
                raise RisError(f"collection {self.path}: index and PCA disagree ({self._index.d} vs {self._reducer.dims} "
                               "dims); run `ris reindex --refit-pca`")  # fmt: skip
        return self._index, self._reducer

    def query_image(self, query: Query, draft_size: int | None = None) -> Image.Image:
        """One query (path, bytes, PIL image or HxWx3 array) as an upright RGB image."""
        try:
            if isinstance(query, Image.Image):
                return query.convert("RGB")
            if isinstance(query, np.ndarray):
                return Image.fromarray(np.asarray(query, dtype=np.uint8)).convert("RGB")
            return open_image(query if isinstance(query, bytes) else read_file(str(query)), draft_size)
        except DecodeError as exc:
            raise RisError(f"cannot use query {query if isinstance(query, (str, os.PathLike)) else '<image>'}: {exc}") from None

    def query_pixels(self, query: Query) -> np.ndarray:
        """Decode one query into model input (JPEGs decoded at reduced scale, as indexed images are)."""
        size = self.manifest.input_size
        return resize(self.query_image(query, draft_size=size), size)

    def reduce(self, raw: np.ndarray) -> np.ndarray:
        """Raw model output -> the unit vectors the index compares (with the latest saved PCA)."""
        _, reducer = self._searchable()
        return reducer(raw)

    def embed(self, queries: Sequence[Query], device: str = "auto", batch_size: int = 32) -> np.ndarray:
        """Reduced, unit-norm vectors for the queries (what the index compares)."""
        return self.reduce(self.embed_raw(queries, device, batch_size))

    def embed_raw(self, queries: Sequence[Query], device: str = "auto", batch_size: int = 32) -> np.ndarray:
        """The model's raw features of the queries (what `reduce` takes)."""
        ext = self.extractor(device)
        pixels = np.stack([self.query_pixels(q) for q in queries])
        return np.concatenate([ext(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)])

    def search(
        self, query: Query, k: int = 5, device: str = "auto", qe: int | None = None, nprobe: int | None = None,
        verify: bool | None = None,
    ) -> SearchResult:
        """The k most similar indexed images to one query (path, bytes, PIL image or HxWx3 array)."""
        return self.search_many([query], k, device, qe, nprobe, verify)[0]

    def search_many(
        self, queries: Sequence[Query], k: int = 5, device: str = "auto", qe: int | None = None,
        nprobe: int | None = None, verify: bool | None = None,
    ) -> list[SearchResult]:
        """The k most similar indexed images for each query, in one batched model call and search.

        verify (default: the collection's): geometric verification (ris.verify) of the 5 nearest by plain
        vectors puts the image a query was copied from first when local features confirm it (~20-45 ms
        a query). See search_vectors for how the first result is chosen.
        """  # fmt: skip
        if k < 1:
            raise RisError("k must be at least 1")
        raw = self.embed_raw(queries, device)
        names = [_query_name(q) for q in queries]
        verify = self.manifest.verify if verify is None else verify
        return self.search_vectors(self.reduce(raw), k, names, qe, nprobe, verify_with=queries if verify else None, raw=raw)

    def expand(self, vectors: np.ndarray, n: int, nprobe: int | None = None) -> np.ndarray:
        """αQE: each query moved towards its n nearest indexed images (weighted by similarity).

        Neighbour vectors come from the catalogue's raw features, not the index: approximate indexes
        cannot reconstruct by id (IVF has no direct map) or only lossily (SQ6, PQ).
        """
        from .evaluate import QE_ALPHA

        idx, reducer = self._searchable()
        nprobe = nprobe or self.manifest.nprobe or None
        if isinstance(idx, MilvusStore):
            sims, ids, _ = idx.search(vectors, n, nprobe)
        else:
            sims, ids = index.search(idx, vectors, n, nprobe)
        known = np.array(sorted(self.catalog.rows(np.unique(ids[ids >= 0]))), dtype=np.int64)
        found = np.isin(ids, known)
        neighbours = np.zeros((*ids.shape, reducer.dims), np.float32)
        if len(known):
            neighbours[found] = self._plain_of(reducer, ids[found])
        sims = np.where(found, sims, 0)
        weights = np.clip(sims, 0, None)[..., None] ** QE_ALPHA
        out = vectors + (weights * neighbours).sum(axis=1)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def search_vectors(
        self, vectors: np.ndarray, k: int, names: Sequence[str], qe: int | None = None, nprobe: int | None = None,
        verify_with: Sequence[Query] | None = None, raw: np.ndarray | None = None,
    ) -> list[SearchResult]:
        """The k nearest indexed images per vector; qe (default: the collection's) expands queries first.

        nprobe (default: the manifest's, else the index's default) trades speed for recall in IVF/HNSW.
        Approximate indexes' candidates are re-scored exactly (scores are then true cosine similarities).

        The first result is the image nearest to the query by its own (plain) vector: with DBA or αQE the
        served ranking favours an image's class over the image itself, which loses copies' originals
        (copy recall@1 0.97 -> 0.89 on Caltech-101), so the first place goes to the plain nearest of the
        served top ANCHOR_POOL, the rest follow in served order. Scores are then the plain cosines of query
        and image (the served ones compare with augmented vectors), so after the first they need not decrease.
        verify_with: the query images (one per vector); the first place goes to the one of the 5 plain
        nearest that geometric verification confirms (ris.verify), else to the plain nearest. With `raw` (the
        queries' raw features) too, the verified candidates are copy candidates instead (ris.copies: plain +
        edit-invariant descriptor, found over the whole collection).
        """  # fmt: skip
        from .verify import TOP

        idx, reducer = self._searchable()
        qe = self.manifest.query_expansion if qe is None else qe
        nprobe = nprobe or self.manifest.nprobe or None
        plain = vectors
        if qe and (total := idx.ntotal):
            vectors = self.expand(vectors, min(qe, total), nprobe)
        reordered = bool(qe) or self._current_graph() is not None  # DBA: the index serves augmented vectors
        want = max(k, ANCHOR_POOL) if reordered else max(k, TOP) if verify_with is not None else k
        scores, ids, rows = self._nearest(idx, reducer, vectors, want, nprobe)
        candidates = [[(float(sc), rows[int(i)]) for sc, i in zip(srow, irow, strict=True) if int(i) in rows]
                      for srow, irow in zip(scores, ids, strict=True)]  # fmt: skip
        if reordered:  # plain cosines of the served candidates, their vectors read once for all queries
            pool = np.unique([row.id for cands in candidates for _, row in cands]).astype(np.int64)
            pool_vectors = self._plain_of(reducer, pool) if len(pool) else np.zeros((0, reducer.dims), np.float32)
        by_plain = []  # each query's candidates by plain cosine
        for q, cands in enumerate(candidates):
            if reordered and cands:  # scores become the plain cosines, served order kept
                plain_scores = pool_vectors[np.searchsorted(pool, [row.id for _, row in cands])] @ plain[q]
                candidates[q] = cands = [(float(sc), row) for sc, (_, row) in zip(plain_scores, cands, strict=True)]
                by_plain.append([cands[j] for j in np.argsort(-plain_scores, kind="stable")])
            else:
                by_plain.append(cands)
        if verify_with is not None and raw is not None:  # ris.copies: the first place to a verified copy candidate
            candidates = self._copies_first(verify_with, raw, plain, candidates, reducer)
        else:
            firsts = self._verified_firsts(verify_with, by_plain) if verify_with is not None else [0] * len(candidates)
            for q, (cands, ranked, first) in enumerate(zip(candidates, by_plain, firsts, strict=True)):
                if cands and (reordered or verify_with is not None):
                    candidates[q] = [ranked[first]] + [c for c in cands if c[1].id != ranked[first][1].id]
        return [SearchResult(name, [Match(rank, row.path, score, row.label, row.id)
                                    for rank, (score, row) in enumerate(cands[:k], start=1)])
                for name, cands in zip(names, candidates, strict=True)]  # fmt: skip

    def _copies_first(self, queries: Sequence[Query], raw: np.ndarray, plain: np.ndarray,
                      served: list[list[tuple[float, Any]]], reducer: Reducer) -> list[list[tuple[float, Any]]]:  # fmt: skip
        """ris.copies.rank over this collection: copy descriptors kept current (copies.npz), candidates'
        plain vectors and rows from the catalogue, verification spread over the CPU threads."""
        from . import copies, runtime
        from .verify import Verifier

        if self._copies is None:
            self._copies = copies.CopyStore(self.path / "copies.npz", copies.cells_of(self.manifest.pooling))
        if self._copies_key != self._index_mtime or self._copy_index is None:  # the index changed: ids may have
            ids = self.catalog.ok_ids()
            self._copy_index = self._copies.get(ids, lambda chunk: self.catalog.features(chunk, self.manifest.raw_dims))
            self._copies_key = self._index_mtime
        index = self._copy_index
        self._verifier = self._verifier or Verifier()
        verifier = self._verifier

        def run(job: tuple[Query, list[str]]) -> list[int]:
            query, paths = job
            return verifier.counts(copies.query_views(self.query_image(query)), paths) if len(paths) > 1 else [0] * len(paths)

        def verify(paths: list[list[str]]) -> list[list[int]]:
            jobs = list(zip(queries, paths, strict=True))
            threads = min(runtime.cpu_threads(), len(jobs))
            if threads <= 1:
                return [run(j) for j in jobs]
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                return list(pool.map(run, jobs))

        return copies.rank(served, plain, index.query(raw, copies.cells_of(self.manifest.pooling)), index,
                           lambda ids: self._plain_of(reducer, ids), self.catalog.rows, verify)  # fmt: skip

    def _verified_firsts(self, queries: Sequence[Query], ranked: list[list[tuple[float, Any]]]) -> list[int]:
        """Which of each query's 5 plain nearest geometric verification puts first (ris.verify; candidates'
        keypoints cached), the queries spread over the CPU threads."""
        from . import runtime
        from .verify import TOP, Verifier

        self._verifier = self._verifier or Verifier()
        jobs = [(lambda q=q: self.query_image(q), [row.path for _, row in cands[:TOP]])
                for q, cands in zip(queries, ranked, strict=True)]  # fmt: skip
        return self._verifier.firsts(jobs, runtime.cpu_threads())

    def _nearest(self, idx, reducer: Reducer, vectors: np.ndarray, k: int, nprobe: int | None):
        """(scores, ids, rows by id) of at least the k nearest searchable images per vector; -1 where none.

        FAISS answers ids and the catalogue their rows; Milvus answers both (its rows are current: the
        writer deletes there what it drops from the catalogue).
        """
        if isinstance(idx, MilvusStore):
            return idx.search(vectors, k, nprobe)
        want = min(idx.ntotal, k + 8)  # margin for rows deleted since
        if not index.is_approximate(idx):
            scores, ids = index.search(idx, vectors, want, nprobe)
            rows = self.catalog.rows(np.unique(ids[ids >= 0]))
        else:  # candidates re-scored with exact vectors from the catalogue's raw features (index.rerank)
            _, ids = index.search(idx, vectors, min(idx.ntotal, want * index.REFINE_FACTOR), nprobe)
            rows = self.catalog.rows(np.unique(ids[ids >= 0]))
            ids = np.where(np.isin(ids, np.fromiter(rows, np.int64, len(rows))), ids, -1)
            scores, ids = index.rerank(vectors, ids, self._served(reducer), want)
        return scores, ids, rows

    def vectors(self) -> tuple[list, np.ndarray]:
        """Every searchable image's catalogue row and its reduced vector (what the index holds, unless the
        collection has DBA: then the index holds these averaged with their neighbours, see ris.dba)."""
        _, reducer = self._searchable()
        rows = self.catalog.all_rows()
        return rows, self._read_reduced(reducer, np.array([r.id for r in rows], dtype=np.int64))

    # --- describing ----------------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        counts = self.catalog.counts()
        m = self.manifest
        return {
            "collection": str(self.path.absolute()),
            "images": counts["ok"],
            "pending": counts["pending"],
            "skipped": counts["skipped"],
            "skipped_files": self.catalog.skipped_files(),
            "model": m.model,
            "cpu_runtime": m.cpu_runtime,
            "pooling": m.pooling,
            "precision": m.precision,
            "weights_sha256": m.weights_sha256,
            "raw_dims": m.raw_dims,
            "dims": m.dims,
            "pca": (self.path / "pca.npz").exists(),
            "index": m.index_factory,
            "index_built": m.index_built or m.index_factory,
            "nprobe": m.nprobe,
            "dba": m.dba,
            "dba_active": dba.active(m.dba, counts["ok"]),
            "verify": m.verify,
            "store": m.store or "faiss",
            "store_collection": m.store_collection,
            "format_version": m.format_version,
            "created": m.created,
        }


def _check_dba(n: int) -> None:
    if not 0 <= n <= dba.MAX_NEIGHBOURS:
        raise RisError(f"--dba is a number of neighbours from 0 (off) to {dba.MAX_NEIGHBOURS}")


def _query_name(query: Query) -> str:
    if isinstance(query, (str, os.PathLike)):
        return str(query)
    return "<image>"


def is_collection(path: str | os.PathLike) -> bool:
    return (Path(path) / "manifest.json").exists()
