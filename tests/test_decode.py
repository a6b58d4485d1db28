"""Decoding real files of every supported format and mode, and refusing bad ones with a reason."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ris.errors import DecodeError
from ris.images import decode
from ris.images.decode import MAX_PIXELS, decode_bytes, decode_file, open_image, read_file

from .conftest import caltech_files


def _photo() -> Image.Image:
    return Image.open(caltech_files("sunflower", 1)[0]).convert("RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF"])
def test_every_format_is_read_by_content_not_extension(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "no_extension_and.WRONG"
    path.write_bytes(_encode(_photo(), fmt))
    decoded = decode_file(str(path), 224)
    assert decoded.pixels.shape == (224, 224, 3) and decoded.pixels.dtype == np.uint8
    assert len(decoded.sha256) == 64


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "1"])
def test_every_mode_becomes_rgb(mode: str) -> None:
    img = _photo()
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        img = Image.fromarray(arr)
        assert img.mode == "I;16"
    else:
        img = img.convert(mode)
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    out = open_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == img.size
    if mode == "I;16":  # 16-bit is rescaled to 8-bit, not clipped to white
        assert 30 < np.asarray(out).mean() < 225


def test_transparent_pixels_become_white() -> None:
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert np.asarray(open_image(_encode(img, "PNG")))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied() -> None:
    img = _photo()  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = open_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert rotated.size == (img.height, img.width)


def test_same_bytes_same_hash_and_pixels() -> None:
    data = _encode(_photo(), "JPEG", quality=90)
    a, b = decode_bytes(data, 224), decode_bytes(data, 224)
    assert a.sha256 == b.sha256 and np.array_equal(a.pixels, b.pixels)


def test_bad_files_raise_with_a_reason(tmp_path: Path) -> None:
    good = _encode(_photo(), "JPEG")
    cases = {
        "empty": (b"", "empty file"),
        "text": (b"just some text, not an image\n" * 20, "not an image"),
        "truncated": (good[: len(good) // 3], "truncated"),
        "corrupt": (good[:200] + bytes(range(256)) * 8, "corrupt"),
    }
    for data, reason in cases.values():
        with pytest.raises(DecodeError, match=reason):
            decode_bytes(data, 224)
    with pytest.raises(DecodeError, match="unreadable"):
        decode_file(str(tmp_path / "vanished.jpg"), 224)


def test_a_file_is_read_whole_and_one_that_grows_past_the_cap_is_refused(tmp_path: Path, monkeypatch) -> None:
    """read_file reads what fstat saw and one byte more; a file longer than fstat said (it grew since) is read on,
    to its end or to one byte past the cap, where it is refused."""
    photo = caltech_files("sunflower", 1)[0].read_bytes()
    for size in (0, 1, 5000, len(photo)):
        path = tmp_path / f"f{size}.jpg"
        path.write_bytes(photo[:size])
        assert read_file(str(path), max_bytes=len(photo)) == photo[:size]
    real_fstat = decode.os.fstat

    def stale_fstat(fd: int):  # the size as it was before the file grew
        st = real_fstat(fd)
        return os.stat_result((st.st_mode, *st[1:6], 100, *st[7:]))

    monkeypatch.setattr(decode.os, "fstat", stale_fstat)
    grown = tmp_path / f"f{len(photo)}.jpg"
    assert read_file(str(grown), max_bytes=len(photo)) == photo  # read on to its end
    with pytest.raises(DecodeError, match="it grew while read"):
        read_file(str(grown), max_bytes=len(photo) - 1)


def test_decompression_bomb_is_refused() -> None:
    side = int((MAX_PIXELS * 1.05) ** 0.5) + 1
    bomb = _encode(Image.new("1", (side, side)), "PNG")  # a few KB on disk, ~190 megapixels decoded
    assert len(bomb) < 1_000_000
    with pytest.raises(DecodeError, match="too large"):
        decode_bytes(bomb, 224)


@pytest.mark.parametrize("side", [300, 1000, 3000])
def test_resize_stays_close_to_an_antialiased_resize(side: int) -> None:
    """The fast bilinear path must not alias: large images are box-reduced first."""
    from ris.images.decode import resize

    img = _photo().resize((side, side * 3 // 4))
    fast = resize(img, 224).astype(np.float32)
    reference = np.asarray(img.resize((224, 224), Image.Resampling.BILINEAR), dtype=np.float32)
    assert fast.shape == (224, 224, 3) and np.abs(fast - reference).mean() < 3.0


@pytest.mark.parametrize("side", [250, 700, 2100])
def test_resize_on_a_tensor_matches_the_cpu_resize(side: int) -> None:
    """GPU-decoded images go through resize_tensor (run here on CPU tensors): same pixels within rounding."""
    import torch

    from ris.images.decode import resize, resize_tensor

    img = _photo().resize((side, side * 3 // 4 + 7))
    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    diff = np.abs(resize(img, 224).astype(int) - resize_tensor(chw, 224).numpy().astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.3
