"""The catalogue: one SQLite file for every image's state, and one append-only file for their vectors.

SQLite is the source of truth. Each extracted batch is one transaction (image rows and the count of
vector rows they may use), so a run killed at any moment resumes at the last committed batch and never
shows half-written rows. WAL mode lets readers search while a writer indexes.

What a collection keeps per image is compact (format 2): not the model's wide raw features (grid3:
11,520 float16 = 23 KB an image in format 1) but one *stored vector* per distinct content, bfloat16, in
`vectors.<generation>.bf16` — fixed-width rows addressed by the `slot` an image row names:
- while the collection is small, the raw features themselves (at most `reduce.FIT_SAMPLE` of them, so
  at most ~47 MB for grid3), which PCA is fitted on and small collections are searched with;
- once it holds more, their projection onto the top `reduce.PROJECTED_DIMS` principal axes of those
  first raw features (`reduce.Projection`, kept in the `projection` table: the catalogue alone can
  reduce a query). PCA (re)fits and every derived file are computed from these; nothing is re-extracted.

Beside it, `signatures.<generation>.u8` keeps each content's signature (ris.images.signature: 256 bytes of
16 x 16 grey levels, for finding heavily edited copies) at the same slot; a row of zeros, or one past the end
of that file, is a content stored before signatures were kept (or injected without one): it has none.

Vector rows are written before the transaction that makes image rows point at them: rows past the
committed count (`meta.slots`) are leftovers of a crash and are overwritten by the next writer. Rows of
removed images stay until `rewrite` (ris reindex) compacts the file into the next generation.
"""

from __future__ import annotations

import fnmatch
import os
import sqlite3
import threading
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RisError
from ..files.sources import SourceFile
from ..images import signature

SCHEMA_VERSION = 2
#: Stored vectors are bfloat16 (float32's top 16 bits, rounded to nearest even), kept as uint16: 2 bytes a
#: value like float16, but converted by integer shifts (numpy's float16 casts ran ~18 ns a value on the writer
#: thread, a third of a commit's time, and float16 subnormals ~23x slower still), with float32's range (no
#: flush of GeM's ~1e-6 dark cells). Its 8-bit mantissa (relative error <= 2^-9) is plenty for vectors only
#: re-read to fit PCA, rebuild derived files and re-score candidates.
STORED_DTYPE = np.uint16
#: meta keys: the largest image id ever given (ids are never reused); the vector file's name, row width
#: and committed row count.
LAST_ID, VECTORS, WIDTH, SLOTS = "last_id", "vectors", "width", "slots"


def as_stored(vectors: Iterable[np.ndarray] | np.ndarray, dims: int = 0) -> np.ndarray:
    """Vectors as the catalogue keeps them: bfloat16 bits (uint16), rounded to nearest even."""
    x = np.ascontiguousarray(vectors if isinstance(vectors, np.ndarray) else list(vectors), dtype=np.float32)
    if not x.size:
        return np.zeros((len(x), dims), STORED_DTYPE)
    bits = x.view(np.uint32)
    return ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(STORED_DTYPE)


def from_stored(stored: np.ndarray) -> np.ndarray:
    """float32 vectors from stored bfloat16 bits (one new array: in this VM a fresh page costs ~7 us to fault in,
    and a cast then a shift faulted in two: 2,048 x 11,520 rows 0.33 -> 0.02 s)."""
    stored = np.asarray(stored)
    out = np.empty(stored.shape, np.uint32)
    return np.left_shift(stored, np.uint32(16), out=out, dtype=np.uint32).view(np.float32)


def hash_key(sha256: str) -> int:
    """The indexed part of a content hash: its first 8 bytes as a signed 64-bit integer (an index of
    integers is a third the size of one of 64-character strings, and cheaper to insert into)."""
    return int.from_bytes(bytes.fromhex(sha256[:16]), "little", signed=True)


#: The content-hash index (dedupe lookups): dropped during a bulk load (`Catalog.bulk`) and made again after it.
HKEY_INDEX = "CREATE INDEX IF NOT EXISTS images_hkey ON images(hkey);"
#: Ids read as one text by `Catalog.ok_ids` (~9 bytes an id: ~9 MB a text; 1M to 20M ids a text ran alike at 10M).
OK_IDS_SPAN = 1_000_000
#: SQLite's page cache per connection (KiB when negative): room for the indexes' pages a batch touches.
CACHE_KIB = 65536

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    hkey INTEGER,
    slot INTEGER,
    label TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'ok', 'skipped')),
    error TEXT,
    seen INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS images_status ON images(status);
{HKEY_INDEX}
CREATE TABLE IF NOT EXISTS projection (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    mean BLOB NOT NULL,
    components BLOB NOT NULL,
    dims INTEGER NOT NULL,
    raw_dims INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class ImageRow:
    id: int
    path: str
    label: str | None
    sha256: str | None


@dataclass(frozen=True)
class SyncReport:
    new: int
    changed: int
    unchanged: int
    removed: int


def to_db(name: str | None) -> str | bytes | None:
    """A path or label as the catalogue stores it: the text itself when it is valid UTF-8 (so older
    catalogues read unchanged), else the file name's raw bytes as a BLOB. Names that are not UTF-8 come
    from os.walk (and argv) with lone surrogates, which SQLite TEXT cannot hold."""
    if name is None:
        return None
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name)
    return name


