"""`ris serve`: a web page and a REST API over one collection (FastAPI + uvicorn).

Threading: SQLite connections belong to the thread that opened them, and the Collection loads its
index lazily, so one dedicated thread owns the Collection and runs every catalogue/index call in
turn. Decoding and the model (ONNX Runtime's session.run is thread-safe) run in the request
threads, in parallel; only the cheap vector lookup is serialised.

Safety: loopback by default; images are served by catalogue id only, never by a client path;
uploads are size-capped, content-sniffed and bomb-checked; add/remove need a configured token.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from . import __version__
from .collection import Collection
from .decode import open_image, read_file, resize
from .errors import CollectionLocked, DecodeError, RisError
from .runtime import cpu_threads
from .search import Match, SearchResult
from .store import ImageRow

DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
THUMBNAIL_SIZE = 256
MAX_K = 100
STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file
_DRAIN_FACTOR = 4  # bodies up to this many times the limit are read and dropped, so clients see the 413

T = TypeVar("T")
#: The form field k (module level: with postponed annotations FastAPI resolves names in module globals).
KForm = Annotated[int, Form(ge=1, le=MAX_K, description="How many matches")]


# --- response models (they document the API at /docs) ---------------------------------------------


class MatchOut(BaseModel):
    rank: int
    path: str
    score: float
    label: str | None
    id: int
    thumbnail: str
    image: str


class SearchOut(BaseModel):
    query: str
    matches: list[MatchOut]


class ImageOut(BaseModel):
    id: int
    label: str | None
    path: str
    thumbnail: str
    image: str


class CollectionOut(BaseModel):
    images: int
    pending: int
    skipped: int
    model: str
    pooling: str
    precision: str
    raw_dims: int
    dims: int
    pca: bool
    index: str
    created: str
    writable: bool
    offset: int
    limit: int
    sample: list[ImageOut]


class AddOut(ImageOut):
    added: bool


class Detail(BaseModel):
    detail: str


def _errors(**codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error answers, which all carry {"detail": "..."}."""
    return {int(code[1:]): {"model": Detail, "description": text} for code, text in codes.items()}


UPLOAD_ERRORS = _errors(e400="Corrupt, truncated or empty image", e413="Over the size limit, or a decompression bomb",
                        e415="Not an image (or an unsupported format)")  # fmt: skip
AUTH_ERRORS = _errors(e401="Missing or wrong bearer token", e403="The server has no token: adding and removing are off")
NOT_FOUND = _errors(e404="No image with this id in the collection (or its file is gone)")


class HealthOut(BaseModel):
    status: str
    images: int
    version: str


# --- the collection, owned by one thread -------------------------------------------------------------


