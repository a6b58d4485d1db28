"""A folder shaped like a real photo library: images in many formats and camera RAW files beside sidecars, videos,
hidden and excluded folders. Images are found, the rest ignored quietly and counted, HEIC/AVIF/RAW copies find their
originals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ris.errors import DecodeError
from ris.files.sources import scan
from ris.images.decode import decode_file, open_image

from .conftest import caltech_files, run_cli
from .rawfiles import dng, write_dng


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2024/ holds JPEGs with sidecars, a HEIC, an AVIF, a PPM and two camera RAW copies of five of them (one with
    the camera's preview, taken upright), a RAW beside its JPEG, a broken RAW, a video and a PDF; .thumbnails/
    (hidden), export/ (excluded by --exclude) and scratch/ (by .risignore) hold JPEGs too."""
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
    write_dng(year / "DSC_0100.DNG", Image.open(jpegs[5]))  # no preview: the sensor data is developed
    write_dng(year / "IMG_0200.DNG", Image.open(jpegs[9]), preview=1600, orientation=6)  # the camera held upright
    write_dng(year / "panda_image_0002.DNG", Image.open(jpegs[1]))  # RAW + JPEG: the JPEG stands for both
    (year / "DSC_0003.NEF").write_bytes(b"MM\x00*\x00\x00\x00\x08" + bytes(3000))  # a RAW name, not a RAW file
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
    assert len(names) == 12 + 7 and all(n.startswith("2024/") for n in names)
    assert {"2024/panda.HEIC", "2024/sunflower.avif", "2024/airplane.pgm", "2024/broken.jpg", "2024/DSC_0100.DNG",
            "2024/IMG_0200.DNG", "2024/DSC_0003.NEF"} <= set(names)  # fmt: skip
    assert found.ignored == 12 + 4  # 12 .xmp, .aae, .json, .mp4, .PDF
    assert found.ignored_types == {".xmp": 12, ".aae": 1, ".mp4": 1, ".json": 1, ".pdf": 1}
    assert found.raw_beside_image == 1  # panda_image_0002.DNG, beside panda_image_0002.jpg
    assert len(scan([photo_folder])) == 20  # without --exclude, export/ counts; .risignore still drops scratch/
    raw_named = photo_folder / "2024" / "panda_image_0002.DNG"
    assert raw_named.as_posix() in {f.path for f in scan([photo_folder / "2024" / "panda_image_0002.jpg", raw_named])}


def test_heic_avif_pgm_decode(photo_folder: Path) -> None:
    for name in ("panda.HEIC", "sunflower.avif", "airplane.pgm", "DSC_0100.DNG", "IMG_0200.DNG"):
        assert decode_file(str(photo_folder / "2024" / name), 224).pixels.shape == (224, 224, 3)


@pytest.mark.parametrize("preview", [None, 1600])
@pytest.mark.parametrize("orientation", [1, 6, 8, 3])
def test_camera_raw_is_the_photo_upright(preview: int | None, orientation: int) -> None:
    """Developed (no preview) or from the camera's preview, turned as the camera was held, in the photo's colours."""
    photo = Image.open(caltech_files("sunflower", 1)[0]).convert("RGB")
    for preview_exif in (False, True) if preview else (False,):  # the preview's own EXIF says it again: turned once
        img = open_image(dng(photo, preview=preview, orientation=orientation, preview_exif=preview_exif))
        assert img.width / img.height == pytest.approx(photo.width / photo.height, rel=0.02)
        diff = np.abs(np.asarray(img.resize(photo.size), np.float32) - np.asarray(photo, np.float32)).mean()
        assert diff < (3 if preview else 12), diff  # developing from linear sensor values: within a few levels


