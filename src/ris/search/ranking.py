"""Ranking: from query vectors to ordered, scored results, over whatever vector store the collection has.

The served order comes from the store (DBA-augmented vectors when the collection has DBA). DBA and αQE
favour an image's class over the image itself, which loses copies' originals (copy recall@1 0.97 -> 0.89 on
Caltech-101), so the first place goes to the one of the 5 plain nearest that geometric verification confirms
(ris.search.verify), or else to the plain nearest of the served top ANCHOR_POOL where it `stands_out` (its plain
cosine beats the served first's by ANCHOR_MARGIN, or is SAME_PICTURE high: a copy's original stands out so, an
image merely of the same kind rarely does); the images sharing most keypoints with the query (ris.search.votes,
once the indexed images' keypoints are kept) are verified too, a confirmed one first where none was or by twice
the first's matches; when none is confirmed, a second look at the query's turns, rotations and regions
(ris.search.views; only its pasted picture's crops where the votes hold every image) may confirm another image for
it; the image whose signature matches
the query's (ris.search.copies: blurred, darkened, tiny copies) goes first unless another was confirmed by
keypoints as ris.search.copies says; the image verification confirmed best after it comes second (a copy's
original or another copy of the same picture before images that merely look alike); the rest follow in served
order.

Each match carries two numbers: `similarity`, the plain cosine of query and image, and `score`, what
ranked it: the served score, never increasing down the list (a first result promoted as the query's
copy is shown at least at the score of the result below it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from ..images.query import Query, query_image
from ..tools.evaluate import QE_ALPHA
from ..vectors import faiss_index as index
from ..vectors.catalog import Catalog, ImageRow
from ..vectors.derived import Derived, Snapshot
from . import views
from .copies import SignatureIndex
from .results import Match, SearchResult
from .views import Embed
from .votes import VOTED, VOTED_INLIERS

if TYPE_CHECKING:
    from .verify import Look, Verifier

#: With DBA or αQE and no confirmed copy, the first result is the plain nearest among this many served candidates
#: where it `stands_out`, else the served first (Caltech-101 leave-one-out P@1 / P@5 0.9419 / 0.9397 -> 0.9457 /
#: 0.9403; copies of nothing P@1 0.9255 -> 0.9375; copy sets within a copy of before: benchmarks/RESULTS.md
#: sections 5 and 6).
ANCHOR_POOL = 32
#: Its plain cosine over the served first's by this much, or this high (the same picture: an indexed file searched
#: again, a re-encoded copy; in a low-dimensional PCA other images come within ANCHOR_MARGIN of it).
ANCHOR_MARGIN = 0.03
SAME_PICTURE = 0.95


def stands_out(nearest: np.ndarray | float, first: np.ndarray | float) -> np.ndarray:
    """Whether an unconfirmed plain nearest (plain cosine `nearest`) goes before the served first (`first`): a copy's
    original stands out so, an image merely of the same kind rarely does (the served first is then more often of
    the query's class)."""
    return (np.asarray(nearest) - first >= ANCHOR_MARGIN) | (np.asarray(nearest) >= SAME_PICTURE)

Candidates = list[tuple[float, ImageRow]]
Checked = dict[int, tuple[int, ImageRow]]  # image id -> (agreeing keypoint matches with the query, its row)


@dataclass
class _Verifying:
    """One search's queries while verification chooses their first results: what each look reads, per query, and
    what it updates (heads, confirmed, checked)."""

    snap: Snapshot
    plain: np.ndarray  # the queries' plain vectors
    served: list[Candidates]  # each query's candidates in served order...
    by_plain: list[Candidates]  # ...and by plain cosine
    looks: list[Look]  # verification of the first TOP by plain cosine (ris.search.verify)
    heads: list  # each query's first result so far: (score, row), or None
    confirmed: list[bool]  # whether keypoints confirmed it
    checked: list[Checked]  # the images keypoints were matched with, and their agreeing matches
    crops: list[list[Image.Image]]  # each query's pasted picture's crops (ris.search.views.pasted)
    nprobe: int | None
    threads: int


class Ranker:
    """Searches one collection's current derived set; keeps the verifier's keypoint cache between searches."""

    def __init__(self, catalog: Catalog, derived: Derived):
        self.catalog, self.derived = catalog, derived
        self._verifier: Verifier | None = None
        self.signatures = SignatureIndex(catalog)

    @property
    def verifier(self) -> Verifier:
        """Geometric verification, with the candidates' keypoints it keeps between searches (made on first use)."""
        from .verify import Verifier

        self._verifier = self._verifier or Verifier()
        return self._verifier

    def keep_keypoints(self, threads: int = 1) -> int:
        """Find the indexed images' keypoints (as many as RIS_KEYPOINT_CACHE_MB holds) and build their votes
        (ris.search.votes), as `ris serve` does while idle: searches then verify without decoding candidates, and
        check the images that share most keypoints with the query too; how many images vote."""
        from ..threads import on_threads

        rows = self.keypoint_rows()
        on_threads(lambda part: self.verifier.prepare([r.path for r in part], lambda: True, lambda: False),
                   [rows[i::threads] for i in range(threads)], threads)  # fmt: skip
        return self.verifier.vote_for([(row.id, row.path) for row in rows])

    def keypoint_rows(self) -> list[ImageRow]:
        """The indexed images whose keypoints are kept ahead of searches: the first that RIS_KEYPOINT_CACHE_MB holds."""
        from .verify import KEYPOINT_BYTES

        return self.catalog.page(0, self.verifier.budget // KEYPOINT_BYTES + 1)

    def plain(self, snap: Snapshot, ids: np.ndarray) -> np.ndarray:
        """Plain reduced vectors of these ids: from the DBA graph's copy when it holds them all for this PCA
        (32 candidates: ~0.1 ms), or the file kept beside an approximate index, else (and for whatever
        those lack) from the catalogue's stored vectors."""
        ids = np.asarray(ids, dtype=np.int64)
        graph = snap.graph
        if graph is not None and graph.x is not None and len(ids):
            kept = graph.plain(ids, snap.space.fingerprint)
            if kept is not None:
                return kept
        if snap.kept is not None and len(ids):
            x, known = snap.kept.lookup(ids)
            if not known.all():
                x[~known] = self.derived.reduced(snap.space, ids[~known])
            return x
        return self.derived.reduced(snap.space, ids)

    def _served(self, snap: Snapshot) -> Callable[[np.ndarray], np.ndarray]:
        """What the store holds for a chunk of ids (re-scoring approximate candidates): plain or augmented."""
        plain = lambda c: self.plain(snap, c)  # noqa: E731
        return plain if snap.graph is None else (lambda c: snap.graph.vectors(c, plain))

    def nearest(self, snap: Snapshot, vectors: np.ndarray, k: int, nprobe: int | None):
        """(scores, ids, rows by id) of at least the k nearest searchable images per vector; -1 where none.

        Rows come from the store when it keeps them (Milvus), else from the catalogue (which also drops ids
        deleted since the index was written). Approximate stores' candidates are re-scored exactly.
        """
        store = snap.store
        want = min(store.ntotal, k + 8)  # margin for rows deleted since
        if not want:
            return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64), {}
        if not store.approximate():
            scores, ids, rows = store.search(vectors, want, nprobe)
            return scores, ids, rows or self.catalog.rows(np.unique(ids[ids >= 0]))
        _, ids, rows = store.search(vectors, store.candidates(want), nprobe)
        if rows:  # the store knows which of them are still indexed
            ids = np.where(_indexed(ids, rows), ids, -1)
            scores, ids = index.rerank(vectors, ids, self._served(snap), want)
            return scores, ids, rows
        scores, ids = index.rerank(vectors, ids, self._served(snap), ids.shape[1])
        rows = self._rows_of_best(ids, want)
        found = _indexed(ids, rows)
        best = np.argsort(~found, axis=1, kind="stable")[:, :want]  # still re-scored order, deleted ones out
        scores, ids, found = (np.take_along_axis(a, best, 1) for a in (scores, ids, found))
        return np.where(found, scores, -np.inf), np.where(found, ids, -1), rows

    def _rows_of_best(self, ids: np.ndarray, want: int) -> dict[int, ImageRow]:
        """Catalogue rows of each query's `want` best re-scored candidates still indexed, read best first and
        further only where some were removed since the index was written: a row lookup costs ~15 us at 10M
        images, and only the best 18 of the 180 re-scored are kept."""
        rows: dict[int, ImageRow] = {}
        for end in range(want, ids.shape[1] + want, want):
            block = ids[:, end - want : end]
            rows.update(self.catalog.rows(np.unique(block[block >= 0])))
            head = ids[:, :end]
            if (_indexed(head, rows).sum(1) >= min(want, ids.shape[1])).all():
                break
        return rows

    def expand(self, vectors: np.ndarray, n: int, nprobe: int | None = None) -> np.ndarray:
        """αQE: each query moved towards its n nearest indexed images (weighted by similarity), using their plain
        vectors (approximate indexes cannot reconstruct by id, or only lossily)."""
        snap = self.derived.snapshot()
        sims, ids, rows = self.nearest(snap, vectors, n, nprobe)
        sims, ids = sims[:, :n], ids[:, :n]
        known = np.array(sorted(i for i in np.unique(ids[ids >= 0]) if int(i) in rows), dtype=np.int64)
        found = np.isin(ids, known)
        neighbours = np.zeros((*ids.shape, snap.space.dims), np.float32)
        if len(known):
            neighbours[found] = self.plain(snap, ids[found])
        weights = np.clip(np.where(found, sims, 0), 0, None)[..., None] ** QE_ALPHA
        out = vectors + (weights * neighbours).sum(axis=1)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        names: Sequence[str],
        qe: int = 0,
        nprobe: int | None = None,
        verify_with: Sequence[Query | Callable[[], Image.Image]] | None = None,
        threads: int = 1,
        embed: Embed | None = None,
        signatures: np.ndarray | None = None,
    ) -> list[SearchResult]:
        """The k nearest indexed images per query vector, ordered and scored as the module docstring says.

        verify_with: each query's image (or a loader of it); the first place then goes to the one of the 5
        plain nearest that geometric verification confirms. embed (the model, images -> reduced vectors): a
        query none of whose 5 plain nearest is confirmed gets a second look (ris.search.views). signatures:
        the queries' (ris.images.signature): a signature match goes first where ris.search.copies says so.
        """  # fmt: skip
        from .verify import MIN_INLIERS, TOP, UPSAMPLE_BELOW

        snap = self.derived.snapshot()
        plain = vectors
        if qe and snap.store.ntotal:
            vectors = self.expand(vectors, min(qe, snap.store.ntotal), nprobe)
        reordered = bool(qe) or snap.augmented
        want = max(k, ANCHOR_POOL) if reordered else max(k, TOP) if verify_with is not None else k
        scores, ids, rows = self.nearest(snap, vectors, want, nprobe)
        served = [[(float(sc), rows[int(i)]) for sc, i in zip(srow, irow, strict=True) if int(i) in rows]
                  for srow, irow in zip(scores, ids, strict=True)]  # fmt: skip
        if reordered:  # the served scores compare with augmented or expanded vectors: plain cosines read once for all
            pool = np.unique([row.id for cands in served for _, row in cands]).astype(np.int64)
            pool_vectors = self.plain(snap, pool) if len(pool) else np.zeros((0, snap.space.dims), np.float32)
            sims = [pool_vectors[np.searchsorted(pool, [row.id for _, row in c])] @ plain[q] if c else np.zeros(0)
                    for q, c in enumerate(served)]  # fmt: skip
        else:  # the store serves the plain vectors: its scores are the plain cosines (re-scored exactly when approximate)
            sims = [np.array([score for score, _ in c], np.float32) for c in served]
        by_plain = [[c[j] for j in np.argsort(-s, kind="stable")] for c, s in zip(served, sims, strict=True)]
        heads = [c[0] if c else None for c in by_plain]
        confirmed, small, places = [False] * len(heads), [False] * len(heads), [1] * len(heads)
        checked: list[Checked] = [{} for _ in heads]
        if verify_with is not None:
            voting = self.verifier.votes.covers(snap.store.ntotal)
            looks = self._looks(verify_with, by_plain, threads, own_views=not voting)
            for q, look in enumerate(looks):
                _note(checked[q], [row for _, row in by_plain[q][:TOP]], look.counts)
            v = _Verifying(snap, plain, served, by_plain, looks, heads=[c[look.first] if c else None for c, look in
                           zip(by_plain, looks, strict=True)], confirmed=[look.inliers >= MIN_INLIERS for look in looks],
                           checked=checked, crops=[list(look.beside[0].crops) if look.beside else [] for look in looks],
                           nprobe=nprobe, threads=threads)  # fmt: skip
            small = [look.query is not None and max(look.query.size) < UPSAMPLE_BELOW for look in looks]
            places = [max(1, len(look.beside[0].tiles) - 1) if look.beside else 1 for look in looks]
            self._pasted_look(v)
            if self.verifier.votes.worth(snap.store.ntotal):
                self._vote_look(v)
            if embed is not None:
                self._crop_look(v, embed)
                self._second_look(v, embed, own_views=not voting)
            heads, confirmed = v.heads, v.confirmed
        if reordered:  # an unconfirmed plain nearest goes first only when clearly nearer than the served first
            heads = [h if h is None or ok or stands_out(s.max(), s[0]) else None
                     for h, ok, s in zip(heads, confirmed, sims, strict=True)]  # fmt: skip
        if signatures is not None:
            heads = self._by_signature(snap, signatures, heads, checked, small, served)
        results = []
        for q, (name, cands, sim, head) in enumerate(zip(names, served, sims, heads, strict=True)):
            similarity = {row.id: float(s) for (_, row), s in zip(cands, sim, strict=True)}
            if head is not None and (reordered or verify_with is not None or signatures is not None):
                front = [head[1], *_runners_up(checked[q], head[1].id, places[q])]
                for row in front:
                    if row.id not in similarity:  # found by the second look or its signature: its plain cosine
                        similarity[row.id] = float(self.plain(snap, [row.id])[0] @ plain[q])
                own, ids = {c[1].id: c for c in cands}, {row.id for row in front}
                cands = [own.get(row.id, (similarity[row.id], row)) for row in front] + [c for c in cands if c[1].id not in ids]
            results.append(SearchResult(name, _matches(cands[:k], similarity, checked[q])))
        return results

    def _looks(self, queries: Sequence[Query | Callable[[], Image.Image]], ranked: list[Candidates],
               threads: int, own_views: bool = True) -> list[Look]:  # fmt: skip
        """Which of each query's 5 plain nearest geometric verification puts first (candidates' keypoints cached),
        with the crops of each query's pasted picture (ris.search.views.pasted) and, for a query alone, its second
        look's own views (made beside its keypoints, where own_views); queries are decoded at verification's
        working size."""
        from .verify import MAX_SIDE, TOP

        loaders = [q if callable(q) else (lambda q=q: query_image(q, MAX_SIDE)) for q in queries]
        jobs = [(load, [row.path for _, row in cands[:TOP]]) for load, cands in zip(loaders, ranked, strict=True)]
        alone = len(jobs) == 1 and threads > 1 and own_views  # its views made beside its keypoints: an idle thread

        def beside(full: Image.Image, work: Image.Image) -> list[Callable[[], object]]:
            return [lambda: views.pasted(full)] + ([lambda: views.own_views(work)] if alone else [])

        return self.verifier.looks(jobs, threads, beside)

    def _by_signature(self, snap: Snapshot, signatures: np.ndarray, heads: list, checked: list[Checked], small: list[bool],
                      served: list[Candidates]) -> list:  # fmt: skip
        """Heads with each query's signature match first where ris.search.copies says so (checked: the images keypoints
        were matched with, and their agreeing matches; small: a thumbnail); served: the candidates a collection too
        large to scan compares."""
        from .copies import NCC_MARGIN, NEAR_NCC, overrules

        ids = [np.array([row.id for _, row in c] + ([h[1].id] if h else []), np.int64)
               for c, h in zip(served, heads, strict=True)]  # fmt: skip
        found = self.signatures.best(snap.stamp, signatures, ids)
        todo = [q for q, f in enumerate(found) if f is not None and (heads[q] is None or heads[q][1].id != f[0])]
        have = [q for q in todo if heads[q] is not None]
        own = dict(zip(have, self.signatures.ncc(signatures[have], [heads[q][1].id for q in have]) if have else [], strict=True))
        matches = {q: [checked[q].get(i, (0,))[0] for i in (heads[q][1].id, found[q][0])] for q in have}
        keep = {q for q in have if own[q] >= found[q][1] - NCC_MARGIN  # as good a match: the head stays
                or (not small[q] and own[q] < NEAR_NCC and overrules(*matches[q]))}  # keypoints confirmed another layout
        todo = [q for q in todo if q not in keep]
        rows = self.catalog.rows([found[q][0] for q in todo])
        for q in todo:
            heads[q] = (0.0, rows[found[q][0]]) if found[q][0] in rows else heads[q]
        return heads

    def _second_look(self, v: _Verifying, embed: Embed, own_views: bool = True) -> None:
        """ris.search.views' second look for the queries whose first result verification did not confirm: their views
        (with their pasted picture's crop) embedded in one batch, each image's best cosine over a query's views, the
        best CANDIDATES verified, and each tile's TILE_NEAREST (pictures joined: views.tiles); a confirmed one
        (MIN_INLIERS, MARGIN x the first result's matches) goes first. Without own_views (the keypoint votes found what
        they would), only a pasted picture's first crop and the tiles are views, and a query with neither gets no
        second look."""
        from ..threads import on_threads
        from .verify import TOP, choose

        looks, crops, plain, threads = v.looks, v.crops, v.plain, v.threads
        tiles = [look.beside[0].tiles if look.beside else [] for look in looks]
        todo = [q for q, look in enumerate(looks)
                if look.query is not None and not v.confirmed[q] and (own_views or crops[q] or tiles[q])]  # fmt: skip
        if not todo:
            return
        if own_views:
            made, cut = {q: looks[q].beside[1] for q in todo if len(looks[q].beside) > 1}, views.CROP_VIEWS  # beside keypoints
        else:
            made, cut = dict.fromkeys(todo, []), views.VOTED_CROP_VIEWS
        shots = [views.views(looks[q].query, crops[q][:cut], made.get(q), tiles[q]) for q in todo]
        vectors = embed([view for shot in shots for view in shot])
        bounds = np.cumsum([0] + [len(shot) for shot in shots])
        turns = len(views.QUARTER_TURNS) if own_views else 0  # own views begin with the quarter turns
        alone = threads if len(todo) == 1 else 1  # one query: its candidates side by side
        _, ids, rows = self.nearest(v.snap, np.vstack([vectors, plain[todo]]), views.PER_VIEW, v.nprobe)

        def one(j: int) -> tuple[float, ImageRow] | None:
            q, start, end = todo[j], bounds[j] + turns, bounds[j + 1] - len(tiles[todo[j]])  # the tiles come last
            found = np.unique(np.concatenate([ids[start:end].ravel(), ids[len(vectors) + j]]))
            seen = {row.id for _, row in v.by_plain[q][:TOP]}
            found = np.array([i for i in found if int(i) in rows and int(i) not in seen], np.int64)
            shot = np.vstack([plain[q : q + 1], vectors[start:end]])
            order = views.best_per_image(shot, found, self.plain(v.snap, found))[0] if len(found) else found
            pick = [rows[int(i)] for i in order[: views.CANDIDATES]]
            turned = ids[bounds[j] : start, : views.TURNED_NEAREST].ravel()
            pick += self._turned(v, q, vectors[bounds[j] : start], turned, rows, {row.id for row in pick} | seen)
            taken = {row.id for row in pick} | seen  # each tile's nearest besides: they took the CANDIDATES' places
            tiled = dict.fromkeys(int(i) for i in ids[end : bounds[j + 1], : views.TILE_NEAREST].ravel())
            pick += [rows[i] for i in tiled if i in rows and i not in taken]
            if not pick:
                return None
            counts = self.verifier.counts(looks[q].views, [row.path for row in pick], alone)
            _note(v.checked[q], pick, counts)
            best = choose([looks[q].inliers, *counts])
            return (0.0, pick[best - 1]) if best else None

        for q, head in zip(todo, on_threads(one, range(len(todo)), threads), strict=True):
            v.heads[q], v.confirmed[q] = head or v.heads[q], v.confirmed[q] or head is not None

    def _turned(self, v: _Verifying, q: int, turned: np.ndarray, nearest: np.ndarray, rows: dict[int, ImageRow],
                taken: set[int]) -> list[ImageRow]:  # fmt: skip
        """The nearest images of the quarter turns of query q (`turned`: their vectors; `nearest`: the ids each one's
        search found, views.TURNED_NEAREST a turn) that are nearer to a turned query than any image is to the query as
        it stands: a photo on its side finds its original so, while other queries' turns rarely come that near and
        cost no verification. Apart from the other views' CANDIDATES, so as not to take their places."""
        from .verify import TOP

        new = [int(i) for i in dict.fromkeys(nearest.tolist()) if int(i) in rows and int(i) not in taken]
        if not new:
            return []
        near = self.plain(v.snap, np.array([row.id for _, row in v.by_plain[q][:TOP]] + new, np.int64))
        standing = float((near @ v.plain[q]).max())
        gain = (near[-len(new) :] @ turned.T).max(axis=1)
        return [rows[i] for i, g in zip(new, gain, strict=True) if g > standing]

    def _vote_look(self, v: _Verifying) -> None:
        """Verify the VOTED images that share most keypoints with each query (ris.search.votes) and were not checked yet:
        one with VOTED_INLIERS agreeing matches and MARGIN x the first result's goes first, by verification's own rule
        (a photo on its side: its original with ~460 matches over a look-alike confirmed with 14), else is noted to
        come second (_runners_up)."""
        from ..threads import on_threads
        from .verify import choose

        votes, looks, threads, checked = self.verifier.votes, v.looks, v.threads, v.checked
        todo = [q for q, look in enumerate(looks) if look.query is not None]
        voted = {q: [i for i, _ in votes.best(looks[q].views, VOTED, threads) if i not in checked[q]] for q in todo}
        rows = self.catalog.rows([i for ids in voted.values() for i in ids])
        picks = {q: [rows[i] for i in voted[q] if i in rows] for q in todo}
        todo = [q for q in todo if picks[q]]
        alone = threads if len(todo) == 1 else 1

        def one(q: int) -> list[int]:
            return self.verifier.counts(looks[q].views, [row.path for row in picks[q]], alone)

        for q, counts in zip(todo, on_threads(one, todo, threads), strict=True):
            strong = [(row, n) for row, n in zip(picks[q], counts, strict=True) if n >= VOTED_INLIERS]
            _note(checked[q], [row for row, _ in strong], [n for _, n in strong])
            head = checked[q].get(v.heads[q][1].id, (0,))[0] if v.confirmed[q] else looks[q].inliers
            best = choose([head, *(n for _, n in strong)])
            if best:
                v.heads[q], v.confirmed[q] = (0.0, strong[best - 1][0]), True

    def _crop_look(self, v: _Verifying, embed: Embed) -> None:
        """A confirmed first result that leaves a region of the query unexplained (ris.search.verify.unexplained: a
        picture pasted over it, a sticker, another picture beside it) gets the query's pasted picture and tiles searched
        too: its crops and each tile embedded, the CROP_CANDIDATES best new images of each verified with their own
        keypoints and noted, so that a confirmed one comes second (_runners_up). Without it, a picture pasted onto
        another indexed one found only that one (its second look does not run): harsh set, seeds 0/1/2/5, pip copies
        R@5 194 -> 209 of 240; with the tiles, pictures joined with others (joined set, seeds 1/2, with the votes)
        0.807 / 0.830 -> 0.863 / 0.870."""
        from ..threads import on_threads
        from .verify import enlarged, features, unexplained

        left = {q: unexplained(look, self.verifier.keypoints(v.heads[q][1].path), look.beside[0].boxes)
                for q, look in enumerate(v.looks)
                if v.confirmed[q] and v.heads[q] is not None and look.beside and look.beside[0].boxes}  # fmt: skip
        todo = [q for q, boxes in left.items() if any(boxes)]
        if not todo:
            return
        groups = [self._left_out(v.crops[q], v.looks[q].beside[0].tiles, left[q]) for q in todo]
        vectors = embed([crop for shot in groups for group in shot for crop in group])
        _, ids, rows = self.nearest(v.snap, vectors, views.PER_VIEW, v.nprobe)
        bounds = np.cumsum([0] + [len(group) for shot in groups for group in shot])  # each group's views
        starts = np.cumsum([0] + [len(shot) for shot in groups])  # each query's first group
        threads, checked = v.threads, v.checked
        alone = threads if len(todo) == 1 else 1

        def one(j: int) -> None:
            q = todo[j]
            pick: list[ImageRow] = []
            for g in range(starts[j], starts[j + 1]):
                taken = {row.id for row in pick}
                found = np.unique(ids[bounds[g] : bounds[g + 1]])
                found = np.array([i for i in found if int(i) in rows and int(i) not in checked[q] and int(i) not in taken],
                                 np.int64)  # fmt: skip
                if len(found):
                    order, _ = views.best_per_image(vectors[bounds[g] : bounds[g + 1]], found, self.plain(v.snap, found))
                    pick += [rows[int(i)] for i in order[: views.CROP_CANDIDATES]]
            if pick:
                own = [features(enlarged(crop)) for group in groups[j] for crop in group]
                _note(checked[q], pick, self.verifier.counts(own, [row.path for row in pick], alone))

        on_threads(one, range(len(todo)), threads)

    @staticmethod
    def _left_out(crops: list[Image.Image], tiles: list[Image.Image], left: list[bool]) -> list[list[Image.Image]]:
        """The groups of views a confirmed first result leaves unexplained: the pasted picture's first crops where one
        of its boxes is, and each tile that is (the first result's own tile would find its look-alikes: a crab
        confirmed by 50 chance matches beside a hawksbill took its yin-yang's place, joined set, seed 1)."""
        pieces = left[len(left) - len(tiles) :]
        return [g for g in (crops[: views.CROP_VIEWS] if any(left[: len(left) - len(tiles)]) else [],
                            *([t] for t, out in zip(tiles, pieces, strict=True) if out)) if g]  # fmt: skip

    def _pasted_look(self, v: _Verifying) -> None:
        """Each query's pasted picture first (ris.search.views.pasted) where an indexed image's
        signature matches its crop and keypoints confirm that image (ris.search.copies.pasted_inliers), the crop's
        own or the query's (a picture pasted at a quarter of the side keeps few of the query's 500 keypoints): a
        picture pasted onto another indexed one (a picture-in-picture of two of them) is the copy of the pasted one,
        when its match is nearly as strong (PASTED_OVER) as the first result's."""
        from ..images import signature
        from ..threads import on_threads
        from .copies import PASTED_NCC, PASTED_OVER, pasted_inliers
        from .verify import query_views

        looks, heads, confirmed = v.looks, v.heads, v.confirmed
        todo = [(q, crop) for q, cs in enumerate(v.crops) for crop in cs]
        if not todo:
            return
        sigs = np.stack([signature.of_image(crop) for _, crop in todo])
        found = self.signatures.best(v.snap.stamp, sigs, [np.array([row.id for _, row in v.served[q]], np.int64)
                                                          for q, _ in todo], PASTED_NCC)  # fmt: skip
        rows = self.catalog.rows([f[0] for f in found if f is not None])
        check: dict[tuple[int, int], tuple[int, ImageRow, float, Image.Image]] = {}
        for (q, crop), f in zip(todo, found, strict=True):
            if f is not None and f[0] in rows and (heads[q] is None or heads[q][1].id != f[0]):
                if (q, f[0]) not in check or f[1] > check[q, f[0]][2]:
                    check[q, f[0]] = (q, rows[f[0]], f[1], crop)

        def inliers(c: tuple[int, ImageRow, float, Image.Image]) -> int:
            views = (*looks[c[0]].views, *query_views(c[3])[0])
            return self.verifier.counts(views, [c[1].path])[0]

        counts = on_threads(inliers, list(check.values()), v.threads)
        best: dict[int, tuple[int, ImageRow]] = {}  # per query, its best confirmed match
        for (q, row, ncc, _), n in zip(check.values(), counts, strict=True):
            _note(v.checked[q], [row], [n])
            strong = n >= pasted_inliers(ncc) and (not confirmed[q] or n >= PASTED_OVER * looks[q].inliers)
            if strong and n > best.get(q, (0, None))[0]:
                best[q] = (n, row)
        for q, (_, row) in best.items():
            heads[q], confirmed[q] = (0.0, row), True