class CollectionService:
    """The Collection and its model, opened once; catalogue calls run one at a time on their own thread."""

    def __init__(self, path: Path, weights: str | None, device: str):
        self.path = path
        self.device = device
        self.threads = cpu_threads()  # same key as Collection.add uses, so adding never reloads the model
        self._owner = ThreadPoolExecutor(1, thread_name_prefix="ris-catalogue")
        try:
            self.coll: Collection = self.call(Collection.open, path, weights)
            self.extractor = self.call(self.coll.extractor, device, self.threads)
            self.call(self.coll.connect)  # a Milvus store: reachable (and a milvus-lite file ours) before serving
        except BaseException:
            self._owner.shutdown(wait=False)
            raise
        self.input_size = self.coll.manifest.input_size
        self.thumbs = path / "thumbs"
        self.uploads = path / "uploads"

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the owner thread and wait for it."""
        return self._owner.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self.call(self.coll.close)
        self._owner.shutdown(wait=True)

    # --- searching ---

    def search(self, pixels: np.ndarray, k: int, name: str, verify_with: bytes | None = None) -> SearchResult:
        """Model in the calling thread, PCA and index lookup on the owner thread.

        verify_with: the query file's bytes, for geometric verification of the top results (ris.verify)."""
        raw = self.extractor(pixels[None])
        return self.call(self._lookup, raw, k, name, verify_with)

    def _lookup(self, raw: np.ndarray, k: int, name: str, verify_with: bytes | None = None) -> SearchResult:
        # reduce() reloads PCA and index if another process rewrote them
        queries = None if verify_with is None else [verify_with]
        return self.coll.search_vectors(self.coll.reduce(raw), k, [name], verify_with=queries, raw=raw)[0]

    # --- reading ---

    def row(self, image_id: int) -> ImageRow:
        row = self.call(self.coll.catalog.rows, [image_id]).get(image_id)
        if row is None:
            raise HTTPException(404, f"no image with id {image_id} in this collection")
        return row

    def page(self, offset: int, limit: int) -> tuple[dict[str, Any], list[ImageRow]]:
        def read() -> tuple[dict[str, Any], list[ImageRow]]:
            return self.coll.info(), self.coll.catalog.page(offset, limit)

        return self.call(read)

    def count(self) -> int:
        return self.call(lambda: self.coll.catalog.counts()["ok"])

    # --- writing ---

    def add(self, path: Path) -> tuple[ImageRow, bool]:
        """Index one file; returns its row and whether it is new to the collection."""

        def find() -> ImageRow | None:
            return self.coll.catalog.row_by_path(str(path))

        def add_and_find() -> tuple[ImageRow, bool]:
            known = find() is not None
            self.coll.add([path], workers=0, device=self.device, threads=self.threads)
            row = find()
            if row is None:
                raise HTTPException(400, "the image could not be indexed")
            return row, not known

        return self.call(add_and_find)

    def remove(self, row: ImageRow) -> None:
        self.call(self.coll.remove_ids, [row.id])
        for thumb in self.thumbs.glob(f"{row.id}-*.jpg"):
            thumb.unlink(missing_ok=True)
        if Path(row.path).is_relative_to(self.uploads.absolute()):
            Path(row.path).unlink(missing_ok=True)  # ours: it came in through the API

    # --- files ---

    def thumbnail(self, row: ImageRow) -> Path | bytes:
        """A JPEG thumbnail cached in the collection's thumbs/ (keyed by content hash, so never stale).

        A read-only collection still gets thumbnails: they are then made per request, not cached.
        """
        dest = self.thumbs / f"{row.id}-{(row.sha256 or 'x')[:16]}.jpg"
        if dest.exists():
            return dest
        img = decode_stored(row, THUMBNAIL_SIZE)
        img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85, optimize=True)
        try:
            write_atomic(dest, buf.getvalue())
        except OSError:
            return buf.getvalue()
        return dest


def decode_stored(row: ImageRow, draft_size: int) -> Image.Image:
    """Decode an indexed image's file; a file that vanished or changed since indexing is a 404."""
    try:
        return open_image(read_file(row.path), draft_size=draft_size)
    except DecodeError as exc:
        raise HTTPException(404, f"the file of image {row.id} is no longer readable: {exc}") from None


def write_atomic(dest: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so concurrent readers never see half a file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- uploads ---------------------------------------------------------------------------------------


def read_upload(file: UploadFile, limit: int) -> bytes:
    """The uploaded bytes, or 413 when over the limit (checked before reading it into memory)."""
    if file.size is not None and file.size > limit:
        raise HTTPException(413, f"upload too large: {file.size:,} bytes (limit {limit:,})")
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"upload too large (limit {limit:,} bytes)")
    return data


