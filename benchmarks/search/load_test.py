"""A bounded loopback load test of `ris serve`: upload-and-search requests at a fixed concurrency.

    python benchmarks/search/load_test.py --requests 500 --concurrency 8 [--json] [--collection C]
    python benchmarks/search/load_test.py --hostile --seconds 30 --concurrency 8 [--json] [--server-src DIR]
    python benchmarks/search/load_test.py --collection C --queries outside=DIR --queries harsh=DIR2 --concurrency 1
    python benchmarks/search/load_test.py --write-copies DIR2 --copies-of FOLDER [--copies 120] [--exclude GLOB]

Without --collection it indexes the scikit-image sample photos and some Caltech-101 images into a
temporary collection. The server runs in a subprocess (its own GIL, like `ris serve`) on a free
loopback port; queries are Caltech images that are not in the collection, cycled.

--queries NAME=DIR (repeatable): each folder's images are one query set, measured on its own (the second look
makes a query that is not a copy of an indexed image dearer than one that is). --write-copies writes the
edited copies of a seeded sample of FOLDER's images (ris.images.edits, --copy-set harsh or heldout, every
kind in turn) as JPEGs, for a copies set of queries.

--hostile: for --seconds, each client sends a mix of valid searches and uploads meant to hurt (over the
size limit, declared or chunked; PNG bombs of 13000 x 13000 and 20000 x 20000 pixels; random bytes; a
cut JPEG), and the report counts answers by kind and status, the server's peak RSS (VmHWM) against its
RSS when idle, and the valid searches' latencies. --server-src runs the server from another source tree
(e.g. main's src/, as the baseline).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from ris.tools.bench import machine

CALTECH = Path(__file__).resolve().parents[3] / "shared/datasets/caltech101/101_ObjectCategories"
CATEGORIES = ("accordion", "airplanes", "anchor", "ant", "barrel", "bonsai", "brain", "butterfly", "camera", "chair",
              "cup", "dolphin", "ferry", "grand_piano", "helicopter", "lamp")  # fmt: skip
INDEXED_PER_CATEGORY = 5


def caltech(offset: int, count: int) -> list[Path]:
    return [p for c in CATEGORIES for p in sorted((CALTECH / c).glob("*.jpg"))[offset : offset + count]]


def build_collection(root: Path) -> Path:
    """Sample photos plus a few images per Caltech category (about 100 images, seconds)."""
    from ris.collection import Collection
    from ris.tools.demo import sample_paths

    path = root / "bench.ris"
    with Collection.create(path) as coll:
        coll.add([*sample_paths(), *caltech(0, INDEXED_PER_CATEGORY)], workers=0)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(collection: Path, port: int, src: Path | None = None) -> subprocess.Popen:
    """`ris serve` in a subprocess (from the source tree src, if given); returns once it answers."""
    code = "import sys; from ris.server import run; run(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(src or ""), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.Popen([sys.executable, "-c", code, str(collection), str(port)], env=env,
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


def wait_prepared(base_url: str, quiet_s: float = 3.0) -> dict:
    """Wait until the server has kept the keypoints it prepares after start (health's "keypoints" unchanged for quiet_s;
    a server without the field: at once) and built their votes (health's "voted" above 0, where it has the field);
    how long that took and how many it kept."""
    start, seen, since = time.monotonic(), -1, time.monotonic()
    while True:
        health = httpx.get(f"{base_url}/api/health", timeout=10).json()
        kept, voting = health.get("keypoints"), health.get("voted", 1) > 0
        if kept is None or (kept == seen and voting and time.monotonic() - since >= quiet_s):
            return {"prepared_s": round(time.monotonic() - start - (quiet_s if kept is not None else 0), 1), "keypoints": kept,
                    "voted": health.get("voted")}  # fmt: skip
        if kept != seen:
            seen, since = kept, time.monotonic()
        time.sleep(0.5)


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


# --- hostile load --------------------------------------------------------------------------------------

#: Request kinds and their share of the mix: a third valid searches, the rest meant to hurt.
MIX = {"valid": 4, "oversized": 1, "chunked": 1, "bomb-13k": 2, "bomb-20k": 1, "garbage": 1, "truncated": 1}
OVERSIZE = 21 * 1024 * 1024  # just over the default 20 MB limit


def folder_queries(folder: Path, limit: int = 200) -> list[tuple[str, bytes]]:
    """Up to `limit` images of a folder (sorted, spread over it) as (name, bytes) queries."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    return [(p.name, p.read_bytes()) for p in files[:: max(1, len(files) // limit)][:limit]]


def write_copies(out: Path, source: Path, count: int, copy_set: str, exclude: str = "", seed: int = 0) -> int:
    """JPEG copies of `count` images of source (a seeded sample; names matching `exclude` left out, as an
    index with that --exclude would), edited by the set's kinds in turn."""
    from ris.images import edits

    files = sorted(p for p in source.rglob("*.jpg") if not (exclude and p.match(exclude)))
    rng = random.Random(seed)
    picks = rng.sample(files, min(count, len(files)))
    kinds = list(edits.SETS[copy_set])
    out.mkdir(parents=True, exist_ok=True)
    for n, path in enumerate(picks):
        kind = kinds[n % len(kinds)]
        other = lambda n=n: Image.open(files[(n * 7919 + 1) % len(files)]).convert("RGB")  # noqa: E731
        with Image.open(path) as img:
            copy = edits.edit(kind, img, edits.rng_for(seed, kind, n), other)
        copy.convert("RGB").save(out / f"{n:04d}-{kind}-{path.parent.name}-{path.stem}.jpg", quality=90)
    return len(picks)


def png_bomb(side: int) -> bytes:
    """A blank greyscale PNG of side x side pixels: tens of kB that would decode to side² bytes and more."""
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, "PNG")
    return buf.getvalue()


