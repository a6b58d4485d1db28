"""A second look for copies that the first search did not confirm: the query rotated back and cut into regions.

A copy rotated by tens of degrees, or pasted small onto another picture (picture-in-picture, a screenshot of a
post, a collage), has a global descriptor far from its original's, which is then rarely among the nearest
images, where verification (ris.search.verify) could confirm it; so has a photo on its side or upside down (its
EXIF orientation lost). So when verification confirms none of a query's nearest, the query gets a second look: its
VIEWS (quarter turns; rotated back by a few angles and cropped to the valid area; windows on a grid) go through the
model in one batch, each indexed image scores its best cosine over the views, and the CANDIDATES best by that score
are verified with the query's keypoints, with the quarter turns' nearest images where they are nearer a turned
query than any image is to the query as it stands (ris.search.ranking.Ranker._turned); the best confirmed one goes
first.

A picture pasted onto another is found by its sharpness and its border (`pasted`): the background of a
picture-in-picture copy was enlarged (a photo blown up to frame a picture 25-50% of its side) or is flat shapes,
and a screenshot is flat around its picture, while the pasted picture keeps its detail and ends in straight
edges. The region of most Laplacian energy (its sides moved onto the nearest straight edges) and the rectangles
of strongest border are cropped, as is a picture turned with black corners (`straightened`); the indexed image
whose signature matches a crop (ris.search.copies) is verified with the crop's keypoints
(ris.search.ranking), and the first crops are views too (Caltech-101 harsh set, seed 0: the detailed crop alone
found 0.82 of pasted pictures' originals first, the query 0.38).
A query whose first result is confirmed (an exact or mildly edited copy) costs nothing more. Where the keypoint
votes (ris.search.votes) hold every indexed image, they find what the rotated views and windows found, and only
the crops are views. Measured in benchmarks/RESULTS.md (section 6, "Copies").
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

from ..images.edits import valid_box

#: Angles (degrees) the query is rotated back by; windows (left, top, side) as fractions of the query's sides.
ANGLES = (-22.0, 22.0)
#: The query a quarter, a half and three quarters turned: a photo whose EXIF orientation was lost (a messaging app's
#: copy, an export, a scan) stands on its side or upside down, its CNN vector far from its original's.
QUARTER_TURNS = (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
WINDOWS = ((0.0, 0.0, 0.5), (0.5, 0.0, 0.5), (0.0, 0.5, 0.5), (0.5, 0.5, 0.5), (0.25, 0.25, 0.5))
#: Candidates per view read from the store, and images verified after the views' ranking (after a crop look's).
PER_VIEW = 16
CANDIDATES = 8
#: Each quarter turn's nearest images that may be verified besides (ris.search.ranking.Ranker._turned).
TURNED_NEAREST = 2
CROP_CANDIDATES = 2

Embed = Callable[[Sequence[Image.Image]], np.ndarray]


def window(img: Image.Image, x: float, y: float, side: float) -> Image.Image:
    w, h = img.size
    box = (round(x * w), round(y * h), max(round(x * w) + 1, round((x + side) * w)),
           max(round(y * h) + 1, round((y + side) * h)))  # fmt: skip
    return img.crop(box)


#: A straight line crosses a query whole where a step in grey level runs along this share of a column or row, within
#: SPLIT_BAND of its side; the pieces between such lines shaped like a picture (sides at most TILE_ASPECT to 1) and with
#: some detail (TILE_STD, grey levels) are its tiles, up to MAX_TILES. Joined set, seed 1 (60 copies an edit): split in
#: two or more tiles 92% of pictures side by side with a gap, 93% stacked, 70% joined without a gap, 98% of triptychs;
#: indexed images 9 of 305, photos that are copies of nothing 18 of 832 (Caltech-sized and at 1,000 px). A tile is only
#: searched where the first result is not confirmed, or leaves that tile unexplained. A strip is no picture: an
#: airliner's runway edge split its photo in two strips, and the upper one's nearest image was confirmed by 23 chance
#: matches.
DIVIDER = 0.75
SPLIT_BAND = (0.15, 0.85)
TILE_ASPECT = 3.0
TILE_STD = 8.0
MAX_TILES = 4
#: The second look verifies each tile's nearest this many images besides its CANDIDATES (among them, they took the
#: place of a news card's original: fresh set, seed 2).
TILE_NEAREST = 2
#: Crops of a pasted picture that are also views (each one more image through the model); where the keypoint votes
#: hold every image (ris.search.votes), the first alone: the second found no more pip copies over harsh seeds 0-5
#: (one screenshot of 420 held-out copies) and cost ~2.5 ms.
CROP_VIEWS = 2
VOTED_CROP_VIEWS = 1
#: The most views one query gets but for its tiles: a server runs its model once on each batch size up to this at
#: start (OpenVINO prepares each new batch shape on its first call: ~35 ms, then 13 ms for 9 views). Each shape holds
#: ~15 MB: a query split in tiles before the keypoint votes exist (2% of photos that are copies of nothing) prepares its
#: shape when it comes, rather than every server holding 4 more (+63 MB, Intel Xeon, 2026-12-08).
MAX_VIEWS = len(QUARTER_TURNS) + len(ANGLES) + len(WINDOWS) + CROP_VIEWS


def views(img: Image.Image, crops: Sequence[Image.Image] = (), own: list[Image.Image] | None = None,
          tiles: Sequence[Image.Image] = ()) -> list[Image.Image]:  # fmt: skip
    """The second look's views of one query (not the query itself, which the first search used), the first
    CROP_VIEWS crops of its pasted picture when it has one and its tiles (`pasted`); own: its `own_views`, when made
    already."""
    return (own if own is not None else own_views(img)) + list(crops[:CROP_VIEWS]) + list(tiles)  # `tiles`: MAX_TILES at most


def own_views(img: Image.Image) -> list[Image.Image]:
    """The views made from the query alone: quarter turns, rotated back, windows (a served query makes them beside its
    keypoints, ~1 ms, before it is known whether it needs them)."""
    return [img.transpose(t) for t in QUARTER_TURNS] + [turned(img, a) for a in ANGLES] + [window(img, *box) for box in WINDOWS]


def turned(img: Image.Image, angle: float) -> Image.Image:
    """The image turned by `angle` degrees and cut to edits.valid_box, as edits.rotated (whose copies stay as they were)
    but with OpenCV's bilinear warp of the box alone: within one grey level of it at a sixth of the time (two views
    of a 480 x 284 query: 9.2 -> 1.5 ms, AMD EPYC)."""
    pixels = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
    h, w = pixels.shape[:2]
    x0, y0, x1, y1 = valid_box(w, h, angle)
    turn = cv2.getRotationMatrix2D((w / 2 - 0.5, h / 2 - 0.5), angle, 1.0)  # PIL turns about the frame's centre
    turn[:, 2] -= (x0, y0)  # straight into the box
    return Image.fromarray(cv2.warpAffine(pixels, turn, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR))


#: The detail map's window (a fraction of the longest side), how far a side may move onto a straight edge (a
#: fraction of the box), and the share of the picture a pasted one may cover.
DETAIL_WINDOW = 1 / 32
SNAP_BAND = 0.25
PASTED_AREA = (0.02, 0.8)
PASTED_SIDE = 1280
DETAIL_SIDE = 720


class Pasted(NamedTuple):
    """A query's crops where a picture may be pasted (`pasted`), the boxes of those cut from it as they stand (not the
    straightened ones) and of its tiles, as fractions of its sides: (left, top, right, bottom); and the query's tiles
    where straight lines cross it whole (`tiles`: pictures joined side by side or one above the other)."""

    crops: list[Image.Image]
    boxes: list[tuple[float, float, float, float]]
    tiles: list[Image.Image]


def pasted(img: Image.Image) -> Pasted:
    """Crops of a picture turned with black corners (`straightened`) and of where one may have been pasted onto
    this one (`boxes`), found at up to PASTED_SIDE pixels, the detail map at up to DETAIL_SIDE (pip copies' pasted
    picture covered by a crop at IoU > 0.85, Caltech-101 harsh set, seeds 0-2: 0.61 of them at 480 px, 0.69 at 720,
    0.78 at full size; found first, seeds 0-2: 0.783, 0.750, 0.750 at 720 px, 0.833, 0.783, 0.800 now, in ~10 ms
    a 1,128 x 953 query instead of ~14)."""
    from .verify import working_size

    img = working_size(img, PASTED_SIDE)
    grey = np.asarray(img.convert("L"), np.float32)
    if min(grey.shape) < 32:
        return Pasted([], [], [])
    steps = steps_of(grey)
    lines = lines_of(steps)
    found, cut = boxes(grey, steps, lines), tiles(grey, lines)
    w, h = img.size
    return Pasted(straightened(img) + [img.crop(box) for box in found],
                  [(x0 / w, y0 / h, x1 / w, y1 / h) for x0, y0, x1, y1 in found + cut],
                  [img.crop(box) for box in cut])  # fmt: skip


def steps_of(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The grey image's steps in grey level across its columns and across its rows."""
    return np.abs(np.diff(grey, axis=1)), np.abs(np.diff(grey, axis=0))


