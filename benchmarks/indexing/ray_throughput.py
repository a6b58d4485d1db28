"""Ray extraction vs the local pipeline on the same images, same run, same machine.

Each round indexes the same files into a fresh collection twice: `Collection.index` (worker processes
+ ONNX Runtime in this process) and `distributed.ray_extract` on a Ray instance (local by default,
one started here with --cpus CPUs, or --address). Ray's start-up is timed apart; the Ray wall includes
starting the model actors (each loads the model), as every `ris index --ray` run pays it. Each engine runs
on a quarter of the images and on all of them: wall = fixed + n / marginal rate separates the start-up
cost from the throughput a long run sees (Ray returns shards out of order, so per-shard progress cannot).

    python benchmarks/indexing/ray_throughput.py [--images 300] [--rounds 2] [--cpus 2] [--address HOST:PORT]

With --nodes 1 2, each round instead starts real local clusters with `ray start` (tests/test_ray_cluster.py's
commands: one node with 2 CPUs, then two nodes with 1 CPU each, token authentication on) and indexes through
both address forms, on a node (HOST:PORT) and through Ray Client (ray://), beside the local pipeline:

    python benchmarks/indexing/ray_throughput.py --nodes 1 2 --images 600 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from ris.collection import Collection
from ris.files.sources import scan
from ris.tools.bench import machine

CALTECH = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"


def pick(root: Path, n: int) -> list[str]:
    """n files spread over every class (every k-th of the sorted listing), so sizes and formats vary."""
    files = sorted(str(p) for p in root.rglob("*.jpg"))
    step = max(1, len(files) // n)
    return files[::step][:n]


def local_run(files: list[str], where: Path, batch_size: int) -> dict[str, float]:
    with Collection.open_or_create(where) as coll:
        start = time.perf_counter()
        report = coll.index(files, batch_size=batch_size)
        total = time.perf_counter() - start
    t = report.times
    return {"extracted": t.extracted, "extract_s": t.wall, "total_s": total, "img_s": t.extracted / t.wall,
            "model_s": t.model}  # fmt: skip


def ray_run(files: list[str], where: Path, batch_size: int, shard_size: int, address: str | None) -> dict[str, float]:
    from ris.extract.ray import SHARD_DIR, ray_extract

    with Collection.open_or_create(where) as coll:
        start = time.perf_counter()
        coll.lock()
        coll.catalog.sync(scan(files))
        t = ray_extract(coll.catalog.pending(), coll.model_settings(), coll.sink(), where / SHARD_DIR, address=address,
                        batch_size=batch_size, shard_size=shard_size)  # fmt: skip
        coll.derived.update()
        total = time.perf_counter() - start
    return {"extracted": t.extracted, "extract_s": t.wall, "total_s": total, "img_s": t.extracted / t.wall,
            "model_s": t.model, "decode_s": t.decode, "driver_wait_s": t.wait, "nodes": t.nodes,
            "catalog_bytes_per_image": (where / "catalog.sqlite").stat().st_size / t.extracted,
            "index_bytes_per_image": (where / "index.faiss").stat().st_size / t.extracted}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--address", default=None, help="an existing cluster instead of a local instance")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--root", type=Path, default=CALTECH)
    ap.add_argument("--nodes", type=int, nargs="*", help="start local clusters of these many nodes (see above)")
    args = ap.parse_args()
    if args.nodes:
        return clusters(args)

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    files = pick(args.root, args.images)
    work = Path(tempfile.mkdtemp(prefix="rayb", dir="/tmp"))
    start = time.perf_counter()
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        env = {k: v for k, v in os.environ.items() if k.startswith("RIS_")}
        ray.init(num_cpus=args.cpus, include_dashboard=False, _temp_dir=str(work / "ray"),
                 runtime_env={"env_vars": env}, log_to_driver=False)  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    startup = time.perf_counter() - start
    results = {"machine": machine(), "ray": ray.__version__, "images": len(files), "ray_startup_s": round(startup, 2),
               "cluster": ray.cluster_resources(), "rounds": []}  # fmt: skip
    small = files[: len(files) // 4]
    try:
        for r in range(args.rounds):
            row: dict = {}
            for name, run in (("local", lambda f, w: local_run(f, w, args.batch_size)),
                              ("ray", lambda f, w: ray_run(f, w, args.batch_size, args.shard_size, args.address))):  # fmt: skip
                a, b = run(small, work / f"{name}{r}s.ris"), run(files, work / f"{name}{r}.ris")
                rate = (b["extracted"] - a["extracted"]) / (b["extract_s"] - a["extract_s"])
                row[name] = {"small": a, "full": b, "marginal_img_s": rate, "fixed_s": a["extract_s"] - a["extracted"] / rate}
            results["rounds"].append(row)
            summary = "; ".join(
                f"{k} {v['full']['img_s']:.0f} img/s end to end ({v['full']['extract_s']:.1f} s for {v['full']['extracted']}), "
                f"marginal {v['marginal_img_s']:.0f} img/s + fixed {v['fixed_s']:.1f} s"
                for k, v in row.items()
            )
            print(f"round {r + 1}: {summary}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2, default=lambda v: round(v, 3) if isinstance(v, float) else str(v)))


def fit(small: dict, full: dict) -> dict[str, float]:
    """wall = fixed + n / rate from a small and a full run."""
    rate = (full["extracted"] - small["extracted"]) / (full["extract_s"] - small["extract_s"])
    return {"marginal_img_s": rate, "fixed_s": small["extract_s"] - small["extracted"] / rate}


def clusters(args: argparse.Namespace) -> None:
    """Local pipeline vs real local clusters of 1 and 2 nodes (same CPUs in all), both --ray address forms."""
    import secrets
    import sys

    token = secrets.token_hex(32)  # one for every cluster of this run: Ray reads the mode and token once
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    import ray

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.test_ray_cluster import HEAD, NODE, start_cluster

    files = pick(args.root, args.images)
    small = files[: len(files) // 4]
    work = Path(tempfile.mkdtemp(prefix="rayn", dir="/tmp"))
    results: dict = {"machine": machine(), "ray": ray.__version__, "images": len(files), "rounds": []}
    try:
        for r in range(args.rounds):
            row: dict = {}
            a, b = local_run(small, work / f"l{r}s.ris", args.batch_size), local_run(files, work / f"l{r}.ris", args.batch_size)
            row["local pipeline"] = {"small": a, "full": b, **fit(a, b)}
            for n in args.nodes:
                start = time.perf_counter()
                templates = [HEAD.replace("--num-cpus=1", "--num-cpus=2")] if n == 1 else [HEAD] + [NODE] * (n - 1)
                cluster = start_cluster(templates, token)
                started = time.perf_counter() - start
                try:
                    for form, address in (("on a node", f"127.0.0.1:{cluster.ports['GCS_PORT']}"),
                                          ("ray://", f"ray://127.0.0.1:{cluster.ports['CLIENT_PORT']}")):  # fmt: skip
                        start = time.perf_counter()
                        ray.init(address=address, log_to_driver=False)
                        connect = time.perf_counter() - start
                        try:
                            a = ray_run(small, work / f"n{n}{r}{form[0]}s.ris", args.batch_size, args.shard_size, address)
                            b = ray_run(files, work / f"n{n}{r}{form[0]}.ris", args.batch_size, args.shard_size, address)
                        finally:
                            ray.shutdown()
                        row[f"{n} node(s), {form}"] = {"small": a, "full": b, **fit(a, b), "cluster_start_s": started,
                                                        "connect_s": connect}  # fmt: skip
                finally:
                    cluster.stop()
            results["rounds"].append(row)
            for name, v in row.items():
                print(f"round {r + 1}, {name}: {v['full']['img_s']:.0f} img/s end to end "
                      f"({v['full']['extract_s']:.1f} s for {v['full']['extracted']}), marginal {v['marginal_img_s']:.0f} "
                      f"img/s + fixed {v['fixed_s']:.1f} s; nodes {v['full'].get('nodes', {})}", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2, default=lambda v: round(v, 3) if isinstance(v, float) else str(v)))


if __name__ == "__main__":
    main()
