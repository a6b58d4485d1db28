"""Finding the image a query was copied from, under harsh edits: a second, edit-invariant descriptor and
geometric verification over the copy candidates it and the plain vectors propose.

The class descriptor (`grid3`: GeM of each cell of a 3x3 grid) keeps the layout, which is what ranks an
image's class well and what crops, rotations, mirroring and picture-in-picture break. The copy descriptor is
the GeM of the whole feature map, recovered from the same model pass (the cells' cubed means averaged, see
`copy_vectors`), centred on the collection's mean: nothing more is extracted. A query's copy candidates
are the union of its nearest images by plain vector and by copy descriptor, ranked by the sum of both
cosines; the first VERIFY of them are checked by ORB + RANSAC (ris.verify), and a confirmed one comes first.

On the harsh copy set (ris.edits, full Caltech-101) this is what moved recall (benchmarks/RESULTS.md,
"Copies under harsh edits"); a score threshold alone cannot tell a copy from a close class neighbour
there (Caltech holds many near-identical photos), so only verification moves a candidate up.

The per-image copy vectors live in memory (n x 1280 float32) and in `copies.npz` beside the collection
(float16), derived from the catalogue's raw features and brought up to date with the ids searched.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from . import verify
from .models import GEM_P
from .verify import Features, features

#: Copy candidates taken from each list (plain vectors, copy descriptors), and how many of the fused
#: ranking verification checks.
POOL = 32
VERIFY = 8
#: A verified candidate comes first with at least MIN_INLIERS agreeing matches and MARGIN x those of the
#: plain nearest (ris.verify's rule, over more candidates).
MIN_INLIERS = verify.MIN_INLIERS
MARGIN = verify.MARGIN
#: Queries smaller than this (longest side) are enlarged to UPSAMPLE_TO before their keypoints are found.
UPSAMPLE_BELOW = 240
UPSAMPLE_TO = 320


def copy_vectors(raw: np.ndarray, cells: int) -> np.ndarray:
    """The whole-map GeM of each raw feature vector (float32, not normalised).

    grid poolings hold GeM cells (`cells` x `cells`, 1280 channels each): GeM^p of a cell is the mean of
    x^p over it, so the mean of the cells' x^p is the whole map's (overlapping rows counted twice, a
    centre-weighted GeM). Other poolings are global already."""
    raw = np.asarray(raw, dtype=np.float32)
    if cells <= 1:
        return raw.copy()
    per = raw.reshape(len(raw), cells * cells, -1)
    return np.power(np.power(np.clip(per, 1e-6, None), GEM_P).mean(axis=1), 1.0 / GEM_P)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class CopyIndex:
    """The copy descriptors of a collection's images: ids (sorted), unit GeM mean, centred unit vectors."""

    ids: np.ndarray
    mean: np.ndarray
    vectors: np.ndarray  # float32, rows in ids' order

    def query(self, raw: np.ndarray, cells: int) -> np.ndarray:
        return self.centre(copy_vectors(raw, cells))

    def centre(self, gem: np.ndarray) -> np.ndarray:
        return _unit(_unit(gem) - self.mean)

    def of(self, ids: np.ndarray) -> np.ndarray:
        """Copy vectors of these ids (zeros for ids not held)."""
        at = np.searchsorted(self.ids, ids)
        at = np.clip(at, 0, max(0, len(self.ids) - 1))
        found = (len(self.ids) > 0) & (self.ids[at] == ids) if len(self.ids) else np.zeros(len(ids), bool)
        out = np.zeros((len(ids), self.vectors.shape[1] if len(self.vectors) else 1), np.float32)
        out[found] = self.vectors[at[found]]
        return out

    def nearest(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of each query's m nearest images by copy descriptor."""
        m = min(m, len(self.ids))
        sims = queries @ self.vectors.T
        part = np.argpartition(-sims, m - 1, axis=1)[:, :m] if m < len(self.ids) else np.tile(np.arange(m), (len(sims), 1))
        top = np.take_along_axis(sims, part, 1)
        order = np.argsort(-top, axis=1, kind="stable")
        return np.take_along_axis(top, order, 1), self.ids[np.take_along_axis(part, order, 1)]


class CopyStore:
    """Keeps a collection's CopyIndex current: in memory, and in `copies.npz` (float16) across processes.

    `get(ids, raw_of)` returns the index for exactly these ids, reading raw features only for ids it does
    not hold (the first call on a collection reads them all: ~2 s at 9k images on 2 cores)."""

    def __init__(self, path: Path, cells: int):
        self.path = path
        self.cells = cells
        self._lock = threading.Lock()
        self._index: CopyIndex | None = None

    def get(self, ids: np.ndarray, raw_of: Callable[[np.ndarray], np.ndarray]) -> CopyIndex:
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        with self._lock:
            index = self._index or self._load()
            if index is not None and len(index.ids) == len(ids) and np.array_equal(index.ids, ids):
                self._index = index
                return index
            gem_ids, gem = (index.ids, index.gem) if index is not None else (np.empty(0, np.int64), None)
            keep = np.isin(gem_ids, ids)
            new = np.setdiff1d(ids, gem_ids[keep])
            blocks = [copy_vectors(raw_of(new[i : i + 1024]), self.cells) for i in range(0, len(new), 1024)]
            parts = ([gem[keep]] if gem is not None and keep.any() else []) + blocks
            all_ids = np.concatenate([gem_ids[keep], new])
            order = np.argsort(all_ids)
            all_gem = np.concatenate(parts)[order].astype(np.float16) if parts else np.zeros((0, 1), np.float16)
            self._index = self._build(all_ids[order], all_gem)
            self._save()
            return self._index

    def _build(self, ids: np.ndarray, gem: np.ndarray) -> CopyIndex:
        unit = _unit(gem.astype(np.float32))
        mean = unit.mean(axis=0) if len(unit) else np.zeros(unit.shape[1], np.float32)
        index = CopyIndex(ids, mean.astype(np.float32), _unit(unit - mean).astype(np.float32))
        index.gem = gem  # type: ignore[attr-defined]  # the raw GeM, kept for the file and incremental updates
        return index

    def _load(self) -> CopyIndex | None:
        try:
            with np.load(self.path) as data:
                return self._build(data["ids"], data["gem"])
        except (OSError, ValueError, KeyError):
            return None

    def _save(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp.npz")
        try:
            np.savez(tmp, ids=self._index.ids, gem=self._index.gem)  # type: ignore[union-attr]
            os.replace(tmp, self.path)
        except OSError:  # a read-only collection: kept in memory only
            tmp.unlink(missing_ok=True)


def rank(
    served: list[list[tuple[float, object]]],
    plain_queries: np.ndarray,
    copy_queries: np.ndarray,
    index: CopyIndex,
    plain_of: Callable[[np.ndarray], np.ndarray],
    rows_of: Callable[[np.ndarray], dict[int, object]],
    verify: Callable[[list[list[str]]], list[list[int]]] | None,
) -> list[list[tuple[float, object]]]:
    """Each query's results re-ordered for copies. served: its candidates [(plain cosine, row)] in served order.

    Copy candidates: the served ones plus the POOL nearest by copy descriptor, ranked by plain + copy
    cosine; verify(paths of each query's first VERIFY) -> their inlier counts (ris.verify). The first
    place goes to the most confirmed candidate when `confirmed` says so, else (as before) to the plain
    nearest served one; the rest follow in served order (a first that was not served pushes them down).
    """
    _, copy_ids = index.nearest(copy_queries, POOL) if len(index.ids) else (None, np.zeros((len(served), 0), np.int64))
    extra_rows = rows_of(np.unique(copy_ids))
    checked = []  # each query's copy candidates: [(plain cosine, row)] in fused order
    for q, cands in enumerate(served):
        held = {row.id: row for _, row in cands}
        pool = list(held) + [int(i) for i in dict.fromkeys(copy_ids[q].tolist()) if int(i) not in held and int(i) in extra_rows]
        pool_ids = np.array(pool, np.int64)
        plain_scores = plain_of(pool_ids) @ plain_queries[q] if len(pool) else np.zeros(0, np.float32)
        fused = plain_scores + index.of(pool_ids) @ copy_queries[q]
        order = np.argsort(-fused, kind="stable")[:VERIFY]
        checked.append([(float(plain_scores[j]), held.get(pool[j]) or extra_rows[pool[j]]) for j in order])
    counts = verify([[row.path for _, row in c] for c in checked]) if verify is not None else [[0] * len(c) for c in checked]
    out = []
    for cands, check, count in zip(served, checked, counts, strict=True):
        head = max(cands, key=lambda c: c[0]) if cands else None  # the plain nearest served: the first before
        head_count = next((n for (_, row), n in zip(check, count, strict=True) if head and row.id == head[1].id), 0)
        if count and confirmed(max(count), head_count):
            head = check[int(np.argmax(count))]
        out.append([] if head is None else [head] + [c for c in cands if c[1].id != head[1].id])
    return out


def confirmed(best: int, first: int) -> bool:
    """Whether a candidate with `best` agreeing matches takes the first place from one with `first`."""
    return best >= MIN_INLIERS and best >= MARGIN * first


def query_views(img: Image.Image) -> tuple[Features, Features]:
    """ORB features of a query and of its mirror image; a thumbnail is enlarged first (to UPSAMPLE_TO on its
    longest side), so that a fifth-size copy still yields keypoints (harsh set: inliers of its original
    median 27 this way)."""
    if max(img.size) < UPSAMPLE_BELOW:
        f = UPSAMPLE_TO / max(img.size)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BICUBIC)
    return features(img), features(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def cells_of(pooling: str) -> int:
    from .models import GRID_CELLS

    return GRID_CELLS.get(pooling, 1)
