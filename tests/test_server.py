"""The REST API over real HTTP: a real uvicorn on a loopback port, a real collection, the real model."""

from __future__ import annotations

import base64
import functools
import io
import re
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from ris.collection import Collection
from ris.images.decode import max_file_bytes
from ris.server import create_app, serve_in_thread
from ris.tools.demo import sample_paths
from tests.rawfiles import dng
from tests.server_fixtures import AUTH, TOKEN, base_url_fixture, caltech_images, client_fixture, collection_path_fixture, upload  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def readonly_url(collection_path: Path) -> Iterator[str]:
    """A server without a token, the default: add and remove are refused."""
    with serve_in_thread(create_app(collection_path)) as url:
        yield url


def raw_get(base_url: str, target: str) -> tuple[int, bytes]:
    """GET a request target byte for byte (HTTP clients normalise '../' away; attackers do not)."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data


# --- searching ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("query", [caltech_images()[0], caltech_images()[7], sample_paths()[0]], ids=lambda p: p.name)
def test_search_finds_the_uploaded_image_first(client: httpx.Client, query: Path) -> None:
    res = client.post("/api/search", files=upload(query), data={"k": "4"})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["query"] == query.name
    assert [m["rank"] for m in body["matches"]] == [1, 2, 3, 4]
    top = body["matches"][0]
    assert top["path"] == str(query) and top["score"] > 0.9
    assert top["thumbnail"] == f"/api/images/{top['id']}/thumbnail"
    assert set(top) >= {"rank", "path", "score", "label", "id", "thumbnail"}


@functools.cache
def camera_dng(original: Path) -> bytes:
    """The photo as a camera's DNG: its mosaic 4,800 px on the long side, a 1,600-px preview."""
    photo = Image.open(original)
    scale = 2400 / max(photo.size)  # dng() doubles it
    camera = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.BICUBIC)
    return dng(camera, preview=1600, orientation=6)


@pytest.mark.parametrize("verify", ["true", "false"])
def test_a_camera_raw_upload_finds_its_original_and_comes_back_as_a_thumbnail(client: httpx.Client, verify: str) -> None:
    """A camera's DNG (a 4,800-px mosaic, 36 MB: over the 20 MB uploads were once held to; shot with the camera held
    upright) is searched like any photo under the default upload limit; a browser cannot show it, so the page asks
    for the query back: an upright JPEG thumbnail."""
    original = caltech_images()[1]
    photo = Image.open(original)
    raw = camera_dng(original)
    assert len(raw) > 30 * 2**20
    res = client.post("/api/search", files={"file": ("IMG_0001.DNG", raw, "image/x-adobe-dng")},
                      data={"k": "3", "verify": verify, "preview": "true"})  # fmt: skip
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["matches"][0]["path"] == str(original)
    assert body["preview"].startswith("data:image/jpeg;base64,")
    shown = Image.open(io.BytesIO(base64.b64decode(body["preview"].split(",", 1)[1])))
    assert shown.format == "JPEG" and max(shown.size) == 256
    assert shown.width / shown.height == pytest.approx(photo.width / photo.height, rel=0.02)  # upright
    plain = client.post("/api/search", files=upload(original), data={"k": "1"}).json()
    assert plain["preview"] is None  # only when asked


def test_search_matches_the_library_and_cli_fields(client: httpx.Client, collection_path: Path) -> None:
    """The API adds links to exactly what `ris search --json` prints for the same query."""
    query = caltech_images()[3]
    api = client.post("/api/search", files=upload(query), data={"k": "5"}).json()
    with Collection.open(collection_path) as coll:
        expected = coll.search(query, k=5).as_json()
    keys = ("rank", "path", "score", "similarity", "label", "inliers")
    assert [{key: m[key] for key in keys} for m in api["matches"]] == expected["matches"]


def test_search_with_verification_answers_as_the_library(client: httpx.Client, collection_path: Path, tmp_path: Path) -> None:
    """verify=true: the library's verified answer for a rotated copy (top 5 kept, a confirmed original first)."""
    from ris.images.decode import open_image, read_file
    from ris.tools.demo import TRANSFORMS

    original = caltech_images()[3]
    copy = tmp_path / "rotated.jpg"
    TRANSFORMS["rotate10"](open_image(read_file(str(original)))).save(copy, "JPEG", quality=90)
    api = client.post("/api/search", files=upload(copy), data={"k": "5", "verify": "true"})
    assert api.status_code == 200, api.text
    with Collection.open(collection_path) as coll:
        lib = coll.search(str(copy), k=5, verify=True).as_json()["matches"]
    got = [(m["rank"], m["path"], m["inliers"]) for m in api.json()["matches"]]
    assert got == [(m["rank"], m["path"], m["inliers"]) for m in lib] and got[0][1] == str(original)
    assert got[0][2] >= 12 and [n for _, _, n in got[1:]] == [None] * 4  # keypoints confirm the original alone


