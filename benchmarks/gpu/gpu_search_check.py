"""Search on the GPU vs FAISS on the CPU: speed and agreement, through ris's own functions.

Usage (from the repository root):
    python benchmarks/gpu/gpu_search_check.py                # GPU machine: 1M vectors, 10k queries (< 90 s on an H200)
    python benchmarks/gpu/gpu_search_check.py --n 20000      # anywhere; without CUDA the "device" side is the
                                                         # PyTorch path on CPU tensors (torch:cpu)

Data: N unit 256-d vectors from a mixture of Gaussians (1,000 centres, spread varying per centre, so
neighbourhoods look like real features rather than uniform noise), 1% of them planted as near-copies of
others (for the duplicate search), and queries drawn the same way. Through `ris.vectors.faiss_index.search` on an
IDMap2,Flat index (ids not rows) it times, CPU (FAISS, device="cpu") against the device
(device="cuda": PyTorch, or FAISS GPU where the build has it; float32 and float16 storage):
  - a batch of queries (k = 10), and the first call's upload of the vectors;
  - single queries, p50 / p99 (CPU: fewer, they are slow);
  - agreement with the CPU's exact answer: recall@10, ids equal place by place, largest score difference;
  - `ris dupes`'s similar_pairs and a k = 10 self-search on --self-n vectors, both ways;
  - `ris eval`'s leave_one_out (full rankings) on --loo-n vectors labelled by centre, both ways.
Prints one JSON object; also writes it to $OUT/gpu_search.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

import faiss  # noqa: E402
import torch  # noqa: E402

from ris.tools import evaluate
from ris.tools.dupes import similar_pairs  # noqa: E402
from ris.vectors import faiss_index as index  # noqa: E402

DIMS, CENTRES = 256, 1000


def make_data(n: int, nq: int, device: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(vectors, their centre labels, queries): unit float32 rows, generated on the device (fast), returned on the host."""
    g = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(CENTRES, DIMS, generator=g, device=device)
    spread = 0.4 + 0.5 * torch.rand(CENTRES, generator=g, device=device)

    def draw(m: int) -> tuple[torch.Tensor, torch.Tensor]:
        label = torch.randint(0, CENTRES, (m,), generator=g, device=device)
        v = centres[label] + spread[label, None] * torch.randn(m, DIMS, generator=g, device=device)
        return v / v.norm(dim=1, keepdim=True), label

    x, labels = draw(n)
    copies = torch.randperm(n, generator=g, device=device)[: n // 100]
    originals = torch.randint(0, n, (len(copies),), generator=g, device=device)
    noisy = x[originals] + 0.02 * torch.randn(len(copies), DIMS, generator=g, device=device)  # near-copies
    x[copies], labels[copies] = noisy / noisy.norm(dim=1, keepdim=True), labels[originals]
    q, _ = draw(nq)
    return x.cpu().numpy(), labels.cpu().numpy(), q.cpu().numpy()


def timed(fn, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def agreement(got: tuple[np.ndarray, np.ndarray], want: tuple[np.ndarray, np.ndarray]) -> dict:
    (gs, gi), (ws, wi) = got, want
    k = wi.shape[1]
    recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(gi, wi, strict=True)])
    return {"recall@10": round(float(recall), 5), "ids_equal_share": round(float((gi == wi).mean()), 5),
            "max_score_diff": float(np.abs(gs - ws).max())}  # fmt: skip


