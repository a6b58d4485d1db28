"""The catalogue: one SQLite file holding every image's state and the raw features.

SQLite is the source of truth. Each extracted batch is committed in one transaction (features and
image rows together), so a run killed at any moment resumes at the last committed batch and never
shows half-written rows. WAL mode lets readers search while a writer indexes.
"""

from __future__ import annotations

import fnmatch
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RisError
from .sources import SourceFile

SCHEMA_VERSION = 1
FEATURE_DTYPE = np.float16  # raw features are only re-read to (re)fit PCA: half precision is plenty
#: Smaller magnitudes are stored as 0: they would be float16 subnormals, whose conversion numpy does in
#: software, 23x slower (GeM features of dark cells are ~1e-6: on an H100 these conversions held the
#: writer thread, and so the whole grid3 extraction, at ~1k img/s). Against features of norm ~1-50 the
#: change is nil (< 6.1e-5 per element).
FEATURE_TINY = np.float32(2.0**-14)
#: meta keys: the largest image id ever given (ids are never reused), and "1" while deletions may have left
#: features no image uses (absent in older catalogues: cleaned once, then tracked).
LAST_ID, ORPHANS = "last_id", "orphans"


def as_stored(vectors: Iterable[np.ndarray] | np.ndarray, dims: int = 0) -> np.ndarray:
    """Raw features as the catalogue keeps them: a float16 matrix, subnormals flushed to zero."""
    x = np.array(vectors if isinstance(vectors, np.ndarray) else list(vectors), dtype=np.float32)  # a copy
    if not x.size:
        return np.zeros((len(x), dims), FEATURE_DTYPE)
    x[np.abs(x) < FEATURE_TINY] = 0
    return x.astype(FEATURE_DTYPE)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT,
    label TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'ok', 'skipped')),
    error TEXT,
    seen INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
CREATE INDEX IF NOT EXISTS images_status ON images(status);
CREATE TABLE IF NOT EXISTS features (sha256 TEXT PRIMARY KEY, vec BLOB NOT NULL);
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
        return conn
    except sqlite3.OperationalError:
        conn.close()
    return sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=30, check_same_thread=False)


class Catalog:
    """A typed wrapper over the collection's SQLite file."""

    def __init__(self, path: Path, readonly: bool = False):
        """readonly: never write (nor create the schema); also chosen when the file or its folder cannot be
        written (a read-only mount, a shared copy): such a collection is searched, not changed."""
        self.path, self.readonly = path, readonly or not _writable(path)
        self._local = threading.local()
        self._opened: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._guard = threading.Lock()
        try:
            if not self.readonly:
                with self.db:
                    self.db.executescript(SCHEMA)
                    self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            version = int(self.meta("schema_version") or 0)
        except sqlite3.DatabaseError as exc:
            raise RisError(f"{path} is not a usable ris catalogue: {exc}") from None
        if version > SCHEMA_VERSION:
            raise RisError(f"{path} was written by a newer ris (schema {version}); upgrade ris to open it")

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

    # --- syncing the file list -----------------------------------------------------------------

    def sync(self, files: Sequence[SourceFile], drop_under: Sequence[str] = ()) -> SyncReport:
        """Upsert the scanned files; changed files get a new id (their old vector leaves the index).

        Rows at or below the `drop_under` roots (the folders a resync scanned) whose files were not
        found again are deleted; rows elsewhere are left alone. Only the scanned paths are looked up:
        adding 1% to a collection reads 1% of its rows.
        """
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
            if removed or changed:
                self._set_meta(ORPHANS, "1")
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

    def known_hashes(self, hashes: Sequence[str]) -> set[str]:
        return {r[0] for r in self._select_in("SELECT sha256 FROM features WHERE sha256 IN ({})", list(set(hashes)))}

    def commit_batch(
        self,
        done: Sequence[tuple[int, str]],
        features: dict[str, np.ndarray],
        skipped: Sequence[tuple[int, str]],
    ) -> None:
        """One transaction: new features, images marked ok with their hash, bad files with reasons.

        Multi-row statements, a few per batch: the extraction's writer thread runs this, and every
        SQLite step releases and re-takes the GIL, which a busy main thread holds. Row by row
        (executemany) 18,000 images took 51 s against a spinning thread; this way 1.4 s (0.4 s idle).
        """
        feats = list(zip(features, (row.tobytes() for row in as_stored(features.values())), strict=True))
        with self.db:
            for chunk in _chunks(feats, ROWS_PER_STATEMENT):
                self.db.execute(f"INSERT OR IGNORE INTO features VALUES {_rows(len(chunk), 2)}", _flat(chunk))
            for status, column, items in (("ok", "sha256", done), ("skipped", "error", skipped)):
                for chunk in _chunks(list(items), ROWS_PER_STATEMENT):
                    cases = " ".join(["WHEN ? THEN ?"] * len(chunk))
                    self.db.execute(
                        f"UPDATE images SET status = '{status}', {column} = CASE id {cases} END"
                        + (", error = NULL" if status == "ok" else "") + f" WHERE id IN ({_marks(len(chunk))})",
                        _flat(chunk) + [image_id for image_id, _ in chunk],
                    )  # fmt: skip

    def drop_orphan_features(self) -> int:
        """Delete features no image uses any more. Only deletions leave such rows, and they flag it (ORPHANS)
        in their own transaction: a write that deleted nothing skips this scan of the whole catalogue."""
        if self.meta(ORPHANS) == "0":
            return 0
        with self.db:
            dropped = self.db.execute(
                "DELETE FROM features WHERE sha256 NOT IN (SELECT sha256 FROM images WHERE sha256 IS NOT NULL)"
            ).rowcount
            self._set_meta(ORPHANS, "0")
        return dropped

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

    # --- reading -------------------------------------------------------------------------------

    def ok_ids(self) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM images WHERE status = 'ok' ORDER BY id").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def features(self, ids: Sequence[int], dim: int) -> np.ndarray:
        """Raw float32 features of these images, in the order given (repeats allowed; unknown ids: zeros)."""
        unique, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        out = np.zeros((len(unique), dim), dtype=np.float32)
        pos = {int(i): n for n, i in enumerate(unique)}
        q = "SELECT images.id, features.vec FROM images JOIN features USING (sha256) WHERE images.id IN ({})"
        for image_id, blob in self._select_in(q, [int(i) for i in unique]):
            out[pos[image_id]] = np.frombuffer(blob, dtype=FEATURE_DTYPE)
        inverse = inverse.reshape(-1)
        if len(inverse) == len(unique) and (inverse == np.arange(len(unique))).all():
            return out  # sorted, no repeats (the usual case): no second copy
        return out[inverse]

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

    def remove_ids(self, ids: Sequence[int]) -> int:
        with self.db:
            removed = sum(
                self.db.execute(f"DELETE FROM images WHERE id IN ({_marks(len(chunk))})", list(chunk)).rowcount
                for chunk in _chunks([int(i) for i in ids])
            )
            if removed:
                self._set_meta(ORPHANS, "1")
        self.drop_orphan_features()
        return removed

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
