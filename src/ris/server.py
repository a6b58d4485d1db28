"""`ris serve`: a web page and a REST API over one collection (FastAPI + uvicorn).

Threading: SQLite connections belong to the thread that opened them, and the Collection loads its
index lazily, so one dedicated thread owns the Collection and runs every catalogue/index call in
turn. Decoding and the model (ONNX Runtime's session.run is thread-safe) run in the request
threads, in parallel; only the cheap vector lookup is serialised.

Safety: loopback by default, and only for the Host names allowed (DNS rebinding); browsers' cross-site
writes are refused (a page elsewhere can submit a form to a loopback server); images are served by
catalogue id only, and only while the file is still the one indexed (same content hash); uploads are
size-capped, time-limited, content-sniffed and pixel-budgeted before decoding, and only a few decode at
once, so parallel uploads cannot multiply memory; add/remove need a configured token; unexpected
errors are one line of JSON (the details go to the server's log) and keep the connection usable.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import ipaddress
import logging
import os
import secrets
import socket
import stat
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Annotated, Any, BinaryIO, Literal, TypeVar
from urllib.parse import urlsplit

import anyio
import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import Headers
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .collection import Collection
from .errors import CollectionLocked, DecodeError, RisError
from .files.atomic import write_bytes
from .files.sources import CAMERA_RAW_EXTENSIONS
from .images import raw, signature
from .images.decode import max_file_bytes, open_image, resize
from .model.runtime import cpu_threads
from .search.results import Match, SearchResult
from .threads import faiss_alone
from .tools import dupes
from .vectors.catalog import ImageRow, displayed

THUMBNAIL_SIZE = 256
MAX_K = 100
STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: Host header names accepted by default (DNS rebinding: a page's own name resolving to 127.0.0.1 is refused).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "")
#: Decoded pixels one upload (or one stored image decoded for a thumbnail) may take: 40 MP is ~160 MB in
#: Pillow's RGB(X) layout. Checked from the header before decoding; JPEGs count at their draft-reduced size.
DEFAULT_MAX_PIXELS = 40_000_000
#: Decodes at once (each within the pixel budget): N parallel uploads wait instead of multiplying memory.
DECODE_SLOTS = 2
#: Stored files larger than this are not decoded for thumbnails or search by id (they are still served).
MAX_STORED_DECODE_BYTES = 64 * 1024 * 1024
#: A request body must arrive within this many seconds; an idle keep-alive connection closes after KEEP_ALIVE_S.
BODY_TIMEOUT_S = 60.0
KEEP_ALIVE_S = 5
#: Health re-runs its probe search at most this often.
HEALTH_TTL_S = 5.0
MAX_ID = 2**63 - 1  # SQLite's integer range
_MULTIPART_SLACK = 64 * 1024  # form boundaries and headers around the file
_DRAIN_FACTOR = 4  # bodies up to this many times the limit are read and dropped, so clients see the 413
_CHUNK = 1024 * 1024
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

log = logging.getLogger("ris.server")

T = TypeVar("T")
#: The form field k (module level: with postponed annotations FastAPI resolves names in module globals).
KForm = Annotated[int, Form(ge=1, le=MAX_K, description="How many matches")]
#: The bearer token as OpenAPI security, so /docs has an Authorize button (None: none sent, or not "Bearer ...").
Bearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="The token `ris serve --token` was started with")),
]


# --- response models (they document the API at /docs) ---------------------------------------------


class MatchOut(BaseModel):
    rank: int
    path: str
    score: float = Field(description="What ranked the match (DBA-served similarity); never increases down the list")
    similarity: float = Field(description="Plain cosine similarity of query and image (1 = identical)")
    label: str | None
    inliers: int | None = Field(description="Agreeing keypoint matches that confirm the image shows the query's "
                                             "picture or scene (12 or more; null: not confirmed, or not checked)")  # fmt: skip
    id: int
    thumbnail: str
    image: str


class SearchOut(BaseModel):
    query: str
    matches: list[MatchOut]
    preview: str | None = Field(None, description="The uploaded query as a JPEG thumbnail (a data: URL), when asked "
                                                  "for: a browser cannot show HEIC (outside Safari) or camera RAW")  # fmt: skip


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


UPLOAD_ERRORS = _errors(e400="Corrupt, truncated or empty image", e408="The body did not arrive in time",
                        e413="Over the size or pixel limit, or a decompression bomb",
                        e415="Not an image (or an unsupported format)")  # fmt: skip
AUTH_ERRORS = _errors(e401="Missing or wrong bearer token", e403="The server has no token: adding and removing are off")
NOT_FOUND = _errors(e404="No image with this id in the collection (or its file is gone)",
                    e409="The file at the image's path is no longer the one indexed")  # fmt: skip


class HealthOut(BaseModel):
    status: str
    images: int
    version: str
    detail: str | None = None
    keypoints: int = Field(0, description="Images whose keypoints verification keeps at hand (found after start, "
                                          "while idle and slowly under load, up to RIS_KEYPOINT_CACHE_MB)")  # fmt: skip
    voted: int = Field(0, description="Images whose keypoints vote for a query's candidates (ris.search.votes; built "
                                      "once the keypoints are kept)")  # fmt: skip


class DupeImageOut(ImageOut):
    similarity: float = Field(description="Cosine similarity to the group's representative (1: the representative "
                                          "itself, or a byte-for-byte copy)")  # fmt: skip
    inliers: int | None = Field(description="Agreeing keypoint matches with the representative (verify=true; "
                                             "None: not matched)")  # fmt: skip
    representative: bool
    keep: bool = Field(description="The one image of its group the keep rule keeps")


class DupeGroupOut(BaseModel):
    group: int = Field(description="Its place among all groups (1: the largest)")
    kind: Literal["exact", "near"] = Field(description="exact: every image has one content hash; near: near-duplicates")
    similarity: float = Field(description="The lowest similarity of a member to the representative")
    representative: int = Field(description="The id of the representative (the first image)")
    keep: int = Field(description="The id of the image the keep rule keeps")
    images: list[DupeImageOut]


class DupesPending(BaseModel):
    detail: str
    seconds: float = Field(description="Since the groups were first asked for")


class DuplicatesOut(BaseModel):
    threshold: float = Field(description="The similarity threshold used (the collection's default when none was given)")
    verify: bool
    keep: str
    images: int = Field(description="Images in the collection")
    total: int = Field(description="Groups found (this answer holds those from offset to offset + limit)")
    duplicates: int = Field(description="Images in all groups that the keep rule does not keep")
    offset: int
    limit: int
    seconds: float = Field(description="How long finding the groups took (once per catalogue state, threshold and verify)")
    cached: bool = Field(description="The groups were already found for this state of the collection")
    groups: list[DupeGroupOut]


# --- the collection, owned by one thread -------------------------------------------------------------


class CollectionService:
    """The Collection and its model, opened once; catalogue calls run one at a time on their own thread."""

    def __init__(self, path: Path, weights: str | None, device: str, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.path = path
        self.max_pixels = max_pixels
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
        self._warm()
        self.thumbs = path / "thumbs"
        self.uploads = path / "uploads"
        self.decode_slots = threading.BoundedSemaphore(DECODE_SLOTS)
        self._health: tuple[float, str | None] = (-HEALTH_TTL_S, None)
        self._working, self._working_lock, self._closing = 0, threading.Lock(), threading.Event()
        self.verifier = self.coll.ranker.verifier  # a bad RIS_KEYPOINT_CACHE_MB stops the start here
        if self.coll.manifest.verify and self.verifier.budget:
            threading.Thread(target=self._prepare_keypoints, name="ris-keypoints", daemon=True).start()

    def _warm(self) -> None:
        """Run the model once on every batch size a search sends it (a query; the second look's views), so that no
        early search pays for preparing a new batch shape (~35 ms each on 2 cores; ~0.4 s here, once)."""
        from .search.views import MAX_VIEWS

        for n in range(1, MAX_VIEWS + 1):
            self.extractor(np.zeros((n, self.input_size, self.input_size, 3), np.uint8))

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run fn on the owner thread and wait for it."""
        return self._owner.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self._closing.set()
        self.call(self.coll.close)
        self._owner.shutdown(wait=True)

    @contextmanager
    def working(self) -> Iterator[None]:
        """Marks a search (or a search for duplicates) in progress: keypoints are prepared only while none is."""
        with self._working_lock:
            self._working += 1
        try:
            yield
        finally:
            with self._working_lock:
                self._working -= 1

    def _prepare_keypoints(self) -> None:
        """The keypoints of as many indexed images as RIS_KEYPOINT_CACHE_MB holds, found ahead of searches while none
        runs and with a tenth of the time while they do (ris.search.verify.Verifier.prepare), on every core at the
        lowest CPU priority: an outside query's candidates then cost ~0.5 ms each instead of ~3 (Caltech-101: ~170 MB;
        27-31 s on one core of 2, 15-18 s on both, AMD EPYC)."""
        rows = self._unless_closing(self.call, self.coll.ranker.keypoint_rows) or []
        paths, n = [row.path for row in rows], max(1, self.threads)
        others = [threading.Thread(target=self._prepare_part, args=(paths[i::n],), name=f"ris-keypoints-{i}", daemon=True)
                  for i in range(1, min(n, len(paths)))]  # fmt: skip
        for thread in others:
            thread.start()
        self._prepare_part(paths[::n])  # this thread now at the lowest priority, as the votes' build below
        for thread in others:
            thread.join()
        if not self._closing.is_set():
            self._unless_closing(self._build_votes, [(row.id, row.path) for row in rows])

    def _build_votes(self, rows: list[tuple[int, str]]) -> None:
        """The keypoint votes (ris.search.votes) of the kept keypoints, built on this thread alone (~7 s for
        Caltech-101's 4M descriptors): FAISS's OpenMP threads would not share its lowest priority."""
        with faiss_alone():
            self.verifier.vote_for(rows)

    def _prepare_part(self, paths: list[str]) -> None:
        """One thread's share of `_prepare_keypoints`, at the lowest CPU priority."""
        if sys.platform.startswith("linux"):  # elsewhere PRIO_PROCESS would lower the whole server
            with suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        self._unless_closing(self.verifier.prepare, paths, idle=lambda: self._working == 0, stop=self._closing.is_set)

    def _unless_closing(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """fn's result, or None with its error logged, unless the server is closing under it (searches then find
        keypoints as they go)."""
        try:
            return fn(*args, **kwargs)
        except Exception:
            if not self._closing.is_set():
                log.exception("preparing keypoints stopped")
            return None

    # --- searching ---

    def search(self, pixels: np.ndarray, k: int, name: str, verify_with: bytes | None = None) -> SearchResult:
        """Model in the calling thread, PCA and index lookup on the owner thread.

        verify_with: the query file's bytes, for geometric verification of the top results (ris.search.verify) and
        its signature's match (ris.search.copies)."""
        with self.working():
            raw = self.extractor(pixels[None])
            sig = signature.of_pixels(pixels[None]) if verify_with is not None else None
            return self.call(self._lookup, raw, k, name, verify_with, sig)

    def embed(self, images: list[Image.Image], batch: int = 32) -> np.ndarray:
        """The vectors the index compares for these images (as Collection.embed; ris.tools.dupes embeds framed
        pictures' content): the model in the calling thread, the PCA on the owner thread."""
        pixels = np.stack([self.coll.query_pixels(img) for img in images])
        raw = np.concatenate([self.extractor(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
        return self.call(self.coll.reduce, raw)

    def _lookup(self, raw: np.ndarray, k: int, name: str, verify_with: bytes | None = None,
                sig: np.ndarray | None = None) -> SearchResult:  # fmt: skip
        # reduce() reloads PCA and index if another process rewrote them
        queries = None if verify_with is None else [verify_with]
        return self.coll.search_vectors(self.coll.reduce(raw), k, [name], verify_with=queries, signatures=sig)[0]

    # --- reading ---

    def row(self, image_id: int) -> ImageRow:
        row = self.call(self.coll.catalog.rows, [image_id]).get(image_id) if 0 <= image_id <= MAX_ID else None
        if row is None:
            raise HTTPException(404, f"no image with id {image_id} in this collection")
        return row

    def page(self, offset: int, limit: int) -> tuple[dict[str, Any], list[ImageRow]]:
        def read() -> tuple[dict[str, Any], list[ImageRow]]:
            return self.coll.info(), self.coll.catalog.page(offset, limit)

        return self.call(read)

    def count(self) -> int:
        return self.call(lambda: self.coll.catalog.counts()["ok"])

    def search_problem(self) -> str | None:
        """Why a search would fail now (None: it works), from a tiny search re-run at most every HEALTH_TTL_S.

        Loads what a search loads (index, PCA, catalogue rows), so a damaged collection shows here, not
        only as every search failing."""
        checked, problem = self._health
        if time.monotonic() - checked < HEALTH_TTL_S:
            return problem
        try:
            if self.count():
                probe = np.ones((1, self.coll.manifest.raw_dims), np.float32)
                self.call(self._lookup, probe, 1, "<health>")
            problem = None
        except RisError as exc:
            problem = f"search fails: {exc}"
        except Exception:
            log.exception("health probe: search fails")
            problem = "search fails (details in the server's log)"
        self._health = (time.monotonic(), problem)
        return problem

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

        row, new = self.call(add_and_find)
        if new and self.verifier.votes.ready:  # its keypoints vote from now on, as the others'
            self.verifier.votes.add(row.id, self.verifier.keypoints(row.path))
        return row, new

    def add_upload(self, data: bytes, label: str | None, name: str | None = None) -> tuple[ImageRow, bool]:
        """Save an upload under uploads/ and index it; a file this call wrote is removed again if indexing fails."""
        folder = self.uploads / (safe_label(label) or "")
        dest = (folder / f"{hashlib.sha256(data).hexdigest()[:20]}.{_extension(data, name)}").absolute()
        created = not dest.exists()
        if created:
            write_atomic(dest, data)
        try:
            return self.add(dest)
        except BaseException:
            if created and self.call(self.coll.catalog.row_by_path, str(dest)) is None:
                dest.unlink(missing_ok=True)
            raise

    def remove(self, row: ImageRow) -> None:
        self.call(self.coll.remove_ids, [row.id])
        self.verifier.votes.remove([row.id])
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
        jpeg = jpeg_thumbnail(self.decode_stored(row, THUMBNAIL_SIZE))
        try:
            write_atomic(dest, jpeg, durable=False)
        except OSError:
            return jpeg
        return dest

    # --- decoding, within the pixel budget and the decode slots ---

    def decode(self, data: bytes, draft_size: int | None) -> Image.Image:
        """Decode within the pixel budget (413 above it, from the header alone), at most DECODE_SLOTS at a time."""
        check_pixels(data, draft_size, self.max_pixels)
        with self.decode_slots:
            return decode_upload(data, draft_size)

    def query_pixels(self, data: bytes) -> np.ndarray:
        """The model input for uploaded bytes (decoded at reduced scale, as Collection.query_pixels does)."""
        return resize(self.decode(data, self.input_size), self.input_size)

    def verify_image(self, data: bytes) -> Image.Image:
        """The query as geometric verification sees it, shrunk to at most twice verify's working size: held
        while the search waits for the catalogue thread, it must stay small."""
        from .search.verify import MAX_SIDE

        img = self.decode(data, MAX_SIDE)
        factor = max(img.size) // (2 * MAX_SIDE)
        return img.reduce(factor) if factor >= 2 else img

    def decode_stored(self, row: ImageRow, draft_size: int) -> Image.Image:
        """Decode an indexed image's file, if it is still the file indexed (see open_indexed)."""
        fh, size = open_indexed(row)
        with fh:
            if size > MAX_STORED_DECODE_BYTES:
                raise HTTPException(413, f"the file of image {row.id} is too large to decode here ({size:,} bytes)")
            data = fh.read()
        try:
            return self.decode(data, draft_size)
        except HTTPException as exc:
            raise HTTPException(exc.status_code, f"the file of image {row.id}: {exc.detail}") from None


def open_indexed(row: ImageRow) -> tuple[BinaryIO, int]:
    """The file of an indexed image, open at its start (the caller closes it), with its size; only if it is still a
    regular file with the content indexed (its SHA-256 is compared: a symlink or another file put at the
    path since is refused with 409, a missing one is 404). The caller reads the descriptor that was checked,
    so nothing can be swapped in between the check and the read."""
    try:
        fd = os.open(row.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO must not block
    except OSError:
        raise HTTPException(404, f"the file of image {row.id} is gone") from None
    fh = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise HTTPException(409, f"the file of image {row.id} is now not a regular file (run `ris index`)")
        digest = hashlib.sha256()
        for chunk in stream_file(fh):
            digest.update(chunk)
        if row.sha256 is None or digest.hexdigest() != row.sha256:
            raise HTTPException(409, f"the file of image {row.id} changed since it was indexed (run `ris index`)")
        fh.seek(0)
    except BaseException:
        fh.close()
        raise
    return fh, st.st_size


def stream_file(fh: BinaryIO) -> Iterator[bytes]:
    """An open file's bytes in chunks (Starlette iterates this in a worker thread)."""
    while chunk := fh.read(_CHUNK):
        yield chunk


def write_atomic(dest: Path, data: bytes, durable: bool = True) -> None:
    """Write through ris.files.atomic, so concurrent readers never see half a file (mode 0644, as a file copied in
    would be); its folder is made when missing. durable=False for a cache (thumbnails): no fsync."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(dest, data, durable=durable, mode=0o644)


# --- uploads ---------------------------------------------------------------------------------------


def read_upload(file: UploadFile, limit: int) -> bytes:
    """The uploaded bytes, or 413 when over the limit (checked before reading it into memory)."""
    if file.size is not None and file.size > limit:
        raise HTTPException(413, f"upload too large: {file.size:,} bytes (limit {limit:,})")
    data = file.file.read((limit if file.size is None else file.size) + 1)  # read(n) allocates n bytes
    if len(data) > limit:
        raise HTTPException(413, f"upload too large (limit {limit:,} bytes)")
    return data


def decode_upload(data: bytes, draft_size: int | None = None) -> Image.Image:
    """Decode uploaded bytes; failures become 415 (not an image), 413 (bomb) or 400 (corrupt)."""
    try:
        return open_image(data, draft_size=draft_size)
    except DecodeError as exc:
        raise HTTPException(_decode_status(str(exc)), f"cannot use this upload: {exc}") from None


def check_pixels(data: bytes, draft_size: int | None, max_pixels: int) -> None:
    """413 when the image would decode to more than max_pixels (JPEGs at their draft-reduced size).

    Reads the header only (Pillow opens lazily), so a 20 kB PNG of 13000 x 13000 pixels costs nothing.
    What Pillow cannot open is left to the decoder, which says why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))
                width, height = img.size
    except Exception:
        return
    if width * height > max_pixels:
        raise HTTPException(413, f"image too large: {width:,} x {height:,} pixels (the limit is {max_pixels:,})")


def jpeg_thumbnail(img: Image.Image) -> bytes:
    """A JPEG of at most THUMBNAIL_SIZE px a side (img is shrunk in place: callers are done with it)."""
    img.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, optimize=True)
    return buf.getvalue()


def _extension(data: bytes, name: str | None = None) -> str:
    """A file extension for uploaded bytes, from their content; a camera RAW file keeps its own (`.nef`, `.cr3`),
    which Pillow would call a TIFF or nothing."""
    suffix = PurePath(name or "").suffix.lower()
    if suffix in CAMERA_RAW_EXTENSIONS and raw.looks_raw(data):
        return suffix[1:]
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


def image_format(fh: BinaryIO) -> str | None:
    """The format by content (header only), as the decoder sees it; MPO (a JPEG with previews) is JPEG."""
    try:
        with Image.open(fh) as img:
            return "JPEG" if img.format == "MPO" else img.format
    except Exception:
        return None


def safe_label(label: str | None) -> str | None:
    """A folder name made of safe characters only (labels come from folder names)."""
    if not label:
        return None
    cleaned = "".join(c if c.isalnum() or c in "-_" else "_" for c in label.strip())[:64].strip("_")
    return cleaned or None


class BodyGuard:
    """Bound a request body by size and time before the app parses it.

    A declared Content-Length far over the upload limit is refused at once (413; the body is first read
    and dropped, up to a cap, so the client gets to read the answer instead of a reset). A body that
    arrives (chunked, or under a false length) past the limit, or not within `timeout` seconds in all,
    is cut off: 413 or 408, and the connection closes.
    """

    def __init__(self, app: ASGIApp, limit: int, timeout: float):
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.limit + _MULTIPART_SLACK:
            if int(declared) <= _DRAIN_FACTOR * self.limit:
                with anyio.move_on_after(self.timeout):
                    while (await receive()).get("more_body"):
                        pass
            detail = f"upload too large: {int(declared):,} bytes (limit {self.limit:,})"
            await JSONResponse({"detail": detail}, 413, headers={"Connection": "close"})(scope, receive, send)
            return
        deadline = anyio.current_time() + self.timeout
        received, complete = 0, False

        async def guarded() -> Message:
            nonlocal received, complete
            if complete:  # after the body: disconnect notices, no deadline
                return await receive()
            with anyio.move_on_after(deadline - anyio.current_time()):
                message = await receive()
                received += len(message.get("body", b""))
                complete = not message.get("more_body") or message["type"] != "http.request"
                if received > self.limit + _MULTIPART_SLACK:
                    raise HTTPException(413, f"upload too large (limit {self.limit:,} bytes)", headers={"Connection": "close"})
                return message
            raise HTTPException(408, f"the request body did not arrive within {self.timeout:g} s",
                                headers={"Connection": "close"})  # fmt: skip

        await self.app(scope, guarded, send)


class SameOriginWrites:
    """Refuse requests that change or cost something (anything but GET/HEAD/OPTIONS) when a browser sends
    them from another site: CORS hides the answer from the other page, but a simple form POST is still
    processed. Browsers say where a request comes from (Sec-Fetch-Site, Origin); clients that are not
    browsers send neither and pass. `allowed_origins` ("http://host:port") are let through.
    """

    def __init__(self, app: ASGIApp, allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS and not self._allowed(Headers(scope=scope)):
            detail = "cross-origin request refused (start the server with --allow-origin to allow a site)"
            await JSONResponse({"detail": detail}, 403)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, headers: Headers) -> bool:
        origin, site = headers.get("origin"), headers.get("sec-fetch-site")
        if origin is not None and origin.lower() in self.allowed:
            return True
        if site is not None and site not in ("same-origin", "none"):
            return False
        return origin is None or urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


class ErrorsAsJson:
    """An unexpected error becomes a one-line JSON 500 that names no internals (the traceback goes to the
    server's log under a reference the answer quotes), and stops here: an exception reaching uvicorn
    closes the connection, so the client's next request on it would fail too."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            ref = secrets.token_hex(4)
            log.exception("internal error %s in %s %s", ref, scope["method"], scope["path"])
            if started:  # half an answer sent: closing is all that is left
                raise
            detail = f"internal error (reference {ref}; the details are in the server's log)"
            await JSONResponse({"detail": detail}, 500)(scope, receive, send)


def _host_name(name: str) -> str:
    """A Host allow-list entry as TrustedHostMiddleware matches it: a name without port, an IPv6 address in
    brackets, '*' or '*.domain'; anything else is the user's mistake, said in one line."""
    name = name.strip().lower()
    with suppress(ValueError):
        if ipaddress.ip_address(name).version == 6:
            name = f"[{name}]"
    wildcard = name == "*" or (name.startswith("*.") and "*" not in name[1:])
    if not name or ("*" in name and not wildcard) or (":" in name and not name.startswith("[")):
        raise RisError(f"--allow-host {name!r}: give a host name or address without a port, '*' or '*.domain'")
    return name


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Host header names to accept: loopback names, the bound address, and extra ('*' accepts any).

    Bound to every interface, the machine's own names are added too."""
    names = [*LOOPBACK_HOSTS, *map(_host_name, extra)]
    if host in WILDCARD_BINDS:
        names += [socket.gethostname(), socket.getfqdn()]
    elif host not in LOOPBACK:
        names.append(f"[{host}]" if ":" in host else host)
    return list(dict.fromkeys(n.lower() for n in names if n))


# --- duplicates, found off the event loop and the catalogue thread -----------------------------------

#: Results of the duplicate search kept (one per catalogue state, threshold and verify), most recent last.
DUPES_CACHED = 8
#: A request for groups still being found waits this long, then answers 202 (ask again): the keypoint check of a
#: large collection takes minutes (3,000 Caltech images: 250 CPU-seconds, 12 minutes on 2 busy cores; the grouping
#: alone 2 s), longer than a request should stay open.
DUPES_WAIT_S = 10.0
KeepRule = Literal[dupes.KEEP_RULES]  # "largest", "newest", "first"

DUPES_THRESHOLD = ("Cosine similarity at or above which images count as near-duplicates (default: the collection's, "
                   "0.88 with PCA, 0.80 on raw features)")  # fmt: skip
DUPES_VERIFY = ("Judge each candidate pair by its keypoints too, as `ris dupes` does by default: copies below the "
                "threshold (rotated, cropped, framed) are found, look-alike photos above it dropped; minutes on a large "
                "collection")  # fmt: skip
DUPES_KEEP = ("Which image of each group to keep: largest (most pixels, then bytes), newest (modification time) "
              "or first (by path)")  # fmt: skip


@dataclass(frozen=True)
class FrozenCollection:
    """What ris.tools.dupes reads of a collection (every image's row and vector, read once on the catalogue
    thread, and a way to embed a framed picture's content), so the grouping can take its seconds on another
    thread without touching SQLite or the index."""

    rows: list[ImageRow]
    matrix: np.ndarray
    embed: Callable[[list[Image.Image]], np.ndarray]

    def vectors(self) -> tuple[list[ImageRow], np.ndarray]:
        return self.rows, self.matrix


@dataclass(frozen=True)
class DupesFound:
    groups: list[dupes.DupeGroup]
    images: int
    threshold: float
    verify: bool
    seconds: float


class DupesFinder:
    """`ris dupes` for the server: the groups are found on one thread of their own (seconds on a large
    collection, and keypoint verification reads files), while searches go on; each result is kept per
    (catalogue state, threshold, verify), so paging, changing the keep rule and repeating a request
    cost nothing, and requests asking for a result still being computed wait for that one."""

    def __init__(self, service: CollectionService):
        self.service = service
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ris-dupes")
        self._found: OrderedDict[tuple, tuple[Future[DupesFound], float]] = OrderedDict()  # and when it was asked for
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def find(
        self, threshold: float | None, verify: bool, wait: float | None = None
    ) -> tuple[DupesFound | None, bool, float]:
        """(the groups at this threshold (None: the collection's default), whether they were known already, seconds
        since they were asked for); the groups are None when they take longer than `wait` seconds (None: no limit)
        to find, and the computation goes on for the next request."""
        state, threshold = await anyio.to_thread.run_sync(self.service.call, self._state, threshold)
        key = (state, round(threshold, 6), verify)
        with self._lock:
            future, asked = self._found.get(key, (None, 0.0))
            cached = future is not None and future.done() and future.exception() is None
            if future is None or (future.done() and future.exception() is not None):
                future, asked = self._found[key] = (self._pool.submit(self._compute, threshold, verify), time.monotonic())
                while len(self._found) > DUPES_CACHED:
                    self._found.popitem(last=False)
            self._found.move_to_end(key)
        try:  # shielded: a client that goes away (or stops waiting) must not cancel what other requests wait for
            found = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), wait)
        except asyncio.TimeoutError:
            return None, False, time.monotonic() - asked
        return found, cached, time.monotonic() - asked

    def _state(self, threshold: float | None) -> tuple[tuple, float]:
        """(what identifies the catalogue's searchable images and their vectors, the threshold to use)."""
        catalog = self.service.coll.catalog
        images = catalog.db.execute(
            "SELECT COUNT(*), COALESCE(MAX(id), 0), COALESCE(SUM(id), 0), COALESCE(SUM(hkey & 4294967295), 0) "
            "FROM images WHERE status = 'ok'").fetchone()  # fmt: skip
        state = (tuple(images), catalog.meta("derived"), catalog.meta("vectors"))
        return state, dupes.default_threshold(self.service.coll) if threshold is None else threshold

    def _compute(self, threshold: float, verify: bool) -> DupesFound:
        frozen = self.service.call(self._freeze)
        start = time.perf_counter()
        with self.service.working():
            groups = dupes.find_duplicates(frozen, threshold, verify=verify)
        return DupesFound(groups, len(frozen.rows), threshold, verify, round(time.perf_counter() - start, 3))

    def _freeze(self) -> FrozenCollection:
        if not self.service.coll.catalog.counts()["ok"]:  # nothing searchable yet: no groups, not an error
            return FrozenCollection([], np.zeros((0, 1), np.float32), self.service.embed)
        return FrozenCollection(*self.service.coll.vectors(), self.service.embed)


def kept_paths(groups: list[dupes.DupeGroup], keep: str) -> list[str]:
    """The path each group's keep rule keeps (ris.tools.dupes.to_delete's choice; it reads image headers)."""
    return [next(kept for _, kept in dupes.to_delete([g], keep)) for g in groups]


def _dupes_out(found: DupesFound, cached: bool, keep: str, offset: int, limit: int) -> dict[str, Any]:
    page = found.groups[offset : offset + limit]
    out = []
    for n, (g, kept) in enumerate(zip(page, kept_paths(page, keep), strict=True), offset + 1):
        images = [{**_image_out(r), "similarity": s, "inliers": i, "representative": r is g.images[0], "keep": r.path == kept}
                  for r, s, i in zip(g.images, g.scores, g.inliers or [None] * len(g.images), strict=True)]  # fmt: skip
        out.append({"group": n, "kind": g.kind, "similarity": g.similarity, "representative": g.images[0].id,
                    "keep": next(r.id for r in g.images if r.path == kept), "images": images})  # fmt: skip
    return {"threshold": found.threshold, "verify": found.verify, "keep": keep, "images": found.images,
            "total": len(found.groups), "duplicates": sum(len(g.images) - 1 for g in found.groups), "offset": offset,
            "limit": limit, "seconds": found.seconds, "cached": cached, "groups": out}  # fmt: skip


# --- the app ---------------------------------------------------------------------------------------


def _links(image_id: int) -> dict[str, str]:
    return {"thumbnail": f"/api/images/{image_id}/thumbnail", "image": f"/api/images/{image_id}"}


def _match_out(m: Match) -> dict[str, Any]:
    return {**m.as_json(), "path": displayed(m.path), "label": displayed(m.label), "id": m.id, **_links(m.id)}


def _search_out(result: SearchResult) -> dict[str, Any]:
    return {"query": result.query, "matches": [_match_out(m) for m in result.matches]}


def _image_out(row: ImageRow) -> dict[str, Any]:
    return {"id": row.id, "label": displayed(row.label), "path": displayed(row.path), **_links(row.id)}


def create_app(
    collection_path: str | os.PathLike,
    token: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    max_upload_bytes: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    hosts: list[str] | None = None,
    allow_origins: tuple[str, ...] = (),
    body_timeout: float = BODY_TIMEOUT_S,
    dupes_wait: float = DUPES_WAIT_S,
) -> FastAPI:
    """The app over one collection; opens it and loads its model now, so startup fails fast.

    hosts: the Host header names accepted (default: loopback names; see allowed_hosts); allow_origins:
    sites whose pages may POST and DELETE here (default: none but this server's own pages); dupes_wait: how long
    GET /api/duplicates waits for groups still being found before answering 202. max_upload_bytes: larger uploads
    get 413; by default the file cap `ris index` reads under (RIS_MAX_FILE_MB, 100 MB), so that a camera's RAW
    file of 25-60 MB is searched from the page as it is indexed (the decoded pixels have their own cap)."""
    max_upload_bytes = max_file_bytes() if max_upload_bytes is None else max_upload_bytes
    service = CollectionService(Path(collection_path), weights, device, max_pixels)
    dupes_finder = DupesFinder(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        dupes_finder.close()
        service.close()

    app = FastAPIOffline(  # FastAPI whose /docs and /redoc assets are served locally, not from a CDN
        title="ris",
        version=__version__,
        description="Reverse image search over one collection: upload an image, get the most similar ones.",
        lifespan=lifespan,
    )
    app.state.service = service
    # innermost first: the body guard sees only requests the host and origin checks let through
    app.add_middleware(BodyGuard, limit=max_upload_bytes, timeout=body_timeout)
    app.add_middleware(SameOriginWrites, allowed_origins=allow_origins)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts or list(LOOPBACK_HOSTS), www_redirect=False)
    app.add_middleware(ErrorsAsJson)

    @app.exception_handler(RisError)
    def ris_error(request: Any, exc: RisError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 409 if isinstance(exc, CollectionLocked) else 400)

    def require_token(credentials: Bearer) -> None:
        """403 when the server has no token (read-only); 401 unless the request carries the right one.

        Declared as HTTP bearer security, so /docs has an Authorize button that sends it."""
        if not token:
            raise HTTPException(403, "adding and removing images is disabled (start the server with --token)")
        given = credentials.credentials.strip() if credentials else ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong token", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/api/health", response_model=HealthOut, tags=["info"], responses={503: {"model": HealthOut}})
    def health() -> JSONResponse:
        """Status "ok" when a search works (a tiny one is run, at most every few seconds); 503 with the reason if not."""
        problem = service.search_problem()
        try:
            images = service.count()
        except Exception:  # the probe is cached: the catalogue may have broken since
            log.exception("health: the catalogue cannot be read")
            images, problem = 0, problem or "the catalogue cannot be read (details in the server's log)"
        body = {"status": "error" if problem else "ok", "images": images, "version": __version__, "detail": problem,
                "keypoints": service.verifier.cached(), "voted": service.verifier.votes.images}  # fmt: skip
        return JSONResponse(body, 503 if problem else 200)

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
        preview: Annotated[bool, Form(description="Also send the query back as a JPEG thumbnail (`preview`)")] = False,
    ) -> dict[str, Any]:
        """The k indexed images most similar to the uploaded one (the fields of `ris search --json`, plus links)."""
        data = read_upload(file, max_upload_bytes)
        pixels = service.query_pixels(data)
        verify = service.coll.manifest.verify if verify is None else verify
        query = service.verify_image(data) if verify else None
        out = _search_out(service.search(pixels, k, file.filename or "<upload>", query))
        if preview:  # a copy of the decoded query where there is one (~1 ms): jpeg_thumbnail shrinks what it gets
            shown = query.copy() if query is not None else service.decode(data, THUMBNAIL_SIZE)
            out["preview"] = "data:image/jpeg;base64," + base64.b64encode(jpeg_thumbnail(shown)).decode("ascii")
        return out

    @app.get("/api/search", response_model=SearchOut, tags=["search"], responses=NOT_FOUND)
    def search_by_id(
        id: Annotated[int, Query(description="An image id of this collection")],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 5,
        exclude_self: Annotated[
            bool, Query(description="Leave the image itself out of its results (it would be its own #1)")
        ] = False,
    ) -> dict[str, Any]:
        """More like this: search with an indexed image's own file."""
        row = service.row(id)
        pixels = resize(service.decode_stored(row, service.input_size), service.input_size)
        result = service.search(pixels, k + exclude_self, row.path)
        if exclude_self:
            others = [m for m in result.matches if m.id != id][:k]
            result = SearchResult(result.query, [replace(m, rank=rank) for rank, m in enumerate(others, 1)])
        return _search_out(result)

    @app.get("/api/images/{image_id}", tags=["images"], response_class=FileResponse, responses=NOT_FOUND)
    def get_image(image_id: int) -> StreamingResponse:
        """The original file of an indexed image, with its content type; only while it is the file indexed."""
        fh, size = open_indexed(service.row(image_id))
        media = Image.MIME.get(image_format(fh) or "", "application/octet-stream")
        fh.seek(0)

        def chunks() -> Iterator[bytes]:
            with fh:  # closed when the stream ends, or the client goes
                yield from stream_file(fh)

        headers = {"Content-Length": str(size), "X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=60"}
        return StreamingResponse(chunks(), media_type=media, headers=headers)

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
        service.decode(data, service.input_size)  # refuse what search would refuse, before anything is written
        row, added = service.add_upload(data, label, file.filename)
        return {**_image_out(row), "added": added}

    @app.delete("/api/images/{image_id}", tags=["images"], dependencies=[Depends(require_token)],
                responses={**AUTH_ERRORS, **NOT_FOUND})  # fmt: skip
    def remove_image(image_id: int) -> dict[str, Any]:
        """Drop an image from the collection (files under uploads/ are deleted too; needs the token)."""
        row = service.row(image_id)
        service.remove(row)
        return {"removed": image_id, "path": displayed(row.path)}

    pending = {202: {"model": DupesPending, "description": "Still finding the groups: ask again (see Retry-After)"}}

    @app.get("/api/duplicates", response_model=DuplicatesOut, tags=["duplicates"], responses=pending)
    async def duplicates(
        threshold: Annotated[float | None, Query(gt=0, le=1, description=DUPES_THRESHOLD)] = None,
        verify: Annotated[bool, Query(description=DUPES_VERIFY)] = False,
        keep: Annotated[KeepRule, Query(description=DUPES_KEEP)] = "largest",
        offset: Annotated[int, Query(ge=0, description="Groups to skip")] = 0,
        limit: Annotated[int, Query(ge=1, le=100, description="Groups to return")] = 20,
    ) -> dict[str, Any]:
        """Groups of exact copies and near-duplicates, largest first, as `ris dupes --json` finds them: each
        group's representative first, then the others by similarity to it. Nothing is deleted: `keep` only
        marks which image of each group a `ris dupes --keep` rule would keep.

        The first request for a state of the collection, threshold and verify finds every group (seconds on
        a large collection, on a thread of its own: searches go on meanwhile); later pages and keep rules
        reuse that result until the collection changes. When finding them takes longer than a few seconds (the
        keypoint check of a large collection: minutes) the answer is 202: ask again, the search goes on."""
        found, cached, seconds = await dupes_finder.find(threshold, verify, dupes_wait)
        if found is None:
            return JSONResponse({"detail": "still finding the groups: ask again", "seconds": round(seconds, 1)}, 202,
                                headers={"Retry-After": "1"})  # fmt: skip
        return await anyio.to_thread.run_sync(_dupes_out, found, cached, keep, offset, limit)

    @app.get("/api/duplicates/list", tags=["duplicates"], response_class=PlainTextResponse)
    async def duplicates_list(
        threshold: Annotated[float | None, Query(gt=0, le=1, description=DUPES_THRESHOLD)] = None,
        verify: Annotated[bool, Query(description=DUPES_VERIFY)] = False,
        keep: Annotated[KeepRule, Query(description=DUPES_KEEP)] = "largest",
    ) -> PlainTextResponse:
        """Every image the keep rule would not keep, one a line, then a tab and the image kept in its place: what
        `ris dupes --keep` prints, as a download, for review. Nothing is deleted."""
        found, _, _ = await dupes_finder.find(threshold, verify)
        assert found is not None  # no time limit given

        def listing() -> str:
            return "".join(f"{displayed(path)}\t{displayed(kept)}\n" for path, kept in dupes.to_delete(found.groups, keep))

        text = await anyio.to_thread.run_sync(listing)
        name = f"duplicates-{keep}-{found.threshold:g}.tsv"
        return PlainTextResponse(text, media_type="text/tab-separated-values",
                                 headers={"Content-Disposition": f'attachment; filename="{name}"'})  # fmt: skip

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

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", timeout_keep_alive=KEEP_ALIVE_S)
    server = uvicorn.Server(config)
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


