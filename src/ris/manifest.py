"""A collection's options (one validated object) and its manifest (the options recorded, with what was built).

`Options` is where every collection setting is named, defaulted and checked, whoever asks (CLI, Python,
server); the manifest records them when the collection is created and when they change. Fields are typed:
a manifest whose fields are not what they must be is refused with the field named, never a traceback.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .errors import RisError
from .files.atomic import write_text
from .model import registry as models
from .vectors import dba, faiss_index as index, milvus as milvus_store
from .vectors.reduce import DEFAULT_DIMS

#: 2: the compact catalogue (stored vectors in vectors.G.bf16, derived files by generation); 1: raw features in SQLite.
FORMAT_VERSION = 2


@dataclass(frozen=True)
class Options:
    """How a collection extracts, reduces, indexes and searches. Fixed at creation: model, pooling, precision,
    store; changeable later (recorded, applied at the next write): index_factory, nprobe, dba, verify, qe."""

    model: str = models.DEFAULT_MODEL
    pooling: str = models.DEFAULT_POOLING
    precision: str = "int8"
    dims: int = DEFAULT_DIMS  # PCA dimensions
    index_factory: str = index.AUTO  # a FAISS factory string, or "auto": exact when small, IVF when large
    nprobe: int = 0  # IVF lists visited per query (HNSW: efSearch); 0 = the index's default
    store: str = ""  # "" = index.faiss; "milvus-lite://PATH.db" or "milvus://HOST:PORT"
    dba: int = dba.DEFAULT_NEIGHBOURS  # αDBA neighbours (0: off)
    verify: bool = True  # searches verify the first result geometrically (ris.search.verify)
    query_expansion: int = 0  # αQE neighbours (0: off)

    CHANGEABLE: typing.ClassVar[tuple[str, ...]] = ("index_factory", "nprobe", "dba", "verify", "query_expansion")

    def validated(self) -> Options:
        """These options checked (one clear error each), the store's address normalised."""
        models.get_spec(self.model)
        if self.pooling not in (*models.POOLINGS, "fc2"):
            raise RisError(f"--pooling must be one of {', '.join(models.POOLINGS)}, not {self.pooling!r}")
        if self.precision not in ("fp32", "int8"):
            raise RisError("a collection's precision is fp32 or int8")
        if not 0 <= self.dba <= dba.MAX_NEIGHBOURS:
            raise RisError(f"--dba is a number of neighbours from 0 (off) to {dba.MAX_NEIGHBOURS}")
        if self.dims < 0 or self.query_expansion < 0:
            raise RisError("--dims and --qe are 0 or more")
        store = milvus_store.normalize(self.store)
        if store:
            milvus_store.check_index(self.index_factory, self.nprobe, store)
        else:
            raw = models.feature_dims(self.model, self.pooling)
            index.check_args(self.index_factory, self.nprobe, self.dims if 0 < self.dims < raw else raw)
        return dataclasses.replace(self, store=store)


@dataclass(frozen=True)
class Manifest:
    model: str
    pooling: str
    precision: str
    weights_sha256: str
    input_size: int
    raw_dims: int
    dims: int  # the searched vectors' dimensions (pca_dims once PCA is fitted; informational)
    pca_dims: int
    query_expansion: int = 0
    dba: int = 0
    verify: bool = False
    index_factory: str = index.AUTO
    index_built: str = ""  # the index kind last built (informational: the catalogue records the current one)
    nprobe: int = 0
    store: str = ""
    store_collection: str = ""  # the Milvus collection holding the vectors (a Milvus store only)
    cpu_runtime: str = "onnx"  # "openvino" or "onnx": queries on a CPU use the images' runtime
    format_version: int = FORMAT_VERSION
    created: str = ""
    ris_version: str = __version__

    @classmethod
    def new(cls, options: Options, weights_sha256: str, input_size: int, raw_dims: int, cpu_runtime: str,
            store_collection: str = "") -> Manifest:  # fmt: skip
        o = options
        return cls(
            model=o.model, pooling=o.pooling, precision=o.precision, weights_sha256=weights_sha256, input_size=input_size,
            raw_dims=raw_dims, dims=raw_dims, pca_dims=o.dims, query_expansion=o.query_expansion, dba=o.dba,
            verify=o.verify, index_factory=o.index_factory, nprobe=o.nprobe, store=o.store,
            store_collection=store_collection, cpu_runtime=cpu_runtime,
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )  # fmt: skip

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RisError(f"{path.parent} is not a ris collection (unreadable manifest: {exc})") from None
        if not isinstance(data, dict):
            raise RisError(f"{path} is damaged (not a JSON object)")
        version = data.get("format_version", 0)
        if isinstance(version, int) and version > FORMAT_VERSION:
            raise RisError(f"{path.parent} was written by a newer ris (format {version}); upgrade ris to open it")
        hints = typing.get_type_hints(cls)
        fields = {}
        for f in dataclasses.fields(cls):
            if f.name not in data:
                continue
            value, kind = data[f.name], hints[f.name]
            if not _is(value, kind):
                raise RisError(f"{path} is damaged: field {f.name!r} is {value!r}, not {_name(kind)} "
                               f"(fix it, or restore the file)")  # fmt: skip
            fields[f.name] = value
        try:
            return cls(**fields)
        except TypeError as exc:
            raise RisError(f"{path} is damaged: {exc}") from None

    def write(self, path: Path) -> None:
        write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    def asked(self, asked: dict, root: Path) -> Manifest:
        """This manifest with the changeable options asked (Options.CHANGEABLE) applied; the fixed ones must match."""
        if "store" in asked and milvus_store.normalize(asked["store"]) != self.store:
            raise RisError(f"collection {root} keeps its vectors in {self.store or 'faiss'}, not {asked['store']}; "
                           "the store is chosen when a collection is created (use another --collection)")  # fmt: skip
        for what in ("model", "pooling", "precision"):
            have = getattr(self, what)
            if what in asked and asked[what] != have and not (what == "pooling" and have == "fc2"):
                raise RisError(f"collection {root} was built with {what} {have}, not {asked[what]}; use another --collection")
        changes = {k: asked[k] for k in Options.CHANGEABLE if k in asked and asked[k] != getattr(self, k)}
        if not changes:
            return self
        fixed = dict(model=self.model, pooling=self.pooling, precision=self.precision, store=self.store, dims=self.pca_dims)
        Options(**{**fixed, **{k: getattr(self, k) for k in Options.CHANGEABLE}, **changes}).validated()
        return self.with_options(**changes)

    def with_options(self, **changes: object) -> Manifest:
        return dataclasses.replace(self, **changes)


def _is(value: object, kind: object) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _name(kind: object) -> str:
    return getattr(kind, "__name__", str(kind))
