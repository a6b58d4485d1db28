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
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import cv2
import faiss
import numpy as np
from PIL import Image

from ..config import megabytes
from ..errors import DecodeError, RisError
from ..threads import faiss_alone, on_threads
from .votes import KeypointVotes

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
#: The knob bounding the candidates' keypoints kept (ris.config), and how often `prepare` looks whether it may go on.
CACHE_ENV = "RIS_KEYPOINT_CACHE_MB"
IDLE_POLL_S = 0.002
#: While searches run, `prepare` goes on with at most this share of its thread's time: under steady load from the
#: start a server never idles, and without its keypoints (and their votes) every outside query stays on the dearer
#: path (8 clients: 13.5-14.8 req/s against 25.7-26.3 once prepared, AMD EPYC Zen 4); all the time would slow the
#: searches themselves (its GIL-holding moments: outside p50 87 -> 107-114 ms, Intel Xeon).
BUSY_SHARE = 0.1
#: About what one image's keypoints take (FEATURES of them: positions and descriptors).
KEYPOINT_BYTES = 20_000


def _nbytes(feats: Features) -> int:
    return feats[0].nbytes + (feats[1].nbytes if feats[1] is not None else 0) + 200  # arrays' headers, the entry


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
    return len(agreeing(a, b))


def agreeing(a: Features, b: Features) -> np.ndarray:
    """Where in a its matches to b are (n x 2 positions) that one similarity transform explains (RANSAC)."""
    (pa, da), (pb, db) = a, b
    if da is None or db is None or len(pa) < 3 or len(pb) < 3:
        return NO_FEATURES[0]
    dist, nearest = nearest_two(da, db)
    good = dist[:, 0] < RATIO * dist[:, 1]  # Lowe's ratio test (a tie between the two nearest fails it)
    if good.sum() < 4:
        return NO_FEATURES[0]
    _, mask = cv2.estimateAffinePartial2D(pa[good], pb[nearest[good, 0]], method=cv2.RANSAC,
                                          ransacReprojThreshold=REPROJ_PX)  # fmt: skip
    return pa[good][mask.ravel() > 0] if mask is not None else NO_FEATURES[0]


#: A box of a query holding this many of its keypoints or more is left unexplained by a confirmed image when fewer
#: than UNEXPLAINED_SHARE x the query's share of keypoints agreeing with that image agree inside it.
UNEXPLAINED_KEYPOINTS = 12
UNEXPLAINED_SHARE = 0.3


def unexplained(look: Look, candidate: Features, boxes: Sequence[tuple[float, float, float, float]]) -> list[bool]:
    """For each box of the query (fractions of its sides), whether it holds keypoints that the candidate's agreeing
    matches leave out: a picture pasted over the candidate (two indexed pictures in one), a sticker, a caption, the
    other picture beside it. In an exact or mildly edited copy they cover the query (Caltech-101, 104 indexed files
    searched again: 2 boxes left out)."""
    if look.query is None or not look.views:
        return [False] * len(boxes)
    w, h = keypoint_frame(look.query)
    found = [(agreeing(view, candidate), view[0], mirror) for view, mirror in zip(look.views[:2], (False, True), strict=False)]
    points, every, mirror = max(found, key=lambda f: len(f[0]))
    if not len(every):
        return [False] * len(boxes)
    share = len(points) / len(every)

    def inside(p: np.ndarray, box: tuple[float, float, float, float]) -> int:
        x = 1 - p[:, 0] / w if mirror else p[:, 0] / w  # the mirror image's keypoints, back on the query
        y = p[:, 1] / h
        return int(((x >= box[0]) & (x < box[2]) & (y >= box[1]) & (y < box[3])).sum())

    return [(n := inside(every, box)) >= UNEXPLAINED_KEYPOINTS and inside(points, box) <= UNEXPLAINED_SHARE * share * n
            for box in boxes]  # fmt: skip


