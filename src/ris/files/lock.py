"""The one-writer lock of a collection: flock on its `lock` file, which holds the writer's PID."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import CollectionLocked, RisError

#: Lock descriptors this process holds. A forked child (a decode worker) closes its copies at once: flock
#: belongs to the open file, so a worker outliving a killed writer would otherwise keep the collection locked.
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class WriterLock:
    """Held by at most one process per collection; readers never take it."""

    def __init__(self, root: Path):
        self.root = root
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock, or fail at once naming the process that holds it (re-entrant within this object)."""
        if self._fd is not None:
            return
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RisError(f"collection {self.root} cannot be written here ({exc.strerror}); it can still be searched") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise CollectionLocked(f"collection {self.root} is locked by PID {holder} (another ris is writing)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing releases the flock
            self._fd = None
