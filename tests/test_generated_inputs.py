"""Generated inputs through every path: images of random size, aspect, mode, format and corruption are
indexed, searched (CLI with verification, and POST /api/search on a real uvicorn), and go through dupes,
eval, map and export; camera RAW files (DNG) among them. No traceback, no 5xx; every decodable image is indexed
and finds itself first;
every other file is skipped with a reason.

A seeded generator (numpy), so a failure names its seed and can be replayed. The fast default (40 files,
one collection reused) runs in CI; RIS_FUZZ_EXAMPLES=500 is the longer run (RIS_FUZZ_SEED picks another
draw), reported in benchmarks/RESULTS.md under "Generated inputs".
"""

from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ris.images.decode import FORMATS, MAX_DECODE_BYTES, MAX_PIXELS, decode_cost, max_file_bytes

from .conftest import run_cli
from .rawfiles import dng

EXAMPLES = int(os.environ.get("RIS_FUZZ_EXAMPLES", "40"))
SEED = int(os.environ.get("RIS_FUZZ_SEED", "17"))
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tif", "DNG": ".dng"}
#: Photo sizes a generated DNG may have (its sensor holds twice as many px a side; LibRaw takes 22 px and more).
DNG_SIDES = (16, 1500)
#: Sizes every run has (width, height): the extremes that broke verification, ORB's border, libjpeg's scales.
SPECIAL_SIZES = ((1, 1), (1, 4000), (4000, 12), (12, 4000), (2, 3), (62, 63), (480, 1), (3000, 40))
CORRUPTIONS = ("truncated", "garbage", "empty", "magic+garbage", "wrong extension")
#: Pieces of file names: Rich markup and emoji codes, brackets, spaces, non-ASCII, format strings.
NAME_PIECES = ("img", "[bold red]", "[/x]", ":smile:", "café", "日本", " sp ace ", "%s", "{0}", "a;b", "[", "]", "-")


@dataclass(frozen=True)
class Case:
    path: Path
    decodable: bool  # what PIL itself says (within the decode budget): ris must index it exactly then
    what: str  # mode, format, size, corruption: printed when an assertion fails


def _content(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Distinct, structured RGB content: a small random grid scaled up (blocks), plus noise."""
    w, h = size
    grid = rng.integers(0, 256, (int(rng.integers(1, 9)), int(rng.integers(1, 9)), 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize((w, h), Image.Resampling.BILINEAR)
    noise = rng.integers(-25, 26, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8), "RGB")


def _in_mode(img: Image.Image, mode: str, rng: np.random.Generator) -> Image.Image:
    """The RGB content in one of PIL's modes (16-bit, 32-bit and float ones with their own value ranges)."""
    if mode == "I;16":
        return Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    if mode == "I":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.int32) * 1000 - 70_000)
    if mode == "F":
        return Image.fromarray(np.asarray(img.convert("L"), dtype=np.float32) / 255 * float(rng.uniform(-5, 5)))
    if mode == "PA":
        pa = img.convert("P")
        pa.putalpha(img.convert("L"))
        return pa
    if mode in ("LA", "RGBA"):
        out = img.convert(mode)
        out.putalpha(Image.fromarray(rng.integers(0, 256, (img.height, img.width), dtype=np.uint8)))
        return out
    return img.convert(mode)


def _encode(img: Image.Image, fmt: str) -> tuple[bytes, str]:
    """Bytes in fmt, or in TIFF (which holds every mode) when fmt cannot hold this mode."""
    for candidate in (fmt, "TIFF"):
        buf = io.BytesIO()
        try:
            img.save(buf, candidate)
            return buf.getvalue(), candidate
        except (OSError, ValueError, KeyError, TypeError):
            continue
    raise AssertionError(f"cannot encode {img.mode} {img.size}")


