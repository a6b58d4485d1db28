"""Retrieval quality: leave-one-out precision@k and mAP over the full ranking, by label.

Each labelled image queries all the others; a neighbour is relevant when it has the query's label.
Rankings come from `index.search` over the vectors in query blocks (never a Python double loop), so
they run on a GPU when one is present (see ris.vectors.faiss_index: RIS_SEARCH_DEVICE) and on the CPU otherwise.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import RisError
from ..vectors import faiss_index as index

#: Caltech-101's clutter folder is not a category; it is left out of the figures.
DEFAULT_EXCLUDE = ("BACKGROUND_Google",)
#: Weight exponent of query expansion; 1 beat 3 on Caltech-101 (mAP 0.964 vs 0.959, 10-class subset).
QE_ALPHA = 1.0


@dataclass
class EvalReport:
    images: int
    classes: int
    precision: dict[int, float]
    map: float
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)

    def worst(self, n: int = 5) -> list[tuple[str, dict[str, float]]]:
        return sorted(self.per_class.items(), key=lambda kv: kv[1]["map"])[:n]

    def as_json(self) -> dict:
        return {
            "images": self.images,
            "classes": self.classes,
            **{f"precision@{k}": round(v, 4) for k, v in self.precision.items()},
            "map": round(self.map, 4),
            "worst_classes": [{"label": lab, **{k: round(v, 4) for k, v in s.items()}} for lab, s in self.worst()],
            "per_class": {lab: {k: round(v, 4) for k, v in s.items()} for lab, s in self.per_class.items()},
        }


def neighbour_average(queries: np.ndarray, base: np.ndarray, k: int, alpha: float = QE_ALPHA, skip_self: bool = False,
                      block: int = 1024, device: str | None = None) -> np.ndarray:  # fmt: skip
    """αQE (Radenović et al.): each query becomes the sim^α-weighted mean of itself and its top-k neighbours.

    Applied to the database itself (queries = base, skip_self=False keeps the vector's own weight 1),
    this is database-side augmentation (DBA). skip_self: query i is base[i], not its own neighbour.
    Vectors are unit-norm in and out.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    db = index.flat(base)
    out = np.empty_like(queries)
    for start in range(0, len(queries), block):
        q = queries[start : start + block]
        sims, top = index.search(db, q, k + skip_self, device=device)
        if skip_self:
            sims, top = _drop(sims, top, np.arange(start, start + len(q)))
        w = np.clip(sims, 0, None) ** alpha
        agg = q + np.einsum("nk,nkd->nd", w, base[top])
        out[start : start + block] = agg / np.linalg.norm(agg, axis=1, keepdims=True)
    return out


def _drop(scores: np.ndarray, ids: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row without the query's own id (or without its last column, where the id is not in it)."""
    gone = ids == own[:, None]
    gone[:, -1] |= ~gone.any(axis=1)
    shape = (len(ids), ids.shape[1] - 1)
    return scores[~gone].reshape(shape), ids[~gone].reshape(shape)


def anchor_first(order: np.ndarray, plain_queries: np.ndarray, plain_base: np.ndarray, pool: int,
                 served: bool = False) -> np.ndarray:  # fmt: skip
    """Rankings (rows of base positions) with the plain nearest of each row's first `pool` moved to the front; with
    `served`, only where it stands out (ris.search.ranking.stands_out): how a collection with DBA or αQE serves its
    first result without verification."""
    from ..search.ranking import stands_out

    head = order[:, :pool]
    sims = np.einsum("nd,nkd->nk", plain_queries, plain_base[head])
    rows, best = np.arange(len(order)), sims.argmax(axis=1)
    moved = stands_out(sims[rows, best], sims[:, 0]) if served else np.ones(len(order), bool)
    first = np.where(moved, head[rows, best], head[:, 0])
    rest = order[order != first[:, None]].reshape(len(order), order.shape[1] - 1)
    return np.concatenate([first[:, None], rest], axis=1)


def _score_rankings(rel: np.ndarray, n_rel: np.ndarray, ks: Sequence[int]) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """Precision@k and average precision per row of a ranked relevance matrix (rel[i, r]: rank r+1 relevant)."""
    hits = np.cumsum(rel, axis=1)
    ranks = np.arange(1, rel.shape[1] + 1, dtype=np.float64)
    precision = {k: hits[:, min(k, rel.shape[1]) - 1] / k for k in ks}
    ap = np.where(n_rel > 0, (rel * hits / ranks).sum(axis=1) / np.maximum(n_rel, 1), 0.0)
    return precision, ap


def leave_one_out(
    vectors: np.ndarray,
    labels: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
    block: int = 512,
    progress: Callable[[int], None] | None = None,
    qe: int = 0,
    device: str | None = None,
    dba: int = 0,
    others: np.ndarray | None = None,
    anchor: int = 0,
    served: bool = False,
) -> EvalReport:
    """Precision@k and average precision of every image querying the rest (unit vectors, cosine).

    qe > 0 expands each query with its qe nearest other images first (αQE, as `search` does).
    dba > 0 ranks against a database augmented as a collection with `--dba` holds it (ris.vectors.dba), each
    database vector rebuilt without the query among its neighbours (what it would be had the query
    never been indexed); queries stay plain. anchor > 0: the plain nearest of the first `anchor` ranked
    goes first (with `served`, where it stands out: as served with DBA or αQE, see anchor_first).
    others: the collection's unlabelled vectors, which take part as DBA neighbours but are not ranked.
    device: where the rankings are computed (`index.search`; default RIS_SEARCH_DEVICE, else auto).
    """
    from ..vectors import dba as dba_mod

    names, y = np.unique(np.asarray(labels), return_inverse=True)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = neighbour_average(x, x, qe, QE_ALPHA, skip_self=True, device=device) if qe else x
    n = len(x)
    patch = None
    if dba:
        context = x if others is None or not len(others) else np.concatenate([x, np.asarray(others, np.float32)])
        db_vectors, patch = dba_mod.without_query(context, dba, n, device=device)
        db = index.flat(db_vectors[:n])
    else:
        db = index.flat(x)
    class_sizes = np.bincount(y)
    prec = {k: np.zeros(n, dtype=np.float32) for k in ks}
    ap = np.zeros(n, dtype=np.float64)
    for start in range(0, n, block):
        stop = min(n, start + block)
        scores, ranked = index.search(db, queries[start:stop], n, device=device)  # every image, the query's own too
        if patch is not None:  # pairs whose database vector held the query: re-scored, re-ranked
            dense = np.empty_like(scores)
            np.put_along_axis(dense, ranked, scores, axis=1)
            patch(dense, start, stop)
            ranked = np.argsort(-dense, axis=1, kind="stable")
        order = ranked[ranked != np.arange(start, stop)[:, None]].reshape(stop - start, n - 1)
        if anchor:
            order = anchor_first(order, x[start:stop], x, anchor, served)
        rel = y[order] == y[start:stop, None]
        block_prec, ap[start:stop] = _score_rankings(rel, class_sizes[y[start:stop]] - 1, ks)
        for k in ks:
            prec[k][start:stop] = block_prec[k]
        if progress:
            progress(stop - start)
    per_class: dict[str, dict[str, float]] = defaultdict(dict)
    for c, name in enumerate(names):
        mask = y == c
        per_class[str(name)] = {"images": int(mask.sum()), "map": float(ap[mask].mean()),
                                **{f"precision@{k}": float(prec[k][mask].mean()) for k in ks}}  # fmt: skip
    return EvalReport(n, len(names), {k: float(v.mean()) for k, v in prec.items()}, float(ap.mean()), dict(per_class))


def labelled(rows_labels: Sequence[str | None], exclude: Sequence[str] = DEFAULT_EXCLUDE) -> np.ndarray:
    """Indices of the rows that take part: a label, not excluded."""
    return np.array([i for i, lab in enumerate(rows_labels) if lab and lab not in exclude], dtype=np.int64)


def evaluate_collection(
    coll,
    ks: Sequence[int] = (1, 5, 10),
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    qe: int | None = None,
    dba: int | None = None,
    queries: str | None = None,
    progress: Callable[[int, int], Callable[[int], None]] | None = None,
) -> EvalReport:
    """What `ris eval` reports: a Collection evaluated as it serves, by folder label.

    Leave-one-out over its labelled images (or, with `queries`, a folder of labelled query images
    against it). qe/dba: None takes the collection's own settings; with DBA the database is augmented as
    the index holds it, and in leave-one-out no database vector holds the query itself (dba.without_query).
    progress: as for Collection.index, a factory (total, total) -> tick.
    """
    from ..errors import RisError
    from ..files.sources import scan
    from ..search.ranking import ANCHOR_POOL
    from ..vectors import dba as dba_mod

    rows, vecs = coll.vectors()
    keep = labelled([r.label for r in rows], exclude)
    if len(keep) < 2:
        raise RisError("evaluation needs at least two labelled images (labels are folder names)")
    labels = [rows[i].label for i in keep]
    n_dba = dba_mod.active(coll.manifest.dba if dba is None else dba, len(rows))
    if n_dba < 0:
        raise RisError("--dba is a number of neighbours (0 = off)")
    n_qe = coll.manifest.query_expansion if qe is None else qe
    if queries:
        files = [f for f in scan([queries]) if f.label and f.label not in exclude]
        qvecs = coll.embed([f.path for f in files])
        db = dba_mod.augment(vecs, *dba_mod.neighbours(vecs, n_dba)) if n_dba else vecs
        return queries_against(qvecs, [f.label for f in files], db[keep], labels, ks, plain_vectors=vecs[keep],
                               anchor=ANCHOR_POOL if n_dba else 0, served=True)  # fmt: skip
    others = vecs[np.setdiff1d(np.arange(len(rows)), keep)]
    anchor = ANCHOR_POOL if n_dba or n_qe else 0  # the first result as served (Collection.search_vectors)
    return leave_one_out(vecs[keep], labels, ks, progress=progress(len(keep), len(keep)) if progress else None,
                         qe=n_qe, dba=n_dba, others=others, anchor=anchor, served=True)  # fmt: skip


def queries_against(
    query_vectors: np.ndarray, query_labels: Sequence[str], db_vectors: np.ndarray, db_labels: Sequence[str],
    ks: Sequence[int] = (1, 5, 10), block: int = 512, device: str | None = None,
    plain_vectors: np.ndarray | None = None, anchor: int = 0, served: bool = False,
) -> EvalReport:  # fmt: skip
    """Labelled queries (not in the collection) against the collection: precision@k and mAP.

    anchor > 0 (db_vectors augmented, plain_vectors the collection's own): the first result is anchored as
    served (anchor_first)."""
    _, y = np.unique(np.asarray(list(query_labels) + list(db_labels)), return_inverse=True)
    yq, yd = y[: len(query_vectors)], y[len(query_vectors) :]
    queries = np.ascontiguousarray(query_vectors, dtype=np.float32)
    db = index.flat(db_vectors)
    precision: dict[int, list[np.ndarray]] = {k: [] for k in ks}
    ap = []
    for start in range(0, len(queries), block):
        _, order = index.search(db, queries[start : start + block], len(yd), device=device)
        if anchor and plain_vectors is not None:
            order = anchor_first(order, queries[start : start + block], np.asarray(plain_vectors, np.float32), anchor,
                                 served)  # fmt: skip
        rel = yd[order] == yq[start : start + block, None]
        block_prec, block_ap = _score_rankings(rel, rel.sum(axis=1), ks)
        for k in ks:
            precision[k].append(block_prec[k])
        ap.append(block_ap)
    return EvalReport(len(queries), len(set(query_labels)),
                      {k: float(np.concatenate(v).mean()) for k, v in precision.items()},
                      float(np.concatenate(ap).mean()))  # fmt: skip


#: The copy sets `copy_detection` knows: the mild transforms of ris.tools.demo, and ris.images.edits' families.
COPY_SETS = ("mild", "harsh", "heldout", "unseen", "fresh", "turned", "joined")


def copy_edits(copy_set: str) -> dict[str, Callable]:
    """name -> edit (picture, generator, other picture) of one copy set, or of all of them ("all")."""
    from ..images import edits
    from .demo import TRANSFORMS

    if copy_set == "all":
        return {name: fn for s in COPY_SETS for name, fn in copy_edits(s).items()}
    if copy_set == "mild":
        return {name: (lambda img, rng, other, t=t: t(img)) for name, t in TRANSFORMS.items()}
    if copy_set not in edits.SETS:
        raise RisError(f"unknown copy set {copy_set!r}; choose one of {', '.join((*COPY_SETS, 'all'))}")
    return edits.SETS[copy_set]


def make_copies(rows: Sequence, n: int, seed: int, copy_set: str, load: Callable[[str], Image.Image],
                only: Sequence[str] | None = None):  # fmt: skip
    """(picked rows, {edit name: [copy of each picked row]}): n rows drawn at random, each edited every way.

    Each copy's parameters come from (seed, edit, item) (ris.images.edits.rng_for); pictures pasted around a copy
    (backgrounds, collage tiles) are other rows than the original. only: these edits of the set alone."""
    from ..images.edits import rng_for

    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    picked = [rows[i] for i in chosen]
    originals = [load(r.path) for r in picked]
    out: dict[str, list[Image.Image]] = {}
    for name, fn in copy_edits(copy_set).items():
        if only is not None and name not in only:
            continue
        copies = []
        for item, (i, img) in enumerate(zip(chosen, originals, strict=True)):
            r = rng_for(seed, name, item)
            other_rng = np.random.default_rng(r.integers(1 << 62))
            others = lambda g=other_rng, i=i: load(rows[_other(g, len(rows), int(i))].path)  # noqa: E731
            copies.append(fn(img, r, others))
        out[name] = copies
    return picked, out


def _other(rng: np.random.Generator, n: int, own: int) -> int:
    j = int(rng.integers(n - 1)) if n > 1 else 0
    return j + (j >= own) if n > 1 else own


def copy_detection(
    coll, n: int, seed: int = 0, k: int = 5, batch: int = 64, qe: int | None = None, verify: bool | None = None,
    copy_set: str = "mild",
) -> dict[str, dict[str, float]]:
    """Recall@1/@k of finding an indexed image from an edited copy of it, per edit, searched as `ris search` does.

    `n` indexed images are drawn at random (seed); each gets every edit of the copy set: "mild" (ris.tools.demo's
    crop, flip, JPEG, half size, rotation by 10, brightness, border, grey, caption), "harsh" or "heldout"
    (ris.images.edits: chained edits with random parameters per image), or "all". "all" in the report is the mean
    over the edits; with several sets, "all <set>" the mean over each.
    verify (default: the collection's): the first result is chosen by geometric verification (ris.search.verify).
    """
    from ..images.decode import open_image, read_file

    rows = coll.catalog.all_rows()
    picked, copies = make_copies(rows, n, seed, copy_set, lambda path: open_image(read_file(path)))
    report: dict[str, dict[str, float]] = {}
    for name, edited in copies.items():
        hits1 = hitsk = 0
        for start in range(0, len(picked), batch):
            results = coll.search_many(edited[start : start + batch], k, qe=qe, verify=verify)  # what `ris search` answers
            for row, result in zip(picked[start : start + batch], results, strict=True):
                ids = [m.id for m in result.matches]
                hits1 += bool(ids) and ids[0] == row.id
                hitsk += row.id in ids
        report[name] = {"recall@1": hits1 / len(picked), f"recall@{k}": hitsk / len(picked)}
    keys = ("recall@1", f"recall@{k}")
    mean = lambda names: {key: float(np.mean([report[x][key] for x in names])) for key in keys}  # noqa: E731
    if copy_set == "all":
        for s in COPY_SETS:
            report[f"all {s}"] = mean(list(copy_edits(s)))
    report["all"] = mean(list(copies))
    return report
