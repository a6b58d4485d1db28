"""A small real collection for the server tests: the scikit-image sample photos and a few Caltech-101 images."""

from __future__ import annotations

from pathlib import Path

from ris.collection import Collection
from ris.demo import sample_paths

CALTECH = Path(__file__).resolve().parents[2] / "shared/datasets/caltech101/101_ObjectCategories"
CATEGORIES = ("accordion", "anchor", "ant", "barrel", "camera", "chair")
PER_CATEGORY = 3


def caltech_images(offset: int = 0, per_category: int = PER_CATEGORY) -> list[Path]:
    """A few images of each of some categories (offset picks other ones: queries that are not indexed)."""
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
