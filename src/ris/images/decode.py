"""Turn image bytes into the model's input: RGB, upright, resized, uint8 HxWx3.

Runs in worker processes while the model runs, so it must be cheap: JPEGs are decoded at a
reduced scale directly (libjpeg's DCT scaling through PIL's draft mode) before the final resize.

Bounded before any work: a file is read only when it is a regular file of at most RIS_MAX_FILE_MB
(default 100), and an image is decoded only when its pixels fit a memory budget (MAX_DECODE_BYTES;
a JPEG over it is decoded at the reduced scale that fits): a 20 KB PNG can declare 13000 x 13000 px.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from ..config import megabytes
from ..errors import DecodeError
from . import raw

#: Formats we accept, recognised by content (magic bytes), never by extension: the raster formats Pillow reads
#: (HEIC/HEIF through pillow-heif, AVIF through Pillow itself), not EPS (which runs Ghostscript) nor Pillow's stubs;
#: camera RAW files through LibRaw (ris.images.raw) before them, since Pillow reads a NEF or DNG as a TIFF thumbnail.
FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "WEBP", "TIFF", "PPM", "HEIF", "AVIF", "JPEG2000", "TGA", "QOI", "PCX",
           "SGI", "PSD", "ICO", "DDS", "IM", "SUN", "XBM")  # fmt: skip
#: Larger images are refused as likely decompression bombs (about 16k x 11k pixels).
MAX_PIXELS = 178_956_970

#: The knob capping the files read, in megabytes (refused before they are read; its default is in ris.config).
MAX_FILE_ENV = "RIS_MAX_FILE_MB"
#: Memory one decode may use (decoded pixels plus the working copies of the conversion to RGB): ~65 MP of RGB.
MAX_DECODE_BYTES = 768 * 2**20

Image.MAX_IMAGE_PIXELS = MAX_PIXELS
register_heif_opener()  # HEIC/HEIF, every iPhone photo: the maintained libheif plugin, not a decoder of ours
cv2.setNumThreads(1)  # one decode worker = one core; the model's threads get the rest


@dataclass(frozen=True)
class Decoded:
    """A decoded file: its content hash (for dedup and change detection) and the model input."""

    sha256: str
    pixels: np.ndarray  # uint8, (size, size, 3)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode (L, P, CMYK, RGBA, LA, I;16, I, F) to RGB; transparency is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_cost(mode: str, size: tuple[int, int]) -> int:
    """Bytes decoding an image of this mode and size holds at its peak: PIL keeps 1 byte a pixel for
    1/L/P, 2 for I;16, 4 for I/F and every multi-band mode; the conversion to RGB adds two 4-byte copies
    (e.g. RGBA composited on white, then RGB)."""
    if mode.startswith("I;16"):
        per_pixel = 2
    elif mode in ("1", "L", "P"):
        per_pixel = 1
    else:
        per_pixel = 4
    return size[0] * size[1] * (per_pixel + 8)


def check_budget(img: Image.Image, max_bytes: int = MAX_DECODE_BYTES) -> None:
    """Refuse (DecodeError "image too large ...") an opened, not yet loaded image whose decoding would
    take more than max_bytes; call it after Image.open (which reads the header only)."""
    cost = decode_cost(img.mode, img.size)
    if cost > max_bytes:
        raise DecodeError(
            f"image too large to decode: {img.width}x{img.height} px {img.format or ''} {img.mode} needs about "
            f"{cost / 2**20:,.0f} MB (limit {max_bytes / 2**20:,.0f} MB)"
        )


def _draft(img: Image.Image, draft_size: int | None, max_bytes: int) -> None:
    """Let libjpeg decode a JPEG reduced (by 1/2, 1/4 or 1/8): to at least draft_size pixels a side when
    asked, and in any case small enough for the memory budget when the full size is not. A HEIC's embedded
    thumbnail of at least draft_size a side stands for it (pillow-heif's draft: a scaled copy of the image, as
    phones store one): a 12-MP HEIC takes ~0.6 s to decode on one core, its 320-px thumbnail milliseconds."""
    if img.format == "HEIF" and draft_size:
        img.draft(img.mode, (draft_size, draft_size))
        return
    over = decode_cost(img.mode, img.size) / max_bytes
    if img.format != "JPEG" or (not draft_size and over <= 1):
        return
    want = (draft_size, draft_size) if draft_size else img.size
    if over > 1:  # the largest of libjpeg's scales within budget, whatever draft_size asked for
        scale = next((s for s in (2, 4, 8) if over <= s * s), 8)
        want = (min(want[0], img.width // scale), min(want[1], img.height // scale))
    img.draft("RGB", want)


def open_image(data: bytes, draft_size: int | None = None, max_bytes: int = MAX_DECODE_BYTES) -> Image.Image:
    """Decode bytes to an upright RGB image; raise DecodeError with a short reason otherwise.

    draft_size: JPEGs may be decoded reduced, keeping at least this many pixels a side. max_bytes: the
    memory the decode may take (check_budget); a JPEG over it is decoded reduced, anything else refused.
    """
    if not data:
        raise DecodeError("empty file")
    if raw.looks_raw(data) and (picture := raw.read(data, max_bytes)) is not None:
        if picture.image is not None:
            return _to_rgb(picture.image)
        img = open_image(picture.jpeg, draft_size, max_bytes)  # the camera's preview: a JPEG like any other
        return img.transpose(picture.turn) if picture.turn is not None else img
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=FORMATS)
            _draft(img, draft_size, max_bytes)
            check_budget(img, max_bytes)
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # a copy of every upright image otherwise
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise DecodeError(f"image too large (over {MAX_PIXELS:,} pixels; decompression bomb?)") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image: {exc}") from None


def resize(img: Image.Image, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Squash to size x size, as the tutorial's Keras load_img(target_size=...) does; into `out` when given (a
    decode worker's shared slot: no array of its own to allocate and copy).

    Bilinear in OpenCV: 0.16 ms for a Caltech image where PIL's antialiased bilinear took 0.85 ms (more
    than decoding it). Plain bilinear aliases past a 2x reduction, so larger images are first box-reduced
    by an integer factor (JPEGs already arrive within 2x through draft mode).
    """
    factor = min(img.width // size, img.height // size)
    if factor >= 2:
        img = img.reduce(factor)
    pixels = np.asarray(img, dtype=np.uint8)
    if img.size != (size, size):
        return cv2.resize(pixels, (size, size), dst=out, interpolation=cv2.INTER_LINEAR)
    if out is None:
        return pixels
    out[...] = pixels
    return out


def decode_bytes(data: bytes, size: int, out: np.ndarray | None = None) -> Decoded:
    """Hash and decode one file's bytes into model input (into `out` when given)."""
    digest = hashlib.sha256(data).hexdigest()
    return Decoded(digest, resize(open_image(data, draft_size=size), size, out))


def max_file_bytes() -> int:
    """The largest file read, from RIS_MAX_FILE_MB (megabytes; default 100)."""
    return megabytes(MAX_FILE_ENV)


def read_file(path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file of at most max_bytes (default: max_file_bytes()), else DecodeError.

    Checked before reading (fstat of the opened file, so a swapped-in path cannot slip past), and the
    read itself stops one byte past the cap (a file that grows meanwhile). Devices (/dev/zero), FIFOs
    and sockets are refused; O_NONBLOCK keeps a FIFO without a writer from blocking the open.
    """
    cap = max_file_bytes() if max_bytes is None else max_bytes
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DecodeError(f"unreadable: {exc.strerror or exc}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DecodeError("not a regular file (a folder, device, FIFO or socket)")
    with os.fdopen(fd, "rb") as fh:
        limit = f"limit {cap / 2**20:,.6g} MB; set {MAX_FILE_ENV} to change it"
        if st.st_size > cap:
            raise DecodeError(f"file too large: {st.st_size / 2**20:,.1f} MB ({limit})")
        try:  # exactly what fstat saw and one byte more (read(cap + 1) allocated the cap at every file)
            data = fh.read(st.st_size + 1)
            if len(data) > st.st_size:  # it grows: read on, to one byte past the cap
                data += fh.read(cap - len(data) + 1)
        except OSError as exc:
            raise DecodeError(f"unreadable: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise DecodeError(f"file too large: it grew while read ({limit})")
    return data


def decode_file(path: str, size: int, out: np.ndarray | None = None) -> Decoded:
    return decode_bytes(read_file(path), size, out)


def thumbnail(source: str | Image.Image, size: int) -> Image.Image:
    """An RGB image shrunk to fit size x size (for grids, pages, maps); a grey tile when unreadable."""
    try:
        img = source.convert("RGB") if isinstance(source, Image.Image) else open_image(read_file(source), draft_size=size)
    except DecodeError:
        return Image.new("RGB", (size, size), (200, 200, 200))
    img.thumbnail((size, size))  # convert() made a copy: the caller's image is left alone
    return img


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def decode_jpegs_on_device(datas: list[bytes], size: int, device: str):
    """Batch-decode JPEGs on the GPU (nvJPEG via torchvision) and resize there.

    Returns (uint8 NHWC tensor on the device for the decoded ones, their positions in `datas`).
    Anything else (other formats, CMYK or broken JPEGs, no torchvision) is left to the CPU decoder.
    """
    import torch

    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None, []
    positions = [i for i, d in enumerate(datas) if is_jpeg(d)]
    if not positions:
        return None, []
    encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in positions]
    try:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:  # one bad file fails the whole batch: fall back one by one
        images, kept = [], []
        for pos, enc in zip(positions, encoded, strict=True):
            try:
                images.append(decode_jpeg(enc, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
                kept.append(pos)
            except RuntimeError:
                continue
        positions = kept
    if not images:
        return None, []
    out = torch.empty((len(images), size, size, 3), dtype=torch.uint8, device=device)
    for n, img in enumerate(images):
        out[n] = resize_tensor(img, size)
    return out, positions


def resize_tensor(img, size: int):
    """`resize` for a CHW uint8 torch tensor (on any device): the same integer box reduction past 2x,
    then bilinear with half-pixel centres as OpenCV's INTER_LINEAR, so GPU-decoded images feed the
    model what CPU-decoded ones do. Returns HWC uint8."""
    import torch.nn.functional as F

    x = img[None].float()
    factor = min(img.shape[2] // size, img.shape[1] // size)
    if factor >= 2:  # PIL's reduce(): box means, partial blocks at the edges averaged over what they hold
        x = F.avg_pool2d(x, factor, ceil_mode=True, count_include_pad=False)
    if x.shape[2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x[0].round_().clamp_(0, 255).to(img.dtype).permute(1, 2, 0)
