"""Issue 17, items 1, 3, 4 and 9: odd but valid images, unbounded reads, file names that are not UTF-8 or
look like markup, read-only collections. Each test failed on the code before the fix."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ris.errors import DecodeError
from ris.images.decode import open_image, read_file, resize, thumbnail
from ris.search.verify import Verifier, features

from .conftest import caltech_files, ris_limited, run_cli

CAFE = b"caf\xe9.jpg"  # Latin-1: not UTF-8


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caltech photos and odd images under names that are markup, brackets, or not UTF-8; one bad file."""
    root = tmp_path_factory.mktemp("odd")
    photos = caltech_files("airplanes", 4) + caltech_files("panda", 8)
    for n, f in enumerate(photos[:6]):
        shutil.copy(f, root / f"photo{n}.jpg")
    for name, size in (("tiny.png", (1, 1)), ("wide.png", (4000, 12)), ("tall.png", (12, 4000))):
        _noise(size, len(name)).save(root / name)
    (root / "[bold red]").mkdir()
    shutil.copy(photos[6], root / "[bold red]" / "a.jpg")
    (root / "d" / "[").mkdir(parents=True)
    shutil.copy(photos[7], root / "d" / "[" / "x]")
    shutil.copy(photos[8], os.path.join(os.fsencode(root), CAFE))
    shutil.copy(photos[9], root / ":smile: [i]b.jpg")
    (root / "bad[i].jpg").write_bytes(b"not an image at all")
    return root