def keypoint_frame(query: Image.Image) -> tuple[float, float]:
    """The size of the frame a query's keypoints are placed in (query_views enlarges a thumbnail, features brings
    its longest side to MAX_SIDE)."""
    w, h = query.size
    scale = UPSAMPLE_TO / max(w, h) if max(w, h) < UPSAMPLE_BELOW else 1.0
    scale *= min(1.0, MAX_SIDE / (max(w, h) * scale))
    return w * scale, h * scale


def nearest_two(da: np.ndarray, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hamming distances and indices of each descriptor of da's two nearest in db: FAISS's popcount scan, on
    this thread only (verification runs candidates on threads of its own). 500 x 500 ORB descriptors: 0.3 ms,
    against 0.8 ms for OpenCV's brute-force matcher and its Python match objects."""
    index = faiss.IndexBinaryFlat(db.shape[1] * 8)
    index.add(db)
    with faiss_alone():
        return index.search(da, 2)


class Verifier:
    """Re-orders a query's top candidates by geometric agreement; candidates' features are cached by path, in at
    most RIS_KEYPOINT_CACHE_MB (least recently used out first).

    Thread-safe: OpenCV releases the GIL, so a batch of queries is verified on several threads (`looks`).
    """

    def __init__(self, cache_bytes: int | None = None):
        self._cache: OrderedDict[str, Features] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.budget = megabytes(CACHE_ENV, zero=True) if cache_bytes is None else cache_bytes
        self.votes = KeypointVotes()

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
            if path not in self._cache:
                self._cache[path] = feats
                self._bytes += _nbytes(feats)
            while self._bytes > self.budget and self._cache:
                self._bytes -= _nbytes(self._cache.popitem(last=False)[1])
        return feats

    def prepare(self, paths: Iterable[str], idle: Callable[[], bool], stop: Callable[[], bool],
                busy_share: float = BUSY_SHARE) -> int:  # fmt: skip
        """Find and keep these candidates' keypoints ahead of searches, one at a time: at once while idle() (a server:
        no search running), else with at most `busy_share` of the time, until stop() or the cache is nine tenths
        full (nothing prepared is pushed out); the number of paths gone through. A served query that is a copy of
        nothing verifies 10-13 candidates, ~2.7 ms each to decode and find on first sight: most of its time past
        the model."""
        done, resume = 0, 0.0
        for path in paths:
            while not idle() and not stop() and time.monotonic() < resume:
                time.sleep(IDLE_POLL_S)
            if stop() or self._bytes >= 0.9 * self.budget:
                break
            start = time.monotonic()
            self._candidate(path)
            done += 1
            resume = start + (time.monotonic() - start) / busy_share  # while busy: the rest of the time is theirs
        return done

    def vote_for(self, rows: Iterable[tuple[int, str]]) -> int:
        """Build the keypoint votes (ris.search.votes) from the kept keypoints of these (image id, path); how many
        images they hold. Their index takes about as much memory again as the keypoints."""
        with self._lock:
            kept = [(i, self._cache[p]) for i, p in rows if p in self._cache]
        self.votes.build(kept)
        return self.votes.images

    def keypoints(self, path: str) -> Features:
        """An indexed image's keypoints (cached; none when its file can no longer be decoded)."""
        return self._candidate(path)

    def cached(self) -> int:
        """How many candidates' keypoints are kept."""
        return len(self._cache)

    def looks(self, jobs: Sequence[tuple[Callable[[], Image.Image], Sequence[str]]], threads: int,
              beside: Callable[[Image.Image, Image.Image], Sequence[Callable[[], Any]]] | None = None) -> list[Look]:  # fmt: skip
        """`look` for many (query loader, candidate paths) pairs, on up to `threads` threads (one query alone: its
        candidates on them); a query that cannot be loaded (its file changed since it was embedded) keeps the
        plain order and gets no second look. beside: more work on each query, given it as loaded and at working
        size (its pasted picture's crops, its second look's views), done beside its keypoints."""
        alone = threads if len(jobs) == 1 else 1

        def run(job: tuple[Callable[[], Image.Image], Sequence[str]]) -> Look:
            try:
                full = job[0]()
            except (DecodeError, RisError):
                return Look(0, 0, None, ())
            work = working_size(full)
            return self.look(work, job[1], alone, beside(full, work) if beside else ())

        return on_threads(run, jobs, threads)

    def counts(self, views: Sequence[Features], paths: Sequence[str], threads: int = 1) -> list[int]:
        """Inliers of the best of the query's views (e.g. it and its mirror image) against each candidate, the
        candidates on up to `threads` threads (a served query's uncached candidates are decoded side by side)."""
        return on_threads(lambda p: max(inliers(v, self._candidate(p)) for v in views), paths, threads)

    def look(self, query: Image.Image, paths: Sequence[str], threads: int = 1,
             beside: Sequence[Callable[[], Any]] = ()) -> Look:  # fmt: skip
        """Which of the candidate paths (in search order) should come first, with the query's keypoints and the
        results of `beside`; on several threads the candidates' keypoints are found in the same pass (an idle
        thread took ~3 ms of a served query's 3 equal tasks)."""
        paths = paths[:TOP]
        load = [lambda p=p: self._candidate(p) for p in paths] if threads > 1 and self.budget else []  # kept for counts
        views, done = query_views(query, threads=threads, also=beside, then=load)  # mirrored too; thumbnails enlarged
        counts = self.counts(views, paths, threads)
        first = choose(counts)
        return Look(first, counts[first] if counts else 0, query, views, done, counts)


class Look(NamedTuple):
    """What verification made of one query: the index put first, its agreeing matches, the query and its keypoints."""

    first: int
    inliers: int
    query: Image.Image | None
    views: Sequence[Features]
    beside: Sequence = ()  # the results of the work `looks` was asked to do beside the keypoints
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
#: Queries this large (longest side, at working size) also get keypoints at half size (`query_views`).
HALVED_FROM = MAX_SIDE


def enlarged(img: Image.Image) -> Image.Image:
    """A thumbnail enlarged to UPSAMPLE_TO on its longest side (see query_views); a larger image as it is."""
    if max(img.size) >= UPSAMPLE_BELOW:
        return img
    f = UPSAMPLE_TO / max(img.size)
    return img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BICUBIC)


