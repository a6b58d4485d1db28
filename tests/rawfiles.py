"""Camera RAW files for tests: DNGs written from real photos, as a camera writes them (a linear Bayer mosaic, its
colour matrix, an embedded JPEG preview where asked). No real camera's files can be fetched here, and a DNG is
the RAW format LibRaw reads by the specification, so what it develops is what a camera's file would give."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

_BYTE, _ASCII, _SHORT, _LONG, _RATIONAL, _SRATIONAL = 1, 2, 3, 4, 5, 10
#: XYZ (D65) to linear sRGB: the DNG's ColorMatrix1 for a "camera" whose sensor sees sRGB's primaries.
_XYZ_TO_SRGB = (3.2406, -1.5372, -0.4986, -0.9689, 1.8758, 0.0415, 0.0557, -0.2040, 1.0570)
WHITE = 4095  # a 12-bit sensor


def _pack(typ: int, values) -> tuple[bytes, int]:
    if typ == _ASCII:
        raw = values.encode() + b"\0"
        return raw, len(raw)
    if typ == _BYTE:
        return bytes(values), len(values)
    if typ in (_RATIONAL, _SRATIONAL):
        fmt = "<" + ("I" if typ == _RATIONAL else "i") * 2 * len(values)
        return struct.pack(fmt, *[v for value in values for v in (round(value * 10000), 10000)]), len(values)
    return struct.pack("<" + ("H" if typ == _SHORT else "I") * len(values), *values), len(values)


def _ifd(entries: list[tuple[int, int, object]], start: int) -> bytes:
    """One IFD at `start`, with the values that do not fit in an entry after it."""
    entries = sorted(entries, key=lambda e: e[0])
    data_at = start + 2 + 12 * len(entries) + 4
    head, extra = struct.pack("<H", len(entries)), b""
    for tag, typ, values in entries:
        payload, count = _pack(typ, values)
        if len(payload) <= 4:
            field = payload.ljust(4, b"\0")
        else:
            field = struct.pack("<I", data_at + len(extra))
            extra += payload + b"\0" * (len(payload) % 2)
        head += struct.pack("<HHI", tag, typ, count) + field
    return head + struct.pack("<I", 0) + extra


def mosaic(rgb: np.ndarray) -> np.ndarray:
    """An RGGB Bayer mosaic of an sRGB image, linear light on 12 bits: what the sensor would have recorded."""
    x = rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2].astype(np.float64) / 255
    linear = np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4) * WHITE
    out = np.empty(linear.shape[:2], np.uint16)
    out[0::2, 0::2] = linear[0::2, 0::2, 0]
    out[0::2, 1::2] = linear[0::2, 1::2, 1]
    out[1::2, 0::2] = linear[1::2, 0::2, 1]
    out[1::2, 1::2] = linear[1::2, 1::2, 2]
    return out


def dng(photo: Image.Image, preview: int | None = None, orientation: int = 1, preview_exif: bool = False) -> bytes:
    """A DNG of this photo as a camera stores it: the mosaic at twice the photo's size (so developing it at half
    size gives the photo's), and, when `preview` is given, a JPEG preview of that many px on its long side.
    `orientation` (EXIF's 1, 3, 6, 8) says how the camera was held: the stored pixels are the photo turned back.
    preview_exif: the preview carries that orientation in its own EXIF too (some cameras write it there)."""
    turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}.get(orientation)
    sensor = photo.convert("RGB").transpose(turn) if turn else photo.convert("RGB")
    bayer = mosaic(np.asarray(sensor.resize((sensor.width * 2, sensor.height * 2), Image.Resampling.BICUBIC)))
    h, w = bayer.shape
    described = [
        (271, _ASCII, "ris"), (272, _ASCII, "test camera"), (274, _SHORT, [orientation]),
        (50706, _BYTE, [1, 4, 0, 0]), (50707, _BYTE, [1, 1, 0, 0]), (50708, _ASCII, "ris test camera"),
        (50721, _SRATIONAL, _XYZ_TO_SRGB), (50778, _SHORT, [21]), (50728, _RATIONAL, [1, 1, 1]),
    ]  # fmt: skip
    mosaic_entries = [
        (254, _LONG, [0]), (256, _LONG, [w]), (257, _LONG, [h]), (258, _SHORT, [16]), (259, _SHORT, [1]),
        (262, _SHORT, [32803]), (273, _LONG, [0]), (277, _SHORT, [1]), (278, _LONG, [h]), (279, _LONG, [h * w * 2]),
        (284, _SHORT, [1]), (33421, _SHORT, [2, 2]), (33422, _BYTE, [0, 1, 1, 2]), (50714, _LONG, [0]),
        (50717, _LONG, [WHITE]),
    ]  # fmt: skip
    blobs = [bayer.astype("<u2").tobytes()]
    if preview is None:
        ifds = [described + mosaic_entries]
    else:
        scale = preview / max(sensor.size)
        small = sensor.resize((round(sensor.width * scale), round(sensor.height * scale)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        exif = Image.Exif()
        if preview_exif:
            exif[0x0112] = orientation
        small.save(buf, "JPEG", quality=92, exif=exif)
        blobs.append(buf.getvalue())
        ifds = [described + [
            (254, _LONG, [1]), (256, _LONG, [small.width]), (257, _LONG, [small.height]), (258, _SHORT, [8, 8, 8]),
            (259, _SHORT, [7]), (262, _SHORT, [6]), (273, _LONG, [0]), (277, _SHORT, [3]), (278, _LONG, [small.height]),
            (279, _LONG, [len(blobs[1])]), (284, _SHORT, [1]), (330, _LONG, [0]),
        ], mosaic_entries]  # fmt: skip
    # lay out: header, the IFDs, then the pixel data; offsets are fixed in a second pass (sizes do not change)
    sizes = [len(_ifd(entries, 0)) for entries in ifds]
    starts = [8 + sum(sizes[:i]) for i in range(len(ifds))]
    data_at = 8 + sum(sizes)
    offsets = {0: data_at, 1: data_at + len(blobs[0])}  # mosaic, then preview
    if preview is None:
        ifds[0] = [(t, ty, [offsets[0]] if t == 273 else v) for t, ty, v in ifds[0]]
    else:
        ifds[0] = [(t, ty, [offsets[1]] if t == 273 else [starts[1]] if t == 330 else v) for t, ty, v in ifds[0]]
        ifds[1] = [(t, ty, [offsets[0]] if t == 273 else v) for t, ty, v in ifds[1]]
    out = b"II*\x00" + struct.pack("<I", 8) + b"".join(_ifd(e, s) for e, s in zip(ifds, starts, strict=True))
    return out + b"".join(blobs)


def write_dng(path: Path, photo: Image.Image, **kwargs) -> Path:
    path.write_bytes(dng(photo, **kwargs))
    return path
