"""A real Milvus server (PyPI's `milvus` standalone, with its own etcd) behind `ris index/add/remove/search` and
two `ris serve` replicas searching it while a writer adds and removes images.

The server runs from its own virtual environment (.ci/run installs it: `python3 -m venv .venv-milvus &&
.venv-milvus/bin/pip install milvus==2.3.5`); where it is missing or cannot start, the tests are skipped with
the reason. It listens on all interfaces; every request here goes to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from string import Template

import httpx
import pytest

from tests.conftest import SUBSET_CLASSES, run_cli

pytest.importorskip("pymilvus", reason='needs pip install -e ".[milvus]"')

ROOT = Path(__file__).resolve().parents[1]
INSTALL = "python3 -m venv .venv-milvus && .venv-milvus/bin/pip install milvus==2.3.5"
# docs/scaling.md's command, verbatim: every component on a free port (only --data and --proxy-port are needed
# on a machine of its own; free ports keep it clear of anything else running here)
SERVER = (
    "milvus-server --data $DATA --etcd-port $ETCD_PORT --root-coord-port $ROOT_COORD_PORT --proxy-port $PROXY_PORT "
    "--proxy-internal-port $PROXY_INTERNAL_PORT --query-coord-port $QUERY_COORD_PORT --query-node-port $QUERY_NODE_PORT "
    "--index-coord-port $INDEX_COORD_PORT --index-node-port $INDEX_NODE_PORT --data-coord-port $DATA_COORD_PORT "
    "--data-node-port $DATA_NODE_PORT"
)
START_S = 180  # ≈ 40 s on a quiet 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def milvus_server_command() -> str | None:
    """RIS_MILVUS_SERVER, else the repository's .venv-milvus, else PATH."""
    given = os.environ.get("RIS_MILVUS_SERVER") or str(ROOT / ".venv-milvus" / "bin" / "milvus-server")
    return given if Path(given).is_file() else shutil.which("milvus-server")


def ready(uri: str) -> bool:
    from pymilvus import MilvusClient

    try:
        MilvusClient(uri, timeout=5).list_collections()
        return True
    except Exception:  # noqa: BLE001 - any failure means: not yet
        return False


def start_milvus(command: str, data: Path) -> tuple[subprocess.Popen, str]:
    """`milvus-server --data DIR --proxy-port PORT` (free ports for its other components too) in its own process
    group; (process, milvus://127.0.0.1:PORT) once it answers, RuntimeError with its log's last lines if it does not."""
    ports = {name: str(free_port()) for name in re.findall(r"\$(\w+_PORT)", SERVER)}
    args = [command, *shlex.split(Template(SERVER).substitute(ports, DATA=str(data)))[1:]]
    log = data / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_S
    while not ready(f"http://127.0.0.1:{ports['PROXY_PORT']}"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_milvus(proc)
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"the Milvus server did not start within {START_S} s: {tail}")
        time.sleep(1)
    return proc, f"milvus://127.0.0.1:{ports['PROXY_PORT']}"


