"""Find the image files to index: folders walked recursively, or a list file, labels from folders."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .decode import max_file_bytes
from .errors import RisError


@dataclass(frozen=True)
class SourceFile:
    """A candidate file; whether it is an image is decided by its content when decoded."""

    path: str  # absolute, normalised
    size: int
    mtime_ns: int
    label: str | None


def _source(path: str) -> SourceFile | None:
    """The file at this normalised absolute path, or None when it is not a regular file.

    One stat a file, plain strings: a million-file scan is bound by this loop (pathlib and repeated
    stats took 1.0 s for 18,000 files on a GPU host, ahead of a 3 s extraction).
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return None
    return SourceFile(path, st.st_size, st.st_mtime_ns, os.path.basename(os.path.dirname(path)) or None)


def _walk(root: str) -> Iterator[str]:
    """Every regular, non-hidden file below root, in a stable order (sorted per folder).

    Symlinked folders are followed (photo libraries are often assembled from links), each real
    folder once, so a link loop cannot recurse forever.
    """
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in visited:
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield os.path.join(dirpath, name)


def read_list_file(list_file: str | os.PathLike) -> list[str]:
    """Paths from a file with one path per line; blank lines and '#' comments are ignored."""
    try:  # names that are not UTF-8 come through as os.walk gives them (surrogate escapes)
        text = Path(list_file).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise RisError(f"cannot read list file {list_file}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def scan(paths: Iterable[str | os.PathLike]) -> list[SourceFile]:
    """All files under the given folders (or the given files themselves), deduplicated.

    A missing path is an error (the user mistyped), an empty result too: indexing nothing
    would silently drop every image of an existing collection.
    """
    max_file_bytes()  # a bad RIS_MAX_FILE_MB fails the run here, not every file in the decode workers
    found: dict[str, SourceFile] = {}
    for raw in paths:
        root = os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(raw))))
        try:
            is_dir = stat.S_ISDIR(os.stat(root).st_mode)
        except OSError:
            raise RisError(f"no such file or folder: {raw}") from None
        for path in _walk(root) if is_dir else [root]:
            path = os.path.normpath(path)
            if path in found:
                continue
            try:
                source = _source(path)
            except OSError:
                continue  # vanished or unreadable while walking: not ours to index
            if source is not None:
                found[path] = source
    if not found:
        raise RisError("no files found in: " + ", ".join(str(p) for p in paths))
    return sorted(found.values(), key=lambda f: f.path)
