"""The server under hostile or unlucky use (issue 17): a real uvicorn on loopback, real collections, the real model.

Each test here failed on the server before the hardening: bombs under the bomb limit were decoded, cross-site
form posts and foreign Host names were answered, a symlink swapped in at an indexed path was served, large ids
gave 500, a body that never came held the request, health said "ok" over a broken index, errors named
FAISS/SQLite internals and closed the connection, failed adds left files behind.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import h11
import httpx
import pytest
from PIL import Image

from ris.collection import Collection
from ris.search.results import Match, SearchResult
from ris.server import create_app, serve_in_thread
from tests.conftest import derived_file
from tests.server_fixtures import AUTH, base_url_fixture, caltech_images, client_fixture, collection_path_fixture, upload  # noqa: F401 (fixtures)

INTERNALS = ("Traceback", "faiss", "sqlite", "cv2", "File \"", "Error in ")


@pytest.fixture(scope="module")
def configured_url(collection_path: Path) -> Iterator[str]:
    """The options: another Host name and another site allowed, and a 1 s body deadline."""
    app = create_app(collection_path, hosts=["127.0.0.1", "ris.test"], allow_origins=("http://friend.test:8080",),
                     body_timeout=1.0)  # fmt: skip
    with serve_in_thread(app) as url:
        yield url


def png(size: tuple[int, int], mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


class Connection:
    """One keep-alive HTTP/1.1 connection (h11 speaks the protocol): shows whether the server kept it open."""

    def __init__(self, base_url: str, timeout: float = 60):
        parts = urlsplit(base_url)
        self.host = parts.netloc
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)

    def request(self, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """(status, body) of one exchange; h11.RemoteProtocolError or ConnectionError when the server closed it."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        head = [("Host", self.host), ("Content-Length", str(len(body))), *(headers or {}).items()]
        self.sock.sendall(self.conn.send(h11.Request(method=method, target=target, headers=head)))
        self.sock.sendall(self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
        status, data = 0, b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(self.sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                return status, data
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionError("the server closed the connection")

    def close(self) -> None:
        self.sock.close()


def multipart(name: str, data: bytes, fields: dict[str, str] | None = None) -> tuple[bytes, dict[str, str]]:
    """A multipart/form-data body with one file, as a browser's form sends it."""
    request = httpx.Request("POST", "http://x/", files={"file": (name, data, "application/octet-stream")}, data=fields)
    return request.read(), {"Content-Type": request.headers["content-type"]}


# --- 2. memory: the pixel budget is checked from the header, before decoding --------------------------


def test_small_png_of_huge_dimensions_is_refused_before_decoding(client: httpx.Client) -> None:
    """13000 x 13000 px in ~40 kB: under Pillow's bomb limit, it used to be decoded (+1.8 GB, 5.6 s a request)."""
    bomb = png((13_000, 13_000))
    assert len(bomb) < 1_000_000
    res = client.post("/api/search", files={"file": ("big.png", bomb, "image/png")})
    assert res.status_code == 413, res.text
    assert "13,000 x 13,000 pixels" in res.json()["detail"]
    res = client.post("/api/images", files={"file": ("big.png", bomb, "image/png")}, headers=AUTH)
    assert res.status_code == 413, res.text


def test_large_jpeg_within_the_budget_after_draft_scaling_is_searched(client: httpx.Client) -> None:
    """A 45-megapixel JPEG decodes at 1/8 scale (draft mode): it counts as 0.7 MP, and is answered."""
    buf = io.BytesIO()
    Image.new("L", (8_200, 5_500), 128).save(buf, "JPEG", quality=50)
    res = client.post("/api/search", files={"file": ("photo.jpg", buf.getvalue(), "image/jpeg")}, data={"k": "2"})
    assert res.status_code == 200, res.text
    assert len(res.json()["matches"]) == 2


# --- 2. cross-site writes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [
    {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
    {"Origin": "http://evil.example"},  # a browser without Fetch Metadata
    {"Origin": "null", "Sec-Fetch-Site": "cross-site"},  # a sandboxed frame or a file: page
    {"Sec-Fetch-Site": "same-site"},  # another port of this host is another origin
], ids=["fetch-metadata", "origin-only", "null-origin", "same-site"])  # fmt: skip
def test_cross_origin_posts_are_refused(base_url: str, headers: dict[str, str]) -> None:
    body, form = multipart("q.jpg", caltech_images()[0].read_bytes(), {"k": "3"})
    with httpx.Client(base_url=base_url, timeout=60) as c:
        res = c.post("/api/search", content=body, headers={**form, **headers})
        assert res.status_code == 403 and "cross-origin" in res.json()["detail"]
        res = c.post("/api/images", content=body, headers={**form, **headers, **AUTH})
        assert res.status_code == 403
        assert c.delete("/api/images/1", headers={**headers, **AUTH}).status_code == 403
        assert c.get("/api/images/1").status_code == 200  # nothing was removed


def test_same_origin_and_allowed_origin_posts_are_answered(base_url: str, configured_url: str) -> None:
    body, form = multipart("q.jpg", caltech_images()[0].read_bytes(), {"k": "3"})
    own = {"Origin": base_url, "Sec-Fetch-Site": "same-origin"}
    assert httpx.post(f"{base_url}/api/search", content=body, headers={**form, **own}, timeout=60).status_code == 200
    friend = {"Origin": "http://friend.test:8080", "Sec-Fetch-Site": "cross-site"}
    assert httpx.post(f"{configured_url}/api/search", content=body, headers={**form, **friend}, timeout=60).status_code == 200
    stranger = {"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert httpx.post(f"{configured_url}/api/search", content=body, headers={**form, **stranger}, timeout=60).status_code == 403


# --- 8. serving only the file that was indexed ----------------------------------------------------------


@pytest.fixture(scope="module")
def own_images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, dict[str, int]]]:
    """A collection over copies the test may replace, served; yields (url, their folder, image ids by file name)."""
    root = tmp_path_factory.mktemp("swap")
    folder = root / "images"
    folder.mkdir()
    for src in caltech_images(offset=20, per_category=1):
        shutil.copy2(src, folder / src.name.replace("image", src.parent.name))
    with Collection.create(root / "c.ris") as coll:
        coll.add(sorted(folder.iterdir()), workers=0)
        ids = {Path(row.path).name: row.id for row in coll.catalog.all_rows()}
    with serve_in_thread(create_app(root / "c.ris")) as url:
        yield url, folder, ids