def test_more_like_this_by_id(client: httpx.Client) -> None:
    first = client.post("/api/search", files=upload(caltech_images()[0]), data={"k": "3"}).json()
    other = first["matches"][1]
    res = client.get("/api/search", params={"id": other["id"], "k": 3})
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["matches"][0]["id"] == other["id"] and body["matches"][0]["similarity"] > 0.99
    assert len(body["matches"]) == 3


def test_search_parameters_are_validated(client: httpx.Client) -> None:
    assert client.get("/api/search", params={"id": 999_999}).status_code == 404
    assert client.get("/api/search", params={"id": "abc"}).status_code == 422
    assert client.get("/api/search", params={"id": 1, "k": 0}).status_code == 422
    assert client.post("/api/search", files=upload(caltech_images()[0]), data={"k": "1000"}).status_code == 422
    assert client.post("/api/search", data={"k": "3"}).status_code == 422  # no file


# --- bad uploads -------------------------------------------------------------------------------------


@pytest.mark.parametrize("over", [1, 2 * 1024 * 1024])
def test_oversized_upload_is_413(client: httpx.Client, over: int) -> None:
    """Just over the limit, by default the file cap `ris index` reads under (caught after parsing), and well over
    it (refused by its Content-Length)."""
    size = max_file_bytes() + over
    res = client.post("/api/search", files={"file": ("big.jpg", b"\xff" * size, "image/jpeg")})
    assert res.status_code == 413
    assert "too large" in res.json()["detail"]


def test_non_image_is_415(client: httpx.Client) -> None:
    res = client.post("/api/search", files={"file": ("notes.txt", b"just some text, not pixels", "text/plain")})
    assert res.status_code == 415
    assert "not an image" in res.json()["detail"]


@pytest.mark.parametrize("cut", [0, 2000])
def test_empty_or_truncated_image_is_400(client: httpx.Client, cut: int) -> None:
    data = caltech_images()[0].read_bytes()[:cut]
    res = client.post("/api/search", files={"file": ("broken.jpg", data, "image/jpeg")})
    assert res.status_code == 400
    assert res.json()["detail"].startswith("cannot use this upload")


