"""A real two-node Ray cluster on this machine: `ris index --ray` through Ray Client and from a node.

The head and a second node are started with `ray start` (1 CPU each, their own temp dirs, token
authentication on as Ray 2.60 does by default), exactly as docs/scaling.md shows. Indexing a Caltech subset
through the cluster must give what a local build gives (same images, same skipped files, cosine ≥ 0.999 per
image, same top-5 lists) and both nodes must have done work (the per-node counts `ris index --ray` prints).
The cluster is stopped at the end by killing what this module started, never with `ray stop` (which would
end every Ray instance of this user on the machine).
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from string import Template

import numpy as np
import pytest

from ris.collection import Collection

from .test_ray import CLASSES, PER_CLASS, assert_same, local_build, make_images

pytest.importorskip("ray", reason='needs pip install -e ".[ray]"')

DOCS = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
# The commands of docs/scaling.md ("Two nodes on one machine"), run here verbatim with the shell variables filled in.
TOKEN = "export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(python -c 'import secrets; print(secrets.token_hex(32))')"
HEAD = (
    "ray start --head --node-ip-address=127.0.0.1 --port=$GCS_PORT --ray-client-server-port=$CLIENT_PORT --num-cpus=1 "
    "--temp-dir=$HEAD_DIR --dashboard-port=$DASHBOARD_PORT --dashboard-agent-listen-port=$AGENT_PORT "
    "--object-store-memory=100000000 --disable-usage-stats --block"
)
NODE = (
    "ray start --address=127.0.0.1:$GCS_PORT --node-ip-address=127.0.0.1 --num-cpus=1 --temp-dir=$NODE_DIR "
    "--dashboard-agent-listen-port=$AGENT_PORT2 --object-store-memory=100000000 --disable-usage-stats --block"
)
INDEX_CLIENT = "ris index $IMAGES -c $COLLECTION --ray ray://127.0.0.1:$CLIENT_PORT"
INDEX_ON_NODE = "ris index $IMAGES -c $COLLECTION --ray 127.0.0.1:$GCS_PORT"
NODE_LINE = re.compile(r"^\s*node (\S+ \S+): (\d+) decoded, (\d+) through the model$", re.M)
START_S = 180  # a node starts in ≈ 20 s on a quiet 2-core machine; much longer when it is busy


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalCluster:
    """Ray nodes started here with `ray start --block` (each in its own process group) and how to reach them."""

    env: dict[str, str]
    ports: dict[str, str]
    procs: list[subprocess.Popen] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def command(self, template: str, **more: str) -> list[str]:
        return shlex.split(Template(template).substitute(self.ports, **more))

    def start_node(self, template: str, dir_var: str) -> None:
        temp = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.dirs.append(temp)
        cmd = self.command(template, **{dir_var: temp})
        cmd[0] = str(Path(sys.executable).with_name("ray"))
        log = Path(temp + ".log")
        self.dirs.append(str(log))
        with open(log, "wb") as out:
            self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + START_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            if self.procs[-1].poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
                raise RuntimeError(f"`{' '.join(cmd[:3])} …` did not start within {START_S} s: {tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Kill the process groups started here, then any process that still carries this cluster's token (Ray
        workers start their own sessions), by pid."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)
        marker = f"RAY_AUTH_TOKEN={self.env['RAY_AUTH_TOKEN']}".encode()
        for _ in range(3):
            left = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _has(p, marker)]
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if not left:
                break
            time.sleep(1)
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True) if os.path.isdir(d) else Path(d).unlink(missing_ok=True)


def _has(proc: Path, marker: bytes) -> bool:
    try:
        return marker in (proc / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def start_cluster(templates: list[str], token: str | None = None) -> LocalCluster:
    """Nodes from these `ray start` commands (the first the head), token authentication on (a new token unless
    given); RuntimeError (with the log's last lines) when one does not start, after stopping what did."""
    token = token or secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    names = ("GCS_PORT", "CLIENT_PORT", "DASHBOARD_PORT", "AGENT_PORT", "AGENT_PORT2")
    c = LocalCluster(env, {name: str(free_port()) for name in names})
    try:
        for n, template in enumerate(templates):
            c.ports["AGENT_PORT2"] = str(free_port())  # one per node after the head
            c.start_node(template, "HEAD_DIR" if n == 0 else "NODE_DIR")
        deadline = time.monotonic() + START_S
        while True:  # the head's Ray Client server
            try:
                socket.create_connection(("127.0.0.1", int(c.ports["CLIENT_PORT"])), timeout=1).close()
                return c
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the head's Ray Client server did not listen") from None
                time.sleep(0.5)
    except BaseException:
        c.stop()
        raise


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """Head + one worker node, 1 CPU each, token authentication on (RAY_AUTH_MODE=token and the head's token)."""
    if shutil.which("ray", path=str(Path(sys.executable).parent)) is None:
        pytest.skip("the `ray` command is not installed beside this Python")
    try:
        c = start_cluster([HEAD, NODE])
    except RuntimeError as exc:
        pytest.skip(f"a local Ray cluster could not start here: {exc}")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_images(tmp_path_factory.mktemp("cluster-images"))


@pytest.fixture(scope="module")
def local(images: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, tuple[dict[str, np.ndarray], list]]:
    where = tmp_path_factory.mktemp("local") / "c.ris"
    return where, local_build(images, where)


def run_ris(c: LocalCluster, template: str, env: dict[str, str] | None = None, **values: str) -> subprocess.CompletedProcess:
    cmd = c.command(template, **values)
    assert cmd[0] == "ris"
    return subprocess.run([sys.executable, "-m", "ris", *cmd[1:]], env={**(env or c.env), "COLUMNS": "200"},
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def check_against_local(collection: Path, proc: subprocess.CompletedProcess, images: Path, local) -> None:
    """Same images, skipped files and features as the local build, same top-5 lists; both nodes worked."""
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    nodes = {m[0]: (int(m[1]), int(m[2])) for m in NODE_LINE.findall(proc.stderr)}
    assert len(nodes) == 2, proc.stderr  # head and worker node, told apart by node id (they share the IP)
    assert all(decoded + extracted > 0 for decoded, extracted in nodes.values()), nodes
    assert sum(d for d, _ in nodes.values()) == len(CLASSES) * PER_CLASS + 3  # every file decoded once
    assert sum(e for _, e in nodes.values()) == len(CLASSES) * PER_CLASS  # every good image through the model once
    local_path, reference = local
    queries = [sorted((images / cls).glob("*.jpg"))[i] for cls in CLASSES for i in (0, 5)]
    with Collection.open(collection) as coll, Collection.open(local_path) as ref:
        assert_same(coll, reference)
        got, want = coll.search_many(queries, k=5), ref.search_many(queries, k=5)
        assert [[m.path for m in r.matches] for r in got] == [[m.path for m in r.matches] for r in want]


def test_ray_client_address(cluster: LocalCluster, images: Path, local, tmp_path: Path) -> None:
    """ray://: the pipeline runs in a driver actor on the cluster, shards come back over Ray Client. Only the token
    is given: ris turns token mode on itself (Ray Client would not)."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    proc = run_ris(cluster, INDEX_CLIENT, env, IMAGES=str(images), COLLECTION=str(tmp_path / "c.ris"))
    check_against_local(tmp_path / "c.ris", proc, images, local)


def test_driver_on_a_node(cluster: LocalCluster, images: Path, local, tmp_path: Path) -> None:
    """HOST:PORT from a machine that is a node of the cluster: the pipeline runs in the ris process."""
    proc = run_ris(cluster, INDEX_ON_NODE, IMAGES=str(images), COLLECTION=str(tmp_path / "c.ris"))
    check_against_local(tmp_path / "c.ris", proc, images, local)


def test_a_wrong_token_is_one_error_line(cluster: LocalCluster, images: Path, tmp_path: Path) -> None:
    """Ray Client retries a refused token until it times out (shortened here); then one line says what to set."""
    env = {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1"}
    proc = run_ris(cluster, INDEX_CLIENT, env, IMAGES=str(images / "cup"), COLLECTION=str(tmp_path / "c.ris"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [proc.stderr.strip().splitlines()[-1]], proc.stderr  # (before it, only the progress bar)
    assert errors[0].startswith("error: the Ray cluster at ray://127.0.0.1:") and "RAY_AUTH_TOKEN" in errors[0], errors


def test_a_dashboard_address_is_one_error_line(tmp_path: Path) -> None:
    """The Ray Jobs (dashboard) URL is not what --ray takes: told before anything starts."""
    from .conftest import run_cli

    proc = run_cli("index", str(tmp_path), "-c", str(tmp_path / "c.ris"), "--ray", "http://127.0.0.1:8265", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --ray http://127.0.0.1:8265: not a Ray address; give ray://")
    assert not (tmp_path / "c.ris").exists()


def test_the_docs_give_these_commands() -> None:
    text = DOCS.read_text()
    for command in (TOKEN, HEAD, NODE, INDEX_CLIENT, INDEX_ON_NODE):
        assert command in text, command