def hostile_requests(queries: list[tuple[str, bytes]]) -> dict[str, Callable[[int], dict]]:
    """For each kind, the httpx arguments of its n-th request."""
    bombs = {"bomb-13k": png_bomb(13_000), "bomb-20k": png_bomb(20_000)}
    rng = random.Random(17)
    garbage = [rng.randbytes(rng.randint(1, 200_000)) for _ in range(8)]
    oversized = b"\xff" * OVERSIZE

    def chunks() -> Iterator[bytes]:  # a file part that never ends, without Content-Length: the server must count
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n\r\n'
        piece = b"\0" * (1024 * 1024)
        for _ in range(OVERSIZE // len(piece) + 2):
            yield piece

    def form(name: str, data: bytes) -> dict:
        return {"files": {"file": (name, data, "application/octet-stream")}, "data": {"k": "5"}}

    return {
        "valid": lambda n: form(*queries[n % len(queries)]),
        "oversized": lambda n: form("big.jpg", oversized),
        "chunked": lambda n: {"content": chunks(), "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
        "bomb-13k": lambda n: form("bomb.png", bombs["bomb-13k"]),
        "bomb-20k": lambda n: form("bomb.png", bombs["bomb-20k"]),
        "garbage": lambda n: form("x.jpg", garbage[n % len(garbage)]),
        "truncated": lambda n: form("cut.jpg", queries[n % len(queries)][1][: len(queries[n % len(queries)][1]) // 3]),
    }


def rss_mb(pid: int) -> dict[str, float]:
    """The process's resident memory now (VmRSS) and at its peak so far (VmHWM), in MB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: round(int(fields[key].split()[0]) / 1024, 1) for key in ("VmRSS", "VmHWM")}


def run_hostile(base_url: str, queries: list[tuple[str, bytes]], seconds: float, concurrency: int, pid: int) -> dict:
    """Each of `concurrency` clients sends the mix (kinds drawn with a fixed seed) until `seconds` pass."""
    requests = hostile_requests(queries)
    kinds = [kind for kind, weight in MIX.items() for _ in range(weight)]
    outcomes: Counter[str] = Counter()
    samples: dict[str, str] = {}
    latencies: list[float] = []
    lock = threading.Lock()
    idle = rss_mb(pid)["VmRSS"]
    deadline = time.monotonic() + seconds

    def client(worker: int) -> None:
        rng = random.Random(worker)
        with httpx.Client(base_url=base_url, timeout=120) as c:
            n = 0
            while time.monotonic() < deadline:
                kind, n = rng.choice(kinds), n + 1
                start = time.perf_counter()
                try:
                    res = c.post("/api/search", **requests[kind](n))
                    outcome = str(res.status_code)
                    ok = kind == "valid" and res.status_code == 200 and len(res.json()["matches"]) == 5
                except httpx.HTTPError as exc:
                    outcome, ok, res = f"closed ({type(exc).__name__})", False, None
                with lock:
                    outcomes[f"{kind} {outcome}"] += 1
                    if ok:
                        latencies.append(time.perf_counter() - start)
                    elif res is not None and res.status_code >= 500:
                        samples.setdefault(kind, res.text[:200])

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    memory = rss_mb(pid)
    ms = sorted(t * 1000 for t in latencies)

    def pct(p: float) -> float | None:
        return round(ms[min(len(ms) - 1, int(p / 100 * len(ms)))], 1) if ms else None

    server_errors = sum(v for key, v in outcomes.items() if key.split()[1].startswith("5"))
    return {
        "seconds": seconds, "concurrency": concurrency, "requests": sum(outcomes.values()),
        "outcomes": dict(sorted(outcomes.items())),
        "server_errors": server_errors, "error_samples": samples, "valid_answered": len(ms), "valid_p50_ms": pct(50),
        "valid_p95_ms": pct(95), "rss_idle_mb": idle, "rss_end_mb": memory["VmRSS"], "rss_peak_mb": memory["VmHWM"],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--collection", type=Path, help="an existing collection (default: build a small one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--hostile", action="store_true", help="the hostile mix for --seconds instead of --requests")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--server-src", type=Path, help="run the server from this source tree (a baseline)")
    parser.add_argument("--queries", action="append", default=[], metavar="NAME=DIR",
                        help="a query set: the images of DIR (repeatable; each set measured on its own)")
    parser.add_argument("--write-copies", type=Path, metavar="DIR", help="write edited copies to DIR and exit")
    parser.add_argument("--copies-of", type=Path, help="with --write-copies: the folder whose images are copied")
    parser.add_argument("--copies", type=int, default=120)
    parser.add_argument("--copy-set", choices=("harsh", "heldout"), default="harsh")
    parser.add_argument("--exclude", default="", help="with --write-copies: names not to copy (the index's --exclude)")
    parser.add_argument("--prepared", action="store_true",
                        help="measure once the server has prepared the keypoints it keeps (health's keypoints steady)")
    args = parser.parse_args()
    if args.write_copies:
        written = write_copies(args.write_copies, args.copies_of or CALTECH, args.copies, args.copy_set, args.exclude)
        print(f"{written} copies written")
        return
    sets = dict(q.split("=", 1) for q in args.queries)
    if len(sets) > 1:  # each set in its own run (and server), with the same settings
        rest = ["--requests", str(args.requests), "--concurrency", str(args.concurrency), "--k", str(args.k),
                "--seconds", str(args.seconds), *(["--hostile"] if args.hostile else []),
                *(["--prepared"] if args.prepared else []),
                *(["--collection", str(args.collection)] if args.collection else []),
                *(["--server-src", str(args.server_src)] if args.server_src else [])]  # fmt: skip
        report = {}
        for name, folder in sets.items():
            report[name] = json.loads(subprocess.run(
                [sys.executable, __file__, *rest, "--json", "--queries", f"{name}={folder}"],
                check=True, capture_output=True, text=True).stdout)  # fmt: skip
        print(json.dumps(report) if args.json else "\n".join(f"{k}: {json.dumps(v)}" for k, v in report.items()))
        return

    with tempfile.TemporaryDirectory() as tmp:
        collection = args.collection or build_collection(Path(tmp))
        if sets:
            queries = folder_queries(Path(next(iter(sets.values()))))
        else:
            queries = [(p.name, p.read_bytes()) for p in caltech(INDEXED_PER_CATEGORY, 2)]
        port = free_port()
        server = start_server(collection, port, args.server_src)
        try:
            base_url = f"http://127.0.0.1:{port}"
            info = httpx.get(f"{base_url}/api/collection", params={"limit": 1}).json()
            prepared = {**wait_prepared(base_url), "rss_prepared_mb": rss_mb(server.pid)["VmRSS"]} if args.prepared else {}
            if args.hostile:
                run_load(base_url, queries, 2 * args.concurrency, args.concurrency, args.k)  # warm up
                report = run_hostile(base_url, queries, args.seconds, args.concurrency, server.pid)
            else:
                report = run_load(base_url, queries, args.requests, args.concurrency, args.k)
        finally:
            server.terminate()
            server.wait(30)
    report.update(
        cpu=machine()["cpu"], cores=len(os.sched_getaffinity(0)), collection_images=info["images"], model=info["model"],
        precision=info["precision"], query_images=len(queries), server="subprocess, uvicorn, 1 worker",
        server_src=str(args.server_src or "installed ris"), query_set=next(iter(sets), "caltech"),
        **prepared,
    )  # fmt: skip
    if args.json:
        print(json.dumps(report))
        return
    if args.hostile:
        print(f"hostile mix for {report['seconds']} s at concurrency {report['concurrency']}: {report['requests']} requests, "
              f"{report['server_errors']} answered 5xx")  # fmt: skip
        for key, count in report["outcomes"].items():
            print(f"  {key:<40} {count}")
        print(f"  valid searches answered {report['valid_answered']}: p50 {report['valid_p50_ms']} ms, "
              f"p95 {report['valid_p95_ms']} ms")  # fmt: skip
        print(f"  server RSS: idle {report['rss_idle_mb']} MB, peak {report['rss_peak_mb']} MB, end {report['rss_end_mb']} MB")
        print(f"  CPU: {report['cpu']} ({report['cores']} cores)")
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