def from_db(value: str | bytes | None) -> str | None:
    """The inverse of to_db: the name as os functions take it (surrogate escapes for non-UTF-8 bytes)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def displayed(name: str | None) -> str | None:
    """A file name as UTF-8 text (JSON, Arrow) can carry it: bytes that are not UTF-8 (surrogate escapes) shown
    as \\xNN, the way Python prints them. Not reversible: where a name must round-trip, use the image's id."""
    return None if name is None else name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _image_row(row: tuple) -> ImageRow:
    image_id, path, label, sha256 = row
    return ImageRow(image_id, from_db(path), from_db(label), sha256)


def _marks(n: int) -> str:
    """'?, ?, ?' for an IN (...) list of n bound values."""
    return ", ".join("?" * n)


#: Rows per multi-row statement: 3 bound values a row stays under SQLite's oldest cap of 999.
ROWS_PER_STATEMENT = 300


def _rows(n: int, width: int) -> str:
    """'(?, ?), (?, ?)' for a multi-row VALUES of n rows."""
    return ", ".join([f"({_marks(width)})"] * n)


def _flat(rows: Sequence[tuple]) -> list:
    return [value for row in rows for value in row]


def _chunks(items: Sequence, size: int = 900) -> Iterator[Sequence]:
    """SQLite caps the number of bound parameters; IN (...) lists go in slices."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _writable(path: Path) -> bool:
    """Whether SQLite could write here: the file, and its folder (WAL creates -wal and -shm beside it)."""
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that never writes. mode=ro reads a WAL catalogue where its -shm exists or can be made;
    on read-only media neither holds once the writer is gone, and immutable=1 reads the file as it is
    (nobody can be writing to it there)."""
    uri = "file:" + urllib.parse.quote(os.fsencode(os.path.abspath(path)))
    conn = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=30, check_same_thread=False)
    try:
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        conn.close()
        conn = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=30, check_same_thread=False)
    conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")  # a search's row lookups: interior pages stay at hand
    return conn


def runs(sorted_slots: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) positions of each run of consecutive slots in an ascending array: one read or write each."""
    cuts = (np.flatnonzero(np.diff(sorted_slots) != 1) + 1).tolist()
    return list(zip([0, *cuts], [*cuts, len(sorted_slots)], strict=True))


def as_asked(rows: np.ndarray, unique: np.ndarray, asked: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Rows read for `unique` (np.unique of `asked`) in the order asked: the rows themselves when `asked` came sorted
    without repeats (no second copy of every row: fresh pages cost ~7 us each to fault in here)."""
    if len(unique) == len(asked) and (unique == asked).all():
        return rows
    return rows[inverse.reshape(-1)]


