"""The embedded default: sample photos that ship inside ris, and transformed copies of them.

`ris demo` needs no network and no data of the user's: it indexes these photos with the bundled
model and queries the collection with cropped, flipped, re-encoded and rescaled copies. The photos
come from scikit-image's data (public domain or CC0; samples/CREDITS.md), shipped here so that the
default install needs no scikit-image (and its SciPy) for them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps


def sample_dir() -> Path:
    return Path(__file__).parent / "samples"


def sample_paths() -> list[Path]:
    """The bundled photos, sorted by name."""
    return sorted(p for p in sample_dir().iterdir() if p.suffix in (".jpg", ".png"))


def sample_images() -> list[tuple[Path, Image.Image]]:
    from ..images.decode import open_image

    return [(path, open_image(path.read_bytes())) for path in sample_paths()]


def _reencode(img: Image.Image, quality: int = 30) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _crop(img: Image.Image, keep: float = 0.75) -> Image.Image:
    w, h = img.size
    dx, dy = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return img.crop((dx, dy, w - dx, h - dy))


#: name -> transform; what a "copy" of a photo looks like in the wild.
TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "crop": _crop,
    "flip": ImageOps.mirror,
    "jpeg30": _reencode,
    "half": lambda img: img.resize((max(1, img.width // 2), max(1, img.height // 2))),
    "rotate10": lambda img: img.rotate(10, expand=True, fillcolor=(255, 255, 255)),
    "brighter": lambda img: ImageEnhance.Brightness(img).enhance(1.4),
    "border": lambda img: ImageOps.expand(img, border=max(4, img.width // 12), fill=(0, 0, 0)),
    "gray": lambda img: ImageOps.grayscale(img).convert("RGB"),
    "text": lambda img: _caption(img),
}


def _caption(img: Image.Image) -> Image.Image:
    """A watermark-style caption across the lower third, as reposted photos carry."""
    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    size = max(10, out.height // 8)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    draw.text((out.width // 20, out.height * 2 // 3), "© ris demo 2026", fill=(255, 255, 0), font=font,
              stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0))  # fmt: skip
    return out


DEMO_QUERIES = (("chelsea.jpg", "crop"), ("rocket.jpg", "flip"), ("coffee.jpg", "jpeg30"), ("astronaut.jpg", "half"))


def make_queries(out_dir: Path) -> list[tuple[Path, Path]]:
    """Write the demo's query images; returns (query path, original path) pairs."""
    from ..images.decode import open_image

    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for name, transform in DEMO_QUERIES:
        original = sample_dir() / name
        img = TRANSFORMS[transform](open_image(original.read_bytes()))
        query = out_dir / f"{Path(name).stem}-{transform}.jpg"
        img.convert("RGB").save(query, "JPEG", quality=90)
        pairs.append((query, original))
    return pairs