def stop_milvus(proc: subprocess.Popen) -> None:
    """Stop the server's process group, then whatever it started outside the group: `milvus-server` copies its
    binary under the data folder (DIR/bin/milvus run standalone), which outlived the group's SIGTERM."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    except ProcessLookupError:
        pass
    data = proc.args[proc.args.index("--data") + 1] if "--data" in proc.args else None
    for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()) if data else ():
        try:
            if data.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


@pytest.fixture(scope="module")
def milvus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    command = milvus_server_command()
    if command is None:
        pytest.skip(f"no milvus-server (install it with: {INSTALL})")
    try:
        proc, uri = start_milvus(command, tmp_path_factory.mktemp("milvus-server"))
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        yield uri
    finally:
        stop_milvus(proc)


def query(subset_dir: Path, cls: str) -> Path:
    return sorted((subset_dir / cls).glob("*.jpg"))[3]


def search_json(collection: Path, q: Path, k: int = 5) -> list[str]:
    out = run_cli("search", str(q), "-c", str(collection), "-k", str(k), "--json").stdout
    return [m["path"] for m in json.loads(out)["matches"]]


def test_cli_index_add_remove_search(milvus: str, subset_dir: Path, subset_collection: Path, tmp_path: Path) -> None:
    """The same answers as the FAISS collection of the same images; adds and removes reach the server."""
    from ris.collection import Collection

    c = tmp_path / "c.ris"
    run_cli("index", *(str(subset_dir / cls) for cls in SUBSET_CLASSES[:4]), "-c", str(c), "--store", milvus)
    run_cli("add", *(str(subset_dir / cls) for cls in SUBSET_CLASSES[4:]), "-c", str(c))
    queries = [query(subset_dir, cls) for cls in SUBSET_CLASSES]
    with Collection.open(c) as coll, Collection.open(subset_collection) as faiss_coll:
        info = coll.info()
        assert (info["store"], info["index_built"], info["images"]) == (milvus, "HNSW", 60)
        got, want = coll.search_many(queries, k=5), faiss_coll.search_many(queries, k=5)
        assert [[m.path for m in r.matches] for r in got] == [[m.path for m in r.matches] for r in want]
    gone = SUBSET_CLASSES[0]
    assert "removed 10 images; 50 remain" in run_cli("remove", str(subset_dir / gone), "-c", str(c)).stderr
    found = search_json(c, query(subset_dir, gone), k=50)
    assert len(found) == 50 and not [p for p in found if Path(p).parent.name == gone]


def serve(collection: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ris", "serve", "-c", str(collection), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def wait_up(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"ris serve did not come up: {proc.stderr.read().decode() if proc.poll() is not None else ''}")
        time.sleep(0.5)


def upload(client: httpx.Client, q: Path, k: int) -> httpx.Response:
    return client.post("/api/search", files={"file": (q.name, q.read_bytes())}, data={"k": str(k)})


def test_two_replicas_search_while_a_writer_changes_the_collection(milvus: str, subset_dir: Path, tmp_path: Path) -> None:
    """Two `ris serve` processes on one collection search Milvus while `ris add`/`ris remove` run; no request fails,
    and once the writer is done both answer from what the catalogue holds."""
    first, stable, later = SUBSET_CLASSES[:2], SUBSET_CLASSES[2:4], SUBSET_CLASSES[4:]
    c = tmp_path / "c.ris"
    run_cli("index", *(str(subset_dir / cls) for cls in (*first, *stable)), "-c", str(c), "--store", milvus)
    replicas = [serve(c) for _ in range(2)]
    try:
        for proc, url in replicas:
            wait_up(proc, url)
        steps = [("add", later[0]), ("remove", first[0])]
        failures: list[str] = []

        def writer() -> None:
            for verb, cls in steps:
                proc = run_cli(verb, str(subset_dir / cls), "-c", str(c), check=False)
                if proc.returncode:
                    failures.append(f"ris {verb} {cls}: {proc.stderr}")

        thread = threading.Thread(target=writer)
        clients = [httpx.Client(base_url=url, timeout=120) for _, url in replicas]
        thread.start()
        searched = 0
        while thread.is_alive() or searched < 4:
            for client, cls in zip(clients, stable, strict=True):
                res = upload(client, query(subset_dir, cls), 5)
                assert res.status_code == 200, res.text
                # never removed: always found (first or, with DBA's averaged vectors, next to a near-copy)
                assert str(query(subset_dir, cls)) in [m["path"] for m in res.json()["matches"]]
                searched += 1
        thread.join()
        assert not failures, failures

        from ris.collection import Collection

        with Collection.open(c) as coll:
            held = {row.path for row in coll.catalog.all_rows()}
        kept = {first[1], *stable, later[0]}
        assert {Path(p).parent.name for p in held} == kept and len(held) == 40
        deadline = time.monotonic() + 30  # replicas read with Milvus' Bounded consistency: converge within seconds
        while True:
            answers = [[[m["path"] for m in upload(client, query(subset_dir, cls), 40).json()["matches"]]
                        for cls in SUBSET_CLASSES] for client in clients]  # fmt: skip
            if all(set(paths) == held for answer in answers for paths in answer) or time.monotonic() > deadline:
                break
            time.sleep(1)
        for answer in answers:
            assert answer == answers[0]  # both replicas give the same lists
            for cls, paths in zip(SUBSET_CLASSES, answer, strict=True):
                assert set(paths) == held, cls  # every image the catalogue holds, nothing it dropped
                if cls in kept:
                    assert str(query(subset_dir, cls)) in paths[:5]
        for client in clients:
            assert client.get("/api/health").json()["images"] == 40
            client.close()
    finally:
        for proc, _ in replicas:
            proc.terminate()
            proc.wait(30)


def test_the_docs_give_these_commands() -> None:
    text = (ROOT / "docs" / "scaling.md").read_text()
    assert INSTALL in text and SERVER in text
