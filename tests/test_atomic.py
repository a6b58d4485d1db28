"""ris.files.atomic: a file is replaced whole or not at all, whoever writes it at the same time."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from ris.files.atomic import replacing, write_bytes, write_text


def test_a_write_that_fails_leaves_the_old_file_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    write_text(path, "old")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_text("half of the new one")
        raise RuntimeError("the writer failed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_threads_replacing_one_file_at_once_never_share_a_temporary(tmp_path: Path) -> None:
    """The server's threads write one upload or thumbnail name at once: with a temporary per process only, one
    thread renamed or removed another's half-written file (FileNotFoundError, or a torn file)."""
    path, errors = tmp_path / "thumb.jpg", []
    payloads = [bytes([n]) * 200_000 for n in range(8)]

    def write(data: bytes) -> None:
        try:
            for _ in range(25):
                write_bytes(path, data, durable=False)
        except OSError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["thumb.jpg"]


def test_a_mode_asked_for_is_kept_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_bytes(tmp_path / "upload.png", b"\x89PNG", mode=0o644)
        write_bytes(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "upload.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600
