"""The quality table of issue 8: model x descriptor on the full Caltech-101, one collection each.

Usage: python benchmarks/eval_table.py CALTECH_DIR WORKDIR [--configs lite0-gem-int8,...] [--copies 200]
Per configuration: index the folder (images/s end to end, this machine), leave-one-out precision@1/@5
and mAP over the 101 object categories (BACKGROUND_Google left out), copy-detection recall@1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from ris import evaluate
from ris.bench import machine
from ris.collection import Collection

CONFIGS = {
    "lite0-avg-fp32": ("efficientnet-lite0", "avg", "fp32"),
    "lite0-avg-int8": ("efficientnet-lite0", "avg", "int8"),
    "lite0-gem-fp32": ("efficientnet-lite0", "gem", "fp32"),
    "lite0-gem-int8": ("efficientnet-lite0", "gem", "int8"),
    "lite2-gem-fp32": ("efficientnet-lite2", "gem", "fp32"),
    "lite2-gem-int8": ("efficientnet-lite2", "gem", "int8"),
}


def run(folder: str, work: Path, name: str, copies: int) -> dict:
    model, pooling, precision = CONFIGS[name]
    path = work / f"{name}.ris"
    shutil.rmtree(path, ignore_errors=True)
    coll = Collection.create(path, model, pooling, precision)
    coll.extractor("cpu")  # export / quantize outside the timing
    start = time.perf_counter()
    report = coll.index([folder], device="cpu")
    seconds = time.perf_counter() - start
    rows, vectors = coll.vectors()
    keep = evaluate.labelled([r.label for r in rows])
    loo = evaluate.leave_one_out(vectors[keep], [rows[i].label for i in keep])
    cd = evaluate.copy_detection(coll, copies) if copies else {"all": {"recall@1": float("nan")}}
    coll.close()
    return {"config": name, "model": model, "pooling": pooling, "precision": precision, "dims": vectors.shape[1],
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
    m = machine()
    print(f"# {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, {time.strftime('%Y-%m-%d')}")
    print("| config | dims | P@1 | P@5 | mAP | copy R@1 | img/s |\n|---|---|---|---|---|---|---|", flush=True)
    results = []
    for name in args.configs.split(","):
        r = run(args.folder, args.work, name, args.copies)
        results.append(r)
        print(f"| {name} | {r['dims']} | {r['precision@1']:.3f} | {r['precision@5']:.3f} | {r['map']:.3f} | "
              f"{r['copy_recall@1']:.3f} | {r['images_per_s']:.0f} |", flush=True)  # fmt: skip
    (args.work / "eval_table.json").write_text(json.dumps({"machine": m, "results": results}, indent=1))


if __name__ == "__main__":
    main()
