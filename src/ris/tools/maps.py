"""A map of a collection: every image's thumbnail on a grid, neighbours in feature space side by side.

This is the tutorial's closing picture, made printable: t-SNE (scikit-learn) places the vectors in 2-D,
then each point is moved to its own cell of a grid (an optimal assignment, SciPy's
linear_sum_assignment), so thumbnails tile the page without overlapping or being cut at the edges.
Folder labels are written over the region their images occupy. `--html` writes the same map as a
self-contained page (hover for the path and label; hover a label to see its images). scikit-learn and
SciPy come with the `map` extra; without them `ris map` says so in one line.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import extras
from ..errors import RisError
from ..images.decode import thumbnail

METHODS = ("tsne", "pca")
MIN_IMAGES = 3  # t-SNE needs perplexity < n - 1; fewer points make no map anyway
SAMPLE_SEED = 0
MARGIN = 24  # white border around the grid (px)
TITLE = 44  # height of the title band (px)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The two leading principal components (numpy SVD), signs fixed so reruns give the same picture."""
    x = np.asarray(vectors, dtype=np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    coords = np.zeros((len(x), 2))
    k = min(2, len(s))
    coords[:, :k] = u[:, :k] * s[:k]
    signs = np.sign(vt[:k, np.argmax(np.abs(vt[:k]), axis=1)].diagonal())
    coords[:, :k] *= np.where(signs == 0, 1.0, signs)
    return coords


def tsne_2d(vectors: np.ndarray, seed: int = SAMPLE_SEED) -> np.ndarray:
    """t-SNE on cosine distances (the collection's similarity), initialised by PCA: stable across runs."""
    manifold = extras.require("sklearn.manifold", "ris map's t-SNE layout", "map")
    n = len(vectors)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3), n - 1.5))  # scikit-learn requires perplexity < n
    tsne = manifold.TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", metric="cosine",
                         random_state=seed)  # fmt: skip
    # one thread: on busy cores, OpenMP threads spin-waiting made it far slower (96 images: 45 s vs 2 s on 2 shared cores)
    with extras.require("threadpoolctl", "ris map's t-SNE layout", "map").threadpool_limits(1):
        return tsne.fit_transform(np.asarray(vectors, dtype=np.float32)).astype(np.float64)


def layout(vectors: np.ndarray, method: str = "tsne", seed: int = SAMPLE_SEED) -> np.ndarray:
    """(n, 2) coordinates for n vectors: t-SNE (needs the `map` extra) or PCA's first two components."""
    if method not in METHODS:
        raise RisError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or len(vectors) < MIN_IMAGES:
        raise RisError(f"a map needs at least {MIN_IMAGES} images, got {len(vectors)}")
    return tsne_2d(vectors, seed) if method == "tsne" else pca_2d(vectors)


def _normalise(coords: np.ndarray) -> np.ndarray:
    """Coordinates scaled into [0, 1] per axis (a constant axis sits in the middle)."""
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    return np.where(hi > lo, (coords - lo) / span, 0.5)


def grid_shape(n: int, aspect: float = 1.0) -> tuple[int, int]:
    """(columns, rows) of the smallest grid of about this width/height ratio that holds n cells."""
    cols = max(1, math.ceil(math.sqrt(n * aspect)))
    return cols, max(1, math.ceil(n / cols))


