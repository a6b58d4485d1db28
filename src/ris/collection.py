"""The facade: a persistent, searchable collection of images. CLI, API and server are thin over it.

It ties the stages together and holds no stage's logic: ris.files (scan) -> ris.images (decode) -> ris.model (run) ->
ris.extract (the engines: locally, or on Ray) -> ris.vectors (the catalogue; PCA, DBA, the FAISS or Milvus store) ->
ris.search (ranking, verification). The files on disk: docs/collections.md.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RisError
from .extract.pipeline import IndexReport, ModelSettings, StageTimes, default_workers
from .files import sources
from .files.lock import WriterLock
from .images import signature
from .images.query import Query, query_name, query_pixels
from .manifest import FORMAT_VERSION, Manifest, Options
from .model import registry as models, runtime
from .search.ranking import Ranker
from .search.results import SearchResult
from .vectors import dba, milvus as milvus_store
from .vectors.catalog import Catalog
from .vectors.derived import Derived
from .vectors.migrate import upgrade
from .vectors.milvus import MilvusStore
from .vectors.sink import CatalogSink


class Collection:
    """A directory of images' vectors, searchable by image. See the module docstring for the layout."""

    def __init__(self, path: Path, manifest: Manifest, weights: str | None = None):
        self.path, self.manifest, self.weights = path, manifest, weights
        self.catalog = Catalog(path / "catalog.sqlite")
        self.derived = Derived(path, self.catalog, lambda: self.manifest, self._milvus_client)
        self.ranker = Ranker(self.catalog, self.derived)
        self._lock = WriterLock(path)
        self._extractor: tuple[tuple, Any] | None = None
        self._milvus: MilvusStore | None = None

    def __repr__(self) -> str:
        """What it is at a glance: Collection('photos.ris', model='efficientnet-lite0', pooling='grid3', …, images=9144)."""
        m = self.manifest
        try:
            images: object = self.catalog.counts()["ok"]
        except Exception:  # a repr must not fail: a damaged or vanished catalogue still prints
            images = "?"
        return (f"Collection({str(self.path)!r}, model={m.model!r}, pooling={m.pooling!r}, precision={m.precision!r}, "
                f"images={images})")  # fmt: skip

    # --- opening -----------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike, weights: str | None = None, **options: Any) -> Collection:
        """A new, empty collection with these options (ris.manifest.Options), recording its weights' hash; a
        Milvus store that cannot be reached fails here, before anything is written."""
        root = Path(path)
        if (root / "manifest.json").exists():
            raise RisError(f"{root} already holds a collection; open it instead")
        if root.exists() and not root.is_dir():
            raise RisError(f"{root} exists and is not a directory")
        opts = Options(**options).validated()
        spec = models.get_spec(opts.model)
        if not spec.pooled:
            opts = dataclasses.replace(opts, pooling="fc2")
        digest = models.weights_digest(opts.model, weights)  # no network built, no PyTorch imported
        connected = MilvusStore(opts.store, milvus_store.collection_name(root)) if opts.store else None
        try:
            root.mkdir(parents=True, exist_ok=True)
            Catalog(root / "catalog.sqlite").close()  # the catalogue first: a manifest always has one beside it
            manifest = Manifest.new(opts, digest, spec.input_size, models.feature_dims(opts.model, opts.pooling),
                                    runtime.cpu_runtime(), connected.name if connected else "")  # fmt: skip
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
        manifest = Manifest.read(root / "manifest.json")
        db = root / "catalog.sqlite"
        if not db.exists() or db.stat().st_size == 0:
            raise RisError(f"collection {root} is damaged: its catalogue (catalog.sqlite) is missing or empty; "
                           "restore it from a backup, or index the images again into a new collection")  # fmt: skip
        coll = cls(root, manifest, weights)
        if coll.catalog.version < 2 or manifest.format_version < FORMAT_VERSION:
            upgrade(coll)
        return coll

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, weights: str | None = None, **asked: Any) -> Collection:
        """Open an existing collection (checking it matches what was asked) or create one.

        asked: Options fields; None means "not asked". Changeable options (Options.CHANGEABLE) other than the
        manifest's are recorded there, and the next write rebuilds the index to match. The rest are fixed.
        """
        asked = {k: v for k, v in asked.items() if v is not None}
        root = Path(path)
        if not (root / "manifest.json").exists():
            return cls.create(root, weights, **asked)
        coll = cls.open(root, weights)
        changed = coll.manifest.asked(asked, root)
        if changed is not coll.manifest:
            coll.manifest = changed
            changed.write(root / "manifest.json")
        return coll

    def close(self) -> None:
        self.unlock()
        self.catalog.close()
        if self._milvus is not None:
            self._milvus.close()
            self._milvus = None
        self.derived.drop_cached()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _milvus_client(self) -> MilvusStore | None:
        """The Milvus store holding the vectors, connected on first use; None when they are in index files."""
        if self.manifest.store and self._milvus is None:
            self._milvus = MilvusStore(self.manifest.store, self.manifest.store_collection)
        return self._milvus

    def connect(self) -> None:
        """Connect to the vector store now (Milvus), so that one out of reach fails at once, not at the first search."""
        self._milvus_client()

    # --- writer lock ---------------------------------------------------------------------------

    def lock(self) -> None:
        """Become the one writer (or fail at once naming the process that is), connected to the vector store."""
        if self.catalog.readonly:
            raise RisError(f"collection {self.path} is read-only here: it can be searched, not changed")
        self._lock.acquire()
        try:  # a writer connects to its vector store now: one out of reach fails the run before any change
            self._milvus_client()
        except BaseException:
            self._lock.release()
            raise

    def unlock(self) -> None:
        self._lock.release()

    def _write(self, change: Callable[[], int], refit: bool = False, rebuild: bool = False) -> int:
        """Apply a catalogue change under the writer lock, then bring the derived vectors in line."""
        self.lock()
        try:
            result = change()
            self.derived.update(refit=refit, rebuild=rebuild)
            self.record_built()
            return result
        finally:
            self.unlock()

    def record_built(self) -> None:
        """The manifest's informational dims/index_built follow the derived set (the catalogue is authoritative)."""
        state = self.derived.state()
        if state["generation"] and (state["dims"], state["index"]) != (self.manifest.dims, self.manifest.index_built):
            self.manifest = self.manifest.with_options(dims=state["dims"], index_built=state["index"])
            self.manifest.write(self.path / "manifest.json")

    # --- the model -----------------------------------------------------------------------------

    def model_settings(self) -> ModelSettings:
        """What an extraction engine needs to run this collection's model (it never sees the Collection)."""
        m = self.manifest
        return ModelSettings(m.model, m.pooling, m.precision, self.weights, m.weights_sha256, m.input_size, m.raw_dims,
                             m.cpu_runtime)  # fmt: skip

    def extractor(self, device: str = "auto", threads: int | None = None):
        """The model for this collection's manifest, loaded once and shared (thread-safe to call)."""
        dev = runtime.resolve_device(device)
        key = (dev, threads or runtime.cpu_threads())
        if self._extractor is None or self._extractor[0] != key:
            m = self.manifest
            ext, digest = runtime.load_extractor(
                m.model, m.pooling, self.weights, device=dev, precision=m.precision if dev == "cpu" else None,
                threads=key[1], runtime=m.cpu_runtime if dev == "cpu" else None,
            )  # fmt: skip
            if digest != m.weights_sha256:
                raise RisError(f"collection {self.path} was built with other {m.model} weights (sha256 "
                               f"{m.weights_sha256[:12]}…, these are {digest[:12]}…); pass the same --weights")  # fmt: skip
            self._extractor = (key, ext)
        return self._extractor[1]

    def sink(self) -> CatalogSink:
        """Where extraction engines deliver features (ris.extract.pipeline.Sink); the caller holds the writer lock."""
        return CatalogSink(self.catalog, self.manifest.raw_dims, self.derived.projection())

    # --- writing -------------------------------------------------------------------------------

    def index(
        self, paths: Iterable[str | os.PathLike], resync: bool = True, batch_size: int = 32, workers: int | None = None,
        device: str = "auto", threads: int | None = None, progress: Callable[[int, int], Callable[[int], None]] | None = None,
        ray: str | None = None, shard_size: int = 1024, exclude: Iterable[str] = (),
    ) -> IndexReport:  # fmt: skip
        """Bring the collection in line with these folders/files.

        resync=True (`ris index`): files gone from these paths are dropped. resync=False (`ris add`):
        only adds or updates. Committed batches survive a crash; the next run resumes after them.
        ray: a Ray address ("local", "auto", "ray://host:10001") to extract on a cluster instead.
        exclude: globs on paths relative to a scanned folder left out (as its .risignore's; sources.scan).
        """  # fmt: skip
        from .extract import pipeline as extract

        paths = list(paths)
        files = sources.scan(paths, exclude)
        self.lock()
        try:
            roots = [str(Path(p).expanduser().absolute()) for p in paths] if resync else []
            report = self.catalog.sync(files, drop_under=roots)
            sink = self.sink()
            todo = sink.sample_first(self.catalog.pending())
            times = StageTimes()
            if todo:
                tick = progress(len(todo), len(files)) if progress else None
                if ray is not None:  # device and workers are the cluster's
                    from .extract.ray import SHARD_DIR, ray_extract

                    times = ray_extract(todo, self.model_settings(), sink, self.path / SHARD_DIR, ray,
                                        batch_size=batch_size, shard_size=shard_size, progress=tick)  # fmt: skip
                else:
                    cores = threads or runtime.cpu_threads()
                    ext = sink.projecting(self.extractor(device, threads=cores))
                    nworkers = default_workers(cores, ext.device) if workers is None else workers
                    commit = lambda b, f: sink.commit(b.ok, f, b.failed, b.signatures)  # noqa: E731
                    times = extract.run(todo, ext, self.manifest.input_size, commit, known=sink.known,
                                        batch_size=batch_size, workers=nworkers, progress=tick)  # fmt: skip
            self.derived.update()
            self.record_built()
            counts = self.catalog.counts()
            return IndexReport(
                scanned=len(files), new=report.new, changed=report.changed, removed=report.removed,
                extracted=times.extracted, skipped=counts["skipped"], images=counts["ok"], times=times,
                skipped_files=self.catalog.skipped_files(), **files.counts(),
            )  # fmt: skip
        finally:
            self.unlock()

    def add(self, paths: Iterable[str | os.PathLike], **kwargs: Any) -> IndexReport:
        return self.index(paths, resync=False, **kwargs)

    def remove(self, patterns: Iterable[str]) -> int:
        """Drop images by path, folder or glob; returns how many went. A path that names indexed images is
        taken literally even when it holds glob characters (file names may: "[1].jpg")."""
        pats = [(os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(p)))), os.fspath(p)) for p in patterns]
        return self._write(lambda: self.catalog.remove(pats))

    def remove_ids(self, ids: Iterable[int]) -> int:
        """Drop images by id (exact, whatever characters their paths hold)."""
        return self._write(lambda: self.catalog.remove_ids(list(ids)))

    def reindex(self, refit_pca: bool = False) -> None:
        """Rebuild every derived file from the catalogue as a new generation (searches keep working meanwhile),
        compacting the vector file first; refit_pca: refit PCA on the stored vectors too (no re-extraction)."""
        self._write(lambda: self.catalog.rewrite() or 0, refit=refit_pca, rebuild=True)

    # --- searching -----------------------------------------------------------------------------

    def query_pixels(self, query: Query) -> np.ndarray:
        """Decode one query into model input (JPEGs decoded at reduced scale, as indexed images are)."""
        return query_pixels(query, self.manifest.input_size)

    def reduce(self, raw: np.ndarray) -> np.ndarray:
        """Raw model output -> the unit vectors the index compares (with the current PCA)."""
        return self.derived.snapshot().space.from_raw(raw)

    def embed(self, queries: Sequence[Query], device: str = "auto", batch_size: int = 32) -> np.ndarray:
        """Reduced, unit-norm vectors for the queries (what the index compares)."""
        return self.embed_pixels(np.stack([self.query_pixels(q) for q in queries]), device, batch_size)

    def embed_pixels(self, pixels: np.ndarray, device: str = "auto", batch_size: int = 32) -> np.ndarray:
        ext = self.extractor(device)
        return self.reduce(np.concatenate([ext(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]))

    def search(self, query: Query, k: int = 5, device: str = "auto", qe: int | None = None, nprobe: int | None = None,
               verify: bool | None = None) -> SearchResult:  # fmt: skip
        """The k most similar indexed images to one query (path, bytes, PIL image or HxWx3 array)."""
        return self.search_many([query], k, device, qe, nprobe, verify)[0]

    def search_many(self, queries: Sequence[Query], k: int = 5, device: str = "auto", qe: int | None = None,
                    nprobe: int | None = None, verify: bool | None = None) -> list[SearchResult]:  # fmt: skip
        """The k most similar indexed images for each query, in one batched model call and search (ris.search.ranking).

        verify (default: the collection's): the image a query was copied from goes first when local features or
        its signature confirm it (ris.search.ranking; ~20-70 ms a query).
        """
        if k < 1:
            raise RisError("k must be at least 1")
        verify = self.manifest.verify if verify is None else verify
        pixels = np.stack([self.query_pixels(q) for q in queries])
        return self.search_vectors(self.embed_pixels(pixels, device), k, [query_name(q) for q in queries], qe, nprobe,
                                   queries if verify else None, signature.of_pixels(pixels) if verify else None)  # fmt: skip

    def search_vectors(self, vectors: np.ndarray, k: int, names: Sequence[str], qe: int | None = None,
                       nprobe: int | None = None, verify_with: Sequence[Query | Callable] | None = None,
                       signatures: np.ndarray | None = None) -> list[SearchResult]:  # fmt: skip
        """The k nearest indexed images per reduced vector (ris.search.ranking.Ranker.search). verify_with: each
        query's image (or a loader of it), to verify the first result geometrically, with a second look
        (ris.search.views); signatures: the queries' (ris.images.signature), to find heavily edited copies."""
        qe = self.manifest.query_expansion if qe is None else qe
        nprobe = nprobe or self.manifest.nprobe or None
        return self.ranker.search(vectors, k, names, qe, nprobe, verify_with, runtime.cpu_threads(), self.embed, signatures)

    def expand(self, vectors: np.ndarray, n: int, nprobe: int | None = None) -> np.ndarray:
        """αQE: each query moved towards its n nearest indexed images (ris.search.ranking.Ranker.expand)."""
        return self.ranker.expand(vectors, n, nprobe or self.manifest.nprobe or None)

    def vectors(self) -> tuple[list, np.ndarray]:
        """Every searchable image's catalogue row and its plain reduced vector (with DBA the index holds these
        averaged with their neighbours, see ris.vectors.dba)."""
        snap = self.derived.snapshot()
        rows = self.catalog.all_rows()
        return rows, self.ranker.plain(snap, np.array([r.id for r in rows], dtype=np.int64))

    def info(self) -> dict[str, Any]:
        counts, m, state = self.catalog.counts(), self.manifest, self.derived.state()
        searchable = self.derived.searchable()
        lag = "" if searchable == counts["ok"] else (
            f"the index holds {searchable} of {counts['ok']} images (a write was interrupted): the next "
            "`ris add`/`ris index` or `ris reindex` brings it in line")  # fmt: skip
        return {
            "collection": str(self.path.absolute()), "images": counts["ok"], "searchable": searchable, "index_lag": lag,
            "pending": counts["pending"], "skipped": counts["skipped"], "skipped_files": self.catalog.skipped_files(),
            "model": m.model, "cpu_runtime": m.cpu_runtime, "pooling": m.pooling, "precision": m.precision,
            "weights_sha256": m.weights_sha256, "raw_dims": m.raw_dims, "stored_dims": self.catalog.width or m.raw_dims,
            "dims": state["dims"] or m.dims, "pca": state["dims"] not in (0, self.catalog.width or m.raw_dims),
            "generation": state["generation"], "index": m.index_factory, "index_built": state["index"] or m.index_built,
            "nprobe": m.nprobe, "dba": m.dba, "dba_active": dba.active(m.dba, counts["ok"]), "verify": m.verify,
            "store": m.store or "faiss", "store_collection": m.store_collection, "format_version": m.format_version,
            "created": m.created, "disk_bytes": sum(f.stat().st_size for f in self.path.iterdir() if f.is_file()),
        }  # fmt: skip
