"""One way to replace a file atomically and durably: write beside it, fsync, rename, fsync the directory.

Readers see the old file or the new one, never half of either; after a crash (or power loss) the name
holds one of them. A reader that opened or memory-mapped the old file keeps reading it (the rename leaves
its inode alive). Every derived file, manifest and export of ris goes through here.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: Path, suffix: str = "", durable: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` to write; on success it is synced and renamed over `path`, on failure removed
    (an exception raised inside, e.g. a download whose checksum is wrong, leaves `path` as it was).

    suffix: what the temporary name must end with (numpy's savez appends ".npz" unless the name has it).
    durable: False skips the fsyncs, for caches that may be lost in a crash (thumbnails) but never seen half written.
    The temporary name holds the process and the thread: two writers of one path never share it.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp{suffix}")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        _fsync(path.parent)


def write_with(path: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """Replace `path` with what `write(tmp_path)` writes."""
    with replacing(path, suffix) as tmp:
        write(tmp)


def write_text(path: Path, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes, durable: bool = True, mode: int | None = None) -> None:
    """Replace `path` with `data`; mode: its permission bits (else the umask's default for a new file)."""
    with replacing(path, durable=durable) as tmp:
        tmp.write_bytes(data)
        if mode is not None:
            os.chmod(tmp, mode)


def _fsync(path: Path) -> None:
    """fsync a file or a directory (where the platform allows opening one)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
