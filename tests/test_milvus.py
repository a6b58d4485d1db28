"""Vectors in Milvus: real milvus-lite (embedded, and as a gRPC server), the real model, real Caltech-101 images.

The same images searched in a FAISS-backed and a Milvus-backed collection give the same answers; adding and
removing reach Milvus; a new process finds what an earlier one wrote; `ris serve` works unchanged on top;
a second store for an existing collection, or a milvus-lite file another process holds, is a one-line error.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import SUBSET_CLASSES, run_cli

pytest.importorskip("pymilvus", reason='needs pip install -e ".[milvus]"')
pytest.importorskip("milvus_lite", reason='needs pip install -e ".[milvus]"')

from ris.collection import Collection  # noqa: E402
from ris.errors import RisError  # noqa: E402
from ris.server import create_app, serve_in_thread  # noqa: E402
from ris.vectors import milvus as milvus_store  # noqa: E402

QUERY_CLASSES = SUBSET_CLASSES  # one indexed image of each class is a query


def queries(subset_dir: Path) -> list[Path]:
    return [sorted((subset_dir / cls).glob("*.jpg"))[3] for cls in QUERY_CLASSES]


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """A user error as the CLI must show it: exit 1, one `error:` line, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def lite_collection(subset_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The subset indexed into a milvus-lite file through the API (closed: the file is free for others)."""
    root = tmp_path_factory.mktemp("milvus")
    with Collection.create(root / "lite.ris", store=f"milvus-lite://{root / 'vectors.db'}") as coll:
        coll.index([subset_dir])
    return root / "lite.ris"


def test_search_equals_the_faiss_collection(lite_collection: Path, subset_collection: Path, subset_dir: Path) -> None:
    with Collection.open(subset_collection) as faiss_coll, Collection.open(lite_collection) as milvus_coll:
        assert milvus_coll.info()["store"].startswith("milvus-lite:///") and faiss_coll.info()["store"] == "faiss"
        for qe in (0, 3):
            want = faiss_coll.search_many(queries(subset_dir), k=12, qe=qe)
            got = milvus_coll.search_many(queries(subset_dir), k=12, qe=qe)
            for w, g in zip(want, got, strict=True):
                assert g.query == w.query and len(g.matches) == 12
                assert [(m.rank, m.path, m.label) for m in g.matches] == [(m.rank, m.path, m.label) for m in w.matches]
                np.testing.assert_allclose([m.score for m in g.matches], [m.score for m in w.matches], atol=1e-4)
                rows = milvus_coll.catalog.rows([m.id for m in g.matches])  # ids are the Milvus collection's catalogue ids
                assert [rows[m.id].path for m in g.matches] == [m.path for m in g.matches]
            assert all(r.matches[0].path == str(q) for r, q in zip(got, queries(subset_dir), strict=True))


def test_add_remove_and_pca_reach_milvus(subset_dir: Path, tmp_path: Path) -> None:
    """dims=16: PCA is fitted once 32 images are in, so the second run also rebuilds Milvus at 16 dims."""
    first, second = SUBSET_CLASSES[:2], SUBSET_CLASSES[2:]
    with Collection.create(tmp_path / "c.ris", dims=16, store=f"milvus-lite://{tmp_path / 'v.db'}") as coll:
        coll.add([subset_dir / c for c in first])
        store = coll._milvus_client()
        assert store.ntotal == 20 and store.describe() == (11520, "FLAT") and coll.info()["dims"] == 11520
        coll.add([subset_dir / c for c in second])
        assert store.ntotal == 60 and store.describe() == (16, "FLAT") and coll.info()["dims"] == 16
        assert np.array_equal(store.ids(), coll.catalog.ok_ids())

        gone = sorted((subset_dir / SUBSET_CLASSES[0]).glob("*.jpg"))
        assert coll.remove([str(subset_dir / SUBSET_CLASSES[0])]) == 10
        assert store.ntotal == 50 and np.array_equal(store.ids(), coll.catalog.ok_ids())
        found = coll.search_many(gone[:3], k=50)
        assert all(len(r.matches) == 50 for r in found)
        assert not {m.path for r in found for m in r.matches} & {str(p) for p in gone}

        coll.reindex(refit_pca=True)
        assert store.ntotal == 50 and store.describe() == (16, "FLAT")
    probe = sorted((subset_dir / SUBSET_CLASSES[-1]).glob("*.jpg"))[0]
    # another index type is recorded now and built by the next write (here a removal of nothing)
    with Collection.open_or_create(tmp_path / "c.ris", index_factory="HNSW", nprobe=32) as coll:
        assert coll.remove([str(tmp_path / "nothing.jpg")]) == 0
        store = coll._milvus_client()
        assert store.describe() == (16, "HNSW") and store.ntotal == 50 and coll.info()["index_built"] == "HNSW"
        assert store.search_params(5, 32)["params"] == {"ef": 32}
        assert coll.search(probe, k=1).matches[0].path == str(probe)
    # a new process sees the same vectors, and finds an image of the second run first
    out = run_cli("search", str(probe), "-c", str(tmp_path / "c.ris"), "-k", "3", "--json").stdout
    assert json.loads(out)["matches"][0]["path"] == str(probe)


def test_cli_index_with_a_relative_lite_path(subset_dir: Path, tmp_path: Path) -> None:
    run_cli("index", str(subset_dir / "cup"), str(subset_dir / "panda"), "-c", "c.ris", "--store", "milvus-lite://data/v.db",
            cwd=tmp_path)  # fmt: skip
    info = json.loads(run_cli("info", "-c", str(tmp_path / "c.ris"), "--json").stdout)
    assert info["store"] == f"milvus-lite://{tmp_path / 'data' / 'v.db'}" and info["images"] == 20
    assert info["index_built"] == "FLAT" and info["store_collection"].startswith("ris_c_ris_")
    line = one_error_line(run_cli("index", str(subset_dir / "cup"), "-c", "c.ris", "--store", "faiss", check=False, cwd=tmp_path))
    assert "keeps its vectors in milvus-lite://" in line
    line = one_error_line(run_cli("index", str(subset_dir / "cup"), "-c", "e.ris", "--store", "redis://h:1", check=False))
    assert line.startswith("error: --store redis://h:1: expected milvus://HOST:PORT")
    assert not (tmp_path / "e.ris").exists()


def test_the_store_is_fixed_at_creation(lite_collection: Path, subset_collection: Path, tmp_path: Path) -> None:
    store = json.loads((lite_collection / "manifest.json").read_text())["store"]
    Collection.open_or_create(lite_collection, store=store).close()  # the same store: fine
    Collection.open_or_create(lite_collection).close()  # none asked: the manifest's
    for other in ("faiss", "", f"milvus-lite://{tmp_path / 'other.db'}", "milvus://localhost:19530"):
        with pytest.raises(RisError, match="keeps its vectors in milvus-lite://"):
            Collection.open_or_create(lite_collection, store=other)
    with pytest.raises(RisError, match="keeps its vectors in faiss, not milvus-lite://x.db"):
        Collection.open_or_create(subset_collection, store="milvus-lite://x.db")
    with pytest.raises(RisError, match="not a FAISS factory"):
        Collection.create(tmp_path / "d.ris", store="milvus-lite://d.db", index_factory="IVF64,SQ8")
    with pytest.raises(RisError, match="milvus-lite does not build it"):
        Collection.create(tmp_path / "d.ris", store="milvus-lite://d.db", index_factory="DISKANN")
    for bad in (
        "milvus-lite://no-suffix",
        "milvus-lite://.db",
        "milvus://h:1/db",
        "milvus://user@h:1",
        "milvus://:1",
        "lite://x.db",
    ):
        with pytest.raises(RisError, match="--store"):
            Collection.create(tmp_path / "e.ris", store=bad)
    assert not (tmp_path / "d.ris").exists() and not (tmp_path / "e.ris").exists()
    assert milvus_store.normalize("milvus://db.example:19531/") == "milvus://db.example:19531"
    assert milvus_store.normalize("milvus://db.example") == "milvus://db.example:19530"
    assert milvus_store.normalize("milvus://[::1]") == "milvus://[::1]:19530"


def test_serve_on_milvus_lite(subset_dir: Path, tmp_path: Path) -> None:
    """The server unchanged on a Milvus-backed collection; while it holds the milvus-lite file, the CLI is refused."""
    copy = tmp_path / "served.ris"
    with Collection.create(copy, store=f"milvus-lite://{tmp_path / 'v.db'}") as coll:
        coll.add([subset_dir / c for c in SUBSET_CLASSES[:2]], workers=0)

    query = queries(subset_dir)[1]
    with serve_in_thread(create_app(copy, token="t")) as url, httpx.Client(base_url=url, timeout=60) as client:
        res = client.post("/api/search", files={"file": (query.name, query.read_bytes())}, data={"k": "4"})
        assert res.status_code == 200, res.text
        matches = res.json()["matches"]
        assert [m["rank"] for m in matches] == [1, 2, 3, 4] and matches[0]["path"] == str(query)
        assert set(matches[0]) >= {"rank", "path", "score", "similarity", "label", "id", "thumbnail"}
        assert matches[0]["similarity"] > 0.99
        assert client.get(matches[0]["thumbnail"]).status_code == 200
        similar = client.get("/api/search", params={"id": matches[0]["id"], "k": 3}).json()["matches"]
        assert similar[0]["id"] == matches[0]["id"]

        line = one_error_line(run_cli("search", str(query), "-c", str(copy), check=False))
        assert "open in another process" in line

        gone = client.delete(f"/api/images/{matches[0]['id']}", headers={"Authorization": "Bearer t"})
        assert gone.status_code == 200, gone.text
        after = client.post("/api/search", files={"file": (query.name, query.read_bytes())}, data={"k": "10"}).json()
        assert matches[0]["id"] not in [m["id"] for m in after["matches"]]
        assert client.get("/api/health").json()["images"] == 19
    # the server released the file: the CLI opens it again and sees the removal
    out = json.loads(run_cli("search", str(query), "-c", str(copy), "-k", "10", "--json").stdout)
    assert str(query) not in [m["path"] for m in out["matches"]]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def milvus_server(tmp_path: Path) -> Iterator[str]:
    """A Milvus gRPC server (milvus-lite's, standing in for a cluster) on a free loopback port."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(tmp_path / "server.db"),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"milvus-lite server did not start: {proc.stderr.read().decode()}") from None
                time.sleep(0.1)
        yield f"milvus://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_milvus_server_serves_several_processes(milvus_server: str, subset_dir: Path, tmp_path: Path) -> None:
    """Against a Milvus server (HNSW by default), a web server and CLI searches run at the same time."""
    c = tmp_path / "c.ris"
    with Collection.open_or_create(c, store=milvus_server) as coll:
        coll.index([subset_dir], workers=0)
        info = coll.info()
    assert info["store"] == milvus_server and info["index_built"] == "HNSW" and info["images"] == 60
    query = queries(subset_dir)[4]
    with serve_in_thread(create_app(c)) as url, httpx.Client(base_url=url, timeout=60) as client:
        cli = subprocess.Popen([sys.executable, "-m", "ris", "search", str(query), "-c", str(c), "-k", "5", "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "200"})  # fmt: skip
        served = client.post("/api/search", files={"file": (query.name, query.read_bytes())}, data={"k": "5"}).json()
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 0, err
    assert [m["path"] for m in json.loads(out)["matches"]] == [m["path"] for m in served["matches"]]
    assert served["matches"][0]["path"] == str(query)


def test_without_pymilvus_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if not installed
    with pytest.raises(RisError, match=r'pip install -e "\.\[milvus\]"'):
        milvus_store._pymilvus.__wrapped__()
