"""Incremental cost and batched queries, measured through the real `ris` entry point and API.

    python benchmarks/indexing/incremental.py --images 2000 --add 20 --queries 100

1. `ris index` of --images Caltech-101 images into a new collection, then `ris add` of --add (1%)
   more: wall time of each (each a fresh process: interpreter start and model load included, as a
   user sees them) and the extraction/index part alone (from the run report), so the fixed
   overheads show apart from the part that scales with the images.
2. --queries query images not in the collection: Collection.search_many (one batched model call and
   one batched index search) against Collection.search one by one, after a warm-up; and the index
   search alone, batched against one by one.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CALTECH = Path(__file__).resolve().parents[3] / "shared/datasets/caltech101/101_ObjectCategories"


#: Every STRIDE-th Caltech file in path order (4: n images spread over all classes; --stride 1 for all).
STRIDE = 4
#: Each Caltech file written once per JPEG quality here (--qualities): unique files, so that collections
#: larger than Caltech-101 can be measured; empty: the files are copied as they are.
QUALITIES: list[int] = []


def caltech(n: int, skip: int = 0) -> list[Path]:
    """n images spread over all classes (every STRIDE-th file in path order), after the first `skip`; with
    QUALITIES each file counts once per quality (its re-encodings are made by copy_tree)."""
    files = [f.with_name(f"q{q}_{f.name}") if q else f for f in sorted(CALTECH.glob("*/*.jpg"))[::STRIDE]
             for q in (QUALITIES or [0])]  # fmt: skip
    if skip + n > len(files):
        raise SystemExit(f"only {len(files)} Caltech images at stride {STRIDE}; lower --images/--add/--queries")
    return files[skip : skip + n]


def copy_tree(files: list[Path], root: Path) -> Path:
    from PIL import Image

    for f in files:
        (root / f.parent.name).mkdir(parents=True, exist_ok=True)
        if f.exists():
            shutil.copy2(f, root / f.parent.name / f.name)
        else:  # q{quality}_{name}: the Caltech file re-encoded at that quality
            quality, name = f.name[1:].split("_", 1)
            Image.open(f.with_name(name)).convert("RGB").save(root / f.parent.name / f.name, "JPEG", quality=int(quality))
    return root


def ris(*args: str) -> tuple[float, dict]:
    """Wall seconds of one `ris ... --json` process and its JSON report."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ris", *args, "--json"], capture_output=True, text=True, check=True)
    return time.perf_counter() - t, json.loads(proc.stdout)


def model_load_s(coll_path: Path) -> float:
    """A fresh process's import + model load, the fixed cost of every `ris` run that extracts."""
    code = ("import time; t=time.perf_counter(); from ris.collection import Collection; "
            f"Collection.open({str(coll_path)!r}).extractor('cpu'); print(time.perf_counter()-t)")  # fmt: skip
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def incremental(work: Path, n: int, extra: int) -> list[dict]:
    base = copy_tree(caltech(n), work / "base")
    more = copy_tree(caltech(extra, skip=n), work / "more")
    coll = work / "c.ris"
    full_s, full = ris("index", str(base), "--collection", str(coll))
    add_s, add = ris("add", str(more), "--collection", str(coll))
    load_s = model_load_s(coll)
    return [
        {"run": f"ris index ({n} images)", "wall_s": full_s, "extract_s": full["times"].get("wall"), "images": full["extracted"]},
        {"run": f"ris add ({extra} images)", "wall_s": add_s, "extract_s": add["times"].get("wall"), "images": add["extracted"]},
        {"run": "fixed: process start + model load", "wall_s": load_s, "extract_s": None, "images": 0},
    ]  # fmt: skip