def decode_upload(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode uploaded bytes; failures become 415 (not an image), 413 (bomb) or 400 (corrupt)."""
    try:
        return open_image(data, draft_size=draft_size)
    except DecodeError as exc:
        raise HTTPException(_decode_status(str(exc)), f"cannot use this upload: {exc}") from None


def query_pixels(data: bytes, size: int) -> np.ndarray:
    """The model input for uploaded bytes (decoded at reduced scale, as Collection.query_pixels does)."""
    return resize(decode_upload(data, draft_size=size), size)


def _extension(data: bytes) -> str:
    """A file extension for uploaded bytes, from their content."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "img"
    except Exception:
        fmt = "img"
    return {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif"}.get(fmt, fmt.lower())


def _decode_status(reason: str) -> int:
    if reason.startswith("not an image"):
        return 415
    if "too large" in reason or "decompression" in reason:
        return 413
    return 400


def image_format(path: str) -> str | None:
    """The format by content (header only), as the decoder sees it."""
    try:
        with Image.open(path) as img:
            return img.format
    except Exception:
        return None


def safe_label(label: str | None) -> str | None:
    """A folder name made of safe characters only (labels come from folder names)."""
    if not label:
        return None
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in label.strip())[:64].strip("_")
    return cleaned or None


class BodyLimit:
    """Refuse a request whose declared body is far over the upload limit before parsing it (413).

    The body is read and dropped first (up to a cap) so the client gets to read the 413 instead of a reset.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.limit + _MULTIPART_SLACK:
                if int(declared) <= _DRAIN_FACTOR * self.limit:
                    while (await receive()).get("more_body"):
                        pass
                detail = f"upload too large: {int(declared):,} bytes (limit {self.limit:,})"
                await JSONResponse({"detail": detail}, 413, headers={"Connection": "close"})(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- the app ---------------------------------------------------------------------------------------


def _links(image_id: int) -> dict[str, str]:
    return {"thumbnail": f"/api/images/{image_id}/thumbnail", "image": f"/api/images/{image_id}"}


def _match_out(m: Match) -> dict[str, Any]:
    return {**m.as_json(), "id": m.id, **_links(m.id)}


def _search_out(result: SearchResult) -> dict[str, Any]:
    return {"query": result.query, "matches": [_match_out(m) for m in result.matches]}


def _image_out(row: ImageRow) -> dict[str, Any]:
    return {"id": row.id, "label": row.label, "path": row.path, **_links(row.id)}


def create_app(
    collection_path: str | os.PathLike,
    token: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> FastAPI:
    """The app over one collection; opens it and loads its model now, so startup fails fast."""
    service = CollectionService(Path(collection_path), weights, device)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPIOffline(  # FastAPI whose /docs and /redoc assets are served locally, not from a CDN
        title="ris",
        version=__version__,
        description="Reverse image search over one collection: upload an image, get the most similar ones.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodyLimit, limit=max_upload_bytes)

    @app.exception_handler(RisError)
    def ris_error(request: Any, exc: RisError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 409 if isinstance(exc, CollectionLocked) else 400)

    @app.exception_handler(Exception)
    def internal_error(request: Any, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        """403 when the server has no token (read-only); 401 unless the request carries the right one."""
        if not token:
            raise HTTPException(403, "adding and removing images is disabled (start the server with --token)")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/api/health", response_model=HealthOut, tags=["info"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "images": service.count(), "version": __version__}

    @app.get("/api/collection", response_model=CollectionOut, tags=["info"])
    def collection_info(
        offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=200)] = 24
    ) -> dict[str, Any]:
        """Size, model and dimensions, and one page of the images (in id order)."""
        info, rows = service.page(offset, limit)
        keep = ("images", "pending", "skipped", "model", "pooling", "precision", "raw_dims", "dims", "pca", "index", "created")
        return {
            **{key: info[key] for key in keep},
            "writable": bool(token), "offset": offset, "limit": limit, "sample": [_image_out(r) for r in rows],
        }  # fmt: skip

    @app.post("/api/search", response_model=SearchOut, tags=["search"], responses=UPLOAD_ERRORS)
    def search_upload(
        file: Annotated[UploadFile, File(description="The query image")], k: KForm = 5,
        verify: Annotated[
            bool | None, Form(description="Geometric check of the top 5: a copy's original first (default: the collection's)")
        ] = None,
    ) -> dict[str, Any]:
        """The k indexed images most similar to the uploaded one (the fields of `ris search --json`, plus links)."""
        data = read_upload(file, max_upload_bytes)
        pixels = query_pixels(data, service.input_size)
        verify = service.coll.manifest.verify if verify is None else verify
        return _search_out(service.search(pixels, k, file.filename or "<upload>", data if verify else None))

    @app.get("/api/search", response_model=SearchOut, tags=["search"], responses=NOT_FOUND)
    def search_by_id(
        id: Annotated[int, Query(description="An image id of this collection")],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 5,
    ) -> dict[str, Any]:
        """More like this: search with an indexed image's own file."""
        row = service.row(id)
        pixels = resize(decode_stored(row, service.input_size), service.input_size)
        return _search_out(service.search(pixels, k, row.path))

    @app.get("/api/images/{image_id}", tags=["images"], response_class=FileResponse, responses=NOT_FOUND)
    def get_image(image_id: int) -> FileResponse:
        """The original file of an indexed image, with its content type."""
        row = service.row(image_id)
        if not Path(row.path).is_file():
            raise HTTPException(404, f"the file of image {image_id} is gone")
        fmt = image_format(row.path)
        media = "image/jpeg" if fmt == "MPO" else Image.MIME.get(fmt or "", "application/octet-stream")
        return FileResponse(row.path, media_type=media, headers={"X-Content-Type-Options": "nosniff",
                                                                  "Cache-Control": "private, max-age=60"})  # fmt: skip

    @app.get("/api/images/{image_id}/thumbnail", tags=["images"], response_class=FileResponse, responses=NOT_FOUND)
    def get_thumbnail(image_id: int) -> Response:
        """A JPEG thumbnail (at most 256 px a side), made once and cached in the collection's thumbs/."""
        thumb = service.thumbnail(service.row(image_id))
        headers = {"Cache-Control": "private, max-age=60"}
        if isinstance(thumb, bytes):
            return Response(thumb, media_type="image/jpeg", headers=headers)
        return FileResponse(thumb, media_type="image/jpeg", headers=headers)

    @app.post("/api/images", response_model=AddOut, status_code=201, tags=["images"],
              dependencies=[Depends(require_token)], responses={**UPLOAD_ERRORS, **AUTH_ERRORS})  # fmt: skip
    def add_image(
        file: Annotated[UploadFile, File(description="The image to add")],
        label: Annotated[str | None, Form(description="Label (saved as its folder name)")] = None,
    ) -> dict[str, Any]:
        """Save the upload under the collection's uploads/ and index it (needs the bearer token)."""
        data = read_upload(file, max_upload_bytes)
        decode_upload(data)  # refuse what search would refuse, before anything is written
        folder = service.uploads / (safe_label(label) or "")
        dest = (folder / f"{hashlib.sha256(data).hexdigest()[:20]}.{_extension(data)}").absolute()
        if not dest.exists():
            write_atomic(dest, data)
        row, added = service.add(dest)
        return {**_image_out(row), "added": added}

    @app.delete("/api/images/{image_id}", tags=["images"], dependencies=[Depends(require_token)],
                responses={**AUTH_ERRORS, **NOT_FOUND})  # fmt: skip
    def remove_image(image_id: int) -> dict[str, Any]:
        """Drop an image from the collection (files under uploads/ are deleted too; needs the token)."""
        row = service.row(image_id)
        service.remove(row)
        return {"removed": image_id, "path": row.path}

    @app.get("/", include_in_schema=False)
    def index_page() -> Response:
        csp = "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; object-src 'none'"
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                            headers={"Content-Security-Policy": csp, "X-Content-Type-Options": "nosniff"})  # fmt: skip

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


# --- running ---------------------------------------------------------------------------------------


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> Iterator[str]:
    """Run uvicorn in a background thread (port 0: a free one); yields the base URL, stops it on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="ris-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def run(
    collection: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
) -> None:
    """Serve until interrupted. The collection and model load before the port opens."""
    import uvicorn

    app = create_app(collection, token=token, weights=weights, device=device, max_upload_bytes=max_upload_bytes)
    if host not in LOOPBACK:
        print(f"warning: listening on {host}: anyone who can reach this machine can search"
              f"{' (and, with the token, change)' if token else ''} this collection", file=sys.stderr)  # fmt: skip
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
