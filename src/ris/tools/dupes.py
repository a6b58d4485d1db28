"""Duplicate finding: exact copies (same content hash) and near-duplicates (resized, re-encoded, cropped).

Exact copies come straight from the catalogue's sha256. Near-duplicates come from one batched
self-search of the collection's vectors (`index.range_search` in blocks, so memory stays bounded and
no Python loop runs over pairs; on a GPU when one is present, see ris.vectors.faiss_index: RIS_SEARCH_DEVICE);
every pair at or above the threshold joins a union-find, and each connected component becomes one group.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import RisError
from ..vectors import faiss_index as index
from ..vectors.catalog import ImageRow

#: Cosine similarity at or above which two images count as near-duplicates. Chosen by measurement
#: (benchmarks/quality/dupes_precision.py, 500 Caltech-101 originals + 160 copies, grid pooling, PCA 256): at 0.88
#: recall 0.981 of resized/JPEG-q30/80%-cropped/exact copies, 85% of the pairs with a copy in them right
#: (73% of all pairs: Caltech holds near-identical photos of its own); 0.85 finds more, 0.92 errs less.
DEFAULT_THRESHOLD = 0.88
#: The same on raw features (a collection too small for its PCA yet): unreduced cosines run lower, for
#: copies and unrelated images alike, the more so the wider the features (60 originals + 20 copies: grid
#: copies >= 0.835, closest unrelated pair 0.54; at 0.80 precision and recall 1.0 for grid and grid3,
#: at 0.85 recall 0.95 / 0.85).
RAW_THRESHOLD = 0.80
#: confirm_pairs: each image's nearest this many, from this cosine up, are verified; a pair is a copy with
#: this many agreeing keypoint matches (more than search's 12: no query/original asymmetry to lean on; on
#: benchmarks/quality/dupes_precision.py, copies rotated 20-30 degrees and rescaled: median 176, 10th pctl 58; pairs of
#: other photos: 95th pctl 10, a few over 40 being the same scene shot twice).
VERIFY_NEIGHBOURS = 4
VERIFY_FLOOR = 0.45
DUPE_INLIERS = 40
BLOCK = 4096  # queries per range search: bounds the result buffers on large collections
PAIRWISE_LIMIT = 2000  # groups up to this size report their exact minimum pairwise similarity


@dataclass(frozen=True)
class DupeGroup:
    """Images that are copies of each other. kind is "exact" when all share one content hash."""

    kind: str
    images: list[ImageRow]
    similarity: float  # the lowest similarity of a member to the representative (images[0])
    scores: list[float] = field(default_factory=list)  # each image's similarity to the representative (its own: 1)
    inliers: list[int | None] = field(default_factory=list)  # matches confirming it a copy of the representative, if below


def similar_pairs(
    vectors: np.ndarray, threshold: float, block: int = BLOCK, device: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) of unit vectors whose inner product is >= threshold: (i, j, similarity)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    db = index.flat(x)
    radius = float(threshold) - 1e-6  # range_search keeps scores strictly above the radius
    found_i, found_j, found_s = [], [], []
    for start in range(0, len(x), block):
        lims, sims, ids = index.range_search(db, x[start : start + block], radius, device=device)
        queries = start + np.repeat(np.arange(len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64))
        keep = ids > queries  # each pair once, never an image with itself
        found_i.append(queries[keep])
        found_j.append(ids[keep])
        found_s.append(sims[keep])
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32)
    return np.concatenate(found_i), np.concatenate(found_j).astype(np.int64), np.concatenate(found_s)


def group_indices(
    n: int, hashes: list[str | None], vectors: np.ndarray, threshold: float, device: str | None = None,
    confirmed: dict[tuple[int, int], int] | None = None,
) -> list[tuple[list[int], list[float]]]:
    """Groups (of size > 1) around representatives: (members, representative first, and each one's similarity
    to the representative); every member is at or above the threshold against it (no chaining).

    Images sharing a content hash are one image here (similarity 1). Representatives are taken greedily,
    the image with the most near-duplicates not yet grouped first (ties: the higher summed similarity,
    then the lower index); it takes all of those, so a chain a~b~c with a !~ c never joins a and c.
    confirmed: pairs (i < j) below the threshold that geometric verification confirmed (confirm_pairs);
    they count as near-duplicates too, with their cosine as similarity.
    """
    rep_of = list(range(n))  # exact copies collapse onto their first image
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, sha in enumerate(hashes):
        if sha:
            by_hash[sha].append(i)
    for members in by_hash.values():
        for other in members[1:]:
            rep_of[other] = members[0]
    ii, jj, ss = similar_pairs(vectors, threshold, device=device)
    found = list(zip(ii.tolist(), jj.tolist(), ss.tolist(), strict=True))
    found += [(a, b, float(vectors[a] @ vectors[b])) for a, b in (confirmed or {})]
    neighbours: dict[int, dict[int, float]] = defaultdict(dict)
    for a, b, s in found:
        a, b = rep_of[a], rep_of[b]
        if a != b:
            neighbours[a][b] = max(s, neighbours[a].get(b, -1.0))
            neighbours[b][a] = neighbours[a][b]
    exact = {m[0]: m[1:] for m in by_hash.values() if len(m) > 1}
    taken: set[int] = set()
    order = sorted(set(neighbours) | set(exact), key=lambda i: (-len(neighbours[i]), -sum(neighbours[i].values()), i))
    groups = []
    for rep in order:
        if rep in taken:
            continue
        near = sorted(((s, j) for j, s in neighbours[rep].items() if j not in taken), key=lambda t: (-t[0], t[1]))
        members = [rep] + exact.get(rep, []) + [j for _, j in near]
        sims = [1.0] * (1 + len(exact.get(rep, []))) + [min(s, 1.0) for s, _ in near]
        for j, _ in ((j, s) for s, j in near):
            members += exact.get(j, [])
            sims += [sims[members.index(j)]] * len(exact.get(j, []))
        if len(members) > 1:
            taken.update(members)
            groups.append((members, sims))
    return groups


def dupe_vectors(coll) -> tuple[list[ImageRow], np.ndarray]:
    """Every image's row and the vector near-duplicates are judged by."""
    return coll.vectors()


