"""Copies found by their signature where keypoints fail (ris.images.signature).

A strongly blurred and darkened copy, or a thumbnail a fifth of the size at JPEG quality 10-20, keeps too
few keypoints for verification (ris.search.verify) and often drifts out of the CNN's nearest 100. Its 16 x 16
grey layout stays: against the whole collection its original's signature is the nearest by NCC (Caltech-101,
harsh set, seed 0: blur + brightness 0.96, thumbnails 1.00 at MIN_NCC 0.93), and other pictures reach that
only where they are near-duplicates themselves (burst shots, a picture pasted onto another: the NCC of each
indexed image's nearest other one is >= 0.93 for 8% of Caltech-101, most of them such pairs).

So a query takes, as its first result, the indexed image whose signature (or its mirror image's) has the
highest NCC with its own, when that is at least MIN_NCC and beats the first result's own by NCC_MARGIN,
unless verification or the second look confirmed another image of another layout strongly (`overrules`; its NCC
under NEAR_NCC: a picture pasted onto the matched one is the pasted picture's copy). Keypoints do not overrule it between
near-duplicate shots (Caltech-101 holds many, and mirrored twins), nor on a thumbnail (ORB then works on a
picture enlarged from ~60 px, and 12-48 matches were seen to confirm another shot).

Collections of up to SCAN_MAX images compare against every indexed image (a FAISS float16 inner-product
scan: ~0.2 ms at 9,000 images, rebuilt after each write); larger ones only against the query's nearest
images by their vectors (what the first search served).
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from ..images import signature
from ..vectors.catalog import Catalog

#: A signature match at this NCC or more takes the first place; over a confirmed first result whose own NCC is NEAR_NCC or more.
MIN_NCC = 0.93
NEAR_NCC = 0.8
#: A first result whose own NCC is within this of the best match's stays (both are as much the query's copy).
NCC_MARGIN = 0.02
#: Prefer the match of the query as it is to its mirror image's unless the mirror's is better by this much.
MIRROR_MARGIN = 0.01
#: A pasted picture's crop (ris.search.views.pasted) with a match at this NCC or more: that image is verified, and
#: goes first with MIN_INLIERS agreeing keypoints, or twice that below PASTED_SURE (pip copies found this way, seeds 0
#: and 1: NCC >= 0.94 but for 3 of 55, with 34-60 matches; photos of nothing indexed: 0.83-0.87, 8-22 matches).
PASTED_NCC = 0.8
PASTED_SURE = 0.9
#: Over a first result verification confirmed, a pasted picture's match needs this share of its agreeing keypoints:
#: a mild copy of a photo that holds another indexed one (Caltech's crops of its own photos) matched its original with
#: 411-500 and the inner photo with 285-356; pip copies' pasted pictures 129-428 against 13-323 for the background.
PASTED_OVER = 0.8


def pasted_inliers(ncc: float) -> int:
    """Agreeing keypoints that confirm a pasted picture's match at this NCC."""
    from .verify import MIN_INLIERS

    return MIN_INLIERS if ncc >= PASTED_SURE else 2 * MIN_INLIERS


#: Keypoints overrule a signature match with at least this many agreeing matches for the first result: a pixelated
#: copy's block corners confirmed unrelated pictures with 12-38 (held-out set, seed 1), while the pictures pasted onto
#: a matched background, and captioned copies, had 55-343 (harsh sets, seeds 0-2).
OVERRULE_INLIERS = 48


def overrules(head: int, match: int) -> bool:
    """Whether a first result confirmed by `head` agreeing keypoint matches stays before a signature match that had
    `match` (0: not checked): a strong confirmation, and nearly as strong as the match's own (PASTED_OVER; a
    mirrored copy confirmed its plain nearest with 245 and its original with 474)."""
    return head >= OVERRULE_INLIERS and head >= PASTED_OVER * match


#: Collections up to this many images are scanned whole (float16 signatures in memory: 512 bytes an image).
SCAN_MAX = 100_000


class SignatureIndex:
    """The indexed images' signatures for one state of the collection (`key`), scanned or looked up."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._scan: tuple[object, faiss.Index | None, np.ndarray] = (None, None, np.zeros(0, np.int64))

    def _scan_index(self, key: object) -> tuple[faiss.Index | None, np.ndarray]:
        """(the scan over every indexed signature, the ids of its rows); no scan above SCAN_MAX images or when no
        image has a signature. Made anew when the collection's state changes, and swapped in whole."""
        scan = self._scan
        if key != scan[0]:
            index, ids = None, np.zeros(0, np.int64)
            if self.catalog.counts()["ok"] <= SCAN_MAX:
                found, rows = self.catalog.signatures()
                x, valid = signature.unit(rows)
                if valid.any():
                    index = faiss.IndexScalarQuantizer(signature.WIDTH, faiss.ScalarQuantizer.QT_fp16,
                                                       faiss.METRIC_INNER_PRODUCT)  # fmt: skip
                    index.add(x[valid])
                    ids = found[valid]
            scan = self._scan = (key, index, ids)
        return scan[1], scan[2]

    def best(self, key: object, queries: np.ndarray, candidates: Sequence[np.ndarray],
             min_ncc: float = MIN_NCC) -> list[tuple[int, float] | None]:  # fmt: skip
        """Per query signature (uint8 rows), (id, NCC) of its best match at min_ncc or more, else None.

        key: identifies the collection's current state (a search snapshot's stamp); candidates: per query, the
        ids compared when the collection is too large to scan."""
        q, valid = signature.unit(queries)
        m = signature.mirrored(q)  # mirroring only reorders the grey levels: the mirror's unit rows
        index, ids = self._scan_index(key)
        if index is not None:
            scores, rows = index.search(np.vstack([q, m]), 1)
            n = len(q)
            plain = scores[:n, 0] >= scores[n:, 0] - MIRROR_MARGIN  # mirrored twins: the picture as it is
            pick, best = np.where(plain, rows[:n, 0], rows[n:, 0]), np.where(plain, scores[:n, 0], scores[n:, 0])
            found = [(int(ids[r]), float(s)) if r >= 0 else None for r, s in zip(pick, best, strict=True)]
        else:
            found = [self._best_of(q[i], m[i], cands) for i, cands in enumerate(candidates)]
        return [f if ok and f is not None and f[1] >= min_ncc else None for f, ok in zip(found, valid, strict=True)]

    def ncc(self, queries: np.ndarray, ids: Sequence[int]) -> np.ndarray:
        """NCC of each query signature with one image's (that image's or its mirror's, the better); -1 where either
        has none."""
        q, valid = signature.unit(queries)
        m = signature.mirrored(q)
        found, rows = self.catalog.signatures(ids)
        x, has = signature.unit(rows)
        by_id = {int(i): (v, h) for i, v, h in zip(found, x, has, strict=True)}
        out = np.full(len(q), -1.0, np.float32)
        for n, image_id in enumerate(ids):
            v, h = by_id.get(int(image_id), (None, False))
            if h and valid[n]:
                out[n] = max(float(v @ q[n]), float(v @ m[n]))
        return out

    def _best_of(self, q: np.ndarray, m: np.ndarray, candidates: np.ndarray) -> tuple[int, float] | None:
        ids, rows = self.catalog.signatures(np.unique(candidates[candidates >= 0]))
        x, valid = signature.unit(rows)
        if not valid.any():
            return None
        scores = np.maximum(x[valid] @ q, x[valid] @ m - MIRROR_MARGIN)
        best = int(np.argmax(scores))
        return int(ids[valid][best]), float(scores[best])
