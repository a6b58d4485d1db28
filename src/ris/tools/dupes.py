"""Duplicate finding: exact copies (same content hash) and near-duplicates (resized, re-encoded, cropped,
rotated, blurred, recoloured, framed).

Exact copies come straight from the catalogue's sha256. Near-duplicates: candidate pairs come from one
batched self-search of the collection's vectors (`index.range_search` in blocks for the pairs at or above
the threshold, a k-NN search for each image's nearest; on a GPU when one is present, see ris.vectors.faiss_index:
RIS_SEARCH_DEVICE), plus the nearest of a framed picture's content. With verification (the default) each
candidate pair's ORB keypoints are matched once, and the cosine and the agreeing matches decide together
(accept): look-alike photos of one kind of object reach the threshold but few keypoints agree, rotated or
framed copies fall below it but many do. Groups form around representatives, each image with the one it
matches best (group_pairs): never a chain. Work grows linearly with the images: each image's keypoints
are found once, and at most VERIFY_NEIGHBOURS pairs an image (twice that for a framed one) are matched,
plus the pairs above the threshold.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import RisError
from ..vectors import faiss_index as index
from ..vectors.catalog import ImageRow

#: Cosine similarity at or above which two images count as near-duplicates (with verification: unless their
#: keypoints disagree, see accept). Chosen by measurement (benchmarks/quality/dupes_precision.py: 500 Caltech-101
#: originals + 200 copies of ten kinds, grid pooling, PCA 256).
DEFAULT_THRESHOLD = 0.88
#: The same on raw features (a collection too small for its PCA yet): unreduced cosines run lower, for
#: copies and unrelated images alike, the more so the wider the features (60 originals + 20 copies: grid
#: copies >= 0.835, closest unrelated pair 0.54; at 0.80 precision and recall 1.0 for grid and grid3,
#: at 0.85 recall 0.95 / 0.85).
RAW_THRESHOLD = 0.80
#: Candidate pairs: all at or above the threshold, each image's VERIFY_NEIGHBOURS nearest from VERIFY_FLOOR up,
#: and the same for a framed picture's content (framed_pairs); their ORB keypoints are matched (RANSAC
#: similarity transform) once per pair. On benchmarks/quality/dupes_precision.py (seed 0, 1000 keypoints): copies
#: rotated 20-30 degrees and rescaled, median 257 agreeing matches (min 65), padded onto a canvas min 115,
#: bordered + captioned 10th pctl 34; pairs of other photos: 95th pctl 11, 99th 27, max 57.
VERIFY_NEIGHBOURS = 4
VERIFY_FLOOR = 0.45
#: accept: a pair under the threshold is a copy with DUPE_INLIERS agreeing matches (tuned on seed 0: 40
#: precision 0.965, 50 0.985, 60 0.995; recall 0.970, 0.970, 0.960); one at or above it needs MIN_INLIERS
#: (different photos of one kind of object reach 0.88-0.94 with 3-9), unless its cosine is SURE (no
#: different photo got there; at 0.92 precision falls to 0.951).
DUPE_INLIERS = 50
MIN_INLIERS = 12
SURE = 0.95
FEATURES = 1000  # ORB keypoints an image (search's verification: 500)
BLOCK = 4096  # queries per range search: bounds the result buffers on large collections


@dataclass(frozen=True)
class DupeGroup:
    """Images that are copies of each other. kind is "exact" when all share one content hash."""

    kind: str
    images: list[ImageRow]
    similarity: float  # the lowest similarity of a member to the representative (images[0])
    scores: list[float] = field(default_factory=list)  # each image's similarity to the representative (its own: 1)
    inliers: list[int | None] = field(default_factory=list)  # agreeing keypoint matches with the representative


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


def candidate_pairs(vectors: np.ndarray, threshold: float, device: str | None = None,
                    neighbours: int = VERIFY_NEIGHBOURS) -> dict[tuple[int, int], float]:  # fmt: skip
    """Pairs (i < j) worth judging, with their cosine: all at or above the threshold, plus each image's
    `neighbours` nearest from VERIFY_FLOOR up (where rotated, cropped or framed copies land). One range
    search and one k-NN search of the collection: the count grows linearly with the images."""
    ii, jj, ss = similar_pairs(vectors, threshold, device=device)
    pairs = dict(zip(zip(ii.tolist(), jj.tolist(), strict=True), ss.tolist(), strict=True))
    if neighbours and len(vectors) > 1:
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        for a, b, s in _near(x, x, range(len(x)), neighbours, device):
            pairs.setdefault((min(a, b), max(a, b)), s)
    return pairs


def _near(x: np.ndarray, queries: np.ndarray, owners: Iterable[int], neighbours: int,
          device: str | None) -> Iterator[tuple[int, int, float]]:  # fmt: skip
    """(owner, image, cosine of the owner's query to it) for each query's `neighbours` nearest images from
    VERIFY_FLOOR up, other than its owner: where rotated, cropped or framed copies land."""
    sims, top = index.search(index.flat(x), queries, min(len(x), neighbours + 1), device=device)
    for a, row_s, row_b in zip(owners, sims.tolist(), top.tolist(), strict=True):
        for s, b in zip(row_s, row_b, strict=True):
            if b >= 0 and b != a and s >= VERIFY_FLOOR:
                yield a, b, s


def accept(similarity: float, matches: int | None, threshold: float) -> bool:
    """Whether a pair is a near-duplicate: its cosine, its agreeing keypoint matches (None: not verified).

    Unverified: at or above the threshold. Verified: at or above the threshold with MIN_INLIERS matches
    (or a SURE cosine), or below it with DUPE_INLIERS (rotated, rescaled, framed copies)."""
    if matches is None:
        return similarity >= threshold
    if similarity >= max(threshold, SURE):
        return True
    return matches >= (MIN_INLIERS if similarity >= threshold else DUPE_INLIERS)


def group_pairs(n: int, hashes: list[str | None], pairs: dict[tuple[int, int], float],
                matches: dict[tuple[int, int], int] | None, threshold: float) -> list[tuple[list[int], list[float]]]:  # fmt: skip
    """Groups (of size > 1) around representatives: (members, representative first, and each one's cosine to
    the representative); every member is a near-duplicate of the representative (accept), never a chain.

    Images sharing a content hash are one image here (similarity 1). Accepted pairs are taken strongest
    first (most agreeing matches, then cosine): a pair of two ungrouped images starts a group (its
    representative the one with more near-duplicates), an ungrouped image joins a group when it is a
    near-duplicate of the representative. So each image lands with the representative it matches best,
    and a copy does not follow its original's look-alike.
    """
    rep_of = list(range(n))  # exact copies collapse onto their first image
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, sha in enumerate(hashes):
        if sha:
            by_hash[sha].append(i)
    for members in by_hash.values():
        for other in members[1:]:
            rep_of[other] = members[0]
    found: dict[tuple[int, int], tuple[int, float]] = {}  # accepted pairs of collapsed images: (matches, cosine)
    for (a, b), s in pairs.items():
        m = None if matches is None else matches.get((a, b), 0)
        a, b = sorted((rep_of[a], rep_of[b]))
        if a != b and accept(s, m, threshold):
            found[(a, b)] = max((m or 0, s), found.get((a, b), (-1, -1.0)))
    degree: dict[int, int] = defaultdict(int)
    for a, b in found:
        degree[a] += 1
        degree[b] += 1
    group_of: dict[int, int] = {}
    members: dict[int, list[int]] = {}
    for (a, b), _ in sorted(found.items(), key=lambda e: (-e[1][0], -e[1][1], e[0])):
        ga, gb = group_of.get(a), group_of.get(b)
        if ga is None and gb is None:
            rep, other = (a, b) if (-degree[a], a) <= (-degree[b], b) else (b, a)
            members[rep] = [rep, other]
            group_of[a] = group_of[b] = rep
        elif (ga is None) != (gb is None):
            joining, rep = (a, gb) if ga is None else (b, ga)
            if (min(joining, rep), max(joining, rep)) in found:
                members[rep].append(joining)
                group_of[joining] = rep
    exact = {m[0]: m[1:] for m in by_hash.values() if len(m) > 1}
    groups = []
    for rep in sorted(set(members) | (set(exact) - set(group_of))):
        near = sorted(((found[(min(rep, j), max(rep, j))][1], j) for j in members.get(rep, [rep])[1:]),
                      key=lambda t: (-t[0], t[1]))  # fmt: skip
        ids = [rep] + exact.get(rep, [])
        sims = [1.0] * len(ids)
        for s, j in near:
            ids += [j] + exact.get(j, [])
            sims += [min(s, 1.0)] * (1 + len(exact.get(j, [])))
        groups.append((ids, sims))
    return groups


def group_indices(
    n: int, hashes: list[str | None], vectors: np.ndarray, threshold: float, device: str | None = None
) -> list[tuple[list[int], list[float]]]:
    """group_pairs over the pairs at or above the threshold, unverified."""
    return group_pairs(n, hashes, candidate_pairs(vectors, threshold, device, neighbours=0), None, threshold)


def dupe_vectors(coll) -> tuple[list[ImageRow], np.ndarray]:
    """Every image's row and the vector near-duplicates are judged by."""
    return coll.vectors()


def default_threshold(coll) -> float:
    """The near-duplicate threshold for this collection's vectors: PCA-reduced or raw."""
    return DEFAULT_THRESHOLD if coll.info()["pca"] else RAW_THRESHOLD


def find_duplicates(coll, threshold: float | None = None, device: str | None = None, verify: bool = True) -> list[DupeGroup]:
    """Groups of exact and near-duplicate images in the collection, largest first (device: see index.search).

    Each group lists its representative first, then the others by similarity to it (group_pairs).
    threshold: default_threshold(coll) when not given."""
    return find(coll, threshold, device, verify)[0]


def find(coll, threshold: float | None = None, device: str | None = None, verify: bool = True):
    """(groups, every near-duplicate pair as {image: [(other, similarity)]}) of the collection.

    verify: candidate pairs' keypoints are matched (pair_matches) and judged with their cosine (accept);
    without it, a pair is a near-duplicate at or above the threshold."""
    threshold = default_threshold(coll) if threshold is None else threshold
    if not 0.0 < threshold <= 1.0:
        raise RisError(f"--threshold must be in (0, 1], not {threshold}")
    rows, vectors = dupe_vectors(coll)
    if not rows:
        return [], {}
    hashes = [r.sha256 for r in rows]
    pairs = candidate_pairs(vectors, threshold, device, VERIFY_NEIGHBOURS if verify else 0)
    matches = None
    if verify:
        feats, framed = image_features([r.path for r in rows])
        for pair, s in framed_pairs(coll, vectors, framed, device).items():
            pairs.setdefault(pair, s)
    pairs = {p: s for p, s in pairs.items() if not (hashes[p[0]] and hashes[p[0]] == hashes[p[1]])}
    if verify:
        matches = pair_matches(feats, list(pairs))
    twins: dict[str, list[int]] = defaultdict(list)
    for i, sha in enumerate(hashes):
        if sha:
            twins[sha].append(i)
    groups = []
    for members, sims in group_pairs(len(rows), hashes, pairs, matches, threshold):
        images = [rows[i] for i in members]
        exact = len({r.sha256 for r in images}) == 1 and images[0].sha256 is not None
        scores = [round(float(x), 4) for x in sims]
        inl = [_pair_matches(matches, twins, hashes, members[0], m) for m in members] if matches is not None else []
        groups.append(DupeGroup("exact" if exact else "near", images, 1.0 if exact else min(scores[1:]), scores, inl))
    groups.sort(key=lambda g: (-len(g.images), g.kind != "exact", g.images[0].path))
    accepted = [(a, b, s) for (a, b), s in pairs.items()
                if accept(s, None if matches is None else matches.get((a, b), 0), threshold)]  # fmt: skip
    return groups, _pairs_by_image(rows, accepted, twins)


#: framed_pairs: a picture whose content (what differs from its edges' colour) fills under FRAMED of it is
#: framed (a screenshot's canvas, a letterbox, a border) and its content searched for too.
FRAMED = 0.7
PLAIN_TOLERANCE = 24  # grey levels from the edges' colour that still count as canvas


def content_box(img: Image.Image) -> tuple[int, int, int, int] | None:
    """The box of a framed picture's content (see FRAMED), None when it is not framed."""
    from PIL import ImageChops

    rgb = img.convert("RGB")
    w, h = rgb.size
    a = np.asarray(rgb)
    edges = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    colour = tuple(int(c) for c in np.median(edges, axis=0))
    if np.mean(np.abs(edges.astype(np.int16) - colour).max(axis=1) <= PLAIN_TOLERANCE) < 0.9:
        return None  # the edges are no plain canvas
    diff = ImageChops.difference(rgb, Image.new("RGB", rgb.size, colour)).convert("L")
    box = diff.point(lambda v: 255 if v > PLAIN_TOLERANCE else 0).getbbox()
    if box is None or min(box[2] - box[0], box[3] - box[1]) < 32:
        return None
    return box if (box[2] - box[0]) * (box[3] - box[1]) < FRAMED * w * h else None


def _views(path: str):
    """ORB features of an image and of its mirror image (mirrored copies), a thumbnail enlarged first; and
    the content of a framed picture (content_box), else None."""
    from ..images.decode import open_image, read_file
    from ..search.verify import MAX_SIDE, NO_FEATURES, query_views

    try:
        img = open_image(read_file(path), draft_size=MAX_SIDE)
    except Exception:  # noqa: BLE001  # a file gone or changed since indexing: no keypoints, nothing confirmed
        return (NO_FEATURES, NO_FEATURES), None
    box = content_box(img)
    return query_views(img, FEATURES, halved=False)[0], (img.crop(box) if box else None)


def image_features(paths: list[str], threads: int | None = None):
    """([each image's keypoints: (plain, mirrored)], {image: its content, when framed}): every image decoded
    once, on the CPU threads (OpenCV releases the GIL). Held while pairs are matched: ~64 kB an image."""
    from ..model import runtime
    from ..threads import on_threads

    found = on_threads(_views, paths, threads or runtime.cpu_threads())
    return [views for views, _ in found], {i: crop for i, (_, crop) in enumerate(found) if crop is not None}


def framed_pairs(coll, vectors: np.ndarray, framed: dict[int, Image.Image], device: str | None = None):
    """Candidate pairs of framed pictures (their plain cosine: {(i, j): similarity}): each one's content,
    embedded by the collection's model, and its VERIFY_NEIGHBOURS nearest from VERIFY_FLOOR up. A picture
    pasted on a screen-sized canvas keeps a cosine of -0.05-0.57 to its original, far from any neighbour
    list; its content alone finds it. Skipped for a collection that cannot embed (no model at hand)."""
    embed = getattr(coll, "embed", None)
    if not framed or embed is None:
        return {}
    ids = sorted(framed)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    q = np.ascontiguousarray(embed([framed[i] for i in ids]), dtype=np.float32)
    return {(min(i, b), max(i, b)): float(x[i] @ x[b]) for i, b, _ in _near(x, q, ids, VERIFY_NEIGHBOURS, device)}


def pair_matches(feats: list, pairs: list[tuple[int, int]], threads: int | None = None) -> dict[tuple[int, int], int]:
    """Agreeing keypoint matches (ORB, RANSAC similarity transform; the first image mirrored too) of each
    pair, given each image's (plain, mirrored) keypoints (image_features); on the CPU threads."""
    from ..model import runtime
    from ..search.verify import inliers
    from ..threads import on_threads

    def one(pair: tuple[int, int]) -> int:
        (a, am), (b, _) = feats[pair[0]], feats[pair[1]]
        n = inliers(a, b)
        return n if n >= DUPE_INLIERS else max(n, inliers(am, b))

    return dict(zip(pairs, on_threads(one, pairs, threads or runtime.cpu_threads()), strict=True))


def _pair_matches(matches: dict[tuple[int, int], int], twins: dict[str, list[int]], hashes: list[str | None],
                  a: int, b: int) -> int | None:  # fmt: skip
    """The agreeing matches of a and b (exact copies of either answer for it), or None when not matched."""
    xs = twins[hashes[a]] if hashes[a] else [a]
    ys = twins[hashes[b]] if hashes[b] else [b]
    found = [matches[(min(x, y), max(x, y))] for x in xs for y in ys if (min(x, y), max(x, y)) in matches]
    return max(found, default=None)


def _pairs_by_image(rows: list[ImageRow], accepted: list[tuple[int, int, float]], twins: dict[str, list[int]]):
    """Each image with a near-duplicate: its near-duplicates (and exact copies), most similar first."""
    out: dict[str, list[tuple[str, float]]] = defaultdict(list)
    pairs = {(a, b): s for a, b, s in accepted}
    for members in twins.values():
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
                     + (f" ({n} keypoint matches)" if n is not None else "")
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