def default_threshold(coll) -> float:
    """The near-duplicate threshold for this collection's vectors: PCA-reduced or raw."""
    return DEFAULT_THRESHOLD if coll.info()["pca"] else RAW_THRESHOLD


def find_duplicates(coll, threshold: float | None = None, device: str | None = None, verify: bool = True) -> list[DupeGroup]:
    """Groups of exact and near-duplicate images in the collection, largest first (device: see index.search).

    Each group lists its representative first, then the others by similarity to it (group_indices).
    threshold: default_threshold(coll) when not given."""
    return find(coll, threshold, device, verify)[0]


def find(coll, threshold: float | None = None, device: str | None = None, verify: bool = True):
    """(groups, every near-duplicate pair as {image: [(other, similarity)]}) of the collection.

    verify: pairs below the threshold that geometric verification confirms count too (confirm_pairs)."""
    threshold = default_threshold(coll) if threshold is None else threshold
    if not 0.0 < threshold <= 1.0:
        raise RisError(f"--threshold must be in (0, 1], not {threshold}")
    rows, vectors = dupe_vectors(coll)
    if not rows:
        return [], {}
    confirmed = confirm_pairs(rows, vectors, threshold, device) if verify else {}
    same: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.sha256:
            same[r.sha256].append(i)
    twins = {i: same[r.sha256] if r.sha256 else [i] for i, r in enumerate(rows)}
    groups = []
    for members, sims in group_indices(len(rows), [r.sha256 for r in rows], vectors, threshold, device, confirmed):
        images = [rows[i] for i in members]
        exact = len({r.sha256 for r in images}) == 1 and images[0].sha256 is not None
        scores = [round(float(x), 4) for x in sims]
        inl = [_pair_inliers(confirmed, twins, members[0], m) for m in members]
        groups.append(DupeGroup("exact" if exact else "near", images, 1.0 if exact else min(scores[1:]), scores, inl))
    groups.sort(key=lambda g: (-len(g.images), g.kind != "exact", g.images[0].path))
    return groups, _pairs_by_image(rows, vectors, threshold, device, confirmed)


