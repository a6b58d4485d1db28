"""A second look for copies that the first search did not confirm: the query rotated back and cut into regions.

A copy rotated by tens of degrees, or pasted small onto another picture (picture-in-picture, a screenshot of a
post, a collage), has a global descriptor far from its original's, which is then rarely among the nearest
images, where verification (ris.search.verify) could confirm it. So when verification confirms none of a query's
nearest, the query gets a second look: its VIEWS (rotated back by a few angles and cropped to the valid area;
windows on a grid) go through the model in one batch, each indexed image scores its best cosine over the views,
and the CANDIDATES best by that score are verified with the query's keypoints; the best confirmed one goes first.
A query whose first result is confirmed (an exact or mildly edited copy) costs nothing more. Measured in
benchmarks/RESULTS.md (section 6, "Copies").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from ..images.edits import rotated

#: Angles (degrees) the query is rotated back by; windows (left, top, side) as fractions of the query's sides.
ANGLES = (-22.0, 22.0)
WINDOWS = ((0.0, 0.0, 0.5), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5), (0.5, 0.5, 0.5), (0.25, 0.25, 0.5))
#: Candidates per view read from the store, and images verified after the views' ranking.
PER_VIEW = 16
CANDIDATES = 8

Embed = Callable[[Sequence[Image.Image]], np.ndarray]


def window(img: Image.Image, x: float, y: float, side: float) -> Image.Image:
    w, h = img.size
    box = (round(x * w), round(y * h), max(round(x * w) + 1, round((x + side) * w)),
           max(round(y * h) + 1, round((y + side) * h)))  # fmt: skip
    return img.crop(box)


def views(img: Image.Image) -> list[Image.Image]:
    """The second look's views of one query (not the query itself, which the first search used)."""
    return [rotated(img, a) for a in ANGLES] + [window(img, *box) for box in WINDOWS]


def best_per_image(view_vectors: np.ndarray, ids: np.ndarray, plain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, best cosine over the views) of the candidate ids, best first; plain: their plain vectors (ids' order);
    the query's own vector is one of the views (its nearest past the first 5 get verified too)."""
    scores = (plain @ view_vectors.T).max(axis=1)
    order = np.argsort(-scores, kind="stable")
    return ids[order], scores[order]