class VectorFile:
    """Fixed-width bfloat16 rows in one file, appended by the one writer, read by anyone with positioned reads.

    Reads are pread calls (one per run of consecutive slots), not a memory map: a search re-scores a few
    hundred rows scattered over a file of gigabytes, and mapped pages (with the kernel's fault-around) stayed in
    the process's resident set (10M images: 18.9 GB peak RSS), where read pages are only the kernel's cache.
    The descriptor is opened once and kept, so a reader keeps reading a generation that a rewrite has unlinked.
    """

    dtype: np.dtype = np.dtype(STORED_DTYPE)

    def __init__(self, path: Path, width: int):
        self.path, self.width = path, width
        self.row_bytes = width * self.dtype.itemsize
        self._fd: int | None = None
        self._guard = threading.Lock()

    def decode(self, rows: np.ndarray) -> np.ndarray:
        return from_stored(rows)

    def count(self) -> int:
        """Whole rows in the file (0 when it does not exist)."""
        try:
            return os.stat(self.path).st_size // self.row_bytes
        except FileNotFoundError:
            return 0

    def _reader(self) -> int:
        with self._guard:
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY)
                except FileNotFoundError:
                    raise RisError(f"{self.path} is missing: the catalogue's vectors are gone") from None
                weakref.finalize(self, os.close, self._fd)
            return self._fd

    def write(self, slot: int, rows: np.ndarray) -> None:
        """Rows at `slot` onwards (the writer's end of file; leftovers of a crash are overwritten)."""
        data = np.ascontiguousarray(rows)
        if data.dtype != self.dtype or data.shape[1:] != (self.width,):
            raise RisError(f"vectors of width {data.shape[1:]} for a catalogue of width {self.width}")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            view, offset = memoryview(data).cast("B"), slot * self.row_bytes  # no copy of the rows
            while len(view):  # a write may stop short (Linux: 2 GiB at most a call)
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)

    def read(self, slots: np.ndarray) -> np.ndarray:
        """float32 rows of these slots, in the order given (repeats allowed)."""
        slots = np.asarray(slots, dtype=np.int64)
        if not len(slots):
            return self.decode(np.zeros((0, self.width), self.dtype))
        unique, inverse = np.unique(slots, return_inverse=True)
        rows = np.empty((len(unique), self.width), self.dtype)
        fd = self._reader()
        have = os.fstat(fd).st_size // self.row_bytes
        if have <= unique[-1]:
            raise RisError(f"{self.path} is damaged: it holds {have} vectors, the catalogue uses {int(unique[-1]) + 1}")
        whole, rb = memoryview(rows).cast("B"), self.row_bytes  # one view, sliced: a search reads ~180 single rows
        for lo, hi in runs(unique):  # each run of consecutive slots: one read
            view, offset = whole[lo * rb : hi * rb], int(unique[lo]) * rb
            while len(view):  # a read may return short (Linux: 2 GiB at most a call)
                got = os.preadv(fd, [view], offset)
                if not got:  # cut short since its size was read
                    raise RisError(f"{self.path} is damaged: it ends inside vector {offset // rb}")
                view, offset = view[got:], offset + got
        return self.decode(as_asked(rows, unique, slots, inverse))

    def read_or_zeros(self, slots: np.ndarray) -> np.ndarray:
        """`read`, with rows of zeros for slots past the end of the file (or all, when there is none): files that
        may lag the catalogue (signatures, kept reduced vectors) read those as missing."""
        slots = np.asarray(slots, np.int64)
        inside = slots < self.count()
        found = self.read(slots[inside])
        out = np.zeros((len(slots), self.width), found.dtype)
        out[inside] = found
        return out

    def sync(self) -> None:
        if self.path.exists():
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class SignatureFile(VectorFile):
    """`signatures.G.u8`: each stored content's signature at its vector's slot (uint8 rows, read as they are)."""

    dtype = np.dtype(np.uint8)

    def decode(self, rows: np.ndarray) -> np.ndarray:
        return rows


def signature_name(vectors_name: str) -> str:
    """The signature file that goes with a vector file (`vectors.3.bf16` -> `signatures.3.u8`)."""
    return f"signatures.{vectors_name.split('.')[1]}.u8"