def confirm_pairs(rows: list[ImageRow], vectors: np.ndarray, threshold: float, device: str | None = None,
                  threads: int | None = None) -> dict[tuple[int, int], int]:  # fmt: skip
    """Pairs (i < j) below the threshold that ORB + RANSAC confirm as copies: {pair: agreeing matches}.

    Rotated, sheared or cropped copies fall below any cosine threshold that keeps different photos of one
    kind of object apart (harsh set: a 15-40 degree rotation's cosine to its original has median 0.72,
    the closest other photo of its class 0.77), but their keypoints still agree under one similarity
    transform. Each image's VERIFY_NEIGHBOURS nearest with cosine >= VERIFY_FLOOR are checked (both
    images' keypoints found once; a mirrored view too), on the CPU threads."""
    from concurrent.futures import ThreadPoolExecutor

    from ..model import runtime
    from ..search.verify import Verifier, query_views

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    sims, top = index.search(index.flat(x), x, min(len(x), VERIFY_NEIGHBOURS + 1), device=device)
    todo = sorted({(min(a, int(b)), max(a, int(b))) for a in range(len(x)) for b, s in zip(top[a], sims[a], strict=True)
                   if int(b) != a and int(b) >= 0 and VERIFY_FLOOR <= s < threshold})  # fmt: skip
    if not todo:
        return {}
    verifier = Verifier(cache_size=len(x) + 1)

    def check(pair: tuple[int, int]) -> int:
        from ..images.decode import open_image, read_file

        try:
            img = open_image(read_file(rows[pair[0]].path))
        except Exception:  # noqa: BLE001  # a file gone or changed since indexing: not confirmed
            return 0
        return verifier.counts(query_views(img), [rows[pair[1]].path])[0]

    with ThreadPoolExecutor(threads or runtime.cpu_threads()) as pool:
        counts = list(pool.map(check, todo))
    return {pair: n for pair, n in zip(todo, counts, strict=True) if n >= DUPE_INLIERS}


def _pair_inliers(confirmed: dict[tuple[int, int], int], twins: dict[int, list[int]], a: int, b: int) -> int | None:
    """The matches confirming a and b copies of each other (exact copies of either answer for it), or None."""
    found = [confirmed.get((min(x, y), max(x, y)), 0) for x in twins[a] for y in twins[b] if x != y]
    return max(found, default=0) or None


def _pairs_by_image(rows: list[ImageRow], vectors: np.ndarray, threshold: float, device: str | None,
                    confirmed: dict[tuple[int, int], int]):  # fmt: skip
    """Each image with a near-duplicate: its near-duplicates (and exact copies), most similar first."""
    out: dict[str, list[tuple[str, float]]] = defaultdict(list)
    ii, jj, ss = similar_pairs(vectors, threshold, device=device)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        if r.sha256:
            by_hash[r.sha256].append(i)
    pairs = {(a, b): s for a, b, s in zip(ii.tolist(), jj.tolist(), ss.tolist(), strict=True)}
    pairs.update({(a, b): float(vectors[a] @ vectors[b]) for a, b in confirmed})
    for members in by_hash.values():
        pairs.update({(a, b): 1.0 for a in members for b in members if a < b})
    for (a, b), s in pairs.items():
        out[rows[a].path].append((rows[b].path, round(min(float(s), 1.0), 4)))
        out[rows[b].path].append((rows[a].path, round(min(float(s), 1.0), 4)))
    return {p: sorted(v, key=lambda t: (-t[1], t[0])) for p, v in sorted(out.items())}


# --- which to keep --------------------------------------------------------------------------------

KEEP_RULES = ("largest", "newest", "first")


def to_delete(groups: list[DupeGroup], keep: str) -> list[tuple[str, str]]:
    """(path to delete, path kept) for every group member but the one `keep` chooses; nothing is deleted here.

    largest: most pixels (then most bytes); newest: latest modification time; first: first path by name."""
    if keep not in KEEP_RULES:
        raise RisError(f"--keep is one of {', '.join(KEEP_RULES)}, not {keep!r}")
    out = []
    for g in groups:
        paths = [r.path for r in g.images]
        kept = max(paths, key=_keep_key(keep))
        out += [(p, kept) for p in paths if p != kept]
    return out


def _keep_key(keep: str):
    def largest(path: str) -> tuple:
        try:
            with Image.open(path) as img:
                pixels = img.width * img.height
        except (OSError, ValueError, Image.DecompressionBombError):
            pixels = 0
        return (pixels, _stat(path).st_size if _stat(path) else 0, _neg_path(path))

    def newest(path: str) -> tuple:
        st = _stat(path)
        return (st.st_mtime_ns if st else 0, _neg_path(path))

    return {"largest": largest, "newest": newest, "first": _neg_path}[keep]


def _neg_path(path: str) -> tuple:
    """Sorts the first path by name highest (max() keeps it)."""
    return tuple(-ord(c) for c in path)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


# --- output --------------------------------------------------------------------------------------