def exposure_notes(host: str, hosts: list[str] | tuple[str, ...], token: bool) -> list[str]:
    """What a server bound beyond loopback exposes, and to which Host names it answers."""
    if host in LOOPBACK:
        return []
    notes = [f"warning: listening on {host}: anyone who can reach this machine can search"
             f"{' (and, with the token, change)' if token else ''} this collection"]  # fmt: skip
    if "*" not in hosts:
        notes.append(f"note: requests are answered for the host names {', '.join(hosts)}; add others with --allow-host")
    return notes


def run(
    collection: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    weights: str | None = None,
    device: str = "auto",
    max_upload_bytes: int | None = None,
    allow_hosts: tuple[str, ...] = (),
    allow_origins: tuple[str, ...] = (),
    say: Callable[[str], object] = lambda line: None,
) -> None:
    """Serve until interrupted. The collection and model load before the port opens; `say` gets the lines the
    person starting it must read (exposure_notes) once they have."""
    import uvicorn

    hosts = allowed_hosts(host, allow_hosts)
    app = create_app(collection, token=token, weights=weights, device=device, max_upload_bytes=max_upload_bytes,
                     hosts=hosts, allow_origins=allow_origins)  # fmt: skip
    for line in exposure_notes(host, hosts, token is not None):
        say(line)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5, timeout_keep_alive=KEEP_ALIVE_S)