def test_bad_camera_raw_files_are_refused_with_a_reason(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    photo = Image.open(caltech_files("panda", 1)[0])
    whole = dng(photo, preview=1600)  # the mosaic first, then the preview, as cameras lay them out
    with pytest.raises(DecodeError, match="^corrupt camera RAW file: Unexpected end of file$"):
        open_image(whole[:60_000])  # cut in the sensor data
    assert open_image(whole[: len(whole) - 20_000]).size == photo.size  # cut in the preview: developed instead
    with pytest.raises(DecodeError, match="^camera RAW too large to develop: "):
        open_image(dng(photo), max_bytes=100_000)
    assert capfd.readouterr().err == ""  # what LibRaw prints became the reason
    tiff = tmp_path / "scan.tif"
    photo.save(tiff)  # a plain TIFF, which LibRaw declines: Pillow's
    assert open_image(tiff.read_bytes()).size == photo.size


def test_index_a_photo_folder(photo_folder: Path, tmp_path: Path) -> None:
    coll = str(tmp_path / "c.ris")
    proc = run_cli("index", str(photo_folder), "-c", coll, "--exclude", "export")
    lines = proc.stderr.splitlines()
    assert "ignored 16 non-image files (by extension: .xmp 12, .aae 1, .mp4 1, .json 1, .pdf 1)" in lines
    assert "left out 1 camera RAW file beside an image of the same name (IMG_1.CR2 beside IMG_1.JPG): the image " \
           "stands for both" in lines  # fmt: skip
    assert f"  skipped {photo_folder / '2024' / 'DSC_0003.NEF'}: not an image (or an unsupported format)" in lines
    assert "skipped" in proc.stderr and "broken.jpg" in proc.stderr
    assert "panda_image_0001.jpg.xmp" not in proc.stderr and "clip.mp4" not in proc.stderr  # not listed, only counted
    report = json.loads(run_cli("index", str(photo_folder), "-c", coll, "--exclude", "export", "--json").stdout)
    assert report["images"] == 17 and report["skipped"] == 2 and report["ignored"] == 16 and report["new"] == 0
    assert report["raw_beside_image"] == 1
    info = json.loads(run_cli("info", "-c", coll, "--json").stdout)
    assert [Path(s["path"]).name for s in info["skipped_files"]] == ["DSC_0003.NEF", "broken.jpg"]

    originals = {"panda.HEIC": "panda_image_0001.jpg", "sunflower.avif": "sunflower_image_0001.jpg",
                 "airplane.pgm": "airplanes_image_0001.jpg", "DSC_0100.DNG": "sunflower_image_0002.jpg",
                 "IMG_0200.DNG": "airplanes_image_0002.jpg"}  # fmt: skip
    queries = [str(photo_folder / "2024" / q) for q in originals]
    lines = run_cli("search", *queries, "-c", coll, "-k", "2", "--json").stdout.splitlines()
    for query, line in zip(originals, lines, strict=True):
        matches = [Path(m["path"]).name for m in json.loads(line)["matches"]]
        assert matches == [query, originals[query]]  # itself, then the JPEG it was made from


def test_a_memory_card_of_camera_raw_files(photo_folder: Path, tmp_path: Path) -> None:
    """RAW files alone (a camera set to RAW) are indexed and found, by their JPEG copies too."""
    card = tmp_path / "DCIM"
    card.mkdir()
    for name in ("DSC_0100.DNG", "IMG_0200.DNG", "DSC_0003.NEF"):
        shutil.copy2(photo_folder / "2024" / name, card / name)
    coll = str(tmp_path / "c.ris")
    report = json.loads(run_cli("index", str(card), "-c", coll, "--json").stdout)
    assert report["images"] == 2 and report["skipped"] == 1 and report["ignored"] == 0
    found = json.loads(run_cli("search", str(photo_folder / "2024" / "airplanes_image_0002.jpg"), "-c", coll,
                               "-k", "1", "--json").stdout)  # fmt: skip
    assert [Path(m["path"]).name for m in found["matches"]] == ["IMG_0200.DNG"]


def test_a_phones_heic_is_read_through_its_thumbnail_for_the_model(tmp_path: Path) -> None:
    """A phone's HEIC carries a 320 x 240 thumbnail: the model's 224-px input comes from it (milliseconds instead of
    a 12-MP HEVC decode), larger views (verification, the full image) from the image itself; a JPEG shared from the
    photo still finds it first."""
    folder = tmp_path / "iphone"
    folder.mkdir()
    photos = caltech_files("airplanes", 3) + caltech_files("panda", 3)
    for f in photos:
        big = Image.open(f).convert("RGB").resize((1600, 1200), Image.Resampling.BICUBIC)  # a phone's 4:3
        big.save(folder / f"IMG_{f.parent.name}_{f.stem}.HEIC", quality=80, thumbnails=[320])
    heic = folder / f"IMG_airplanes_{photos[1].stem}.HEIC"
    assert Image.open(heic).info["thumbnails"] == [320]  # its long side, as pillow-heif lists them
    assert open_image(heic.read_bytes(), draft_size=224).size == (320, 240)
    assert open_image(heic.read_bytes(), draft_size=480).size == (1600, 1200)
    shared = tmp_path / "shared.jpg"
    Image.open(heic).resize((1024, 768)).save(shared, quality=80)  # as a messenger sends it on
    coll = str(tmp_path / "c.ris")
    run_cli("index", str(folder), "-c", coll)
    found = json.loads(run_cli("search", str(shared), "-c", coll, "-k", "1", "--json").stdout)
    assert [Path(m["path"]).name for m in found["matches"]] == [heic.name]
