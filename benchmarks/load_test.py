"""A bounded loopback load test of `ris serve`: upload-and-search requests at a fixed concurrency.

    python benchmarks/load_test.py --requests 500 --concurrency 8 [--json] [--collection C]

Without --collection it indexes the scikit-image sample photos and some Caltech-101 images into a
temporary collection. The server runs in a subprocess (its own GIL, like `ris serve`) on a free
loopback port; queries are Caltech images that are not in the collection, cycled.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from ris.bench import machine

CALTECH = Path(__file__).resolve().parents[2] / "shared/datasets/caltech101/101_ObjectCategories"
CATEGORIES = ("accordion", "airplanes", "anchor", "ant", "barrel", "bonsai", "brain", "butterfly", "camera", "chair",
              "cup", "dolphin", "ferry", "grand_piano", "helicopter", "lamp")  # fmt: skip
INDEXED_PER_CATEGORY = 5


def caltech(offset: int, count: int) -> list[Path]:
    return [p for c in CATEGORIES for p in sorted((CALTECH / c).glob("*.jpg"))[offset : offset + count]]


def build_collection(root: Path) -> Path:
    """Sample photos plus a few images per Caltech category (about 100 images, seconds)."""
    from ris.collection import Collection
    from ris.demo import sample_paths

    path = root / "bench.ris"
    with Collection.create(path) as coll:
        coll.add([*sample_paths(), *caltech(0, INDEXED_PER_CATEGORY)], workers=0)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(collection: Path, port: int) -> subprocess.Popen:
    code = "import sys; from ris.server import run; run(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(collection), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def run_load(base_url: str, queries: list[tuple[str, bytes]], requests: int, concurrency: int, k: int) -> dict:
    """Send the requests from `concurrency` threads (one keep-alive client each); time each one."""
    local = threading.local()
    errors: list[str] = []

    def one(n: int) -> float | None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base_url, timeout=120)
        name, data = queries[n % len(queries)]
        start = time.perf_counter()
        try:
            res = local.client.post("/api/search", files={"file": (name, data, "image/jpeg")}, data={"k": str(k)})
            ok = res.status_code == 200 and len(res.json()["matches"]) == k
            if not ok:
                errors.append(f"HTTP {res.status_code}: {res.text[:200]}")
        except httpx.HTTPError as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            return None
        elapsed = time.perf_counter() - start
        return elapsed if ok else None

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(requests, 2 * concurrency))))  # warm up: connections, thumbnails, caches
        start = time.perf_counter()
        latencies = [t for t in pool.map(one, range(requests)) if t is not None]
        wall = time.perf_counter() - start
    latencies.sort()
    ms = [t * 1000 for t in latencies]

    def pct(p: float) -> float:
        return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 1) if ms else float("nan")

    return {
        "requests": requests, "concurrency": concurrency, "k": k, "errors": len(errors), "error_samples": errors[:5],
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": round(ms[-1], 1) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 1) if ms else None, "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--collection", type=Path, help="an existing collection (default: build a small one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        collection = args.collection or build_collection(Path(tmp))
        queries = [(p.name, p.read_bytes()) for p in caltech(INDEXED_PER_CATEGORY, 2)]
        port = free_port()
        server = start_server(collection, port)
        try:
            base_url = f"http://127.0.0.1:{port}"
            info = httpx.get(f"{base_url}/api/collection", params={"limit": 1}).json()
            report = run_load(base_url, queries, args.requests, args.concurrency, args.k)
        finally:
            server.terminate()
            server.wait(30)
    report.update(
        cpu=machine()["cpu"], cores=len(os.sched_getaffinity(0)), collection_images=info["images"], model=info["model"],
        precision=info["precision"], query_images=len(queries), server="subprocess, uvicorn, 1 worker",
    )  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['requests']} upload+search requests at concurrency {report['concurrency']} "
          f"against {report['collection_images']} images ({report['model']}, {report['precision']})")  # fmt: skip
    print(f"  errors {report['errors']}  p50 {report['p50_ms']} ms  p90 {report['p90_ms']} ms  p99 {report['p99_ms']} ms  "
          f"max {report['max_ms']} ms  {report['requests_per_s']} req/s  ({report['wall_s']} s)")  # fmt: skip
    print(f"  CPU: {report['cpu']} ({report['cores']} cores)")
    for sample in report["error_samples"]:
        print(f"  error: {sample}")


if __name__ == "__main__":
    main()