class Catalog:
    """A typed wrapper over the collection's SQLite file, its vector file and its signature file."""

    def __init__(self, path: Path, readonly: bool = False):
        """readonly: never write (nor create the schema); also chosen when the file or its folder cannot be
        written (a read-only mount, a shared copy): such a collection is searched, not changed."""
        self.path, self.readonly = path, readonly or not _writable(path)
        self._local = threading.local()
        self._opened: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._guard = threading.Lock()
        self._file: VectorFile | None = None
        self._signatures: SignatureFile | None = None
        self._end: int | None = None  # the writer's next free slot (this process only)
        try:
            version = int(self.meta("schema_version") or 0) if self._has_meta() else 0
            if version > SCHEMA_VERSION:
                raise RisError(f"{path} was written by a newer ris (schema {version}); upgrade ris to open it")
            if not self.readonly and version == 0:
                with self.db:
                    self.db.executescript(SCHEMA)
                    self._set_meta("schema_version", str(SCHEMA_VERSION))
                version = SCHEMA_VERSION
        except sqlite3.DatabaseError as exc:
            raise RisError(f"{path} is not a usable ris catalogue: {exc}") from None
        self.version = version

    def _has_meta(self) -> bool:
        found = self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone()
        return found is not None

    @property
    def db(self) -> sqlite3.Connection:
        """This thread's connection (opened on first use): the extraction's writer thread commits on its
        own connection while the main thread reads on another, as WAL allows."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.readonly:
                conn = _connect_readonly(self.path)
            else:
                conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._local.conn = conn
            with self._guard:  # connections of threads that have ended are closed here (no leak per run)
                for thread, old in self._opened:
                    if not thread.is_alive():
                        old.close()
                self._opened = [(t, c) for t, c in self._opened if t.is_alive()]
                self._opened.append((threading.current_thread(), conn))
        return conn

    def close(self) -> None:
        """Close every thread's connection (each is only ever used by its own thread)."""
        with self._guard:
            for _, conn in self._opened:
                conn.close()
            self._opened.clear()
        self._local = threading.local()

    # --- meta --------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.db:
            self._set_meta(key, value)

    def _set_meta(self, key: str, value: str) -> None:
        """Within the caller's transaction."""
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # --- the vector file -----------------------------------------------------------------------

    @property
    def width(self) -> int:
        """Stored vectors' width (0 while none was ever stored)."""
        return int(self.meta(WIDTH) or 0)

    def vector_file(self) -> VectorFile | None:
        """The current vector file (re-opened when a rewrite moved to another generation)."""
        name = self.meta(VECTORS)
        if name is None:
            return None
        if self._file is None or self._file.path.name != name:
            self._file = VectorFile(self.path.parent / name, self.width)
        return self._file

    def signature_file(self) -> SignatureFile | None:
        """The signature file of the current vector file (None while nothing is stored)."""
        name = self.meta(VECTORS)
        if name is None:
            return None
        if self._signatures is None or self._signatures.path.name != signature_name(name):
            self._signatures = SignatureFile(self.path.parent / signature_name(name), signature.WIDTH)
        return self._signatures

    def _put_signatures(self, slot: int, shas: Sequence[str], signatures: dict[str, np.ndarray] | None) -> None:
        """Signature rows for contents just given vector rows from `slot` on (zeros where none is known, so that a
        crash's leftover row is never taken for a new content's); no file is made for contents that have none."""
        file = self.signature_file()
        assert file is not None
        if not signatures and file.count() <= slot:
            return
        rows = np.zeros((len(shas), signature.WIDTH), np.uint8)
        for n, sha in enumerate(shas):
            if signatures and sha in signatures:
                rows[n] = signatures[sha]
        file.write(slot, rows)

    def signatures(self, ids: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, their signatures: uint8 rows, zeros where none) of these images, or of every indexed one (None);
        ids not indexed are left out."""
        with self.snapshot():
            file = self.signature_file()
            q = "SELECT id, slot FROM images WHERE slot IS NOT NULL AND status = 'ok'"
            found = (self.db.execute(q + " ORDER BY id").fetchall() if ids is None
                     else list(self._select_in(q + " AND id IN ({})", [int(i) for i in ids])))  # fmt: skip
            pairs = np.asarray(found, np.int64).reshape(-1, 2)
            if file is None or not len(pairs):
                return pairs[:, 0], np.zeros((len(pairs), signature.WIDTH), np.uint8)
            return pairs[:, 0], file.read_or_zeros(pairs[:, 1])

    def _writer_file(self, width: int) -> tuple[VectorFile, int]:
        """(the file, the next free slot) for appending rows of `width`; the first write names the file."""
        file = self.vector_file()
        if file is None:
            with self.db:
                self._set_meta(VECTORS, "vectors.1.bf16")
                self._set_meta(WIDTH, str(width))
                self._set_meta(SLOTS, "0")
            file = self.vector_file()
        if self._end is None:
            self._end = int(self.meta(SLOTS) or 0)
        assert file is not None
        return file, self._end

    def used_slots(self) -> int:
        """Rows committed to the vector file (removed images' rows included until a rewrite)."""
        return int(self.meta(SLOTS) or 0)

    def live_slots(self) -> np.ndarray:
        """The slots of the stored vectors some image uses, sorted."""
        q = "SELECT DISTINCT slot FROM images WHERE slot IS NOT NULL AND status = 'ok' ORDER BY slot"
        return np.asarray([r[0] for r in self.db.execute(q)], np.int64)

    def live_vectors(self) -> np.ndarray:
        """Every stored vector some image uses (float32, in slot order): what the projection is fitted on."""
        file = self.vector_file()
        return file.read(self.live_slots()) if file is not None else np.zeros((0, 0), np.float32)

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one committed state (a WAL read transaction): slots and the file they index agree
        even while a writer switches to a rewritten vector file."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    # --- syncing the file list -----------------------------------------------------------------

    def sync(self, files: Sequence[SourceFile], drop_under: Sequence[str] = ()) -> SyncReport:
        """Upsert the scanned files; changed files get a new id (their old vector leaves the index).

        Rows at or below the `drop_under` roots (the folders a resync scanned) whose files were not
        found again are deleted; rows elsewhere are left alone. Only the scanned paths are looked up:
        adding 1% to a collection reads 1% of its rows.
        """
        self._restore_indexes()  # a bulk load that died left the hash index out: the next write brings it back
        existing = self._stat_of([f.path for f in files])
        new, changed, unchanged = [], [], []
        for f in files:
            old = existing.get(f.path)
            if old is None:
                new.append(f)
            elif old != (f.size, f.mtime_ns):
                changed.append(f)
            else:
                unchanged.append(f.path)
        scanned = {f.path for f in files}
        with self.db:
            first = self._next_id()  # before the deletes: a changed file never gets its old id back
            removed = 0
            if drop_under:
                folders = [r for r in drop_under if r not in scanned]  # file roots are in the scan itself
                self.db.executemany("UPDATE images SET seen = 0 WHERE path = ?",
                                    ((to_db(r),) for r in drop_under if r in scanned))  # fmt: skip
                for root in folders:  # compared as bytes: a BLOB (non-UTF-8) path never equals a TEXT prefix
                    prefix = os.fsencode(root.rstrip("/") + "/")
                    self.db.execute("UPDATE images SET seen = 0 WHERE path = ? OR substr(CAST(path AS BLOB), 1, ?) = ?",
                                    (to_db(root), len(prefix), prefix))  # fmt: skip
                kept = unchanged + [f.path for f in changed]
                self.db.executemany("UPDATE images SET seen = 1 WHERE path = ?", ((to_db(p),) for p in kept))
                removed = self.db.execute("DELETE FROM images WHERE seen = 0").rowcount
                self.db.execute("UPDATE images SET seen = 1")
            for chunk in _chunks([f.path for f in changed]):
                self.db.execute(f"DELETE FROM images WHERE path IN ({_marks(len(chunk))})", [to_db(p) for p in chunk])
            rows = [(first + n, to_db(f.path), f.size, f.mtime_ns, to_db(f.label)) for n, f in enumerate(new + changed)]
            self.db.executemany("INSERT INTO images (id, path, size, mtime_ns, label, status) VALUES (?, ?, ?, ?, ?, 'pending')",
                                rows)  # fmt: skip
            if rows:
                self._set_meta(LAST_ID, str(first + len(rows) - 1))
        return SyncReport(len(new), len(changed), len(unchanged), removed)

    def _stat_of(self, paths: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(size, mtime_ns) of the catalogued ones among these paths."""
        rows = self._select_in("SELECT path, size, mtime_ns FROM images WHERE path IN ({})", [to_db(p) for p in paths])
        return {from_db(path): (size, mtime) for path, size, mtime in rows}

    def _select_in(self, query: str, values: Sequence) -> Iterator[tuple]:
        """The rows of `query` for these values (its IN list written `{}`), asked a slice at a time."""
        for chunk in _chunks(values):
            yield from self.db.execute(query.format(_marks(len(chunk))), list(chunk))

    def _next_id(self) -> int:
        """An id above every id ever given (SQLite alone reuses the largest rowid once it is deleted): an id
        names one content for life, so index.faiss and the DBA graph can trust the vectors they hold by id."""
        (largest,) = self.db.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()
        return max(largest, int(self.meta(LAST_ID) or 0)) + 1

    def pending(self) -> list[tuple[int, str]]:
        rows = self.db.execute("SELECT id, path FROM images WHERE status = 'pending' ORDER BY id")
        return [(image_id, from_db(path)) for image_id, path in rows]

    def _slots_of(self, hashes: Sequence[str]) -> dict[str, int]:
        """The stored vector's slot of each of these contents that has one."""
        wanted = set(hashes)
        keys = sorted({hash_key(h) for h in wanted})
        rows = self._select_in("SELECT sha256, slot FROM images WHERE hkey IN ({}) AND slot IS NOT NULL", keys)
        return {sha: slot for sha, slot in rows if sha in wanted}

    def known_hashes(self, hashes: Sequence[str]) -> set[str]:
        return set(self._slots_of(hashes))

    def commit_batch(
        self,
        done: Sequence[tuple[int, str]],
        vectors: dict[str, np.ndarray],
        skipped: Sequence[tuple[int, str]],
        signatures: dict[str, np.ndarray] | None = None,
    ) -> None:
        """One transaction: images marked ok with their hash and their vector's slot, bad files with reasons.

        `vectors` holds the new contents' stored vectors by hash (all of the catalogue's width); the others
        in `done` are contents stored before; `signatures` the new contents' signatures by hash. The new rows
        are written to the vector and signature files first; the transaction then makes them count. One
        multi-row UPDATE ... FROM VALUES per few hundred images:
        the extraction's writer thread runs this while a busy main thread holds the GIL between SQLite steps.
        """
        slots: dict[str, int] = {}
        if vectors:
            stored = as_stored(np.stack(list(vectors.values())))
            file, end = self._writer_file(stored.shape[1])
            file.write(end, stored)
            self._put_signatures(end, list(vectors), signatures)
            slots = {sha: end + n for n, sha in enumerate(vectors)}
            self._end = end + len(stored)
        missing = [sha for _, sha in done if sha not in slots]
        if missing:
            slots.update(self._slots_of(missing))
        ok = [(image_id, sha, hash_key(sha), slots.get(sha)) for image_id, sha in done]
        with self.db:
            for chunk in _chunks(ok, ROWS_PER_STATEMENT // 2):
                self.db.execute(
                    "UPDATE images SET status = 'ok', sha256 = v.column2, hkey = v.column3, slot = v.column4, error = NULL "
                    f"FROM (VALUES {_rows(len(chunk), 4)}) AS v WHERE images.id = v.column1", _flat(chunk),
                )  # fmt: skip
            for chunk in _chunks(list(skipped), ROWS_PER_STATEMENT):
                self.db.execute(
                    f"UPDATE images SET status = 'skipped', error = v.column2 FROM (VALUES {_rows(len(chunk), 2)}) AS v "
                    "WHERE images.id = v.column1", _flat(chunk),
                )  # fmt: skip
            if vectors:
                self._set_meta(SLOTS, str(self._end))

    def insert_done(self, files: Sequence[SourceFile], hashes: Sequence[str], vectors: np.ndarray,
                    signatures: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        """New images whose stored vectors are known already (features injected through the Python API, not
        extracted from files): their rows go in as 'ok' with their vector's slot in one transaction, one write
        a row where sync + commit_batch write each twice (pending, then ok). Returns their ids.

        Every content gets its own vector row (no dedupe lookup: a bulk load runs without the hash index); a
        path already catalogued is an error and nothing of the call is kept. signatures: one row per image
        (ris.images.signature), or none.
        """
        stored = as_stored(vectors)
        if len(stored) != len(files) or len(hashes) != len(files):
            raise RisError(f"{len(files)} files, {len(hashes)} hashes and {len(stored)} vectors: one of each per image")
        file, end = self._writer_file(stored.shape[1])
        file.write(end, stored)
        given = None if signatures is None else dict(zip(hashes, np.asarray(signatures, np.uint8), strict=True))
        self._put_signatures(end, list(hashes), given)
        try:
            with self.db:
                first = self._next_id()
                rows = [(first + n, to_db(f.path), f.size, f.mtime_ns, sha, hash_key(sha), end + n, to_db(f.label))
                        for n, (f, sha) in enumerate(zip(files, hashes, strict=True))]  # fmt: skip
                self.db.executemany("INSERT INTO images (id, path, size, mtime_ns, sha256, hkey, slot, label, status) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'ok')", rows)  # fmt: skip
                self._end = end + len(stored)
                if rows:
                    self._set_meta(LAST_ID, str(first + len(rows) - 1))
                self._set_meta(SLOTS, str(self._end))
        except sqlite3.IntegrityError as exc:
            self._end = None  # re-read from the catalogue: the rows written above are leftovers
            raise RisError(f"cannot add these images: {exc} (a path already in the collection?)") from None
        return np.arange(first, first + len(rows), dtype=np.int64)

    @contextmanager
    def bulk(self) -> Iterator[None]:
        """A large load (millions of rows): the content-hash index goes meanwhile and is made once at the end, one
        sort instead of a random B-tree insert per image (at 10M images each batch touched a page per image).
        Lookups by hash are full scans meanwhile; if the process dies inside, the next sync makes the index again."""
        with self.db:
            self.db.execute("DROP INDEX IF EXISTS images_hkey")
        try:
            yield
        finally:
            self._restore_indexes()

    def _restore_indexes(self) -> None:
        if self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'images_hkey'").fetchone() is None:
            with self.db:
                self.db.execute(HKEY_INDEX)

    def rewrite(self, transform: Callable[[np.ndarray], np.ndarray] | None = None, width: int | None = None,
                projection: tuple[np.ndarray, np.ndarray] | None = None, block: int = 8192,
                live: tuple[np.ndarray, np.ndarray] | None = None) -> None:  # fmt: skip
        """Copy the live vectors (transformed) into the next generation's file, then switch to it in one
        transaction: a compaction (no transform), or the move to projected vectors (with the projection
        that made them, kept in the catalogue). Readers keep reading the old file until they see the switch.
        `live`: (live slots, their new rows) where the caller has the rows already (nothing is read then)."""
        old = self.vector_file()
        if old is None:
            return
        width = width or old.width
        live, given = live if live is not None else (self.live_slots(), None)
        generation = int(old.path.name.split(".")[1]) + 1
        new = VectorFile(self.path.parent / f"vectors.{generation}.bf16", width)
        old_sigs = self.signature_file()
        new_sigs = SignatureFile(self.path.parent / signature_name(new.path.name), signature.WIDTH)
        for leftover in (new.path, new_sigs.path):  # of a rewrite that crashed before its switch
            leftover.unlink(missing_ok=True)
        for start in range(0, len(live), block):
            if given is not None:
                new.write(start, as_stored(given[start : start + block]))
            else:
                rows = old.read(live[start : start + block])
                new.write(start, as_stored(transform(rows) if transform else rows))
            if old_sigs is not None and old_sigs.count():
                new_sigs.write(start, old_sigs.read_or_zeros(live[start : start + block]))
        new.sync()
        new_sigs.sync()
        with self.db:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS moved (old INTEGER PRIMARY KEY, new INTEGER NOT NULL)")
            self.db.execute("DELETE FROM moved")
            for chunk in _chunks(list(zip(live.tolist(), range(len(live)), strict=True)), ROWS_PER_STATEMENT):
                self.db.execute(f"INSERT INTO moved VALUES {_rows(len(chunk), 2)}", _flat(chunk))
            self.db.execute("UPDATE images SET slot = (SELECT new FROM moved WHERE old = images.slot) WHERE slot IS NOT NULL")
            self.db.execute("UPDATE images SET slot = NULL, status = 'pending' WHERE slot IS NULL AND status = 'ok'")
            if projection is not None:
                self._set_projection(*projection)
            self._set_meta(VECTORS, new.path.name)
            self._set_meta(WIDTH, str(width))
            self._set_meta(SLOTS, str(len(live)))
        self._end, self._file = len(live), None
        old.path.unlink(missing_ok=True)  # readers that opened it keep reading it until they drop it
        if old_sigs is not None:
            old_sigs.path.unlink(missing_ok=True)

    def projection(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean, components) of the stored projection, or None while vectors are raw features."""
        row = self.db.execute("SELECT mean, components, dims, raw_dims FROM projection WHERE id = 1").fetchone()
        if row is None:
            return None
        mean, comps, dims, raw_dims = row
        return np.frombuffer(mean, np.float32).copy(), np.frombuffer(comps, np.float16).astype(np.float32).reshape(dims, raw_dims)

    # --- removing ------------------------------------------------------------------------------

    def remove(self, patterns: Iterable[tuple[str, str]]) -> int:
        """Delete images by (path, glob) pairs: those at or under the path, or when there are none, those the
        glob matches. A name that exists wins over its reading as a glob: "[bold red].jpg" is that file,
        not "b.jpg"."""
        rows = [(i, from_db(p)) for i, p in self.db.execute("SELECT id, path FROM images")]
        doomed: set[int] = set()
        for path, glob in patterns:
            folder = path.rstrip("/") + "/"
            named = [i for i, p in rows if p == path or p.startswith(folder)]
            doomed.update(named or (i for i, p in rows if fnmatch.fnmatchcase(p, glob)))
        return self.remove_ids(sorted(doomed))

    def remove_ids(self, ids: Sequence[int]) -> int:
        with self.db:
            return sum(
                self.db.execute(f"DELETE FROM images WHERE id IN ({_marks(len(chunk))})", list(chunk)).rowcount
                for chunk in _chunks([int(i) for i in ids])
            )

    # --- reading -------------------------------------------------------------------------------

    def ok_ids(self) -> np.ndarray:
        """Ids of every indexed image, ascending: comma-separated texts out of SQLite, not a Python row an id
        (10M images: 1.0-1.2 s instead of 4.6 s, ~9 MB of text at a time instead of ~1 GB of row objects); one
        text per OK_IDS_SPAN ids (SQLite caps a string at 1 GB, ~100M ids)."""
        parts = [np.zeros(0, np.int64)]
        with self.snapshot():
            top = self.db.execute("SELECT max(id) FROM images").fetchone()[0] or 0
            for lo in range(0, top + 1, OK_IDS_SPAN):
                text = self.db.execute("SELECT group_concat(id) FROM images WHERE status = 'ok' AND id >= ? AND id < ?",
                                       (lo, lo + OK_IDS_SPAN)).fetchone()[0]  # fmt: skip
                if text:
                    parts.append(np.fromstring(text, dtype=np.int64, sep=","))
        ids = np.concatenate(parts)
        return ids if (ids[1:] > ids[:-1]).all() else np.sort(ids)

    def vectors(self, ids: Sequence[int]) -> np.ndarray:
        """Stored vectors (float32) of these images, in the order given (repeats allowed; unknown ids: zeros)."""
        ids = np.asarray(ids, dtype=np.int64)
        with self.snapshot():
            file = self.vector_file()
            if file is None or not len(ids):
                return np.zeros((len(ids), file.width if file else 0), dtype=np.float32)
            unique, inverse = np.unique(ids, return_inverse=True)
            slots = np.full(len(unique), -1, np.int64)
            pos = {int(i): n for n, i in enumerate(unique)}
            q = "SELECT id, slot FROM images WHERE slot IS NOT NULL AND status = 'ok' AND id IN ({})"
            for image_id, slot in self._select_in(q, unique.tolist()):
                slots[pos[image_id]] = slot
        have = slots >= 0
        if have.all():  # no zeroed copy to fill (as_asked)
            found = file.read(slots)
        else:
            found = np.zeros((len(unique), file.width), np.float32)
            found[have] = file.read(slots[have])
        return as_asked(found, unique, ids, inverse)

    def rows(self, ids: Iterable[int]) -> dict[int, ImageRow]:
        q = "SELECT id, path, label, sha256 FROM images WHERE status = 'ok' AND id IN ({})"
        return {row[0]: _image_row(row) for row in self._select_in(q, [int(i) for i in ids])}

    def page(self, offset: int, limit: int) -> list[ImageRow]:
        q = "SELECT id, path, label, sha256 FROM images WHERE status = 'ok' ORDER BY id LIMIT ? OFFSET ?"
        return [_image_row(r) for r in self.db.execute(q, (limit, offset))]

    def row_by_path(self, path: str) -> ImageRow | None:
        q = "SELECT id, path, label, sha256 FROM images WHERE status = 'ok' AND path = ?"
        row = self.db.execute(q, (to_db(path),)).fetchone()
        return _image_row(row) if row else None

    def all_rows(self) -> list[ImageRow]:
        q = "SELECT id, path, label, sha256 FROM images WHERE status = 'ok' ORDER BY id"
        return [_image_row(r) for r in self.db.execute(q)]

    def counts(self) -> dict[str, int]:
        counts = {"ok": 0, "pending": 0, "skipped": 0}
        counts.update(dict(self.db.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall()))
        return counts

    def skipped_files(self) -> list[dict[str, str]]:
        q = "SELECT path, error FROM images WHERE status = 'skipped' ORDER BY path"
        return [{"path": from_db(p), "reason": r} for p, r in self.db.execute(q)]

    # --- upgrading older catalogues ----------------------------------------------------------

    def upgrade(self, plan: Callable[[Catalog], tuple[Callable[[np.ndarray], np.ndarray] | None, tuple | None]]) -> None:
        """Bring a format-1 catalogue (every content's raw float16 features in a `features` table) to format 2.

        plan(catalogue) -> (transform, projection): how the raw features are stored (None: as they are; else
        the projection's function and its (mean, components), which the catalogue keeps). It may read
        `old_features` (e.g. a sample to fit the projection on). Then every content gets its stored vector,
        the old table goes, and the file is vacuumed (format 1 kept 23 KB an image for grid3).
        """
        if self.version >= SCHEMA_VERSION:
            return
        with self.db:
            columns = {r[1] for r in self.db.execute("PRAGMA table_info(images)")}
            for column in ("hkey", "slot"):
                if column not in columns:
                    self.db.execute(f"ALTER TABLE images ADD COLUMN {column} INTEGER")
            self.db.execute("DROP INDEX IF EXISTS images_sha256")
            hashed = self.db.execute("SELECT id, sha256 FROM images WHERE sha256 IS NOT NULL").fetchall()
            self.db.executemany("UPDATE images SET hkey = ? WHERE id = ?", ((hash_key(sha), i) for i, sha in hashed))
        self.db.executescript(SCHEMA)  # the new tables and indexes (images keeps its rows)
        with self.db:
            self.db.execute("UPDATE images SET status = 'pending', sha256 = NULL WHERE status = 'ok' AND sha256 NOT IN "
                            "(SELECT sha256 FROM features)")  # fmt: skip
        transform, projection = plan(self)
        shas = self.old_hashes()
        for start in range(0, len(shas), 2048):
            block = shas[start : start + 2048]
            raw = self.old_features(block)
            self._store_contents(block, transform(raw) if transform else raw)
        with self.db:
            if projection is not None:
                self._set_projection(*projection)
            self.db.execute("DROP TABLE IF EXISTS features")
            self._set_meta("schema_version", str(SCHEMA_VERSION))
            self._set_meta(SLOTS, str(self._end or 0))
        self.db.execute("VACUUM")
        self.version = SCHEMA_VERSION

    def old_hashes(self) -> list[str]:
        """Format 1: the contents with features that some indexed image uses."""
        q = "SELECT sha256 FROM features WHERE sha256 IN (SELECT sha256 FROM images WHERE status = 'ok') ORDER BY sha256"
        return [r[0] for r in self.db.execute(q)]

    def old_features(self, shas: Sequence[str]) -> np.ndarray:
        """Format 1: raw float32 features of these contents, in the order given."""
        found = dict(self._select_in("SELECT sha256, vec FROM features WHERE sha256 IN ({})", list(shas)))
        return np.stack([np.frombuffer(found[s], np.float16) for s in shas]).astype(np.float32)  # format 1: float16

    def _store_contents(self, shas: Sequence[str], vectors: np.ndarray) -> None:
        """Append these contents' stored vectors and point every image of each content at its row."""
        stored = as_stored(vectors)
        file, end = self._writer_file(stored.shape[1])
        file.write(end, stored)
        self._end = end + len(stored)
        rows = [(sha, hash_key(sha), end + n) for n, sha in enumerate(shas)]
        with self.db:
            for chunk in _chunks(rows, ROWS_PER_STATEMENT):
                self.db.execute(f"UPDATE images SET slot = v.column3 FROM (VALUES {_rows(len(chunk), 3)}) AS v "
                                "WHERE images.hkey = v.column2 AND images.sha256 = v.column1", _flat(chunk))  # fmt: skip
            self._set_meta(SLOTS, str(self._end))

    def _set_projection(self, mean: np.ndarray, components: np.ndarray) -> None:
        """Within the caller's transaction."""
        self.db.execute(
            "INSERT INTO projection VALUES (1, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET mean = excluded.mean, "
            "components = excluded.components, dims = excluded.dims, raw_dims = excluded.raw_dims",
            (np.asarray(mean, np.float32).tobytes(), np.asarray(components, np.float16).tobytes(), *components.shape),
        )  # fmt: skip