def in_process(work: Path) -> dict:
    """The same index + 1% add through the API in one process (model loaded first, as in `ris serve` or
    a notebook): the ratio without the per-process constant."""
    from ris.collection import Collection

    path = work / "api.ris"
    with Collection.create(path) as coll:
        coll.extractor("cpu")
        t = time.perf_counter()
        coll.index([str(work / "base")], device="cpu")
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        coll.add([str(work / "more")], device="cpu")
        add_s = time.perf_counter() - t
    shutil.rmtree(path, ignore_errors=True)
    return {"run": "API: Collection.index, then .add (one process)", "index_s": full_s, "add_s": add_s,
            "add_pct_of_index": 100 * add_s / full_s}  # fmt: skip


def batching(coll_path: Path, n_queries: int, n_base: int, extra: int) -> list[dict]:
    from ris.collection import Collection
    from ris.vectors import faiss_index as index

    # the Caltech files themselves (with --qualities: each once, whatever its re-encodings), not in the collection
    queries = list(dict.fromkeys(str(p if p.exists() else p.with_name(p.name.split("_", 1)[1]))
                                 for p in caltech(n_queries, skip=n_base + extra)))  # fmt: skip
    n_queries = len(queries)
    rows = []
    with Collection.open(coll_path) as coll:
        coll.search_many(queries[:8], k=10, device="cpu")  # warm-up: model loaded, index read, keypoints cached
        for verify in (False, True):  # the model + index part, then with the default's verification
            t = time.perf_counter()
            coll.search_many(queries, k=10, device="cpu", verify=verify)
            batched = time.perf_counter() - t
            t = time.perf_counter()
            for q in queries:
                coll.search(q, k=10, device="cpu", verify=verify)
            single = time.perf_counter() - t
            what = f"model + index, {n_queries} queries" + (", geometric verification (default)" if verify else ", --no-verify")
            rows.append({"what": what, "batched_ms_per_query": 1e3 * batched / n_queries,
                         "one_by_one_ms_per_query": 1e3 * single / n_queries, "speedup": single / batched})  # fmt: skip
        idx = coll.derived.snapshot().store.faiss_index
        vecs = coll.embed(queries, "cpu")
        t = time.perf_counter()
        index.search(idx, vecs, 10)
        ibatched = time.perf_counter() - t
        t = time.perf_counter()
        for v in vecs:
            index.search(idx, v[None], 10)
        isingle = time.perf_counter() - t
    rows.append({"what": f"index alone ({idx.ntotal} vectors)", "batched_ms_per_query": 1e3 * ibatched / n_queries,
                 "one_by_one_ms_per_query": 1e3 * isingle / n_queries, "speedup": isingle / ibatched})  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])

    def fmt(v: object) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)

    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows])  # fmt: skip


def main() -> None:
    global STRIDE
    from ris.tools.bench import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--add", type=int, default=20)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--stride", type=int, default=STRIDE, help="take every n-th Caltech file (1: all 9,144)")
    ap.add_argument("--keep", help="build the collection here and keep it (default: a temporary folder)")
    ap.add_argument("--qualities", default="", help="e.g. 90,80,70: each Caltech file once per JPEG quality")
    args = ap.parse_args()
    STRIDE = args.stride
    QUALITIES[:] = [int(q) for q in args.qualities.split(",") if q]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="ris-incremental-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        inc = incremental(work, args.images, args.add)
        full, added, fixed = inc
        ratio = added["wall_s"] / full["wall_s"]
        var = (added["wall_s"] - fixed["wall_s"]) / (full["wall_s"] - fixed["wall_s"])
        api = in_process(work)
        batch = batching(work / "c.ris", args.queries, args.images, args.add)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    m = machine()
    print(f"`python benchmarks/indexing/incremental.py {' '.join(sys.argv[1:])}`  \n{m.get('cpu')}, {os.cpu_count()} cores, "
          f"{dt.date.today()}, CPU int8 model\n")  # fmt: skip
    print(markdown(inc))
    print(f"\nadd/index wall: {ratio:.3f} ({args.add / args.images:.3f} of the images); "
          f"without the fixed cost: {var:.3f}\n")
    print(markdown([api]) + "\n")
    print(markdown(batch))


if __name__ == "__main__":
    main()
