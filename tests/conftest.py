"""Shared fixtures: real Caltech-101 images from ../shared, the real bundled model, real collections."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
SUBSET_CLASSES = ("airplanes", "Motorbikes", "sunflower", "panda", "scissors", "cup")
PER_CLASS = 10


def pytest_configure(config: pytest.Config) -> None:
    # One model cache for the whole run: the ONNX export and int8 calibration happen once.
    if "RIS_CACHE_DIR" not in os.environ:
        cache = Path(config.rootpath) / ".pytest_cache" / "ris-model-cache"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["RIS_CACHE_DIR"] = str(cache)


def caltech_files(cls: str, n: int, start: int = 0) -> list[Path]:
    if not CALTECH.is_dir():
        pytest.skip(f"Caltech-101 not found at {CALTECH}")
    return sorted((CALTECH / cls).glob("*.jpg"))[start : start + n]


def copy_classes(root: Path, classes: tuple[str, ...], per_class: int) -> Path:
    """A labelled image tree under root: the first per_class Caltech images of each class (copies, editable)."""
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for f in caltech_files(cls, per_class):
            shutil.copy2(f, root / cls / f.name)
    return root


@pytest.fixture(scope="session")
def subset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled image tree: PER_CLASS images from each of SUBSET_CLASSES."""
    return copy_classes(tmp_path_factory.mktemp("caltech-subset"), SUBSET_CLASSES, PER_CLASS)


@pytest.fixture(scope="session")
def subset_collection(subset_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A read-only collection of the subset, built once with the default model."""
    from ris.collection import Collection

    path = tmp_path_factory.mktemp("collections") / "subset.ris"
    coll = Collection.open_or_create(path)
    coll.index([subset_dir])
    coll.close()
    return path


def run_cli(*args: str, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real `ris` entry point in a subprocess (stdout, stderr and exit code as a user sees them)."""
    proc = subprocess.run([sys.executable, "-m", "ris", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, timeout=600)  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"ris {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def ris_limited(limit: str, value: int) -> list[str]:
    """The command line of `ris` under a resource limit (resource.RLIMIT_<limit>) that it sets on itself before it starts,
    writes past a file size limit failing instead of killing it. Not a preexec_fn: that runs Python between fork and
    exec, where a gRPC poller left in the test process by the Milvus tests once aborted the child (SIGABRT,
    "epoll_wait error: Bad file descriptor")."""
    code = (f"import resource, runpy, signal; resource.setrlimit(resource.RLIMIT_{limit}, ({value}, {value})); "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); runpy.run_module('ris', run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]


def derived_file(collection: Path, kind: str) -> Path:
    """The current generation's derived file of a collection: kind is "pca", "index" or "dba"."""
    from ris.vectors.catalog import Catalog
    from ris.vectors.derived import DERIVED, files

    catalog = Catalog(collection / "catalog.sqlite")
    try:
        generation = json.loads(catalog.meta(DERIVED) or '{"generation": 0}')["generation"]
    finally:
        catalog.close()
    return files(collection, generation)[("pca", "index", "dba").index(kind)]