def latencies(idx, queries: np.ndarray, device: str, dtype: str | None = None) -> dict:
    times = []
    for q in queries:
        _, t = timed(index.search, idx, q[None], 10, device=device, dtype=dtype)
        times.append(t * 1e3)
    return {"n": len(times), "p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3)}  # fmt: skip


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000 if cuda else 100_000, help="vectors in the index")
    ap.add_argument("--queries", type=int, default=10_000 if cuda else 1_000, help="batched queries")
    ap.add_argument("--self-n", type=int, default=100_000, help="vectors for dupes / self-search (at most --n)")
    ap.add_argument("--loo-n", type=int, default=10_000, help="vectors for leave-one-out (at most --n)")
    ap.add_argument("--cpu-singles", type=int, default=20)
    ap.add_argument("--gpu-singles", type=int, default=200)
    args = ap.parse_args()
    dev = "cuda" if cuda or faiss.get_num_gpus() else "torch:cpu"  # no GPU: the GPU's code on CPU tensors
    started = time.perf_counter()
    report: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name(0) if cuda else None, "torch": torch.__version__,
                    "faiss": faiss.__version__, "faiss_gpus": faiss.get_num_gpus(),
                    "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                    "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "device": dev, "n": args.n, "queries": args.queries,
    }  # fmt: skip
    (x, labels, q), report["data_s"] = timed(make_data, args.n, args.queries, "cuda" if cuda else "cpu")
    ids = np.arange(args.n, dtype=np.int64) * 3 + 7  # IDMap2 ids, not rows
    idx = index.create(DIMS)
    idx.add_with_ids(x, ids)
    report["plan"] = {"batch": index.search_plan(idx, args.queries, 10), "single": index.search_plan(idx, 1, 10),
                      "single_on_10k": index.search_plan(index.flat(x[:10_000]), 1, 10)}  # fmt: skip

    cpu, t = timed(index.search, idx, q, 10, device="cpu")
    report["cpu_batch"] = {"s": round(t, 3), "ms_per_query": round(t / len(q) * 1e3, 4)}
    report["cpu_single"] = latencies(idx, q[: args.cpu_singles], "cpu")
    for dtype in ("float32", "float16"):
        _, upload = timed(index.search, idx, q[:1], 10, device=dev, dtype=dtype)  # the first call uploads
        got, t = timed(index.search, idx, q, 10, device=dev, dtype=dtype)
        report[f"{dev}_{dtype}"] = {
            "upload_and_first_query_s": round(upload, 3), "batch_s": round(t, 4),
            "ms_per_query": round(t / len(q) * 1e3, 5), "speedup_vs_cpu_batch": round(report["cpu_batch"]["s"] / t, 1),
            "vs_cpu": agreement(got, cpu), "single": latencies(idx, q[: args.gpu_singles], dev, dtype),
            "gpu_mem_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
        }  # fmt: skip
    index.release(idx)
    del idx

    m = min(args.self_n, args.n)
    xs = np.ascontiguousarray(x[:m])
    flat = index.flat(xs)
    both: dict = {}
    for where in ("cpu", dev):
        both[where] = {}
        (pi, pj, _), t = timed(similar_pairs, xs, 0.88, device=where)
        both[where]["dupes_pairs"], both[where]["dupes_s"] = {(a, b) for a, b in zip(pi.tolist(), pj.tolist(), strict=True)}, t
        both[where]["self"], both[where]["self_s"] = timed(index.search, flat, xs, 11, device=where)
    report["self_n"] = m
    report["dupes"] = {
        "pairs_cpu": len(both["cpu"]["dupes_pairs"]), "pairs_device": len(both[dev]["dupes_pairs"]),
        "pairs_differing": len(both["cpu"]["dupes_pairs"] ^ both[dev]["dupes_pairs"]),
        "cpu_s": round(both["cpu"]["dupes_s"], 3), "device_s": round(both[dev]["dupes_s"], 3),
    }  # fmt: skip
    report["self_search_k10"] = {"cpu_s": round(both["cpu"]["self_s"], 3), "device_s": round(both[dev]["self_s"], 3),
                                 "vs_cpu": agreement(both[dev]["self"], both["cpu"]["self"])}  # fmt: skip
    del flat, both

    m = min(args.loo_n, args.n)
    loo = {}
    for where in ("cpu", dev):
        r, t = timed(evaluate.leave_one_out, x[:m], labels[:m].astype(str), device=where)
        loo[where] = {"s": round(t, 3), "map": r.map, "precision@10": r.precision[10]}
    loo["map_diff"] = abs(loo["cpu"]["map"] - loo[dev]["map"])
    report["leave_one_out"] = {"n": m, **loo}
    report["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_search.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