def test_decompression_bomb_is_refused(client: httpx.Client) -> None:
    """A few kB of PNG that would decode to 180 megapixels."""
    buf = io.BytesIO()
    Image.new("1", (15_000, 12_000)).save(buf, "PNG")
    assert len(buf.getvalue()) < 1_000_000
    res = client.post("/api/search", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
    assert res.status_code in (400, 413)
    assert "too large" in res.json()["detail"]


# --- serving images ----------------------------------------------------------------------------------


def test_original_and_thumbnail_by_id(client: httpx.Client, collection_path: Path) -> None:
    body = client.get("/api/collection", params={"limit": 200}).json()
    by_suffix = {Path(row["path"]).suffix: row for row in body["sample"]}
    for suffix, content_type in ((".png", "image/png"), (".jpg", "image/jpeg")):
        row = by_suffix[suffix]
        res = client.get(f"/api/images/{row['id']}")
        assert res.status_code == 200 and res.headers["content-type"] == content_type
        assert res.content == Path(row["path"]).read_bytes()
        thumb = client.get(row["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        img = Image.open(io.BytesIO(thumb.content))
        assert img.format == "JPEG" and max(img.size) <= 256
    assert list((collection_path / "thumbs").glob("*.jpg")), "thumbnails are cached in the collection"


def test_unknown_id_is_404(client: httpx.Client) -> None:
    for url in ("/api/images/999999", "/api/images/999999/thumbnail", "/api/images/-1"):
        res = client.get(url)
        assert res.status_code == 404 and "no image" in res.json()["detail"]


@pytest.mark.parametrize(
    "target",
    [
        "/api/images/../../../../etc/passwd",
        "/api/images/..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/images/%2Fetc%2Fpasswd",
        "/api/images/1/../../../../../etc/passwd",
        "/api/images/1/thumbnail/..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/../../../../../../etc/passwd",
        "/static/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/static/..%2Fserver.py",
        "/static/%2Fetc%2Fpasswd",
    ],
)
def test_path_traversal_gets_nothing(base_url: str, target: str) -> None:
    status, data = raw_get(base_url, target)
    assert status in (400, 404, 422), (target, status)
    assert b"root:" not in data and b"create_app" not in data


# --- adding and removing -----------------------------------------------------------------------------


def test_add_and_remove_are_disabled_without_a_token(readonly_url: str) -> None:
    with httpx.Client(base_url=readonly_url, timeout=60) as c:
        assert c.post("/api/images", files=upload(caltech_images(5)[0]), headers=AUTH).status_code == 403
        assert c.delete("/api/images/1", headers=AUTH).status_code == 403
        assert c.get("/api/images/1").status_code == 200  # still there
        assert c.get("/api/collection").json()["writable"] is False


def test_add_and_remove_need_the_right_token(client: httpx.Client) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}):
        res = client.post("/api/images", files=upload(caltech_images(5)[0]), headers=headers)
        assert res.status_code == 401 and res.headers["www-authenticate"] == "Bearer"
        assert client.delete("/api/images/1", headers=headers).status_code == 401
    assert client.get("/api/images/1").status_code == 200


def test_add_then_remove_with_the_token(client: httpx.Client, collection_path: Path) -> None:
    new = caltech_images(offset=10, per_category=1)[0]
    before = client.get("/api/health").json()["images"]
    res = client.post("/api/images", files=upload(new), data={"label": "new ones"}, headers=AUTH)
    assert res.status_code == 201, res.text
    added = res.json()
    saved = Path(added["path"])
    assert added["added"] and added["label"] == "new_ones"
    assert saved.is_relative_to((collection_path / "uploads").absolute()) and saved.read_bytes() == new.read_bytes()
    assert client.get("/api/health").json()["images"] == before + 1

    found = client.post("/api/search", files=upload(new), data={"k": "1"}).json()["matches"][0]
    assert found["id"] == added["id"] and found["similarity"] > 0.99

    again = client.post("/api/images", files=upload(new), data={"label": "new ones"}, headers=AUTH).json()
    assert again["id"] == added["id"] and again["added"] is False  # the same bytes are not added twice

    res = client.delete(f"/api/images/{added['id']}", headers=AUTH)
    assert res.status_code == 200 and res.json()["removed"] == added["id"]
    assert client.get(f"/api/images/{added['id']}").status_code == 404
    assert client.delete(f"/api/images/{added['id']}", headers=AUTH).status_code == 404
    assert client.get("/api/health").json()["images"] == before
    assert not saved.exists()


def test_an_added_camera_raw_file_keeps_its_kind(client: httpx.Client) -> None:
    """A NEF or DNG added through the API is stored as what it is, not as the TIFF Pillow takes it for; a file
    that only claims a RAW name is named by its content."""
    photo = Image.open(caltech_images(offset=11, per_category=1)[0])
    raw = dng(photo, preview=800)
    res = client.post("/api/images", files={"file": ("DSC_0001.NEF", raw, "image/x-nikon-nef")}, headers=AUTH)
    assert res.status_code == 201, res.text
    added = res.json()
    assert Path(added["path"]).suffix == ".nef"
    fake = io.BytesIO()
    photo.save(fake, "PNG")
    png = client.post("/api/images", files={"file": ("DSC_0002.NEF", fake.getvalue(), "image/x-nikon-nef")}, headers=AUTH)
    assert png.status_code == 201 and Path(png.json()["path"]).suffix == ".png"
    for row in (added, png.json()):
        assert client.delete(f"/api/images/{row['id']}", headers=AUTH).status_code == 200


def test_adding_a_non_image_is_refused(client: httpx.Client, collection_path: Path) -> None:
    res = client.post("/api/images", files={"file": ("x.jpg", b"<html>", "image/jpeg")}, headers=AUTH)
    assert res.status_code == 415
    assert not list((collection_path / "uploads").rglob("*.jpg*"))


# --- describing --------------------------------------------------------------------------------------


def test_health_and_collection_info(client: httpx.Client) -> None:
    health = client.get("/api/health").json()
    assert health["status"] == "ok" and health["images"] > 30
    info = client.get("/api/collection", params={"offset": 0, "limit": 10}).json()
    assert info["images"] == health["images"] and info["model"] and info["dims"] > 0 and info["writable"]
    assert len(info["sample"]) == 10 and set(info["sample"][0]) == {"id", "label", "path", "thumbnail", "image"}
    second = client.get("/api/collection", params={"offset": 10, "limit": 10}).json()["sample"]
    assert not {r["id"] for r in info["sample"]} & {r["id"] for r in second}
    assert client.get("/api/collection", params={"limit": 0}).status_code == 422


def test_the_server_prepares_the_images_keypoints_while_idle(collection_path: Path) -> None:
    """After start, verification's keypoints of every indexed image are found ahead of searches and then vote
    (ris.search.votes; health counts both); an image added votes at once, one removed no longer (a server of its
    own: the module's shares its cache with searches of images added and removed since)."""
    with serve_in_thread(create_app(collection_path, token=TOKEN)) as url, httpx.Client(base_url=url, timeout=30) as client:
        deadline = time.monotonic() + 60
        while (health := client.get("/api/health").json())["voted"] < health["images"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health["keypoints"] == health["images"] == health["voted"] > 30

        new = caltech_images(offset=12, per_category=1)[1]
        added = client.post("/api/images", files=upload(new), headers=AUTH).json()
        assert client.get("/api/health").json()["voted"] == health["voted"] + 1
        turned = io.BytesIO()
        with Image.open(new) as img:  # turned by 35 degrees, its corners cut off: its CNN vector is far from the original's
            img.convert("RGB").rotate(35, Image.Resampling.BICUBIC).crop((img.width // 5, img.height // 5, img.width * 4 // 5,
                                                                          img.height * 4 // 5)).save(turned, "JPEG")  # fmt: skip
        found = client.post("/api/search", files={"file": ("turned.jpg", turned.getvalue())}, data={"k": "5"}).json()
        assert found["matches"][0]["id"] == added["id"]
        assert client.delete(f"/api/images/{added['id']}", headers=AUTH).status_code == 200
        assert client.get("/api/health").json()["voted"] == health["voted"]


def test_a_server_searched_without_pause_from_the_start_still_prepares_its_keypoints(collection_path: Path) -> None:
    """Keypoints are prepared while no search runs, and with a tenth of the time while searches do: under steady
    load from the first second a server never idles, and without them every outside query stays on the dearer path."""
    import threading

    queries = [upload(path) for path in caltech_images(offset=20, per_category=1)[:4]]
    with serve_in_thread(create_app(collection_path)) as url:
        stop, answered, busy = threading.Event(), [], []

        def search(q: dict) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while not stop.is_set():
                    answered.append(c.post("/api/search", files=q, data={"k": "5"}).status_code)

        with ThreadPoolExecutor(len(queries)) as pool:
            for q in queries:
                pool.submit(search, q)
            with httpx.Client(base_url=url, timeout=60) as client:
                deadline = time.monotonic() + 90
                while (health := client.get("/api/health").json())["voted"] < health["images"] and time.monotonic() < deadline:
                    busy.append(len(answered))
                    time.sleep(0.5)
            stop.set()
    assert health["keypoints"] == health["images"] == health["voted"] > 30
    assert set(answered) == {200} and len(busy) >= 2 and busy[-1] > busy[0]  # searches ran all along


def test_docs_and_openapi(client: httpx.Client) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', docs.text)
    assert assets and all(not a.startswith("http") for a in assets)  # works offline: no CDN
    assert all(client.get(a).status_code == 200 for a in assets)
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/search", "/api/images", "/api/images/{image_id}", "/api/images/{image_id}/thumbnail",
            "/api/health", "/api/collection"} <= set(paths)  # fmt: skip
    assert set(paths["/api/search"]) == {"get", "post"}


def test_page_and_static_files(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in page.text and "script-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        res = client.get(f"/static/{name}")
        assert res.status_code == 200 and kind in res.headers["content-type"]
    assert "//cdn" not in client.get("/static/app.js").text + page.text  # nothing from the network


# --- concurrency -------------------------------------------------------------------------------------


def test_concurrent_searches_all_succeed_identically(base_url: str) -> None:
    """16 uploads from 8 threads (model calls in parallel, catalogue on its one thread) agree exactly."""
    queries = caltech_images(offset=6, per_category=1)[:4]

    def search(n: int) -> tuple[int, list[tuple[int, float]]]:
        with httpx.Client(base_url=base_url, timeout=120) as c:
            res = c.post("/api/search", files=upload(queries[n % 4]), data={"k": "5"})
            assert res.status_code == 200, res.text
            return n % 4, [(m["id"], m["score"]) for m in res.json()["matches"]]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(search, range(16)))
    by_query: dict[int, set[str]] = {}
    for q, matches in results:
        by_query.setdefault(q, set()).add(repr(matches))
    assert len(by_query) == 4 and all(len(v) == 1 for v in by_query.values())


def test_the_server_prepares_every_batch_size_its_searches_send(collection_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At start the model runs once on each batch size up to views.MAX_VIEWS (OpenVINO prepares a new batch shape
    on its first call, ~35 ms each on 2 cores), and a search that gets the second look sends no other size."""
    from ris.search.views import MAX_VIEWS
    from ris.server import CollectionService

    sizes: list[int] = []
    real = Collection.extractor

    def spied(self: Collection, *args, **kwargs):
        extractor = real(self, *args, **kwargs)
        return lambda pixels: (sizes.append(len(pixels)), extractor(pixels))[1]

    monkeypatch.setattr(Collection, "extractor", spied)
    service = CollectionService(collection_path, None, "cpu")
    try:
        assert sorted(set(sizes)) == list(range(1, MAX_VIEWS + 1))
        sizes.clear()
        photo = caltech_images(offset=40, per_category=1)[0].read_bytes()  # not indexed: no confirmed first result
        service.search(service.query_pixels(photo), 5, "photo", service.verify_image(photo))
        assert len(sizes) >= 2 and set(sizes) <= set(range(1, MAX_VIEWS + 1)), sizes
    finally:
        service.close()
