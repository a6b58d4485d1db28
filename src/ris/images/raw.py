"""Camera RAW files (NEF, CR2, CR3, ARW, DNG, RAF, ORF, RW2, PEF, …) through LibRaw (rawpy).

A photo folder's RAW files are its photos. Where the camera embedded a JPEG preview of at least
PREVIEW_MIN_SIDE px a side, that is the picture (what the camera showed; decoded like any JPEG, in
milliseconds); otherwise the sensor data is developed at half size (each 2 x 2 block one pixel, the
camera's white balance). The choice depends on the file alone, so an image gets the same vector whether
it is indexed, searched or verified.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from PIL import ExifTags, Image

from ..errors import DecodeError

#: A smaller embedded preview (a 160 x 120 thumbnail) is not the picture: the sensor data is developed instead.
PREVIEW_MIN_SIDE = 640
#: LibRaw's `flip` -> the transpose that makes an embedded preview upright (developed images come upright).
_TURNS = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}
#: First bytes of the RAW families: TIFF (DNG, NEF, CR2, ARW, PEF, …; and plain TIFFs, told apart by _plain_tiff),
#: Olympus ORF, Panasonic RW2, Phase One IIQ, Sigma X3F, Minolta MRW.
_TIFF = (b"II*\x00", b"MM\x00*")
_MAGIC = (b"IIRO", b"IIRS", b"MMOR", b"IIU\x00", b"IIII", b"FOVb", b"\x00MRM")
_SUBFILE_TYPE, _PHOTOMETRIC, _SUB_IFDS, _DNG_VERSION = 254, 262, 330, 50706
_RAW_PHOTOMETRIC = (32803, 34892)  # CFA, LinearRaw
#: How LibRaw begins what it prints about a buffer's bad data (it has no file name to give).
_LIBRAW_SAYS = b"unknown file: "
_STDERR_LOCK = threading.Lock()


@dataclass(frozen=True)
class RawPicture:
    """A RAW file's picture: its embedded preview's JPEG bytes and the turn that sets them upright, or an image."""

    jpeg: bytes | None = None
    turn: Image.Transpose | None = None
    image: Image.Image | None = None


def looks_raw(data: bytes) -> bool:
    """Whether the bytes may be a RAW file (by magic; LibRaw decides): cheap enough for every file."""
    if data[:4] in _TIFF:
        return not _plain_tiff(data)
    return data[:4] in _MAGIC or data[:8] == b"FUJIFILM" or data[4:12] == b"ftypcrx " or data[6:14] == b"HEAPCCDR"


def _plain_tiff(data: bytes) -> bool:
    """A TIFF whose first image is the picture (a scan, an export), which Pillow reads: LibRaw would take a 16-bit
    grey one for a monochrome sensor's data. A camera's TIFF-shaped RAW file says what it is in its first IFD:
    a DNG version, sub-images (the sensor data beside a preview), a reduced-size first image, or CFA / linear raw
    pixels; a CR2 says "CR" after its header."""
    if data[8:10] == b"CR":
        return False
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data), formats=("TIFF",)) as img:
            warnings.simplefilter("ignore")
            tags = img.tag_v2
            return not (_DNG_VERSION in tags or _SUB_IFDS in tags or int(tags.get(_SUBFILE_TYPE, 0)) & 1
                        or tags.get(_PHOTOMETRIC) in _RAW_PHOTOMETRIC)  # fmt: skip
    except Exception:  # Pillow cannot read it as a picture: LibRaw may
        return False


def read(data: bytes, max_bytes: int) -> RawPicture | None:
    """The picture of a RAW file; None when LibRaw does not take the bytes (a plain TIFF: Pillow's).

    max_bytes: the memory developing may take (the sensor data plus the half-size image); over it, DecodeError.
    """
    import rawpy  # only once a file looks like RAW: most folders have none (and threadpoolctl costs 28 ms to import)
    from threadpoolctl import threadpool_limits

    # LibRaw on one OpenMP thread: its pool would not survive the fork of the decode workers (a hang), and they
    # are one a core anyway; rawpy's notice of that risk is then moot
    with threadpool_limits(1, user_api="openmp"), warnings.catch_warnings(), _libraw_stderr() as complaints:
        warnings.simplefilter("ignore", RuntimeWarning)
        picture, failure = None, ""
        try:
            with rawpy.imread(io.BytesIO(data)) as raw:
                picture = _preview(raw, rawpy) or _develop(raw, max_bytes)
        except rawpy.LibRawFileUnsupportedError:
            return None
        except rawpy.LibRawError as exc:
            failure = _reason(exc)
    if complaints or picture is None:  # what LibRaw printed says more than its error ("Input/output error")
        raise DecodeError(f"corrupt camera RAW file: {complaints[0] if complaints else failure}")
    return picture


@contextmanager
def _libraw_stderr() -> Iterator[list[str]]:
    """LibRaw prints bad data (a truncated file's "Unexpected end of file") on stderr and goes on: its lines are
    caught as the reason to refuse the file; anything else written to stderr meanwhile is passed on."""
    complaints: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield complaints
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            for line in sink.read().splitlines(keepends=True):
                if line.startswith(_LIBRAW_SAYS):
                    complaints.append(line[len(_LIBRAW_SAYS) :].decode(errors="replace").strip())
                else:
                    os.write(2, line)


def _reason(exc: Exception) -> str:
    text = exc.args[0] if exc.args else exc
    return (text.decode(errors="replace") if isinstance(text, bytes) else str(text)) or type(exc).__name__


def _preview(raw, rawpy) -> RawPicture | None:
    """The embedded preview when it is large enough to be the picture."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError, rawpy.LibRawDataError):
        return None
    turn = _TURNS.get(raw.sizes.flip)
    if thumb.format == rawpy.ThumbFormat.BITMAP:
        img = Image.fromarray(thumb.data)
        if min(img.size) < PREVIEW_MIN_SIDE:
            return None
        return RawPicture(image=img.transpose(turn) if turn is not None else img)
    try:
        with Image.open(io.BytesIO(thumb.data), formats=("JPEG",)) as img:
            if min(img.size) < PREVIEW_MIN_SIDE:
                return None
            if img.getexif().get(ExifTags.Base.Orientation, 1) != 1:
                turn = None  # the preview says its own orientation: applied as any JPEG's is
    except (OSError, SyntaxError, ValueError):
        return None  # a broken preview: the sensor data is still there
    return RawPicture(jpeg=bytes(thumb.data), turn=turn)


def _develop(raw, max_bytes: int) -> RawPicture:
    """The sensor data at half size: no demosaicing to pay for, and still far more pixels than search uses."""
    sizes = raw.sizes
    # the unpacked sensor data (2 bytes a photosite), LibRaw's 4 x 16-bit half-size image and our 8-bit RGB
    cost = sizes.raw_width * sizes.raw_height * 2 + (sizes.width // 2) * (sizes.height // 2) * 11
    if cost > max_bytes:
        raise DecodeError(
            f"camera RAW too large to develop: {sizes.width}x{sizes.height} px needs about {cost / 2**20:,.0f} MB "
            f"(limit {max_bytes / 2**20:,.0f} MB)"
        )
    rgb = raw.postprocess(half_size=True, use_camera_wb=True, output_bps=8)
    return RawPicture(image=Image.fromarray(rgb))