def _size(rng: np.random.Generator, n: int, large: bool) -> tuple[int, int]:
    """Special sizes first, then ~20% extreme aspects, else log-uniform sides of 8-2000 px; large: 3% of
    images get sides of 2000-8000 px (up to ~64 MP, the decode budget's order), in long runs only."""
    if n < len(SPECIAL_SIZES):
        return SPECIAL_SIZES[n]
    if large and rng.random() < 0.03:
        return int(rng.integers(2000, 8001)), int(rng.integers(2000, 8001))
    if rng.random() < 0.2:  # extreme aspect
        long, short = int(rng.integers(200, 4001)), int(rng.integers(1, 16))
        return (long, short) if rng.random() < 0.5 else (short, long)
    return int(np.exp(rng.uniform(np.log(8), np.log(2000)))), int(np.exp(rng.uniform(np.log(8), np.log(2000))))


def _decodable(data: bytes) -> bool:
    """The oracle: within the file cap, PIL opens and loads it (formats ris accepts, no decompression bomb)
    within the decode budget."""
    if len(data) > max_file_bytes():
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                if img.format != "JPEG" and decode_cost(img.mode, img.size) > MAX_DECODE_BYTES:
                    return False
                img.load()
        return True
    except Exception:
        return False


def _name(rng: np.random.Generator, n: int, ext: str) -> str:
    pieces = rng.choice(NAME_PIECES, size=int(rng.integers(1, 4)))
    return f"{n:04d} " + "".join(str(p) for p in pieces) + ext


def generate(root: Path, count: int, seed: int) -> list[Case]:
    """count files under root/<label>/ (names may hold "/": then deeper): random size, aspect, mode, format,
    name; about a third corrupted (or misnamed).
    One image over the decode budget (a few KB of PNG declaring 10000 x 10000 px) is always among them."""
    rng = np.random.default_rng(seed)
    cases = []
    for n in range(count):
        mode, fmt = str(rng.choice(MODES)), str(rng.choice(list(EXTENSIONS)))
        size = (10_000, 10_000) if n == len(SPECIAL_SIZES) else _size(rng, n, large=count > 100)
        corruption = str(rng.choice(CORRUPTIONS)) if n > len(SPECIAL_SIZES) and rng.random() < 0.3 else ""
        if n == len(SPECIAL_SIZES):
            data, fmt = _encode(Image.new("L", size, 128), "PNG")
        elif fmt == "DNG" and DNG_SIDES[0] <= min(size) and max(size) <= DNG_SIDES[1]:
            # a preview only when intact: a cut through a big preview leaves the sensor data whole (decodable)
            preview = None if corruption or rng.random() < 0.5 else int(rng.integers(640, 2000))
            data = dng(_content(rng, size), preview=preview, orientation=int(rng.choice([1, 3, 6, 8])))
        else:
            data, fmt = _encode(_in_mode(_content(rng, size), "RGB" if fmt == "DNG" else mode, rng),
                                "PNG" if fmt == "DNG" else fmt)  # fmt: skip
        ext = EXTENSIONS[fmt]
        if corruption == "truncated":
            data = data[: max(1, int(len(data) * rng.uniform(0.05, 0.7)))]
        elif corruption == "garbage":
            data = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
        elif corruption == "empty":
            data = b""
        elif corruption == "magic+garbage":
            data = data[:16] + rng.integers(0, 256, int(rng.integers(1, 2048)), dtype=np.uint8).tobytes()
        elif corruption == "wrong extension":
            ext = str(rng.choice([e for e in EXTENSIONS.values() if e != ext]))
        label = str(rng.choice(["[red]", "plain", mode]))
        path = root / label / _name(rng, n, ext)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        decodable = _decodable(data) if fmt != "DNG" else corruption in ("", "wrong extension")
        cases.append(Case(path, decodable, f"#{n} {mode}->{fmt} {size[0]}x{size[1]} {corruption or 'intact'}"))
    return cases


def no_traceback(proc) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("generated")


@pytest.fixture(scope="module")
def generated(root: Path) -> list[Case]:
    cases = generate(root, EXAMPLES, SEED)
    assert any(c.decodable for c in cases) and any(not c.decodable for c in cases)
    return cases