def to_json(groups: list[DupeGroup], n_images: int, by_image: dict[str, list[tuple[str, float]]] | None = None) -> str:
    data = {
        "groups": [
            {"kind": g.kind, "representative": g.images[0].path, "similarity": g.similarity,
             "images": [{"path": r.path, "label": r.label, "similarity": s, "inliers": n}
                        for r, s, n in zip(g.images, g.scores, _inliers(g), strict=True)]}
            for g in groups
        ],
        "images": n_images,
    }  # fmt: skip
    if by_image is not None:
        data["duplicates"] = {p: [{"path": o, "similarity": s} for o, s in others] for p, others in by_image.items()}
    return json.dumps(data)


def _inliers(g: DupeGroup) -> list[int | None]:
    return g.inliers or [None] * len(g.images)


def to_csv(groups: list[DupeGroup]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group_id", "kind", "path", "similarity", "representative"])
    for n, g in enumerate(groups, 1):
        for r, s in zip(g.images, g.scores, strict=True):
            writer.writerow([n, g.kind, r.path, f"{s:.4f}", int(r is g.images[0])])
    return buf.getvalue()


def to_text(groups: list[DupeGroup], n_images: int) -> str:
    exact = sum(g.kind == "exact" for g in groups)
    lines = []
    for n, g in enumerate(groups, 1):
        lines.append(f"group {n}: {g.kind}, {len(g.images)} images, similarity {g.similarity:.3f} (lowest to the first)")
        lines.extend(f"  {r.path}" + (f"  [{r.label}]" if r.label else "") + ("  (representative)" if i == 0 else f"  {s:.3f}")
                     + (f" (confirmed: {n} keypoint matches)" if n else "")
                     for i, (r, s, n) in enumerate(zip(g.images, g.scores, _inliers(g), strict=True)))  # fmt: skip
    lines.append(f"{len(groups)} groups ({exact} exact, {len(groups) - exact} near) among {n_images} images")
    return "\n".join(lines)


def to_html(groups: list[DupeGroup], out: str | Path, n_images: int) -> Path:
    """A self-contained page: each group's thumbnails in a row, the representative first, similarities under."""
    from ..search.results import thumbnail_figure

    sections = []
    for n, g in enumerate(groups, 1):
        figures = [thumbnail_figure(r.path, ("<b>representative</b>" if i == 0 else f"{s:.3f}")
                                    + (f" · {n} matches" if n else "") + f"<br><small>{html.escape(Path(r.path).name)}</small>")
                   for i, (r, s, n) in enumerate(zip(g.images, g.scores, _inliers(g), strict=True))]  # fmt: skip
        sections.append(f"<section><h2>group {n}: {g.kind}, {len(g.images)} images, lowest similarity to the "
                        f"representative {g.similarity:.3f}</h2><div class=row>{''.join(figures)}</div></section>")  # fmt: skip
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ris dupes</title>
<style>body{{font:14px sans-serif;margin:20px}} h2{{font-size:14px;color:#444}}
.row{{display:flex;gap:10px;flex-wrap:wrap;align-items:flex-start}}</style></head>
<body><h1>ris dupes: {len(groups)} groups among {n_images} images</h1>{"".join(sections)}</body></html>
"""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def dupes_output(collection: str | os.PathLike, threshold: float | None = None, as_json: bool = False,
                 as_csv: bool = False, html_out: str | None = None, keep: str | None = None,
                 verify: bool = True) -> tuple[str, Path | None]:  # fmt: skip
    """What `ris dupes` prints (cli.py prints it): the groups as a listing, one JSON object, or CSV rows; with keep
    the paths to delete (tab, the path kept), deleting nothing. html_out: the review page, written; its path comes
    back second (None without)."""
    from ..collection import Collection

    if sum((as_json, as_csv, keep is not None)) > 1:
        raise RisError("choose one of --json, --csv and --keep")
    if keep is not None and keep not in KEEP_RULES:
        raise RisError(f"--keep is one of {', '.join(KEEP_RULES)}, not {keep!r}")
    with Collection.open(collection) as coll:
        groups, by_image = find(coll, threshold, verify=verify)
        n_images = coll.info()["images"]
    page = to_html(groups, html_out, n_images) if html_out else None
    if as_json:
        return to_json(groups, n_images, by_image) + "\n", page
    if as_csv:
        return to_csv(groups), page
    if keep is not None:
        return "".join(f"{path}\t{kept}\n" for path, kept in to_delete(groups, keep)), page
    return to_text(groups, n_images) + "\n", page
