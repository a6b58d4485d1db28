"""Geometric verification of a copy's nearest images: local features confirm which candidate it was made from.

Global descriptors put a copy's original among the first few results, but in tight classes (portraits
against one wall, airplanes in side view) another image can come first. ORB keypoints of the query
(and of its mirror image) are matched to each of the top candidates (Lowe's ratio test), and a RANSAC
similarity transform (rotation, scale, shift) counts the matches that agree. A candidate that is
geometrically confirmed (`MIN_INLIERS`) and clearly better confirmed than the first result (`MARGIN` x
its inliers) moves to the top; otherwise the order is kept, so the set of the top 5 never changes.
Costs ~20 ms a query on 2 cores with the candidates' keypoints cached, ~45 ms without (5 candidates
decoded), nothing at indexing time. Measured in benchmarks/RESULTS.md.

Any decoded image can arrive (1 x 1 px, 4000 x 12 px): one too small for ORB, or a candidate whose file
can no longer be decoded, simply has no keypoints, so it confirms nothing and the plain order stands.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import cv2
import faiss
import numpy as np
from PIL import Image

from ..errors import DecodeError, RisError
from ..threads import on_threads

#: Candidates checked per query, keypoints per image, longest side they are found at.
TOP = 5
FEATURES = 500
MAX_SIDE = 480
#: ORB finds no keypoint within its edge threshold (31 px) of a border: narrower images have none.
MIN_SIDE = 2 * 31 + 1
#: A candidate moves up with at least this many agreeing matches, and MARGIN x the first result's.
MIN_INLIERS = 12
MARGIN = 2.0
RATIO = 0.8
REPROJ_PX = 5.0

Features = tuple[np.ndarray, np.ndarray | None]  # (N x 2 keypoint positions, N x 32 descriptors)
NO_FEATURES: Features = (np.zeros((0, 2), np.float32), None)


def working_size(img: Image.Image, side: int = MAX_SIDE) -> Image.Image:
    """The query brought to `side` on its longest side when larger (box means, as `features` would): JPEGs decoded
    in draft mode keep up to twice MAX_SIDE, and the second look's views and crops of a 1,128 x 953 picture took
    ~140 ms at full size."""
    scale = side / max(img.size)
    if scale >= 1:
        return img
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return Image.fromarray(cv2.resize(np.asarray(img.convert("RGB")), size, interpolation=cv2.INTER_AREA))


def features(img: Image.Image, nfeatures: int = FEATURES) -> Features:
    """ORB keypoints of the image, its longest side brought to MAX_SIDE; none when a side is under MIN_SIDE
    (ORB's pyramid asserts on a 1-px side, and finds nothing that narrow anyway). `ris dupes` asks for 1000,
    so that a caption's or a border's strong corners do not crowd out the picture's own."""
    grey = np.asarray(img.convert("L"))
    scale = MAX_SIDE / max(grey.shape)
    if scale < 1:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA)
    if min(grey.shape) < MIN_SIDE:
        return NO_FEATURES
    points, desc = cv2.ORB_create(nfeatures=nfeatures, fastThreshold=10).detectAndCompute(grey, None)
    return np.float32([p.pt for p in points]).reshape(-1, 2), desc


def inliers(a: Features, b: Features) -> int:
    """Matches of a to b that one similarity transform explains (RANSAC)."""
    (pa, da), (pb, db) = a, b
    if da is None or db is None or len(pa) < 3 or len(pb) < 3:
        return 0
    dist, nearest = nearest_two(da, db)
    good = dist[:, 0] < RATIO * dist[:, 1]  # Lowe's ratio test (a tie between the two nearest fails it)
    if good.sum() < 4:
        return 0
    _, mask = cv2.estimateAffinePartial2D(pa[good], pb[nearest[good, 0]], method=cv2.RANSAC,
                                          ransacReprojThreshold=REPROJ_PX)  # fmt: skip
    return int(mask.sum()) if mask is not None else 0