def _note(checked: Checked, rows: Sequence[ImageRow], counts: Sequence[int]) -> None:
    """Remember each row's agreeing matches with the query (its best, when checked twice)."""
    for row, n in zip(rows, counts, strict=False):  # a query that could not be loaded has no counts
        if n > checked.get(row.id, (-1, row))[0]:
            checked[row.id] = (n, row)


def _runners_up(checked: Checked, first: int, places: int = 1) -> list[ImageRow]:
    """The images that verification confirmed best (MIN_INLIERS) after the first result, up to `places` (one, or one
    less than a joined query's tiles: a triptych holds three pictures): an image that shares the query's content comes
    before those that look alike (harsh copy set, seed 1: recall@5 0.947 -> 0.951; held-out set 0.767 -> 0.781;
    photos that are copies of nothing, served P@5 by class 0.936 -> 0.934)."""
    from .verify import MIN_INLIERS

    best = sorted(((n, row.id, row) for n, row in checked.values() if row.id != first and n >= MIN_INLIERS), reverse=True)
    return [row for _, _, row in best[:places]]


def _indexed(ids: np.ndarray, rows: dict[int, ImageRow]) -> np.ndarray:
    """Which of these ids have a catalogue row (are still indexed)."""
    return np.isin(ids, np.fromiter(rows, np.int64, len(rows)))


def _matches(cands: Candidates, similarity: dict[int, float], checked: Checked) -> list[Match]:
    """Matches in this order; `score` the served score made non-increasing from the bottom up (a promoted first
    result is shown at least at the score below it), `similarity` the plain cosine, `inliers` where keypoints
    confirmed the image (checked: the agreeing matches of those verification looked at)."""
    from .verify import MIN_INLIERS

    scores = [score for score, _ in cands]
    for i in range(len(scores) - 2, -1, -1):
        scores[i] = max(scores[i], scores[i + 1])
    agreeing = {i: n for i, (n, _) in checked.items() if n >= MIN_INLIERS}
    return [Match(rank, row.path, score, row.label, row.id, similarity.get(row.id, score), agreeing.get(row.id))
            for rank, (score, (_, row)) in enumerate(zip(scores, cands, strict=True), start=1)]  # fmt: skip
