"""Duplicate finding: exact copies (same content hash) and near-duplicates (resized, re-encoded, cropped).

Exact copies come straight from the catalogue's sha256. Near-duplicates come from one batched
self-search of the collection's vectors (`index.range_search` in blocks, so memory stays bounded and
no Python loop runs over pairs; on a GPU when one is present, see ris.index: RIS_SEARCH_DEVICE);
every pair at or above the threshold joins a union-find, and each connected component becomes one group.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from . import index
from .errors import RisError
from .store import ImageRow

#: Cosine similarity at or above which two images count as near-duplicates. Chosen by measurement
#: (benchmarks/dupes_precision.py, 500 Caltech-101 originals + 160 copies, grid pooling, PCA 256): at 0.88
#: recall 0.981 of resized/JPEG-q30/80%-cropped/exact copies, 85% of the pairs with a copy in them right
#: (73% of all pairs: Caltech holds near-identical photos of its own); 0.85 finds more, 0.92 errs less.
DEFAULT_THRESHOLD = 0.88
#: The same on raw features (a collection too small for its PCA yet): unreduced cosines run lower, for
#: copies and unrelated images alike, the more so the wider the features (60 originals + 20 copies: grid
#: copies >= 0.835, closest unrelated pair 0.54; at 0.80 precision and recall 1.0 for grid and grid3,
#: at 0.85 recall 0.95 / 0.85).
RAW_THRESHOLD = 0.80
BLOCK = 4096  # queries per range search: bounds the result buffers on large collections
PAIRWISE_LIMIT = 2000  # groups up to this size report their exact minimum pairwise similarity


@dataclass(frozen=True)
class DupeGroup:
    """Images that are copies of each other. kind is "exact" when all share one content hash."""

    kind: str
    images: list[ImageRow]
    similarity: float  # the lowest similarity between two images of the group


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))  # a list: scalar indexing is much faster than on an ndarray

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:  # path compression keeps later finds O(1)-ish
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


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
    n: int, hashes: list[str | None], vectors: np.ndarray, threshold: float, device: str | None = None
) -> list[tuple[list[int], float]]:
    """Connected components (of size > 1) of 'same hash or similar enough', each with its lowest similarity."""
    uf = _UnionFind(n)
    by_hash: dict[str, list[int]] = defaultdict(list)
    for i, sha in enumerate(hashes):
        if sha:
            by_hash[sha].append(i)
    for members in by_hash.values():
        for other in members[1:]:
            uf.union(members[0], other)
    ii, jj, ss = similar_pairs(vectors, threshold, device=device)
    for a, b in zip(ii.tolist(), jj.tolist(), strict=True):
        uf.union(a, b)
    components: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        components[uf.find(i)].append(i)
    edge_min: dict[int, float] = defaultdict(lambda: 1.0)
    for a, s in zip(ii.tolist(), ss.tolist(), strict=True):
        root = uf.find(a)
        edge_min[root] = min(edge_min[root], s)
    groups = []
    for root, members in components.items():
        if len(members) < 2:
            continue
        if len(members) <= PAIRWISE_LIMIT:
            v = vectors[members]
            sim = float(np.min(v @ v.T))
        else:  # too many pairs to compare all: the weakest link that joined the group
            sim = edge_min[root]
        groups.append((members, min(sim, 1.0)))
    return groups


def default_threshold(coll) -> float:
    """The near-duplicate threshold for this collection's vectors: PCA-reduced or raw."""
    return DEFAULT_THRESHOLD if coll.info()["pca"] else RAW_THRESHOLD


def find_duplicates(coll, threshold: float | None = None, device: str | None = None) -> list[DupeGroup]:
    """Groups of exact and near-duplicate images in the collection, largest first (device: see index.search).

    threshold: default_threshold(coll) when not given."""
    threshold = default_threshold(coll) if threshold is None else threshold
    if not 0.0 < threshold <= 1.0:
        raise RisError(f"--threshold must be in (0, 1], not {threshold}")
    rows, vectors = coll.vectors()
    if not rows:
        return []
    groups = []
    for members, sim in group_indices(len(rows), [r.sha256 for r in rows], vectors, threshold, device):
        images = sorted((rows[i] for i in members), key=lambda r: r.path)
        exact = len({r.sha256 for r in images}) == 1 and images[0].sha256 is not None
        groups.append(DupeGroup("exact" if exact else "near", images, 1.0 if exact else round(sim, 4)))
    groups.sort(key=lambda g: (-len(g.images), g.kind != "exact", g.images[0].path))
    return groups


# --- output --------------------------------------------------------------------------------------


def to_json(groups: list[DupeGroup], n_images: int) -> str:
    data = {
        "groups": [
            {"kind": g.kind, "images": [{"path": r.path, "label": r.label} for r in g.images], "similarity": g.similarity}
            for g in groups
        ],
        "images": n_images,
    }
    return json.dumps(data)


def to_csv(groups: list[DupeGroup]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group_id", "kind", "path", "similarity"])
    for n, g in enumerate(groups, 1):
        for r in g.images:
            writer.writerow([n, g.kind, r.path, f"{g.similarity:.4f}"])
    return buf.getvalue()


def to_text(groups: list[DupeGroup], n_images: int) -> str:
    exact = sum(g.kind == "exact" for g in groups)
    lines = []
    for n, g in enumerate(groups, 1):
        lines.append(f"group {n}: {g.kind}, {len(g.images)} images, similarity {g.similarity:.3f}")
        lines.extend(f"  {r.path}" + (f"  [{r.label}]" if r.label else "") for r in g.images)
    lines.append(f"{len(groups)} groups ({exact} exact, {len(groups) - exact} near) among {n_images} images")
    return "\n".join(lines)


def dupes_command(collection: str | os.PathLike, threshold: float | None = None,
                  as_json: bool = False, as_csv: bool = False) -> None:  # fmt: skip
    """`ris dupes`: print the groups as a listing, one JSON object, or CSV rows."""
    import sys

    from .collection import Collection

    if as_json and as_csv:
        raise RisError("choose one of --json and --csv")
    with Collection.open(collection) as coll:
        groups = find_duplicates(coll, threshold)
        n_images = coll.info()["images"]
    if as_json:
        sys.stdout.write(to_json(groups, n_images) + "\n")
    elif as_csv:
        sys.stdout.write(to_csv(groups))
    else:
        sys.stdout.write(to_text(groups, n_images) + "\n")
