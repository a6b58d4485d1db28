"""`ris index` really killed (SIGKILL) at several moments: the collection stays readable and the next run resumes.

Each batch is one SQLite transaction, so what a reader sees after the kill is a whole number of
batches; the rerun extracts only what was not committed, duplicates nothing, and leaves index.faiss
holding exactly the catalogue's ids. A second writer is refused while one runs; readers are not.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ris.collection import Collection
from ris.vectors import faiss_index as index

from .conftest import copy_classes, ris_limited, run_cli

CLASSES = ("accordion", "anchor", "ant", "barrel", "bass", "beaver",
           "binocular", "bonsai", "brain", "buddha", "butterfly", "camera")  # fmt: skip
PER_CLASS, BATCH = 10, 8
TOTAL = len(CLASSES) * PER_CLASS  # 120, a whole number of batches


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_classes(tmp_path_factory.mktemp("crash-images"), CLASSES, PER_CLASS)


def _index_args(images: Path, coll: Path, batch: int = BATCH) -> list[str]:
    return ["index", str(images), "-c", str(coll), "--batch-size", str(batch), "--workers", "1", "--json"]


def _index_cmd(images: Path, coll: Path, batch: int = BATCH) -> list[str]:
    return [sys.executable, "-m", "ris", *_index_args(images, coll, batch)]


def _start(images: Path, coll: Path, batch: int = BATCH) -> subprocess.Popen:
    return subprocess.Popen(_index_cmd(images, coll, batch), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _query(coll: Path, sql: str) -> list[tuple]:
    """A read-only look at the catalogue, as another process would take it."""
    db = sqlite3.connect(f"file:{coll / 'catalog.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _ok_count(coll: Path) -> int:
    try:
        return _query(coll, "SELECT COUNT(*) FROM images WHERE status = 'ok'")[0][0]
    except sqlite3.Error:  # not created yet
        return 0


def _wait_for(proc: subprocess.Popen, coll: Path, at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _ok_count(coll) < at_least:
        if proc.poll() is not None:
            raise AssertionError(f"ris index ended ({proc.returncode}) before {at_least} rows were ok: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {at_least} ok rows within {timeout} s")
        time.sleep(0.002)


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _assert_consistent_after_kill(coll: Path, some_image: Path) -> int:
    """Readable, whole batches only, no half-written rows; returns the committed ok count."""
    assert _query(coll, "PRAGMA integrity_check") == [("ok",)]
    ok = _ok_count(coll)
    assert ok % BATCH == 0, f"{ok} ok rows is not a whole number of {BATCH}-image batches"
    orphans = _query(coll, "SELECT COUNT(*) FROM images WHERE status = 'ok' AND (sha256 IS NULL OR slot IS NULL)")
    assert orphans == [(0,)]
    used = _query(coll, "SELECT value FROM meta WHERE key = 'slots'")
    assert _query(coll, "SELECT COALESCE(MAX(slot) + 1, 0) FROM images")[0][0] <= (int(used[0][0]) if used else 0)
    with Collection.open(coll) as c:
        info = c.info()
        assert info["images"] == ok and info["images"] + info["pending"] == TOTAL
        if c.derived.state()["generation"]:  # the index written so far is whole and searchable
            idx = c.derived.snapshot().store.faiss_index
            assert set(index.ids_of(idx).tolist()) <= set(c.catalog.ok_ids().tolist())
            if idx.ntotal:
                assert c.search(str(some_image), k=1).matches
    return ok


def _assert_resumes(images: Path, coll: Path) -> None:
    """The rerun extracts exactly what was not committed and ends with index == catalogue."""
    pending = [p for (p,) in _query(coll, "SELECT path FROM images WHERE status != 'ok'")]
    have = {s for (s,) in _query(coll, "SELECT sha256 FROM images WHERE slot IS NOT NULL")}
    expected = len({_sha(p) for p in pending} - have) if pending else 0
    if not pending and _ok_count(coll) == 0:  # killed before the file list was synced
        expected = TOTAL
    report = json.loads(run_cli(*_index_cmd(images, coll)[3:]).stdout)
    assert report["extracted"] == expected and report["images"] == TOTAL and report["skipped"] == 0
    assert _query(coll, "SELECT path FROM images GROUP BY path HAVING COUNT(*) > 1") == []
    assert _query(coll, "SELECT COUNT(*) FROM images") == [(TOTAL,)]
    with Collection.open(coll) as c:
        idx = c.derived.snapshot().store.faiss_index
        assert np.array_equal(np.sort(index.ids_of(idx)), c.catalog.ok_ids()) and idx.ntotal == TOTAL
        target = sorted((images / "buddha").glob("*.jpg"))[4]
        assert c.search(str(target), k=1).matches[0].path == str(target)


@pytest.mark.parametrize("kill_at", [BATCH, TOTAL // 2, TOTAL], ids=["first-batch", "mid-way", "final-phase"])
def test_sigkill_then_resume(images: Path, tmp_path: Path, kill_at: int) -> None:
    coll = tmp_path / "c.ris"
    proc = _start(images, coll)
    _wait_for(proc, coll, kill_at)
    os.kill(proc.pid, signal.SIGKILL)
    rc = proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    # in the final phase the run may just have finished; before it, it must have died by the kill
    assert rc == -signal.SIGKILL or (kill_at == TOTAL and rc == 0)
    ok = _assert_consistent_after_kill(coll, sorted((images / "accordion").glob("*.jpg"))[0])
    assert ok >= kill_at
    _assert_resumes(images, coll)


def test_second_writer_is_refused_and_readers_work_during_a_run(images: Path, tmp_path: Path) -> None:
    coll = tmp_path / "c.ris"
    first = images / CLASSES[0]
    run_cli("index", str(first), "-c", str(coll), "--json")  # searchable before the long run starts
    proc = _start(images, coll, batch=4)
    try:
        _wait_for(proc, coll, PER_CLASS + 4)
        os.kill(proc.pid, signal.SIGSTOP)  # hold the writer (and its lock) still, mid-run, deterministically
        second = run_cli("index", str(images), "-c", str(coll), check=False)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode != 0 and "Traceback" not in second.stderr
        assert lines == [f"error: collection {coll} is locked by PID {proc.pid} (another ris is writing)"]
        query = sorted(first.glob("*.jpg"))[3]
        found = json.loads(run_cli("search", str(query), "-c", str(coll), "-k", "1", "--json").stdout)
        assert found["matches"][0]["path"] == str(query)
        os.kill(proc.pid, signal.SIGCONT)
        out, errors = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, errors
    report = json.loads(out)
    assert report["images"] == TOTAL and report["extracted"] == TOTAL - PER_CLASS


@pytest.fixture(scope="module")
def full_disk_run(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    """One `ris index` whose catalogue writes start failing part-way (the first class was indexed before)."""
    coll = tmp_path_factory.mktemp("full") / "c.ris"
    run_cli("index", str(images / CLASSES[0]), "-c", str(coll), "--json")  # the model cache is written beforehand
    # writes past 150 kB a file fail with EFBIG, as on a full disk (no root, no mount)
    proc = subprocess.run([*ris_limited("FSIZE", 150_000), *_index_args(images, coll)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    return proc, coll


def test_disk_full_while_writing_keeps_committed_batches_and_resumes(images: Path, full_disk_run) -> None:
    proc, coll = full_disk_run
    assert proc.returncode != 0
    with Collection.open(coll) as c:  # a normal (read-write) open recovers the WAL
        info = c.info()
        assert (info["images"] - PER_CLASS) % BATCH == 0  # the first class, then whole batches
        assert info["images"] + info["pending"] == TOTAL
        assert c.search(str(sorted((images / CLASSES[0]).glob("*.jpg"))[2]), k=1).matches
    _assert_resumes(images, coll)


def test_disk_full_is_a_one_line_error(full_disk_run) -> None:
    proc, _ = full_disk_run
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: ")
