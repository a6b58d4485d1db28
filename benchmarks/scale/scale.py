"""Scale benchmark: ris's FAISS indexes on 1M-10M synthetic 256-d vectors shaped like real features.

    python benchmarks/scale/scale.py --real /tmp/evaltab/lite0-gem-int8.ris --n 1000000 \\
        --factories "IDMap2,Flat;IVF1024,SQ4;IVF1024,PQ32" --nprobes 8,16,32,64

Synthetic data, not i.i.d. noise: each vector is a real Caltech-101 vector (from a ris collection)
plus Gaussian noise shaped like the real data's per-component spread (PCA components are
uncorrelated, so this is the data's covariance), L2-normalised. The noise scale is drawn per
vector, log-uniform over [sigma/2, 2 sigma], with sigma calibrated (bisection) so that a synthetic
set as large as the real one has the real data's median nearest-neighbour similarity: near-duplicates
and outliers on either side. (Matching instead each vector's similarity to its source to the real NN
similarity gives data far less clustered than the real features: its NN similarities at 20k vectors
are below the real ones at 9k.) Queries are fresh vectors drawn the same way.

Vectors are generated in chunks and written to a float32 file (never all in RAM); the ground truth
(exact top-10 by inner product for the queries) is kept up to date chunk by chunk. Each index is
built in a child process (so its peak RSS is its own) through ris.vectors.faiss_index.create + reconcile, the
code collections use, and searched in another child that opens it as ris does (memory-mapped when
large). Prints a markdown table; --json writes the rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

K = 10
CHUNK = 250_000


# --- synthetic data ------------------------------------------------------------------------------


def real_vectors(path: str) -> np.ndarray:
    from ris.collection import Collection

    with Collection.open(path) as coll:
        return np.ascontiguousarray(coll.vectors()[1], dtype=np.float32)


def nn_similarity(x: np.ndarray) -> np.ndarray:
    """Each row's similarity to its nearest other row (in blocks: 9k x 9k is fine, keep it general)."""
    out = np.empty(len(x), np.float32)
    for start in range(0, len(x), 4096):
        sims = x[start : start + 4096] @ x.T
        sims[np.arange(len(sims)), np.arange(start, start + len(sims))] = -np.inf
        out[start : start + 4096] = sims.max(axis=1)
    return out