def snap_to_grid(coords: np.ndarray, cols: int, rows: int) -> np.ndarray:
    """(n, 2) integer (column, row) cells, one image per cell, moving the points as little as possible in
    total (squared distance; an optimal assignment). Row 0 is the top: y grows upwards, as in a plot."""
    if cols * rows < len(coords):
        raise RisError(f"a {cols}x{rows} grid cannot hold {len(coords)} images")
    optimize = extras.require("scipy.optimize", "ris map's grid layout", "map")
    points = _normalise(np.asarray(coords, dtype=np.float64))
    gx, gy = np.meshgrid(np.linspace(0, 1, cols), np.linspace(1, 0, rows))
    cells = np.stack([gx.ravel(), gy.ravel()], axis=1)
    cost = ((points[:, None, :] - cells[None, :, :]) ** 2).sum(axis=2)
    _, chosen = optimize.linear_sum_assignment(cost)
    return np.stack([chosen % cols, chosen // cols], axis=1)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _path_of(row: object) -> str:
    return str(row.path) if hasattr(row, "path") else os.fspath(row)  # type: ignore[arg-type]


def _label_of(row: object) -> str | None:
    return getattr(row, "label", None) or None


def label_anchors(labels: Sequence[str | None], cells: np.ndarray, min_images: int = 2) -> list[tuple[str, int, int]]:
    """(label, column, row) where to write each folder label: the label's own cell nearest the middle of
    its cells, biggest labels first. No labels when every image has the same one (or none)."""
    counts = Counter(label for label in labels if label)
    if len(counts) < 2:
        return []
    anchors = []
    for label, count in counts.most_common():
        if count < min_images:
            break
        own = cells[[i for i, lab in enumerate(labels) if lab == label]]
        middle = own.mean(axis=0)
        col, row = own[np.argmin(((own - middle) ** 2).sum(axis=1))]
        anchors.append((label, int(col), int(row)))
    return anchors


def _box_text(draw: ImageDraw.ImageDraw, text: str, centre: tuple[int, int], font: ImageFont.ImageFont,
              taken: list[tuple[int, int, int, int]], bounds: tuple[int, int]) -> None:  # fmt: skip
    """Write text on a white box centred at `centre`, kept inside the picture; skipped if it would hide an
    earlier (bigger) label."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h, pad = right - left, bottom - top, 4
    x = min(max(centre[0] - w // 2, pad), bounds[0] - w - pad)
    y = min(max(centre[1] - h // 2, pad), bounds[1] - h - pad)
    box = (x - pad, y - pad, x + w + pad, y + h + pad)
    if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
        return
    taken.append(box)
    draw.rounded_rectangle(box, radius=4, fill=(255, 255, 255), outline=(40, 40, 40), width=1)
    draw.text((x - left, y - top), text, fill=(0, 0, 0), font=font)


def thumbnails(rows: Sequence[object], thumb: int) -> list[Image.Image]:
    """Each row's image shrunk to fit a cell (a 1 px gutter on each side keeps neighbours apart)."""
    return [thumbnail(_path_of(row), max(1, thumb - 2)) for row in rows]


def draw_map(rows: Sequence[object], cells: np.ndarray, out: str | os.PathLike, thumb: int = 64,
             title: str = "", tiles: Sequence[Image.Image] | None = None) -> Path:  # fmt: skip
    """A PNG: each row's thumbnail fitted inside its (column, row) cell, folder labels over their region.

    rows are catalogue rows (with .path and .label) or paths, in the order of cells (from snap_to_grid);
    tiles: their thumbnails when already made (see thumbnails()).
    """
    cells = np.asarray(cells, dtype=np.int64)
    if len(rows) != len(cells):
        raise RisError(f"{len(rows)} images but {len(cells)} cells")
    if thumb < 8:
        raise RisError("thumbnails must be at least 8 px")
    cols, nrows = int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1
    top = TITLE if title else MARGIN
    width, height = cols * thumb + 2 * MARGIN, nrows * thumb + top + MARGIN
    image = Image.new("RGB", (width, height), (255, 255, 255))
    for tile, (col, r) in zip(tiles or thumbnails(rows, thumb), cells, strict=True):
        x = MARGIN + int(col) * thumb + (thumb - tile.width) // 2
        y = top + int(r) * thumb + (thumb - tile.height) // 2
        image.paste(tile, (x, y))
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((MARGIN, (TITLE - 18) // 2), title, fill=(0, 0, 0), font=_font(18))
    font = _font(max(12, min(28, thumb // 3)))
    taken: list[tuple[int, int, int, int]] = []
    for label, col, r in label_anchors([_label_of(row) for row in rows], cells):
        centre = (MARGIN + col * thumb + thumb // 2, top + r * thumb + thumb // 2)
        _box_text(draw, label, centre, font, taken, (width, height))
    return _save(Path(out), lambda fh: image.save(fh, "PNG"))


def _save(path: Path, write) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            write(fh)
    except OSError as exc:
        raise RisError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _data_uri(tile: Image.Image) -> str:
    buf = io.BytesIO()
    tile.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


HTML_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; }}
#map {{ display: grid; grid-template-columns: repeat({cols}, {thumb}px); grid-auto-rows: {thumb}px;
        position: relative; width: max-content; }}
#map img {{ width: {inner}px; height: {inner}px; object-fit: contain; margin: 1px; transition: opacity .15s; }}
#map.focus img {{ opacity: .15; }} #map.focus img.on {{ opacity: 1; outline: 2px solid #1a66d9; }}
.label {{ position: absolute; transform: translate(-50%, -50%); background: #fff; border: 1px solid #333;
          border-radius: 4px; padding: 1px 6px; font-size: {font}px; white-space: nowrap; cursor: default; }}
#tip {{ position: fixed; bottom: 8px; left: 8px; background: #222; color: #fff; padding: 4px 8px;
        border-radius: 4px; font-size: 13px; display: none; max-width: 90vw; overflow-wrap: anywhere; }}
</style></head><body>
<h1 style="font-size:18px">{title}</h1>
<div id="map">
{tiles}
{labels}
</div>
<div id="tip"></div>
<script>
const map = document.getElementById("map"), tip = document.getElementById("tip");
map.addEventListener("mouseover", (e) => {{
  const t = e.target;
  if (t.tagName === "IMG") {{ tip.textContent = t.dataset.label + "  " + t.title; tip.style.display = "block"; }}
  if (t.classList.contains("label")) {{
    map.classList.add("focus");
    map.querySelectorAll("img").forEach((i) => i.classList.toggle("on", i.dataset.label === t.dataset.label));
  }}
}});
map.addEventListener("mouseout", (e) => {{
  if (e.target.classList.contains("label")) map.classList.remove("focus");
  tip.style.display = "none";
}});
</script></body></html>
"""


def map_html(rows: Sequence[object], cells: np.ndarray, out: str | os.PathLike, thumb: int = 64, title: str = "",
             tiles: Sequence[Image.Image] | None = None) -> Path:  # fmt: skip
    """The same map as a self-contained HTML page: inline thumbnails placed on a CSS grid, folder labels
    over their region; hovering an image shows its path, hovering a label highlights its images."""
    cells = np.asarray(cells, dtype=np.int64)
    if len(rows) != len(cells):
        raise RisError(f"{len(rows)} images but {len(cells)} cells")
    cols = int(cells[:, 0].max()) + 1
    images = []
    for row, tile, (col, r) in zip(rows, tiles or thumbnails(rows, thumb), cells, strict=True):
        path = _path_of(row)
        images.append(f'<img style="grid-column:{col + 1};grid-row:{r + 1}" src="{_data_uri(tile)}" '
                     f'title="{html.escape(path)}" data-label="{html.escape(_label_of(row) or "")}" alt="">')  # fmt: skip
    labels = [
        f'<span class="label" style="left:{col * thumb + thumb // 2}px;top:{r * thumb + thumb // 2}px" '
        f'data-label="{html.escape(label)}">{html.escape(label)}</span>'
        for label, col, r in label_anchors([_label_of(row) for row in rows], cells)
    ]
    page = HTML_PAGE.format(title=html.escape(title or "ris map"), cols=cols, thumb=thumb, inner=max(1, thumb - 2),
                            font=max(11, min(20, thumb // 4)), tiles="\n".join(images), labels="\n".join(labels))  # fmt: skip
    return _save(Path(out), lambda fh: fh.write(page.encode("utf-8")))


def sample_indices(n: int, limit: int, seed: int = SAMPLE_SEED) -> np.ndarray:
    """All of range(n), or `limit` of them drawn with a fixed seed (the same map on every run)."""
    if n <= limit:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))


def default_thumb(n: int) -> int:
    """Thumbnail size so that the map stays printable: ~2,000-3,000 px wide whatever the count."""
    return int(min(128, max(40, 2400 // max(1, grid_shape(n)[0]))))


def make_map(collection: str | os.PathLike, out_file: str | os.PathLike, method: str = "tsne",
             limit: int = 2000, html_out: str | os.PathLike | None = None,
             thumb: int | None = None) -> tuple[list[Path], int, int]:  # fmt: skip
    """`ris map`: the collection (at most `limit` images) as a PNG grid of thumbnails (and an HTML page).

    Returns (files written, images drawn, images in the collection)."""
    from ..collection import Collection

    if method not in METHODS:
        raise RisError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if limit < MIN_IMAGES:
        raise RisError(f"--limit must be at least {MIN_IMAGES}")
    if thumb is not None and thumb < 8:
        raise RisError("--thumb must be at least 8 px")
    # the layout's libraries are checked before the collection is read
    if method == "tsne":
        extras.require("sklearn.manifold", "ris map's t-SNE layout", "map")
    extras.require("scipy.optimize", "ris map's grid layout", "map")
    with Collection.open(collection) as coll:
        rows, vectors = coll.vectors()
    if len(rows) < MIN_IMAGES:
        raise RisError(f"a map needs at least {MIN_IMAGES} images; {collection} has {len(rows)}")
    pick = sample_indices(len(rows), limit)
    picked = [rows[i] for i in pick]
    cells = snap_to_grid(layout(vectors[pick], method), *grid_shape(len(pick)))
    size = thumb or default_thumb(len(pick))
    title = f"{Path(collection).name}: {len(pick)} of {len(rows)} images, {method.replace('tsne', 't-SNE')} on a grid"
    tiles = thumbnails(picked, size)
    written = [draw_map(picked, cells, out_file, thumb=size, title=title, tiles=tiles)]
    if html_out is not None:
        written.append(map_html(picked, cells, html_out, thumb=size, title=title, tiles=tiles))
    return written, len(pick), len(rows)
