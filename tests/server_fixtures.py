"""A small real collection for the server tests: the scikit-image sample photos and a few Caltech-101 images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ris.collection import Collection
from ris.server import create_app, serve_in_thread
from ris.tools.demo import sample_paths

CALTECH = Path(__file__).resolve().parents[2] / "shared/datasets/caltech101/101_ObjectCategories"
CATEGORIES = ("accordion", "anchor", "ant", "barrel", "camera", "chair")
PER_CATEGORY = 3
TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def caltech_images(offset: int = 0, per_category: int = PER_CATEGORY) -> list[Path]:
    """A few images of each of some categories (offset picks other ones: queries that are not indexed); without
    the dataset the calling test module is skipped, as conftest's tests are."""
    if not CALTECH.is_dir():
        pytest.skip(f"Caltech-101 not found at {CALTECH}", allow_module_level=True)
    found: list[Path] = []
    for category in CATEGORIES:
        found += sorted((CALTECH / category).glob("*.jpg"))[offset : offset + per_category]
    return found


def build_collection(root: Path) -> Path:
    """Index the sample photos and the Caltech picks into root/c.ris (about 40 images, a few seconds)."""
    path = root / "c.ris"
    with Collection.create(path) as coll:
        coll.add([*sample_paths(), *caltech_images()], workers=0)
    return path


def upload(path: Path) -> dict:
    return {"file": (path.name, path.read_bytes(), "application/octet-stream")}


# Fixtures for the server test modules: a module imports the *_fixture functions and its tests ask for them
# by name (collection_path, base_url, client); each such module gets its own collection and server.


@pytest.fixture(scope="module", name="collection_path")
def collection_path_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_collection(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module", name="base_url")
def base_url_fixture(collection_path: Path) -> Iterator[str]:
    """A server with a token: add and remove are enabled."""
    with serve_in_thread(create_app(collection_path, token=TOKEN)) as url:
        yield url


@pytest.fixture(name="client")
def client_fixture(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as c:
        yield c