@pytest.fixture(scope="module")
def collection(root: Path, generated: list[Case], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen-collection") / "c.ris"
    proc = run_cli("index", str(root), "-c", str(path), "--json")
    no_traceback(proc)
    return path


def _resolved(p: Path) -> str:
    return os.path.normpath(os.path.abspath(p))


def test_every_decodable_image_is_indexed_and_every_other_file_skipped_with_a_reason(
    generated: list[Case], collection: Path
) -> None:
    info = json.loads(run_cli("info", "-c", str(collection), "--json").stdout)
    skipped = {item["path"]: item["reason"] for item in info["skipped_files"]}
    for case in generated:
        path = _resolved(case.path)
        if case.decodable:
            assert path not in skipped, f"{case.what} {path} skipped: {skipped.get(path)}"
        else:
            assert skipped.get(path), f"{case.what} {path} not skipped with a reason"
    assert info["images"] == sum(c.decodable for c in generated) and info["pending"] == 0


def _finds_itself(query: str, matches: list[dict], what: str) -> None:
    """First, or tied with the first: images whose model input is the same (constant images, e.g. any
    1 x 1 image in a 16-bit or float mode, become one black square) score 1.0 in any order, and more
    than k of them can push the query itself out of the top k."""
    assert matches, f"{what}: no matches"
    own = [m for m in matches if m["path"] == query]
    if not own:
        assert min(m["score"] for m in matches) >= 0.9999, f"{what} {query}: not among {matches}"
        return
    assert matches[0]["path"] == query or own[0]["score"] >= matches[0]["score"] - 1e-4, f"{what}: {matches[:3]}"


def test_cli_search_with_verification_finds_each_image_first(generated: list[Case], collection: Path) -> None:
    good = [c for c in generated if c.decodable]
    proc = run_cli("search", *[str(c.path) for c in good], "-c", str(collection), "-k", "5", "--verify", "--json")
    no_traceback(proc)
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(lines) == len(good)
    for case, result in zip(good, lines, strict=True):
        _finds_itself(_resolved(case.path), result["matches"], case.what)
    bad = next(c for c in generated if not c.decodable)
    proc = run_cli("search", str(bad.path), "-c", str(collection), check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: cannot use query"), proc.stderr
    no_traceback(proc)


def test_api_search_answers_every_upload_without_a_5xx(generated: list[Case], collection: Path) -> None:
    from ris.server import create_app, serve_in_thread

    # the CLI's caps (the file size is the server's default; the decoder's own pixel limit for the server's 40-MP
    # default): the same files searchable, so that every decodable one must answer 200
    app = create_app(collection, max_pixels=MAX_PIXELS)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        for case in generated:  # one keep-alive connection: an error must leave it usable
            data = case.path.read_bytes()
            r = client.post("/api/search", files={"file": (case.path.name, data)}, data={"k": "5", "verify": "true"})
            assert r.status_code < 500, f"{case.what}: {r.status_code} {r.text[:300]}"
            if case.decodable:
                assert r.status_code == 200, f"{case.what}: {r.status_code} {r.text[:300]}"
                _finds_itself(_resolved(case.path), r.json()["matches"], case.what)
            else:
                assert 400 <= r.status_code < 500 and r.json()["detail"], f"{case.what}: {r.status_code}"


@pytest.mark.parametrize(
    "args",
    [
        ("dupes",),
        ("dupes", "--json"),
        ("eval",),
        ("map", "--method", "pca"),
        ("map",),
        ("export",),
        ("export", "--format", "parquet"),
    ],  # fmt: skip
    ids=lambda a: "-".join(a),
)
def test_collection_commands_run_clean(args: tuple[str, ...], generated: list[Case], collection: Path, tmp_path: Path) -> None:
    extra = ("--out", str(tmp_path / ("out.parquet" if "parquet" in args else "out.png" if "map" in args else "out")))
    proc = run_cli(*args, "-c", str(collection), *(extra if args[0] in ("map", "export") else ()))
    no_traceback(proc)
