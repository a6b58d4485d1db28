"""Vectors and their metadata in Milvus instead of index.faiss: a Milvus server, or an embedded milvus-lite file.

A collection created with `--store milvus://HOST:PORT` or `--store milvus-lite://PATH.db` keeps one Milvus
collection (named in its manifest) with a row per searchable image: its catalogue id (primary key), its
reduced unit vector (inner product = cosine similarity) and its path and label, so a search answers from
Milvus alone. The catalogue (catalog.sqlite) stays the truth and Milvus is derived from it, as index.faiss
is: `MilvusStore.reconcile` inserts the ids the catalogue has and Milvus lacks and deletes the others, work
proportional to the change. A writer connects before it changes the catalogue, so an unreachable store
fails the run before anything moves; a run killed between the two writes is healed by the next one.

Index: "auto" is FLAT (exact) on milvus-lite and HNSW (M 16, efConstruction 200) on a server; a collection
may name another of INDEX_TYPES instead (`ris index --index IVF_SQ8`; DISKANN on a server only: milvus-lite
3.2 does not build it). The collection's nprobe is HNSW's ef, IVF's nprobe or DISKANN's search_list.

pymilvus (and milvus-lite for files) are imported only when a Milvus store is used: `pip install -e ".[milvus]"`.
milvus-lite runs inside the process that opens the file and allows one process at a time per file.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ..config import env
from ..errors import RisError
from . import idsets
from .catalog import ImageRow

LITE = "milvus-lite://"
SERVER = "milvus://"
DEFAULT_PORT = 19530
AUTO = "auto"
INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "DISKANN", "AUTOINDEX")
SERVER_ONLY = ("DISKANN",)  # milvus-lite 3.2 searches it by brute force, logging a build failure per flush
HNSW_BUILD = {"M": 16, "efConstruction": 200}
#: Search breadth when the collection sets no nprobe: HNSW's ef (at least k), IVF's nprobe.
DEFAULT_EF, DEFAULT_NPROBE = 64, 16
#: Rows per insert call (a 1280-d float32 vector is 5 KiB: 10 MiB a call, far below gRPC's limits).
INSERT_ROWS = 2048
QUERY_BATCH = 10_000
MAX_PATH, MAX_LABEL = 65_535, 1_024
MAX_LIMIT = 16_384  # Milvus' largest top-k
#: Token for a server with authentication ("user:password" or an API key); never stored in the manifest.
TOKEN_ENV = "RIS_MILVUS_TOKEN"
INSTALL_HINT = 'pip install -e ".[milvus]" (pymilvus and milvus-lite)'

_lite_users: dict[str, int] = {}  # milvus-lite files this process has open -> open stores (one server each)


def normalize(uri: str | None) -> str:
    """The store as a manifest records it: "" (index.faiss), "milvus-lite:///abs/path.db" or "milvus://host:port"."""
    uri = (uri or "").strip()
    if uri in ("", "faiss"):
        return ""
    if uri.startswith(LITE):
        path = uri[len(LITE) :]
        if not path.endswith(".db") or path == ".db":
            raise RisError(f"--store {uri}: a milvus-lite store is a path ending in .db (milvus-lite://PATH.db)")
        return LITE + str(Path(path).expanduser().absolute())
    if uri.startswith(SERVER):
        try:
            parts = urlsplit("//" + uri[len(SERVER) :])
            host, port = parts.hostname, parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise RisError(f"--store {uri}: {exc}") from None
        if not host or parts.path.strip("/") or parts.query or parts.username:
            raise RisError(f"--store {uri}: give milvus://HOST:PORT (a token goes in ${TOKEN_ENV}, not the address)")
        return f"{SERVER}[{host}]:{port}" if ":" in host else f"{SERVER}{host}:{port}"
    raise RisError(f"--store {uri}: expected milvus://HOST:PORT, milvus-lite://PATH.db, or faiss (the default)")


def is_lite(uri: str) -> bool:
    return uri.startswith(LITE)


def collection_name(root: Path) -> str:
    """A Milvus collection name for a new ris collection: readable, and unique on a shared server."""
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(root).absolute().name)[:40]
    return f"ris_{stem}_{uuid.uuid4().hex[:12]}"


def resolve_index(requested: str, uri: str) -> str:
    """The Milvus index type for a collection's index setting: "auto" is FLAT on milvus-lite, HNSW on a server."""
    if requested == AUTO:
        return "FLAT" if is_lite(uri) else "HNSW"
    return requested.upper()


