"""A folder shaped like a real photo library: images in many formats beside sidecars, videos, hidden and
excluded folders. Images are found, the rest ignored quietly and counted, HEIC/AVIF copies find their originals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from ris.files.sources import scan
from ris.images.decode import decode_file

from .conftest import caltech_files, run_cli


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2024/ holds JPEGs with sidecars, a HEIC, an AVIF and a PPM copy of three of them, a video and a PDF;
    .thumbnails/ (hidden), export/ (excluded by --exclude) and scratch/ (by .risignore) hold JPEGs too."""
    root = tmp_path_factory.mktemp("photos")
    year = root / "2024"
    year.mkdir()
    jpegs = caltech_files("panda", 4) + caltech_files("sunflower", 4) + caltech_files("airplanes", 4)
    for f in jpegs:  # Caltech's names repeat across classes: the class goes in front
        shutil.copy2(f, year / f"{f.parent.name}_{f.name}")
        (year / f"{f.parent.name}_{f.name}.xmp").write_text("<x:xmpmeta/>")  # darktable / Lightroom sidecar
    (year / "IMG_0001.aae").write_text("<plist/>")  # iOS edit sidecar
    (year / "metadata.json").write_text("{}")  # Google Takeout sidecar
    (year / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(2000))  # video-like
    (year / "notes.PDF").write_bytes(b"%PDF-1.4\n")
    (year / "IMG_0002.CR2").write_bytes(b"II*\x00\x10\x00\x00\x00CR\x02\x00" + bytes(3000))  # camera RAW
    (year / "DSC_0003.NEF").write_bytes(b"MM\x00*\x00\x00\x00\x08" + bytes(3000))
    Image.open(jpegs[0]).save(year / "panda.HEIC", quality=80)  # written by pillow-heif
    Image.open(jpegs[4]).save(year / "sunflower.avif", quality=80)  # written by Pillow's AVIF plugin
    Image.open(jpegs[8]).convert("L").save(year / "airplane.pgm")
    (year / "broken.jpg").write_bytes(b"not a jpeg at all")  # an image by name: tried, skipped with a reason
    for hidden in (root / ".thumbnails", year / ".cache"):
        hidden.mkdir()
        shutil.copy2(jpegs[1], hidden / "thumb.jpg")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    for other in ("export", "scratch"):
        (root / other).mkdir()
        shutil.copy2(jpegs[2], root / other / "copy.jpg")
    (root / ".risignore").write_text("# not for searching\nscratch\n")
    return root


def test_scan_finds_images_and_counts_the_rest(photo_folder: Path) -> None:
    found = scan([photo_folder], exclude=["export"])
    names = sorted(Path(f.path).relative_to(photo_folder).as_posix() for f in found)
    assert len(names) == 12 + 4 and all(n.startswith("2024/") for n in names)
    assert {"2024/panda.HEIC", "2024/sunflower.avif", "2024/airplane.pgm", "2024/broken.jpg"} <= set(names)
    assert found.ignored == 12 + 4 + 2  # 12 .xmp, .aae, .json, .mp4, .PDF, two camera RAW files
    assert found.ignored_types == {".xmp": 12, ".nef": 1, ".aae": 1, ".cr2": 1, ".mp4": 1, ".json": 1, ".pdf": 1}
    assert len(scan([photo_folder])) == 17  # without --exclude, export/ counts; .risignore still drops scratch/


def test_heic_avif_pgm_decode(photo_folder: Path) -> None:
    for name in ("panda.HEIC", "sunflower.avif", "airplane.pgm"):
        assert decode_file(str(photo_folder / "2024" / name), 224).pixels.shape == (224, 224, 3)


def test_index_a_photo_folder(photo_folder: Path, tmp_path: Path) -> None:
    coll = str(tmp_path / "c.ris")
    proc = run_cli("index", str(photo_folder), "-c", coll, "--exclude", "export")
    lines = proc.stderr.splitlines()
    assert "ignored 18 non-image files (by extension: .xmp 12, .nef 1, .aae 1, .cr2 1, .mp4 1, .json 1, 1 more kind)" in lines
    assert "  2 of them camera RAW files: ris does not read RAW; it finds their JPEGs (the camera's, or exported ones) " \
           "where those are in the folders" in lines  # fmt: skip
    assert "skipped" in proc.stderr and "broken.jpg" in proc.stderr
    assert "panda_image_0001.jpg.xmp" not in proc.stderr and "clip.mp4" not in proc.stderr  # not listed, only counted
    report = json.loads(run_cli("index", str(photo_folder), "-c", coll, "--exclude", "export", "--json").stdout)
    assert report["images"] == 15 and report["skipped"] == 1 and report["ignored"] == 18 and report["new"] == 0
    info = json.loads(run_cli("info", "-c", coll, "--json").stdout)
    assert [Path(s["path"]).name for s in info["skipped_files"]] == ["broken.jpg"]

    originals = {"panda.HEIC": "panda_image_0001.jpg", "sunflower.avif": "sunflower_image_0001.jpg",
                 "airplane.pgm": "airplanes_image_0001.jpg"}  # fmt: skip
    queries = [str(photo_folder / "2024" / q) for q in originals]
    lines = run_cli("search", *queries, "-c", coll, "-k", "2", "--json").stdout.splitlines()
    for query, line in zip(originals, lines, strict=True):
        matches = [Path(m["path"]).name for m in json.loads(line)["matches"]]
        assert matches == [query, originals[query]]  # itself, then the JPEG it was made from


def test_a_folder_of_camera_raw_files_only_says_so(photo_folder: Path, tmp_path: Path) -> None:
    raw = tmp_path / "card"
    raw.mkdir()
    for name in ("IMG_0002.CR2", "DSC_0003.NEF"):
        shutil.copy2(photo_folder / "2024" / name, raw / name)
    proc = run_cli("index", str(raw), "-c", str(tmp_path / "c.ris"), check=False)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        f"error: no image files found (2 non-image files ignored: .nef 1, .cr2 1) in: {raw} "
        "(camera RAW files are not read: export them as JPEG)")  # fmt: skip
    assert not (tmp_path / "c.ris").exists()
