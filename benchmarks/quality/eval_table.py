"""The quality table of issue 8: model x descriptor on the full Caltech-101, one collection each.

Usage: python benchmarks/quality/eval_table.py CALTECH_DIR WORKDIR [--configs lite0-gem-int8,...] [--copies 200]
Per configuration: index the folder (images/s end to end, this machine, DBA's upkeep included),
leave-one-out precision@1/@5 and mAP over the 101 object categories (BACKGROUND_Google left out; with
DBA against the augmented database, no database vector holding the query, the first result anchored as
served), copy-detection recall@1 through `search_many` (the collection's verification setting).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ris.collection import Collection
from ris.tools import evaluate
from ris.tools.bench import machine

CONFIGS = {  # name: model, pooling, precision, DBA neighbours, verified first result
    "lite0-avg-fp32": ("efficientnet-lite0", "avg", "fp32", 0, False),
    "lite0-avg-int8": ("efficientnet-lite0", "avg", "int8", 0, False),
    "lite0-gem-fp32": ("efficientnet-lite0", "gem", "fp32", 0, False),
    "lite0-gem-int8": ("efficientnet-lite0", "gem", "int8", 0, False),
    "lite0-rmac-int8": ("efficientnet-lite0", "rmac", "int8", 0, False),
    "lite0-grid-int8": ("efficientnet-lite0", "grid", "int8", 0, False),
    "lite0-grid3-int8": ("efficientnet-lite0", "grid3", "int8", 0, False),
    "lite0-gem-int8-dba5": ("efficientnet-lite0", "gem", "int8", 5, False),
    "lite0-gem-int8-dba10": ("efficientnet-lite0", "gem", "int8", 10, False),
    "lite0-rmac-int8-dba10": ("efficientnet-lite0", "rmac", "int8", 10, False),
    "lite2-gem-fp32": ("efficientnet-lite2", "gem", "fp32", 0, False),
    "lite2-gem-int8": ("efficientnet-lite2", "gem", "int8", 0, False),
    "lite2-rmac-int8": ("efficientnet-lite2", "rmac", "int8", 0, False),
    "lite0-grid-int8-dba10": ("efficientnet-lite0", "grid", "int8", 10, False),
    "lite2-grid-int8": ("efficientnet-lite2", "grid", "int8", 0, False),
    "lite2-rmac-int8-dba10": ("efficientnet-lite2", "rmac", "int8", 10, False),
    "lite0-grid3-int8-dba10": ("efficientnet-lite0", "grid3", "int8", 10, False),
    "default": ("efficientnet-lite0", "grid3", "int8", 10, True),  # what `ris index` makes
    "default-fp32": ("efficientnet-lite0", "grid3", "fp32", 10, True),  # the same in fp32: what int8 costs
}


def run(folder: str, work: Path, name: str, copies: int) -> dict:
    model, pooling, precision, dba, verify = CONFIGS[name]
    path = work / f"{name}.ris"
    shutil.rmtree(path, ignore_errors=True)
    coll = Collection.create(path, model=model, pooling=pooling, precision=precision, dba=dba, verify=verify)
    coll.extractor("cpu")  # export / quantize outside the timing
    start = time.perf_counter()
    report = coll.index([folder], device="cpu")
    seconds = time.perf_counter() - start
    loo = evaluate.evaluate_collection(coll)  # what `ris eval` reports: ranked as the collection serves
    start = time.perf_counter()
    cd = evaluate.copy_detection(coll, copies) if copies else {"all": {"recall@1": float("nan")}}
    copy_ms = 1000 * (time.perf_counter() - start) / max(1, copies * (len(cd) - 1))
    coll.close()
    return {"config": name, "model": model, "pooling": pooling, "precision": precision, "dba": dba, "verify": verify,
            "dims": coll.derived.snapshot().space.dims, "copy_ms_per_query": copy_ms,
            "images": loo.images, "precision@1": loo.precision[1], "precision@5": loo.precision[5],
            "map": loo.map, "copy_recall@1": cd["all"]["recall@1"], "copy_detail": cd,
            "images_per_s": report.images / seconds}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder")
    ap.add_argument("work", type=Path)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--copies", type=int, default=200)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / "eval_table.json"
    m = machine()
    print(f"# {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, {time.strftime('%Y-%m-%d')}")
    print("| config | dims | P@1 | P@5 | mAP | copy R@1 | img/s |\n|---|---|---|---|---|---|---|", flush=True)
    results = json.loads(out.read_text())["results"] if out.exists() else []  # earlier configs are kept
    for name in args.configs.split(","):
        r = run(args.folder, args.work, name, args.copies)
        results = [x for x in results if x["config"] != name] + [r]
        print(f"| {name} | {r['dims']} | {r['precision@1']:.3f} | {r['precision@5']:.3f} | {r['map']:.3f} | "
              f"{r['copy_recall@1']:.3f} | {r['images_per_s']:.0f} |", flush=True)  # fmt: skip
        out.write_text(json.dumps({"machine": m, "results": results}, indent=1))
        print("  copy R@1 per transform: " + ", ".join(f"{t} {v['recall@1']:.3f}" for t, v in r["copy_detail"].items()
                                                    if t != "all") + f"; {r['copy_ms_per_query']:.0f} ms a copy query",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
