"""Keypoint votes: the indexed images that share the most local features with a query, wherever its CNN vector lands.

A copy rotated by tens of degrees, cut off-centre, mirrored and cropped, or pasted small onto another picture has a
global descriptor far from its original's, which is then often in none of the lists that verification checks
(ris.search.views' second look included: 69 of 78 harsh copies missed at rank 5, seeds 1 and 5). Its ORB
keypoints still match the original's, whatever the turn or the cut. So once the indexed images' keypoints are kept
(ris.search.verify.Verifier.prepare, as `ris serve` does while idle), their descriptors go into one binary inverted
file (FAISS, LISTS Hamming cells, each image's id on each of its descriptors); each of the query's descriptors votes
for the image of its nearest indexed descriptor when that one is near (MAX_BITS) and clearly nearer than the second
(RATIO), and the images with most votes are verified like the second look's candidates (ris.search.ranking).
Measured in benchmarks/RESULTS.md (section 6).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import faiss
import numpy as np

from ..threads import faiss_alone, on_threads

#: Hamming cells of the inverted file (their centres: indexed descriptors drawn at random), cells searched per
#: descriptor; a vote needs its nearest indexed descriptor within MAX_BITS of 256 and under RATIO x the second's.
LISTS = 2048
PROBE = 1
MAX_BITS = 64
RATIO = 0.85
#: Images verified from the votes, and the agreeing matches one needs to count as confirmed: twice verification's
#: MIN_INLIERS, as images picked for sharing descriptors with the query reach 12 by chance more often.
VOTED = 4
VOTED_INLIERS = 24
#: The share of the collection the votes must hold to be asked at all.
MIN_SHARE = 0.5

Features = tuple[np.ndarray, np.ndarray | None]


class KeypointVotes:
    """The kept images' ORB descriptors in one inverted file; thread-safe (FAISS's index is not)."""

    def __init__(self) -> None:
        self._index: faiss.IndexBinaryIVF | None = None
        self._quantizer: faiss.IndexBinaryFlat | None = None
        self._lock = threading.Lock()
        self._voters: set[int] = set()

    @property
    def ready(self) -> bool:
        return self._index is not None

    @property
    def images(self) -> int:
        """How many images' keypoints vote."""
        return len(self._voters)

    def worth(self, count: int) -> bool:
        """Whether the votes hold at least MIN_SHARE of a collection of `count` images: below that a vote costs its
        ~5 ms for few finds (a server whose keypoint budget holds a small part of a large collection)."""
        return self._index is not None and len(self._voters) >= MIN_SHARE * count

    def covers(self, count: int) -> bool:
        """Whether the votes hold as many images as the collection (`count`): a search then finds by them what the
        second look's own views would (ris.search.ranking)."""
        return self._index is not None and len(self._voters) >= count

    def build(self, kept: Iterable[tuple[int, Features]], seed: int = 0) -> None:
        """The index of these (image id, keypoints), replacing any before; cell centres drawn from their descriptors
        (random centres cost no training, and found the original among the 4 most voted as often as k-means':
        686 vs 680 of 720 harsh copies)."""
        pairs = [(i, f[1]) for i, f in kept if f[1] is not None and len(f[1])]
        if not pairs:
            return
        codes = np.concatenate([d for _, d in pairs])
        ids = np.concatenate([np.full(len(d), i, np.int64) for i, d in pairs])
        cells = min(LISTS, max(1, len(codes) // 64))
        quantizer = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        quantizer.add(codes[np.random.default_rng(seed).choice(len(codes), cells, replace=False)])
        index = faiss.IndexBinaryIVF(quantizer, codes.shape[1] * 8, cells)
        index.is_trained = True
        index.nprobe = PROBE
        index.add_with_ids(codes, ids)
        with self._lock:  # the quantizer kept beside the index, which does not own it
            self._index, self._quantizer, self._voters = index, quantizer, {i for i, _ in pairs}

    def add(self, image_id: int, feats: Features) -> None:
        """One more image's descriptors (an image added while serving), once the index is built."""
        if self._index is None or feats[1] is None or not len(feats[1]):
            return
        with self._lock:
            self._index.add_with_ids(feats[1], np.full(len(feats[1]), image_id, np.int64))
            self._voters.add(image_id)

    def remove(self, image_ids: Sequence[int]) -> None:
        """Drop these images' descriptors (removed from the collection)."""
        if self._index is None or not len(image_ids):
            return
        with self._lock:
            self._index.remove_ids(faiss.IDSelectorBatch(np.asarray(image_ids, np.int64)))
            self._voters.difference_update(image_ids)

    def best(self, views: Sequence[Features], top: int, threads: int = 1) -> list[tuple[int, int]]:
        """(image id, votes) of the `top` images with most votes from any one of the query's views (it, its mirror
        image...), best first; none before the index is built. The views' descriptors are searched in `threads` parts
        side by side (~900 descriptors at 8,267 images: ~5 ms on 2 threads, ~8 on one)."""
        if self._index is None:
            return []
        kept = [desc for _, desc in views if desc is not None and len(desc) >= 2]
        if not kept:
            return []
        codes = np.concatenate(kept)
        parts = np.array_split(np.arange(len(codes)), max(1, min(threads, len(codes) // 64)))

        def search(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            with faiss_alone():
                return self._index.search(codes[part], 2)

        with self._lock:  # no add or removal while searching
            found = on_threads(search, parts, threads)
        dist, ids = np.concatenate([d for d, _ in found]), np.concatenate([i for _, i in found])
        near = (dist[:, 0] <= MAX_BITS) & (dist[:, 0] < RATIO * dist[:, 1]) & (ids[:, 0] >= 0)
        votes: dict[int, int] = {}
        for view in np.split(np.arange(len(codes)), np.cumsum([len(d) for d in kept])[:-1]):
            images, counts = np.unique(ids[view][near[view], 0], return_counts=True)
            for i, n in zip(images.tolist(), counts.tolist(), strict=True):
                votes[i] = max(votes.get(i, 0), n)
        return sorted(votes.items(), key=lambda v: -v[1])[:top]