@pytest.fixture(scope="module")
def indexed(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    path = tmp_path_factory.mktemp("odd-collection") / "c.ris"
    return path, run_cli("index", str(tree), "-c", str(path), check=False)


def _run_bytes(*args: str | bytes, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`ris` with raw bytes out (names that are not UTF-8 are written back as their bytes)."""
    return subprocess.run([sys.executable, "-m", "ris", *args], capture_output=True, cwd=cwd, timeout=600,
                          env={**os.environ, "COLUMNS": "250", **(env or {})})  # fmt: skip


# --- 4: names -------------------------------------------------------------------------------------


def test_index_takes_names_that_are_not_utf8_or_look_like_markup(indexed) -> None:
    path, proc = indexed
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "13 images searchable" in proc.stderr
    assert "bad[i].jpg: not an image" in proc.stderr  # "[i]" printed, not taken as italics
    info = _run_bytes("info", "-c", str(path))
    assert info.returncode == 0 and b"bad[i].jpg" in info.stdout


def test_search_prints_and_serialises_names_verbatim(tree: Path, indexed) -> None:
    path, _ = indexed
    cafe = os.path.join(os.fsencode(tree), CAFE)
    queries = [str(tree / "[bold red]" / "a.jpg"), str(tree / "d" / "[" / "x]"), str(tree / ":smile: [i]b.jpg"), cafe]
    table = _run_bytes("search", *queries, "-c", str(path), "-k", "1")
    assert table.returncode == 0 and b"Traceback" not in table.stderr, table.stderr[-2000:]
    for name in (b"[bold red]/a.jpg", b"d/[/x]", b":smile: [i]b.jpg", CAFE):
        assert name in table.stdout, name
    found = _run_bytes("search", *queries, "-c", str(path), "-k", "1", "--json").stdout
    lines = [json.loads(line) for line in found.splitlines()]
    assert [r["matches"][0]["path"] for r in lines] == [os.fsdecode(q) for q in queries]  # \udce9: the same bytes back
    for args in (("dupes",), ("dupes", "--csv"), ("dupes", "--json"), ("export", "--out", str(path.parent / "npy"))):
        proc = _run_bytes(*args, "-c", str(path))
        assert proc.returncode == 0 and b"Traceback" not in proc.stderr, (args, proc.stderr[-2000:])


def test_remove_takes_an_indexed_name_literally(tree: Path, indexed, tmp_path: Path) -> None:
    copy = tmp_path / "c.ris"
    shutil.copytree(indexed[0], copy)
    for name, left in ((b"d/[/x]", 12), (b"[bold red]/a.jpg", 11), (CAFE, 10), (b":smile: [i]b.jpg", 9)):
        proc = _run_bytes("remove", name, "-c", str(copy), cwd=tree)  # relative, as typed in that folder
        assert proc.returncode == 0 and f"removed 1 image; {left} remain".encode() in proc.stderr, (name, proc.stderr)
    proc = _run_bytes("remove", str(tree / "photo[0-1].jpg"), "-c", str(copy))  # no such name: a glob
    assert b"removed 2 images; 7 remain" in proc.stderr, proc.stderr


def test_api_search_answers_with_names_that_are_not_utf8(tree: Path, indexed) -> None:
    import httpx

    from ris.server import create_app, serve_in_thread

    data = Path(os.fsdecode(os.path.join(os.fsencode(tree), CAFE))).read_bytes()
    with serve_in_thread(create_app(indexed[0])) as url, httpx.Client(base_url=url, timeout=120) as client:
        res = client.post("/api/search", files={"file": ("q.jpg", data)}, data={"k": "3"})
        assert res.status_code == 200
        assert any(m["path"].endswith("caf\\xe9.jpg") for m in res.json()["matches"])  # its bytes shown as Python shows them


# --- 1: any size and aspect -----------------------------------------------------------------------


def test_verified_search_of_tiny_and_elongated_images(tree: Path, indexed) -> None:
    path, _ = indexed
    queries = [str(tree / n) for n in ("tiny.png", "wide.png", "tall.png", "photo0.jpg")]
    proc = run_cli("search", *queries, "-c", str(path), "--verify", "--json", check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [json.loads(line)["matches"][0]["path"] for line in proc.stdout.splitlines()] == queries


@pytest.mark.parametrize("size", [(1, 1), (1, 2), (2, 1), (4000, 12), (12, 4000), (480, 1), (62, 62), (64, 64)])
def test_verification_takes_any_size(size: tuple[int, int], tree: Path) -> None:
    """No keypoints where ORB can find none; never an OpenCV assertion; the plain order kept."""
    img = _noise(size, 1)
    points, _ = features(img)
    if min(size) < 63:
        assert len(points) == 0
    candidates = [str(tree / n) for n in ("wide.png", "tall.png", "tiny.png", "photo0.jpg", "bad[i].jpg")]
    assert Verifier().look(img, candidates).first == 0


@pytest.mark.parametrize("size", [(1, 1), (4000, 12), (12, 4000), (1, 4000), (3, 2)])
def test_model_input_and_thumbnails_take_any_aspect(size: tuple[int, int]) -> None:
    img = _noise(size, 2)
    assert resize(img, 224).shape == (224, 224, 3)
    thumb = thumbnail(img, 160)
    assert max(thumb.size) == min(160, max(size)) and min(thumb.size) >= 1


# --- 3: bounded reads -----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_devices_and_fifos_are_refused_before_reading(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):  # a FIFO without a writer used to block the open forever
        with pytest.raises(DecodeError, match="not a regular file"):
            read_file(str(path))


def test_cli_search_refuses_a_device(indexed) -> None:
    # the memory limit is a safety net: code that reads /dev/zero whole fails here instead of taking the machine (24 GB seen)
    proc = subprocess.run([*ris_limited("AS", 6 * 2**30), "search", "/dev/zero", "-c", str(indexed[0])], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot use query /dev/zero: not a regular file"), proc.stderr


def test_files_over_the_size_cap_are_skipped_unread(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for n, f in enumerate(caltech_files("sunflower", 2)):
        shutil.copy(f, folder / f"small{n}.jpg")
    _noise((1000, 800), 3).save(folder / "big.png")  # ~2.4 MB
    assert (folder / "big.png").stat().st_size > 2**21
    proc = _run_bytes("index", str(folder), "-c", str(tmp_path / "c.ris"), "--json", env={"RIS_MAX_FILE_MB": "2"})
    report = json.loads(proc.stdout)
    assert report["images"] == 2 and report["skipped_files"][0]["path"] == str(folder / "big.png")
    assert report["skipped_files"][0]["reason"].startswith("file too large: 2.") and "RIS_MAX_FILE_MB" in proc.stdout.decode()
    bad = _run_bytes("search", str(folder / "small0.jpg"), "-c", str(tmp_path / "c.ris"), env={"RIS_MAX_FILE_MB": "lots"})
    assert bad.returncode == 1 and bad.stderr.startswith(b"error: RIS_MAX_FILE_MB must be a positive number"), bad.stderr
    bad = _run_bytes("search", str(folder / "small0.jpg"), "-c", str(tmp_path / "c.ris"), env={"RIS_KEYPOINT_CACHE_MB": "-1"})
    assert bad.returncode == 1 and bad.stderr == b"error: RIS_KEYPOINT_CACHE_MB must be a number of megabytes (or 0), not '-1'\n"


def test_decoding_is_bounded_by_memory_not_only_pixels() -> None:
    """A ~20 KB PNG declaring 13000 x 13000 px (under the bomb limit) is refused before decoding (it took
    +1.8 GB); a JPEG over the budget is decoded at a reduced scale that fits."""
    script = textwrap.dedent("""
        import io, resource, sys
        from PIL import Image
        from ris.images.decode import open_image
        from ris.errors import DecodeError
        buf = io.BytesIO()
        Image.new("1", (13000, 13000)).save(buf, "PNG")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            open_image(buf.getvalue())
            print("decoded")
        except DecodeError as exc:
            print(exc)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    reason, grown_mb = proc.stdout.splitlines()
    assert reason.startswith("image too large to decode: 13000x13000"), proc.stdout + proc.stderr
    assert int(grown_mb) < 100
    buf = io.BytesIO()
    Image.new("RGB", (12000, 9000), (30, 120, 200)).save(buf, "JPEG", quality=50)
    assert open_image(buf.getvalue()).size == (6000, 4500)


# --- 9: read-only collections ---------------------------------------------------------------------

READ_ONLY_CHECKS = """
import json, subprocess, sys
import httpx
from pathlib import Path
from ris.server import create_app, serve_in_thread

coll, query = sys.argv[1], sys.argv[2]
ris = [sys.executable, "-m", "ris"]
out = {}
for name, args in {"info": ["info", "-c", coll, "--json"], "search": ["search", query, "-c", coll, "--json", "--verify"],
                   "index": ["index", str(Path(query).parent), "-c", coll], "remove": ["remove", query, "-c", coll]}.items():
    proc = subprocess.run(ris + args, capture_output=True, text=True)
    out[name] = [proc.returncode, proc.stdout, proc.stderr]
with serve_in_thread(create_app(Path(coll))) as url, httpx.Client(base_url=url, timeout=120) as client:
    r = client.post("/api/search", files={"file": ("q.jpg", Path(query).read_bytes())}, data={"k": "3"})
    image = r.json()["matches"][0]["id"] if r.status_code == 200 else 0
    out["api"] = [r.status_code, client.get(f"/api/images/{image}/thumbnail").status_code]
print(json.dumps(out))
"""


def _read_only_run(collection: Path, query: Path) -> dict:
    """READ_ONLY_CHECKS against the collection made read-only: a read-only bind mount in a private mount
    namespace when root (whom chmod does not stop), else chmod -R a-w."""
    cmd = [sys.executable, "-c", READ_ONLY_CHECKS, str(collection), str(query)]
    if os.geteuid() == 0:
        if not shutil.which("unshare"):
            pytest.skip("root without unshare: cannot make a read-only view")
        mount = f'mount --bind "{collection}" "{collection}" && mount -o remount,bind,ro "{collection}" && exec "$@"'
        cmd = ["unshare", "--mount", "sh", "-c", mount, "sh", *cmd]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 and "mount" in proc.stderr and not proc.stdout:
            pytest.skip(f"cannot mount read-only here: {proc.stderr.strip()[:200]}")
    else:
        subprocess.run(["chmod", "-R", "a-w", str(collection)], check=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        finally:
            subprocess.run(["chmod", "-R", "u+w", str(collection)], check=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_read_only_collection_is_searchable_and_servable(tree: Path, indexed, tmp_path: Path) -> None:
    copy = tmp_path / "shared.ris"
    shutil.copytree(indexed[0], copy)
    query = tree / "photo1.jpg"
    out = _read_only_run(copy, query)
    assert out["info"][0] == 0 and json.loads(out["info"][1])["images"] == 13, out["info"][2]
    assert out["search"][0] == 0 and json.loads(out["search"][1])["matches"][0]["path"] == str(query), out["search"][2]
    for write in ("index", "remove"):
        code, _, err = out[write]
        assert code == 1 and err.strip().startswith("error: ") and err.strip().count("\n") == 0 and "read-only" in err, err
    assert out["api"] == [200, 200]