def nearest_two(da: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hamming distances and indices of each descriptor of da's two nearest in db: FAISS's popcount scan, on
    this thread only (verification runs candidates on threads of its own). 500 x 500 ORB descriptors: 0.3 ms,
    against 0.8 ms for OpenCV's brute-force matcher and its Python match objects."""
    index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    index.add(db)
    threads = faiss.omp_get_max_threads()  # OpenMP's setting is the calling thread's own
    faiss.omp_set_num_threads(1)
    try:
        dist, nearest = index.search(da, 2)
    finally:
        faiss.omp_set_num_threads(threads)
    return dist, nearest


class Verifier:
    """Re-orders a query's top candidates by geometric agreement; candidates' features are cached by path.

    Thread-safe: OpenCV releases the GIL, so a batch of queries is verified on several threads (`looks`).
    """

    def __init__(self, cache_size: int = 4096):
        self._cache: OrderedDict[str, Features] = OrderedDict()
        self._lock = threading.Lock()
        self.cache_size = cache_size

    def _candidate(self, path: str) -> Features:
        """A candidate's keypoints (cached); none when its file can no longer be decoded."""
        from ..images.decode import open_image, read_file

        with self._lock:
            if path in self._cache:
                self._cache.move_to_end(path)
                return self._cache[path]
        try:  # outside the lock: another thread may do the same
            feats = features(open_image(read_file(path), draft_size=MAX_SIDE))
        except DecodeError:
            return NO_FEATURES  # not cached: the file may come back
        with self._lock:
            self._cache[path] = feats
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return feats

    def looks(self, jobs: Sequence[tuple[Callable[[], Image.Image], Sequence[str]]], threads: int,
              crops: Callable[[Image.Image], list] | None = None) -> list[Look]:  # fmt: skip
        """`look` for many (query loader, candidate paths) pairs, on up to `threads` threads (one query alone: its
        candidates on them); a query that cannot be loaded (its file changed since it was embedded) keeps the
        plain order and gets no second look. crops: what else to cut from each query beside its keypoints."""
        alone = threads if len(jobs) == 1 else 1

        def run(job: tuple[Callable[[], Image.Image], Sequence[str]]) -> Look:
            try:
                full = job[0]()
            except (DecodeError, RisError):
                return Look(0, 0, None, ())
            return self.look(working_size(full), job[1], alone, crops and (lambda: crops(full)))  # crops: from the whole

        return on_threads(run, jobs, threads)

    def counts(self, views: Sequence[Features], paths: Sequence[str], threads: int = 1) -> list[int]:
        """Inliers of the best of the query's views (e.g. it and its mirror image) against each candidate, the
        candidates on up to `threads` threads (a served query's uncached candidates are decoded side by side)."""
        return on_threads(lambda p: max(inliers(v, self._candidate(p)) for v in views), paths, threads)

    def look(self, query: Image.Image, paths: Sequence[str], threads: int = 1,
             crops: Callable[[], list] | None = None) -> Look:  # fmt: skip
        """Which of the candidate paths (in search order) should come first, with the query's keypoints (and its
        crops, made beside them)."""
        views, cut = query_views(query, threads=threads, also=crops)  # mirrored copies too; thumbnails enlarged
        counts = self.counts(views, paths[:TOP], threads)
        first = choose(counts)
        return Look(first, counts[first] if counts else 0, query, views, cut, counts)


class Look(NamedTuple):
    """What verification made of one query: the index put first, its agreeing matches, the query and its keypoints."""

    first: int
    inliers: int
    query: Image.Image | None
    views: Sequence[Features]
    crops: list | None = None  # what `looks` was asked to cut from the query
    counts: Sequence[int] = ()  # each candidate's agreeing matches, in the order given


def choose(counts: Sequence[int]) -> int:
    """Index of the candidate to put first: the best one, if confirmed (MIN_INLIERS, and MARGIN x the first
    candidate's matches), else 0."""
    if not counts:
        return 0
    best = int(np.argmax(counts))
    return best if counts[best] >= MIN_INLIERS and counts[best] >= MARGIN * counts[0] else 0


#: Queries smaller than this (longest side) are enlarged to UPSAMPLE_TO before their keypoints are found.
UPSAMPLE_BELOW = 240
UPSAMPLE_TO = 320


def query_views(img: Image.Image, nfeatures: int = FEATURES, threads: int = 1,
                also: Callable[[], Any] | None = None) -> tuple[tuple[Features, Features], Any]:  # fmt: skip
    """(ORB features of a query and of its mirror image, also() computed beside them on the threads); a
    thumbnail is enlarged first (to UPSAMPLE_TO on its longest side), so that a fifth-size copy still yields
    keypoints (harsh set: inliers of its original median 27 this way)."""
    if max(img.size) < UPSAMPLE_BELOW:
        f = UPSAMPLE_TO / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BICUBIC)
    work = [lambda: features(img, nfeatures), lambda: features(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), nfeatures)]
    if also is not None:  # first: the longest (a large pip copy's crops ~14 ms, each view's keypoints ~4 ms) takes
        work.insert(0, also)  # one thread while the other finds both views' keypoints
    done = on_threads(lambda task: task(), work, threads)
    return (done[-2], done[-1]), (done[0] if also is not None else None)