def check_index(requested: str, nprobe: int, uri: str) -> None:
    if nprobe < 0:
        raise RisError("nprobe must be 0 (the default) or more")
    if requested != AUTO and requested.upper() not in INDEX_TYPES:
        raise RisError(f"--index {requested}: a Milvus store takes auto, {', '.join(INDEX_TYPES)} (not a FAISS factory)")
    if is_lite(uri) and requested.upper() in SERVER_ONLY:
        raise RisError(f"--index {requested}: milvus-lite does not build it; use a Milvus server (milvus://HOST:PORT)")


class _LiteFailure(logging.Filter):
    """milvus-lite logs why it could not open a file (a traceback) and pymilvus then raises a bare
    "Open local milvus failed": keep the reason for the one-line error, drop the log."""

    reason: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            _LiteFailure.reason = record.exc_info[1]
            return False
        return True


@functools.cache
def _pymilvus():
    """Import pymilvus (once), quieting gRPC and pymilvus' own logging: failures surface as RisError."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # no "skipping fork() handlers" from decode workers
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # forked decode workers never use gRPC
    try:
        import pymilvus
    except ImportError:
        raise RisError(f"a Milvus store needs pymilvus: {INSTALL_HINT}") from None
    for name in ("pymilvus", "pymilvus.milvus_client"):  # RPC errors are logged with tracebacks, then raised
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("milvus_lite.server_manager").addFilter(_LiteFailure())
    return pymilvus


@contextmanager
def _errors(uri: str) -> Iterator[None]:
    """Milvus failures as one-line RisErrors naming the store."""
    from pymilvus.exceptions import MilvusException

    try:
        yield
    except MilvusException as exc:
        raise RisError(f"Milvus store {uri}: {exc.message}") from None


class MilvusStore:
    """One ris collection's vectors in one Milvus collection: id (primary key), vector, path, label."""

    def __init__(self, uri: str, name: str, timeout: float = 30.0):
        self.uri, self.name, self.timeout = uri, name, timeout
        self._described: tuple[int, str] | None | bool = False  # (dims, index type), None: absent, False: unknown
        # this process changed the store: its searches read their own writes. Session consistency, not Strong: Strong
        # waits for Milvus' next time tick on every search (≈ 200 ms each on a Milvus 2.3 server, measured), Session
        # only until this client's last write is visible
        self._wrote = False
        pymilvus = _pymilvus()
        self._lite_path = uri[len(LITE) :] if is_lite(uri) else None
        if self._lite_path is not None:
            try:
                import milvus_lite  # noqa: F401
            except ImportError:
                raise RisError(f"a milvus-lite store needs milvus-lite: {INSTALL_HINT}") from None
            Path(self._lite_path).parent.mkdir(parents=True, exist_ok=True)
            _LiteFailure.reason = None
            try:
                self.client = pymilvus.MilvusClient(self._lite_path, timeout=timeout)
            except pymilvus.exceptions.MilvusException as exc:
                raise RisError(self._lite_error(exc)) from None
            _lite_users[self._lite_path] = _lite_users.get(self._lite_path, 0) + 1
        else:
            address = "http://" + uri[len(SERVER) :]
            with _errors(uri):
                self.client = pymilvus.MilvusClient(address, token=env(TOKEN_ENV), timeout=timeout)
        self._loaded = False

    def _lite_error(self, exc: Exception) -> str:
        reason = _LiteFailure.reason
        if type(reason).__name__ == "DataDirLockedError":
            return (f"the milvus-lite store {self._lite_path} is open in another process (milvus-lite allows one at "
                    "a time: stop that one, e.g. `ris serve`, or use a Milvus server, --store milvus://HOST:PORT)")  # fmt: skip
        return f"cannot open the milvus-lite store {self._lite_path}: {reason or getattr(exc, 'message', exc)}"

    def close(self) -> None:
        """Disconnect; the last store of a milvus-lite file in this process releases the file for others."""
        client, self.client = getattr(self, "client", None), None
        if client is None:
            return
        client.close()
        path = self._lite_path
        if path is not None:
            _lite_users[path] -= 1
            if not _lite_users[path]:
                del _lite_users[path]
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(path)

    # --- the Milvus collection ---

    def describe(self, fresh: bool = False) -> tuple[int, str] | None:
        """(vector dims, index type) of the Milvus collection, or None while there is none."""
        if fresh or self._described is False:
            with _errors(self.uri):
                if not self.client.has_collection(self.name):
                    self._described = None
                else:
                    fields = self.client.describe_collection(self.name)["fields"]
                    dims = next(int(f["params"]["dim"]) for f in fields if f["name"] == "vector")
                    indexes = self.client.list_indexes(self.name)
                    kind = self.client.describe_index(self.name, indexes[0])["index_type"] if indexes else ""
                    self._described = (dims, kind)
        return self._described or None

    @property
    def d(self) -> int:
        found = self.describe()
        return found[0] if found else 0

    def create(self, dims: int, index_type: str) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dims)
        schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_LABEL)
        params = self.client.prepare_index_params()
        params.add_index("vector", index_type=index_type, metric_type="IP",
                         params=HNSW_BUILD if index_type == "HNSW" else {})  # fmt: skip
        with _errors(self.uri):
            self.client.create_collection(self.name, schema=schema, index_params=params, consistency_level="Bounded")
        self._described, self._loaded, self._wrote = (dims, index_type), False, True

    def drop(self) -> None:
        with _errors(self.uri):
            self.client.drop_collection(self.name)
        self._described, self._loaded, self._wrote = None, False, True

    def _load(self) -> None:
        """Searching and querying need the collection loaded (a new process or a restarted server has it released).

        Loaded already (by another ris, or by an operator with more in-memory replicas), it is left as it is.
        """
        if not self._loaded:
            with _errors(self.uri):
                if self.client.get_load_state(self.name)["state"].name != "Loaded":
                    self.client.load_collection(self.name)
            self._loaded = True

    @property
    def ntotal(self) -> int:
        """How many vectors Milvus holds (read Strong: every acknowledged write counted)."""
        if not self.describe():
            return 0
        self._load()
        with _errors(self.uri):
            found = self.client.query(self.name, filter="", output_fields=["count(*)"], consistency_level="Strong")
        return int(found[0]["count(*)"])

    def ids(self) -> np.ndarray:
        """Every id Milvus holds, sorted."""
        self._load()
        found: list[int] = []
        with _errors(self.uri):
            it = self.client.query_iterator(self.name, batch_size=QUERY_BATCH, output_fields=["id"],
                                            consistency_level="Strong")  # fmt: skip
            while batch := it.next():
                found += [row["id"] for row in batch]
            it.close()
        return idsets.unique(np.asarray(found, dtype=np.int64))

    # --- keeping it in step with the catalogue ---

    def reconcile(
        self,
        wanted: np.ndarray,
        vectors_for: Callable[[np.ndarray], np.ndarray],
        rows_for: Callable[[Sequence[int]], dict[int, ImageRow]],
    ) -> tuple[int, int]:
        """Make Milvus hold exactly the `wanted` ids, with their vectors, paths and labels; returns (added, removed)."""
        wanted = np.asarray(wanted, dtype=np.int64)
        have = self.ids()
        extra = np.setdiff1d(have, wanted, assume_unique=True)
        missing = np.setdiff1d(wanted, have, assume_unique=True)
        with _errors(self.uri):
            for start in range(0, len(extra), QUERY_BATCH):
                self.client.delete(self.name, ids=[int(i) for i in extra[start : start + QUERY_BATCH]])
        self._write(missing, vectors_for, rows_for, self.client.insert)
        if len(extra) or len(missing):
            self._flush()
        return len(missing), len(extra)

    def replace(
        self,
        ids: np.ndarray,
        vectors_for: Callable[[np.ndarray], np.ndarray],
        rows_for: Callable[[Sequence[int]], dict[int, ImageRow]],
    ) -> None:
        """New vectors for these ids (DBA: a new neighbour) by upsert, so that a concurrent search sees each image
        with its old or its new vector, never without one (a delete and then an insert left such a window)."""
        ids = np.asarray(ids, dtype=np.int64)
        self._write(ids, vectors_for, rows_for, self.client.upsert)
        if len(ids):
            self._flush()

    def _write(self, ids: np.ndarray, vectors_for: Callable[[np.ndarray], np.ndarray],
               rows_for: Callable[[Sequence[int]], dict[int, ImageRow]], send: Callable[..., Any]) -> None:  # fmt: skip
        with _errors(self.uri):
            for start in range(0, len(ids), INSERT_ROWS):
                chunk = ids[start : start + INSERT_ROWS]
                vectors = np.ascontiguousarray(vectors_for(chunk), dtype=np.float32)
                rows = rows_for(chunk)
                data = [{"id": int(i), "vector": v, "path": rows[int(i)].path, "label": rows[int(i)].label or ""}
                        for i, v in zip(chunk, vectors, strict=True) if int(i) in rows]  # fmt: skip
                if data:
                    send(self.name, data)

    def _flush(self) -> None:
        with _errors(self.uri):  # sealed: milvus-lite searched 9,145 unflushed vectors at 270 ms a query, 18 flushed
            self.client.flush(self.name)
        self._wrote = True

    # --- searching ---

    def search_params(self, k: int, nprobe: int | None) -> dict[str, Any]:
        found = self.describe()
        kind = found[1] if found else ""
        if kind == "HNSW":
            return {"metric_type": "IP", "params": {"ef": max(k, nprobe or DEFAULT_EF)}}
        if kind.startswith("IVF"):
            return {"metric_type": "IP", "params": {"nprobe": nprobe or DEFAULT_NPROBE}}
        if kind == "DISKANN":
            return {"metric_type": "IP", "params": {"search_list": max(k, nprobe or DEFAULT_EF)}}
        return {"metric_type": "IP", "params": {}}

    def search(
        self, queries: np.ndarray, k: int, nprobe: int | None = None, batch: int = 1024
    ) -> tuple[np.ndarray, np.ndarray, dict[int, ImageRow]]:
        """(scores, ids, rows by id): the k nearest per query, with their path and label from Milvus; id -1 where none."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = max(1, min(k, MAX_LIMIT))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        rows: dict[int, ImageRow] = {}
        self._load()
        params = self.search_params(k, nprobe)
        extra = {"consistency_level": "Session"} if self._wrote else {}
        with _errors(self.uri):
            for start in range(0, len(queries), batch):
                hits = self.client.search(self.name, data=queries[start : start + batch], limit=k, search_params=params,
                                          output_fields=["path", "label"], **extra)  # fmt: skip
                for q, found in enumerate(hits, start):
                    for j, hit in enumerate(found[:k]):
                        image_id = int(hit["id"])
                        scores[q, j], ids[q, j] = hit["distance"], image_id
                        entity = hit["entity"]
                        rows[image_id] = ImageRow(image_id, entity["path"], entity["label"] or None, None)
        return scores, ids, rows
