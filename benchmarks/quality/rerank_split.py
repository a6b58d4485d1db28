"""Re-ranking on a fair split: half of each class is the database, the other half queries it.

Usage: python benchmarks/quality/rerank_split.py COLLECTION
Compares plain cosine, DBA (ris.vectors.dba, database only) and diffusion (Iscen et al. 2017: mutual-kNN graph
of the database, each query's top-kq similarities^3 diffused by (I - αS) f = y, solved by block
conjugate gradient) by precision@1/@5 and mAP over the 101 object categories. No query is in the
database, so no method can see it there.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import scipy.sparse as sp

from ris.collection import Collection
from ris.tools import evaluate
from ris.vectors import dba

DIFFUSION = [(30, 5, 0.8), (30, 5, 0.9), (15, 5, 0.9), (30, 5, 0.95), (30, 3, 0.9), (30, 10, 0.9)]  # K, kq, α


def score(s: np.ndarray, yq: np.ndarray, yd: np.ndarray) -> str:
    rel = yd[np.argsort(-s, axis=1)] == yq[:, None]
    precision, ap = evaluate._score_rankings(rel, rel.sum(axis=1), (1, 5))
    return f"{precision[1].mean():.3f} | {precision[5].mean():.3f} | {ap.mean():.3f}"


def diffuse(q: np.ndarray, d: np.ndarray, k: int, kq: int, alpha: float, iters: int = 40) -> np.ndarray:
    sims, pos = dba.neighbours(d, k)
    n = len(d)
    w = sp.csr_matrix((np.clip(sims, 0, None).ravel() ** 3, (np.repeat(np.arange(n), k), pos.ravel())), shape=(n, n))
    w = w.minimum(w.T)  # mutual neighbours only
    dinv = 1 / np.sqrt(np.maximum(np.asarray(w.sum(axis=1)).ravel(), 1e-12))
    s = sp.diags(dinv) @ w @ sp.diags(dinv)
    qd = q @ d.T
    top = np.argsort(-qd, axis=1)[:, :kq]
    y = np.zeros_like(qd)
    np.put_along_axis(y, top, np.clip(np.take_along_axis(qd, top, axis=1), 0, None) ** 3, axis=1)
    b = y.T.astype(np.float64)
    x, r = np.zeros_like(b), b.copy()
    p, rs = r.copy(), (b * b).sum(axis=0)
    for _ in range(iters):  # one CG per column, all at once
        ap = p - alpha * (s @ p)
        a = rs / np.maximum((p * ap).sum(axis=0), 1e-30)
        x += a * p
        r -= a * ap
        rn = (r * r).sum(axis=0)
        p = r + (rn / np.maximum(rs, 1e-30)) * p
        rs = rn
    return x.T + 1e-6 * qd  # images the diffusion does not reach: by plain similarity


def main() -> None:
    coll = Collection.open(sys.argv[1])
    rows, v = coll.vectors()
    keep = evaluate.labelled([r.label for r in rows])
    labels = np.array([rows[i].label for i in keep])
    x = v[keep]
    rng = np.random.default_rng(0)
    is_query = np.zeros(len(x), bool)
    for c in np.unique(labels):
        members = np.nonzero(labels == c)[0]
        is_query[rng.choice(members, len(members) // 2, replace=False)] = True
    _, y = np.unique(labels, return_inverse=True)
    q, d, yq, yd = x[is_query], x[~is_query], y[is_query], y[~is_query]
    print(f"{len(q)} queries, {len(d)} database images\n| method | P@1 | P@5 | mAP | s |\n|---|---|---|---|---|")
    print(f"| plain | {score(q @ d.T, yq, yd)} | |")
    for n in (5, 10):
        print(f"| DBA {n} | {score(q @ dba.augment(d, *dba.neighbours(d, n)).T, yq, yd)} | |")
    for k, kq, alpha in DIFFUSION:
        start = time.perf_counter()
        f = diffuse(q, d, k, kq, alpha)
        print(f"| diffusion K={k} kq={kq} α={alpha} | {score(f, yq, yd)} | {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