class Generator:
    """real vector + per-vector-scaled, data-shaped Gaussian noise, L2-normalised; chunk j is deterministic."""

    def __init__(self, real: np.ndarray, seed: int = 0, sigma: float | None = None):
        """sigma: the noise scale calibrated before (calibrating costs 12 nearest-neighbour passes over `real`)."""
        self.real, self.seed = real, seed
        self.spread = real.std(axis=0)
        if sigma is None:
            self.target = float(np.median(nn_similarity(real)))
            self.sigma = 1.0
            sigma = self.calibrate()
        self.sigma = sigma

    def calibrate(self, steps: int = 12) -> float:
        """The noise scale at which as many synthetic vectors as real ones have the real median NN similarity."""
        lo, hi = 0.0, float(np.sqrt((1 / self.target**2 - 1) / (self.spread**2).sum()))  # hi: cos to source = target
        for _ in range(steps):
            self.sigma = (lo + hi) / 2
            x, _ = self.chunk(-1, len(self.real))
            lo, hi = (self.sigma, hi) if np.median(nn_similarity(x)) > self.target else (lo, self.sigma)
        return (lo + hi) / 2

    def chunk(self, j: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(vectors, source rows) of chunk j."""
        rng = np.random.default_rng([self.seed, j + 1])
        src = rng.integers(0, len(self.real), n)
        scale = (self.sigma * 2.0 ** rng.uniform(-1, 1, n)).astype(np.float32)
        x = rng.standard_normal((n, self.real.shape[1]), dtype=np.float32)
        x *= self.spread
        x *= scale[:, None]
        x += self.real[src]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x, src


def merge_topk(scores: np.ndarray, ids: np.ndarray, new_scores: np.ndarray, new_ids: np.ndarray) -> tuple:
    s = np.concatenate([scores, new_scores], axis=1)
    i = np.concatenate([ids, new_ids], axis=1)
    top = np.argsort(-s, axis=1)[:, :K]
    return np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)


def generate(real: np.ndarray, n: int, n_queries: int, work: Path) -> dict:
    """Write data.f32, queries.npy and gt.npy under work; returns what describes the data."""
    gen = Generator(real)
    queries, qsrc = Generator(real, seed=1).chunk(0, n_queries)
    gt_s = np.full((n_queries, K), -np.inf, np.float32)
    gt_i = np.full((n_queries, K), -1, np.int64)
    t0 = time.perf_counter()
    source_sim = []
    with open(work / "data.f32", "wb") as fh:
        for j, start in enumerate(range(0, n, CHUNK)):
            x, src = gen.chunk(j, min(CHUNK, n - start))
            fh.write(x.tobytes())
            sims = queries @ x.T
            top = np.argpartition(-sims, K, axis=1)[:, :K]
            gt_s, gt_i = merge_topk(gt_s, gt_i, np.take_along_axis(sims, top, 1), top + start)
            if j == 0:
                source_sim = np.einsum("ij,ij->i", x[:10000], real[src[:10000]])
    np.save(work / "queries.npy", queries)
    np.save(work / "gt.npy", gt_i)
    return {
        "n": n, "gen_s": time.perf_counter() - t0, "real_nn_median": gen.target, "sigma": gen.sigma,
        "synthetic_to_source_median": float(np.median(source_sim)),
        "query_nn_median": float(np.median(gt_s[:, 0])), "query_10th_nn_median": float(np.median(gt_s[:, -1])),
        "query_source_real": int(len(set(qsrc.tolist()))),
    }  # fmt: skip


# --- children: build, search ---------------------------------------------------------------------


def read_rows(path: Path, ids: np.ndarray, dims: int) -> np.ndarray:
    """Rows `ids` (sorted) of a float32 file by pread of each contiguous run (no mmap: RSS stays honest)."""
    out = np.empty((len(ids), dims), np.float32)
    row = dims * 4
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    with open(path, "rb") as fh:
        pos = 0
        for run in np.split(ids, breaks):
            if len(run):
                buf = os.pread(fh.fileno(), row * len(run), int(run[0]) * row)
                out[pos : pos + len(run)] = np.frombuffer(buf, np.float32).reshape(len(run), dims)
                pos += len(run)
    return out


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork+exec, so a child would report its parent's peak."""
    return _status_mb("VmHWM")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def child_build(work: Path, factory: str, n: int, dims: int, out: Path) -> dict:
    from ris.vectors import faiss_index as index

    t0 = time.perf_counter()
    idx = index.create(dims, index.resolve(factory, n, dims))
    index.reconcile(idx, np.arange(n, dtype=np.int64), lambda ids: read_rows(work / "data.f32", ids, dims), chunk=CHUNK)
    build_s = time.perf_counter() - t0
    index.save(idx, out)
    return {"build_s": build_s, "build_peak_rss_mb": peak_rss_mb(), "bytes": out.stat().st_size}


def child_search(work: Path, path: Path, nprobes: list[int], batch: int, refine: int) -> list[dict]:
    """Latency, recall and RSS; refine > 0: refine x k candidates re-scored with exact vectors read from the
    data file, as ris re-scores them with the catalogue's features (index.rerank)."""
    from ris.vectors import faiss_index as index

    queries = np.load(work / "queries.npy")
    gt = np.load(work / "gt.npy")
    base = rss_mb()
    idx = index.load(path)
    loaded = rss_mb() - base
    data = work / "data.f32"

    def run(qs: np.ndarray, nprobe: int) -> np.ndarray:
        if not refine:
            return index.search(idx, qs, K, nprobe)[1]
        cands = index.search(idx, qs, K * refine, nprobe)[1]
        return index.rerank(qs, cands, lambda ids: read_rows(data, ids, qs.shape[1]), K)[1]

    rows = []
    for nprobe in nprobes if index.is_approximate(idx) else [0]:
        run(queries, nprobe)  # warm: the mapped lists paged in, as in a long-running server
        single = []
        found = np.empty_like(gt)
        for q in range(len(queries)):
            t = time.perf_counter()
            found[q] = run(queries[q : q + 1], nprobe)
            single.append(time.perf_counter() - t)
        batched = []
        for _ in range(3):
            for start in range(0, len(queries) - batch + 1, batch):
                t = time.perf_counter()
                run(queries[start : start + batch], nprobe)
                batched.append(time.perf_counter() - t)
        recall = np.mean([len(np.intersect1d(f, g)) / K for f, g in zip(found, gt, strict=True)])
        top1 = np.mean([g[0] in f for f, g in zip(found, gt, strict=True)])
        ivf = index._ivf(idx)
        rows.append({
            "refine": f"x{refine}" if refine else "-",
            "nprobe": nprobe or (index.default_nprobe(ivf.nlist) if ivf is not None else "-"),
            "recall@10": float(recall), "r1@10": float(top1),
            "p50_ms": 1e3 * float(np.percentile(single, 50)), "p99_ms": 1e3 * float(np.percentile(single, 99)),
            "batch_p50_ms": 1e3 * float(np.percentile(batched, 50)),
            "batch_per_query_ms": 1e3 * float(np.median(batched)) / batch,
            "rss_load_mb": loaded, "rss_after_mb": rss_mb() - base,
        })  # fmt: skip
    return rows


def run_child(*args: str) -> dict | list:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- report ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def table(rows: list[dict]) -> str:
    cols = ["n", "factory", "refine", "nprobe", "recall@10", "r1@10", "p50_ms", "p99_ms", "batch_p50_ms", "batch_per_query_ms",
            "build_s", "build_peak_rss_mb", "index_mb", "bytes_per_vector", "rss_after_mb"]  # fmt: skip
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"

    def fmt(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) and v < 1 else f"{v:.1f}" if isinstance(v, float) else str(v)

    return head + "\n".join("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default="/tmp/evaltab/lite0-gem-int8.ris", help="a ris collection of real images")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--factories", default="auto", help="';'-separated FAISS factory strings (or auto)")
    ap.add_argument("--nprobes", default="0", help="comma-separated; 0 = ris's default for the index")
    ap.add_argument("--work", default="/tmp/ris-scale")
    ap.add_argument("--reuse", action="store_true", help="keep the data already under --work (same --n)")
    ap.add_argument("--refine", default="", help="comma-separated factors: also measure with exact re-scoring of "
                    "factor x k candidates (ris re-scores index.refine_factor(idx) x k)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    work = Path(args.work) / str(args.n)
    work.mkdir(parents=True, exist_ok=True)
    real = real_vectors(args.real)
    meta_path = work / "meta.json"
    if args.reuse and meta_path.exists():
        meta = json.loads(meta_path.read_text())
    else:
        meta = generate(real, args.n, args.queries, work)
        meta_path.write_text(json.dumps(meta))
    print(f"data: {json.dumps(meta)}", file=sys.stderr)
    rows = []
    for factory in args.factories.split(";"):
        path = work / (factory.replace(",", "_").replace("(", "").replace(")", "") + ".faiss")
        built = run_child("_build", str(work), factory, str(args.n), str(real.shape[1]), str(path))
        from ris.vectors import faiss_index as index

        name = index.resolve(factory, args.n, real.shape[1]) + (" (auto)" if factory == index.AUTO else "")
        for refine in ["0", *args.refine.split(",")] if args.refine else ["0"]:
            for r in run_child("_search", str(work), str(path), args.nprobes, str(args.batch), refine):
                rows.append({"n": args.n, "factory": name, **r, **built, "index_mb": built["bytes"] / 2**20,
                             "bytes_per_vector": built["bytes"] / args.n})  # fmt: skip
                print(json.dumps(rows[-1]), file=sys.stderr)
    cmd = "python " + " ".join([sys.argv[0], *[a if " " not in a and ";" not in a else repr(a) for a in sys.argv[1:]]])
    print(f"`{cmd}`  \n{cpu_model()}, {os.cpu_count()} cores, {dt.date.today()}; ground truth: exact top-{K} of "
          f"{args.queries} queries. Real NN similarity median {meta['real_nn_median']:.3f}; synthetic to source "
          f"{meta['synthetic_to_source_median']:.3f}; queries' 1st/10th NN median {meta['query_nn_median']:.3f}/"
          f"{meta['query_10th_nn_median']:.3f}. p50/p99: one query a call; batch: {args.batch} queries a call.\n")  # fmt: skip
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_build":
        w, f, n, d, o = sys.argv[2:7]
        print(json.dumps(child_build(Path(w), f, int(n), int(d), Path(o))))
    elif len(sys.argv) > 1 and sys.argv[1] == "_search":
        w, p, probes, b, r = sys.argv[2:7]
        print(json.dumps(child_search(Path(w), Path(p), [int(x) for x in probes.split(",")], int(b), int(r))))
    else:
        main()
