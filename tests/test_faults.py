"""Fault injection: writers killed (SIGKILL) at seeded random moments of `add`, `remove` and
`reindex --refit-pca`, and a write that runs out of disk. After each, nothing is lost or duplicated, the
collection opens and answers, and every image finds itself first once the next write has run.

(`ris index` killed mid-run is tests/test_crash.py; damaged derived files are tests/test_catalogue.py.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ris.collection import Collection

from .conftest import copy_classes, run_cli

CLASSES = ("accordion", "anchor", "ant", "barrel", "bass", "beaver", "binocular", "bonsai")
PER_CLASS = 8


@pytest.fixture(scope="module", params=["exact", "approximate"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(images, extra images to add, a collection of the images with a 16-d PCA: every derived file exists).
    approximate: an IVF index without DBA, so its candidates are re-scored from `reduced.G.f16`, written
    beside the index by every write."""
    root = tmp_path_factory.mktemp("faults")
    images = copy_classes(root / "images", CLASSES[:6], PER_CLASS)
    extra = copy_classes(root / "extra", CLASSES[6:], PER_CLASS)
    path = root / "c.ris"
    approximate = ["--index", "IVF4,SQ8", "--dba", "0"] if request.param == "approximate" else []
    run_cli("index", str(images), "-c", str(path), "--dims", "16", "--json", *approximate)
    assert bool(list(path.glob("reduced.*.f16"))) == bool(approximate)
    return images, extra, path


def _kill_during(args: list[str], seconds: float) -> int | None:
    """Run `ris ARGS`, SIGKILL it after `seconds` (if it is still running); its exit code, None when killed."""
    proc = subprocess.Popen([sys.executable, "-m", "ris", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=seconds)
        return proc.returncode
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return None


def _assert_whole(path: Path, expected: set[str]) -> None:
    """The collection opens, holds exactly `expected` (no loss, no duplicate), and after a write every image finds
    itself first."""
    info = json.loads(run_cli("info", "-c", str(path), "--json").stdout)
    with Collection.open(path) as coll:
        rows = coll.catalog.all_rows()
    assert sorted(r.path for r in rows) == sorted(expected) and info["images"] == len(expected)
    run_cli("remove", "/no/such/image.jpg", "-c", str(path))  # any write heals a lagging index
    with Collection.open(path) as coll:
        assert coll.info()["searchable"] == len(expected)
        sample = rows[:: max(1, len(rows) // 8)]
        found = coll.search_many([r.path for r in sample], k=1, verify=False)
        assert [f.matches[0].path for f in found] == [r.path for r in sample]


@pytest.mark.parametrize("step", ["add", "remove", "reindex"])
def test_a_writer_killed_at_random_moments_loses_nothing(built, tmp_path: Path, step: str) -> None:
    images, extra, source = built
    originals = {str(p) for p in images.rglob("*.jpg")}
    added = {str(p) for p in extra.rglob("*.jpg")}
    rng = random.Random(f"faults-{step}")
    for attempt in range(3):
        path = tmp_path / f"c{attempt}.ris"
        shutil.copytree(source, path)
        delay = rng.uniform(0.3, 4.0)
        if step == "add":
            code = _kill_during(["add", str(extra), "-c", str(path)], delay)
            run_cli("add", str(extra), "-c", str(path))  # the rerun resumes: nothing twice
            _assert_whole(path, originals | added)
        elif step == "remove":
            gone = images / CLASSES[0]
            code = _kill_during(["remove", str(gone), "-c", str(path)], delay)
            kept = {p for p in originals if not p.startswith(str(gone) + os.sep)}
            with Collection.open(path) as coll:  # killed before or after the commit: one or the other, never half
                now = {r.path for r in coll.catalog.all_rows()}
            assert now in (originals, kept)
            run_cli("remove", str(gone), "-c", str(path))
            _assert_whole(path, kept)
        else:
            code = _kill_during(["reindex", "-c", str(path), "--refit-pca"], delay)
            with Collection.open(path) as coll:  # searches work on whichever generation is current
                probe = coll.catalog.all_rows()[3]
                assert coll.search(probe.path, k=1, verify=False).matches[0].path == probe.path
            _assert_whole(path, originals)
        assert code in (None, 0), f"{step} exited {code} after {delay:.1f} s"


def _mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def test_a_full_disk_is_one_error_line_and_loses_nothing(built, tmp_path: Path) -> None:
    images, extra, source = built
    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "3m"):
        pytest.skip("cannot mount a small tmpfs here (needs root and mount permission)")
    try:
        path = disk / "c.ris"
        shutil.copytree(source, path)
        with open(disk / "filler", "wb") as fh:  # leave almost nothing free
            free = shutil.disk_usage(disk).free
            fh.write(b"\0" * max(0, free - 64 * 1024))
        originals = {str(p) for p in images.rglob("*.jpg")}
        time.sleep(0.1)
        proc = run_cli("reindex", "-c", str(path), "--refit-pca", check=False)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1, proc.stderr
        with Collection.open(path) as coll:  # the current generation still answers
            probe = coll.catalog.all_rows()[5]
            assert coll.search(probe.path, k=1, verify=False).matches[0].path == probe.path
        (disk / "filler").unlink()
        _assert_whole(path, originals)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