def test_a_symlink_or_another_file_swapped_in_is_not_served(own_images: tuple[str, Path, dict[str, int]]) -> None:
    url, folder, ids = own_images
    names = sorted(ids)
    swaps = {
        names[0]: lambda p: p.symlink_to("/etc/passwd"),
        names[1]: lambda p: p.symlink_to(folder / names[5]),  # another indexed image: still not this one
        names[2]: lambda p: p.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n"),  # overwritten in place
        names[3]: lambda p: os.mkfifo(p),  # reading it would block forever
    }
    with httpx.Client(base_url=url, timeout=30) as c:
        for name, swap in swaps.items():
            path = folder / name
            path.unlink()
            swap(path)
            for target in (f"/api/images/{ids[name]}", f"/api/images/{ids[name]}/thumbnail", f"/api/search?id={ids[name]}"):
                res = c.get(target)
                assert res.status_code == 409, (name, target, res.status_code)
                assert b"root:" not in res.content
                assert "since it was indexed" in res.json()["detail"] or "not a regular file" in res.json()["detail"]
        (folder / names[4]).unlink()
        assert c.get(f"/api/images/{ids[names[4]]}").status_code == 404
        res = c.get(f"/api/images/{ids[names[5]]}")  # untouched: served as before
        assert res.status_code == 200 and res.content == (folder / names[5]).read_bytes()
        assert res.headers["content-type"] == "image/jpeg" and int(res.headers["content-length"]) == len(res.content)


# --- 10. smaller ---------------------------------------------------------------------------------------


def test_notebook_html_escapes_the_query_name() -> None:
    script = '<img src=x onerror="alert(1)">.jpg'
    page = SearchResult(script, [Match(1, "/nonexistent/<b>.jpg", 0.5, "<i>label</i>", 1)])._repr_html_()
    assert "<img src=x" not in page and "<b>" not in page and "<i>" not in page
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;.jpg" in page


@pytest.mark.parametrize("image_id", [2**63, 2**63 - 1, 10**30, -(2**63) - 1])
def test_ids_outside_sqlite_range_are_404(client: httpx.Client, image_id: int) -> None:
    answers = [client.get(f"/api/images/{image_id}"), client.get(f"/api/images/{image_id}/thumbnail"),
               client.get("/api/search", params={"id": image_id}), client.delete(f"/api/images/{image_id}", headers=AUTH)]
    for res in answers:
        assert res.status_code == 404, res.text
        assert "no image" in res.json()["detail"]


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "127.0.0.1.nip.io", "localhost.evil.example", ""])
def test_foreign_host_names_are_refused(base_url: str, host: str) -> None:
    """DNS rebinding: a page of evil.example whose name now resolves to 127.0.0.1 reaches the loopback server,
    but its requests carry Host: evil.example."""
    conn = Connection(base_url)
    conn.host = host
    try:
        status, body = conn.request("GET", "/api/collection")
    finally:
        conn.close()
    assert status == 400 and b"sample" not in body


def test_loopback_and_allowed_host_names_are_answered(base_url: str, configured_url: str) -> None:
    port = urlsplit(base_url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "[::1]"):
        conn = Connection(base_url)
        conn.host = host
        assert conn.request("GET", "/api/health")[0] == 200, host
        conn.close()
    conn = Connection(configured_url)
    conn.host = "ris.test:8000"
    assert conn.request("GET", "/api/health")[0] == 200
    conn.host = "localhost"  # not in this server's list
    assert conn.request("GET", "/api/health")[0] == 400
    conn.close()