def query_views(img: Image.Image, nfeatures: int = FEATURES, threads: int = 1, also: Sequence[Callable[[], Any]] = (),
                then: Sequence[Callable[[], Any]] = (), halved: bool = True) -> tuple[tuple[Features, ...], list]:  # fmt: skip
    """(ORB features of a query, of its mirror image and, when halved and the query is HALVED_FROM or more, of the
    query at half size; the results of `also`), with `then` (e.g. loading candidates' keypoints) on the same threads
    after them. A thumbnail is enlarged first (to UPSAMPLE_TO on its longest side), so that a fifth-size copy still
    yields keypoints (harsh set: inliers of its original median 27 this way). The half-size view is for a zoomed cut:
    a square of 55-75% of a 300-px picture's side enlarged to 1,080 px is ~4x its original's scale at MAX_SIDE, at
    the end of ORB's 8-level pyramid (inliers of its original, unseen set seed 1: median 35 at 480 px, 59 at 240;
    confirmed 0.72 -> 0.83); it matched wrong candidates no more often than the full size did (0.16 vs 0.19 had 12)."""
    img = enlarged(img)
    own = [lambda: features(img, nfeatures), lambda: features(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT), nfeatures)]
    if halved and max(img.size) >= HALVED_FROM:
        own.append(lambda: features(working_size(img, max(img.size) // 2), nfeatures))
    # `also` first: the longest (a large pip copy's crops ~14 ms, each view's keypoints ~4 ms) takes one thread
    # while the other finds both views' keypoints
    done = on_threads(lambda task: task(), [*also, *own, *then], threads)
    return tuple(done[len(also) : len(also) + len(own)]), done[: len(also)]