class Lines(NamedTuple):
    """The EDGES columns and rows of an image with the most strong steps in grey level along them (`lines_of`): their
    places (a step between pixel i and i + 1 at i), and the share of strong steps (`_strong`) of every column and row."""

    xs: np.ndarray
    ys: np.ndarray
    across: np.ndarray
    down: np.ndarray


def lines_of(steps: tuple[np.ndarray, np.ndarray]) -> Lines:
    """The image's straight lines, found once for its pasted pictures' borders and its tiles' dividers."""
    strong, (h, w) = _strong(steps), (steps[0].shape[0], steps[1].shape[1])
    across, down = (steps[0] > strong).mean(axis=0), (steps[1] > strong).mean(axis=1)
    return Lines(_peaks(across, max(2, w // 60)), _peaks(down, max(2, h // 60)), across, down)


def boxes(grey: np.ndarray, steps: tuple[np.ndarray, np.ndarray] | None = None,
          lines: Lines | None = None) -> list[tuple[int, int, int, int]]:  # fmt: skip
    """Where a picture may be pasted in this grey image: the most detailed region snapped to straight edges, then
    the RECTANGLES of strongest border; none that covers nearly all of it or little of it (PASTED_AREA)."""
    steps = steps if steps is not None else steps_of(grey)
    found = [_detailed(grey, steps), *_bordered(steps, lines if lines is not None else lines_of(steps))]
    return list(dict.fromkeys(box for box in found if box is not None and _fits(box, grey.shape)))


def tiles(grey: np.ndarray, lines: Lines) -> list[tuple[int, int, int, int]]:
    """The boxes of the pictures a query joins (side by side, one above the other, a grid), split where straight
    lines cross it whole (DIVIDER); none when no line does."""
    h, w = grey.shape
    xs, ys = _dividers(lines.xs, lines.across, w), _dividers(lines.ys, lines.down, h)
    if not xs and not ys:
        return []
    cx, cy = [0, *xs, w], [0, *ys, h]
    found = [(x0, y0, x1, y1) for y0, y1 in itertools.pairwise(cy) for x0, x1 in itertools.pairwise(cx)]
    return [box for box in found if _fits(box, grey.shape) and _picture_like(grey, box)][:MAX_TILES]


def _picture_like(grey: np.ndarray, box: tuple[int, int, int, int]) -> bool:
    """Whether a piece of the query may be a picture of its own: not a strip, not a flat gap or bar."""
    x0, y0, x1, y1 = box
    return max(x1 - x0, y1 - y0) <= TILE_ASPECT * min(x1 - x0, y1 - y0) and grey[y0:y1, x0:x1].std() >= TILE_STD


def _dividers(places: np.ndarray, profile: np.ndarray, n: int) -> list[int]:
    """Edge positions (between pixel i and i + 1: i + 1) of the lines at `places` that cross the query whole (a
    share of strong steps along them of DIVIDER or more: `profile`), within SPLIT_BAND of its side (n pixels)."""
    lo, hi = SPLIT_BAND[0] * n, SPLIT_BAND[1] * n
    return sorted(int(i) + 1 for i in places if lo <= i < hi and profile[i] >= DIVIDER)


def _strong(steps: tuple[np.ndarray, np.ndarray]) -> float:
    """The grey-level step that counts as an edge: the 90th percentile of those across columns (a sample: the whole
    took 1.4 ms), at least 8."""
    return max(8.0, float(np.percentile(steps[0][::4, ::4], 90)))


#: Grey level under which a pixel is the black fill around a turned picture, and the share of the frame the picture
#: covers between which it is looked for.
BLACK = 16
TURNED_SHARE = (0.2, 0.97)


def straightened(img: Image.Image) -> list[Image.Image]:
    """A picture turned by some angle with its corners filled black, turned back and cut out (both ways its
    rectangle can be read: its long side up or across); none when there are no black corners or they do not
    frame a rectangle (harsh rotations, seeds 0 and 1: half have black corners, and the crop's signature matches
    the original's at NCC >= 0.9 for about half of those)."""
    pixels = np.asarray(img.convert("RGB"))
    mask = (cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) > BLACK).astype(np.uint8)
    if not TURNED_SHARE[0] <= mask.mean() <= TURNED_SHARE[1]:
        return []
    outline = max(cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[0], key=cv2.contourArea)
    (cx, cy), (w, h), angle = cv2.minAreaRect(outline)
    if min(w, h) < 16 or cv2.contourArea(outline) < 0.9 * w * h:
        return []
    out = []
    for turn, (cw, ch) in ((angle, (w, h)), (angle - 90, (h, w))):
        if min(abs(turn) % 90, 90 - abs(turn) % 90) < 2:  # upright already
            continue
        turned = cv2.warpAffine(pixels, cv2.getRotationMatrix2D((cx, cy), turn, 1.0), (pixels.shape[1], pixels.shape[0]))
        x0, y0 = max(0, round(cx - cw / 2) + 2), max(0, round(cy - ch / 2) + 2)  # 2 px in: the blended edge
        x1, y1 = min(pixels.shape[1], round(cx + cw / 2) - 2), min(pixels.shape[0], round(cy + ch / 2) - 2)
        if x1 - x0 >= 16 and y1 - y0 >= 16:
            out.append(Image.fromarray(turned[y0:y1, x0:x1]))
    return out


def _fits(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> bool:
    x0, y0, x1, y1 = box
    return PASTED_AREA[0] <= (x1 - x0) * (y1 - y0) / (shape[0] * shape[1]) <= PASTED_AREA[1] and min(x1 - x0, y1 - y0) >= 16


def _detailed(grey: np.ndarray, steps: tuple[np.ndarray, np.ndarray]) -> tuple[int, int, int, int] | None:
    """The box of the region of most Laplacian energy (Otsu's threshold of its local mean), snapped to edges; the
    energy is mapped at up to DETAIL_SIDE pixels (the sides then move onto the edges at full size)."""
    f = -(-max(grey.shape) // DETAIL_SIDE)
    if f > 1:
        grey = cv2.resize(grey, (max(1, grey.shape[1] // f), max(1, grey.shape[0] // f)), interpolation=cv2.INTER_AREA)
    energy = cv2.blur(np.abs(cv2.Laplacian(grey, cv2.CV_32F, ksize=3)), (max(3, round(max(grey.shape) * DETAIL_WINDOW)),) * 2)
    if energy.max() <= 0:
        return None
    level = np.clip(energy * (255 / energy.max()), 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(level, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(np.bincount(labels.ravel(), weights=energy.ravel(), minlength=n)[1:]))
    x, y, w, h = (int(v) * f for v in stats[best, :4])
    return _snapped(steps, (x, y, x + w, y + h))


#: Straight edges tried per direction for the rectangles of strongest border; rectangles kept (IoU under 0.7 with
#: each other): with 3, one crop covers the pasted picture (IoU > 0.85) for 0.74-0.81 of pip copies, 0.65-0.78 with 1.
EDGES = 14
RECTANGLES = 3


def _bordered(steps: tuple[np.ndarray, np.ndarray], lines: Lines) -> list[tuple[int, int, int, int]]:
    """The RECTANGLES whose weakest side has the strongest mean step in grey level along it, over the EDGES columns
    and rows holding the most strong steps (a pasted picture's border: a step all along each of its sides)."""
    across_columns, across_rows = steps
    h, w = across_columns.shape[0], across_rows.shape[1]
    xs, ys = np.sort(lines.xs), np.sort(lines.ys)
    if len(xs) < 2 or len(ys) < 2:
        return []
    # down[y, i]: column xs[i]'s sum above row y; along[j, x]: row ys[j]'s sum left of x (only the edges' own lines:
    # the whole image's running sums took ~5 ms at 720 px)
    down = np.vstack([np.zeros((1, len(xs))), np.cumsum(across_columns[:, xs], axis=0)])
    along = np.hstack([np.zeros((len(ys), 1)), np.cumsum(across_rows[ys], axis=1)])
    a, b = np.triu_indices(len(xs), 1)  # every pair of columns (left, right) and of rows (top, bottom)
    c, d = np.triu_indices(len(ys), 1)
    x0, x1, y0, y1 = xs[a][:, None], xs[b][:, None], ys[c][None, :], ys[d][None, :]
    i0, i1, j0, j1 = a[:, None], b[:, None], c[None, :], d[None, :]  # their places in xs and ys
    tall, wide = np.maximum(y1 - y0, 1), np.maximum(x1 - x0, 1)
    sides = np.stack([(down[y1 + 1, i0] - down[y0 + 1, i0]) / tall, (down[y1 + 1, i1] - down[y0 + 1, i1]) / tall,
                      (along[j0, x1 + 1] - along[j0, x0 + 1]) / wide,
                      (along[j1, x1 + 1] - along[j1, x0 + 1]) / wide])  # fmt: skip
    share = (x1 - x0) * (y1 - y0) / (h * w)
    fits = (share >= PASTED_AREA[0]) & (share <= PASTED_AREA[1]) & (wide >= 16) & (tall >= 16)
    score = np.where(fits, sides.min(axis=0), -1).ravel()
    found: list[tuple[int, int, int, int]] = []
    for k in np.argsort(-score, kind="stable"):
        if score[k] < 0 or len(found) == RECTANGLES:
            break
        i, j = np.unravel_index(int(k), (len(a), len(c)))
        box = (int(xs[a[i]]) + 1, int(ys[c[j]]) + 1, int(xs[b[i]]) + 1, int(ys[d[j]]) + 1)
        if all(_overlap(box, other) < 0.7 for other in found):
            found.append(box)
    return found


def _overlap(p: tuple[int, int, int, int], q: tuple[int, int, int, int]) -> float:
    """Intersection over union of two boxes."""
    inter = max(0, min(p[2], q[2]) - max(p[0], q[0])) * max(0, min(p[3], q[3]) - max(p[1], q[1]))
    return inter / ((p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter)


def _peaks(profile: np.ndarray, apart: int) -> np.ndarray:
    """Positions of the EDGES highest values of profile at least `apart` from each other."""
    p, out = profile.astype(np.float64).copy(), []
    for _ in range(EDGES):
        i = int(np.argmax(p))
        if p[i] <= 0:
            break
        out.append(i)
        p[max(0, i - apart) : i + apart + 1] = 0
    return np.array(out, np.int64)


def _snapped(steps: tuple[np.ndarray, np.ndarray], box: tuple[int, int, int, int], rounds: int = 2) -> tuple[int, int, int, int]:
    """The box with each side moved to the strongest straight edge within SNAP_BAND of it (the pasted picture's
    border: a step in grey level all along the side), twice."""
    across_columns, across_rows = steps
    x0, y0, x1, y1 = box
    for _ in range(rounds):
        w, h = x1 - x0, y1 - y0
        inner_rows = slice(y0 + h // 8, max(y0 + h // 8 + 1, y1 - h // 8))  # the sides' middle: corners may be off
        inner_cols = slice(x0 + w // 8, max(x0 + w // 8 + 1, x1 - w // 8))
        cols, rows = across_columns[inner_rows].mean(axis=0), across_rows[:, inner_cols].mean(axis=1)
        dx, dy = max(2, int(w * SNAP_BAND)), max(2, int(h * SNAP_BAND))
        x0, x1 = (_strongest(cols, x0 - dx, x0 + dx, x0), _strongest(cols, x1 - dx, x1 + dx, x1))
        y0, y1 = (_strongest(rows, y0 - dy, y0 + dy, y0), _strongest(rows, y1 - dy, y1 + dy, y1))
        if x1 - x0 < 8 or y1 - y0 < 8:
            return box
    return x0, y0, x1, y1


def _strongest(profile: np.ndarray, lo: int, hi: int, keep: int) -> int:
    """The edge position (between pixel i and i + 1: i + 1) of the profile's peak within [lo, hi), or keep."""
    lo, hi = max(0, lo), min(len(profile), hi)
    return lo + int(np.argmax(profile[lo:hi])) + 1 if hi > lo else keep


def best_per_image(view_vectors: np.ndarray, ids: np.ndarray, plain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, best cosine over the views) of the candidate ids, best first; plain: their plain vectors (ids' order);
    the query's own vector is one of the views (its nearest past the first 5 get verified too)."""
    scores = (plain @ view_vectors.T).max(axis=1)
    order = np.argsort(-scores, kind="stable")
    return ids[order], scores[order]