def test_docs_can_send_the_token(client: httpx.Client) -> None:
    """Swagger UI shows an Authorize button and sends the token for operations that declare bearer security."""
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert [s for s in schemes.values() if s["type"] == "http" and s["scheme"].lower() == "bearer"]
    for path, method in (("/api/images", "post"), ("/api/images/{image_id}", "delete")):
        assert spec["paths"][path][method]["security"] == [{name: []} for name in schemes]
    assert "security" not in spec["paths"]["/api/search"]["post"]


def test_a_failed_add_leaves_no_file_and_a_saved_one_is_readable(client: httpx.Client, collection_path: Path) -> None:
    new = caltech_images(offset=12, per_category=1)[1]
    uploads = collection_path / "uploads"
    fd = os.open(collection_path / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another writer holds the collection
        res = client.post("/api/images", files=upload(new), headers=AUTH)
    finally:
        os.close(fd)
    assert res.status_code == 409 and "locked" in res.json()["detail"]
    assert not [p for p in uploads.rglob("*") if p.is_file()]  # rglob of a missing folder finds nothing
    res = client.post("/api/images", files=upload(new), headers=AUTH)
    assert res.status_code == 201, res.text
    saved = Path(res.json()["path"])
    assert stat.S_IMODE(saved.stat().st_mode) == 0o644  # as a copied-in file, not mkstemp's 0600
    assert client.delete(f"/api/images/{res.json()['id']}", headers=AUTH).status_code == 200


def test_a_body_that_never_arrives_times_out(configured_url: str) -> None:
    """Content-Length promises 100 kB, 10 bytes come: the server answers 408 after its deadline (1 s here)."""
    parts = urlsplit(configured_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
        sock.sendall(f"POST /api/search HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: 100000\r\n"
                     "Content-Type: multipart/form-data; boundary=x\r\n\r\n--x\r\nabcd".encode())  # fmt: skip
        started = time.monotonic()
        data = b""
        while chunk := sock.recv(65536):  # until the server closes
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert time.monotonic() - started < 15


@pytest.fixture(scope="module")
def damaged_url(collection_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A copy of the collection whose index file was cut in half (as a full disk or a bad copy leaves it)."""
    copy = tmp_path_factory.mktemp("damaged") / "c.ris"
    shutil.copytree(collection_path, copy, ignore=shutil.ignore_patterns("lock", "uploads", "thumbs"))
    index_file = derived_file(copy, "index")
    index_file.write_bytes(index_file.read_bytes()[: index_file.stat().st_size // 2])
    with serve_in_thread(create_app(copy)) as url:
        yield url


def test_health_reflects_whether_search_works(damaged_url: str) -> None:
    with httpx.Client(base_url=damaged_url, timeout=60) as c:
        search = c.post("/api/search", files=upload(caltech_images()[0]))
        health = c.get("/api/health")
    assert (health.status_code == 200 and health.json()["status"] == "ok") == (search.status_code == 200)
    if search.status_code != 200:
        assert health.status_code == 503 and health.json()["status"] == "error" and health.json()["detail"]


def test_errors_are_one_line_json_without_internals_and_keep_the_connection(damaged_url: str, base_url: str) -> None:
    """Each error answer, then a good request on the same connection."""
    body, form = multipart("q.jpg", caltech_images()[0].read_bytes())
    conn = Connection(damaged_url)
    try:
        status, data = conn.request("POST", "/api/search", body, form)
        assert status >= 400
        text = data.decode()
        assert "\n" not in text.strip() and set(json.loads(text)) == {"detail"}
        assert not [word for word in INTERNALS if word in text], text
        assert conn.request("GET", "/static/app.js")[0] == 200  # the same connection still answers
    finally:
        conn.close()
    conn = Connection(base_url)
    bad = [
        ("GET", "/api/images/999999", b"", {}),  # 404
        ("GET", f"/api/images/{2**64}", b"", {}),  # was 500 (OverflowError)
        ("GET", "/api/search?id=x", b"", {}),  # 422
        ("POST", "/api/search", *multipart("t.txt", b"not an image")),  # 415
        ("POST", "/api/search", *multipart("b.jpg", caltech_images()[0].read_bytes()[:500])),  # 400
        ("POST", "/api/search", *multipart("big.png", png((13_000, 13_000)))),  # 413 from the header
    ]
    try:
        for method, target, payload, headers in bad:
            status, data = conn.request(method, target, payload, headers)
            assert 400 <= status < 500 and "detail" in json.loads(data), (target, status)
            assert conn.request("GET", "/api/health")[0] == 200, target
    finally:
        conn.close()
