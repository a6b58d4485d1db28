"""Precision/recall of `ris dupes` on real Caltech-101 images with generated copies, per threshold.

Originals drawn at random (--seed) from every class, round-robin (about 5 a class: different photos of the
same kind of object), plus one copy each of some of them, ten kinds: resized to 50%, JPEG quality 30,
centre-cropped to 80%, exact byte copies, rotated by 20-30 degrees and rescaled by 0.6-1.4, blurred,
brightness/contrast changed, a border with a caption, padded onto a screen-like canvas, grey + contrast
(--hard adds social-media screenshots). They are indexed into a fresh collection; a predicted pair (two
images in one group) is correct when both derive from the same original. Each threshold is run with and
without geometric verification; "below" counts group members under the threshold against their
representative that keypoints did not confirm (must be 0).

The ground truth is decided apart from ris: Caltech holds some pictures twice (edited, re-cropped, the same
scene shot twice: same_picture, a pixel test), and of such a pair only the first drawn is used; the rest
are listed in the output.

    python benchmarks/quality/dupes_precision.py [--originals 500] [--copies-per-kind 20] [--seed 0] [--workdir DIR]

tests/test_dupes.py reuses `make_dataset` and `pair_scores` on a smaller set.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from ris.images import edits
from ris.tools.bench import machine

CALTECH = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
# Faces/Faces_easy hold the same photos cropped differently; BACKGROUND_Google is not one class.
EXCLUDED = {"BACKGROUND_Google", "Faces_easy"}
THRESHOLDS = (0.85, 0.88, 0.92)


def _resize(src: Path, dst: Path, rng: np.random.Generator) -> None:
    img = Image.open(src).convert("RGB")
    img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BILINEAR).save(dst, "JPEG", quality=90)


def _jpeg30(src: Path, dst: Path, rng: np.random.Generator) -> None:
    Image.open(src).convert("RGB").save(dst, "JPEG", quality=30)


def _crop80(src: Path, dst: Path, rng: np.random.Generator) -> None:
    img = Image.open(src).convert("RGB")
    dx, dy = img.width // 10, img.height // 10
    img.crop((dx, dy, img.width - dx, img.height - dy)).save(dst, "JPEG", quality=90)


def _exact(src: Path, dst: Path, rng: np.random.Generator) -> None:
    shutil.copyfile(src, dst)


def _rotscale(src: Path, dst: Path, rng: np.random.Generator) -> None:
    """Rotated by 20-30 degrees either way (corners black, or cropped away) and rescaled by 0.6-1.4."""
    img = Image.open(src).convert("RGB")
    angle = float(rng.uniform(20, 30) * rng.choice([-1, 1]))
    edits._scale(edits._rotate(img, angle, crop=rng.random() < 0.5), rng.uniform(0.6, 1.4)).save(dst, "JPEG", quality=90)


def _blur(src: Path, dst: Path, rng: np.random.Generator) -> None:
    """Gaussian blur of 1-2.5 px (a soft re-upload), JPEG quality 80."""
    img = Image.open(src).convert("RGB")
    edits.jpeg(img.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5))), 80).save(dst, "JPEG", quality=95)


def _bright(src: Path, dst: Path, rng: np.random.Generator) -> None:
    """Brightness x0.6-0.8 or x1.25-1.5 and contrast x0.8-1.2."""
    img = Image.open(src).convert("RGB")
    factor = rng.uniform(0.6, 0.8) if rng.random() < 0.5 else rng.uniform(1.25, 1.5)
    img = ImageEnhance.Contrast(ImageEnhance.Brightness(img).enhance(factor)).enhance(rng.uniform(0.8, 1.2))
    img.save(dst, "JPEG", quality=90)


WORDS = ("reposted", "@someone", "look", "wow", "credit", "via", "found this", "2019", "lol", "share", "original",
         "photo", "by", "#nature", "today")  # fmt: skip


def _border(src: Path, dst: Path, rng: np.random.Generator) -> None:
    """A 5-15% border of a random colour and a caption of random words on the picture, JPEG quality 80."""
    img = Image.open(src).convert("RGB")
    fill = tuple(int(c) for c in rng.integers(0, 256, 3))
    img = ImageOps.expand(img, border=round(max(img.size) * rng.uniform(0.05, 0.15)), fill=fill)
    text = " ".join(str(w) for w in rng.choice(WORDS, int(rng.integers(2, 5))))
    edits.jpeg(edits._caption(img, rng, text), 80).save(dst, "JPEG", quality=95)


def _pad(src: Path, dst: Path, rng: np.random.Generator) -> None:
    """A screenshot of the picture: on a plain canvas (white, black or grey) that it fills 55-85% of the
    width of, taller than wide like a phone's screen, JPEG quality 70-90."""
    img = Image.open(src).convert("RGB")
    w = round(img.width / rng.uniform(0.55, 0.85))
    h = max(round(w * rng.uniform(1.3, 2.0)), img.height + 20)
    canvas = Image.new("RGB", (w, h), tuple([int(rng.choice([0, 40, 128, 250]))] * 3))
    canvas.paste(img, ((w - img.width) // 2, int(rng.integers(10, h - img.height - 9))))
    edits.jpeg(canvas, rng.integers(70, 91)).save(dst, "JPEG", quality=95)


def _edit(kind: str) -> Callable[[Path, Path, np.random.Generator], None]:
    """One of ris.edits' kinds (grey + contrast; a social-media post's screenshot, --hard)."""

    def write(src: Path, dst: Path, rng: np.random.Generator) -> None:
        edits.edit(kind, Image.open(src), rng, lambda: Image.new("RGB", (64, 64))).save(dst, "JPEG", quality=95)

    return write


COPY_KINDS: dict[str, Callable[[Path, Path, np.random.Generator], None]] = {
    "resize50": _resize, "jpeg30": _jpeg30, "crop80": _crop80, "exact": _exact, "rotscale": _rotscale,
    "blur": _blur, "bright": _bright, "border": _border, "pad": _pad, "grey": _edit("grey_contrast"),
}  # fmt: skip
#: --hard adds: the picture at 40-70% of the width in a mock social-media post, whose header, avatar, text
#: lines and buttons are the same in every such copy (their keypoints agree across different pictures).
HARD_KINDS = {"screenshot": _edit("screenshot")}

#: same_picture: grey thumbnails of this side, shifted up to SHIFT px either way; a correlation at or above
#: SAME_CORR (and aspect ratios within SAME_ASPECT of each other) means one picture, or an edit of it.
THUMB, SHIFT, SAME_CORR, SAME_ASPECT = 64, 2, 0.8, 0.15


def _thumb(path: Path) -> tuple[np.ndarray, float]:
    with Image.open(path) as img:
        img.draft("L", (2 * THUMB, 2 * THUMB))
        grey = img.convert("L")
        return np.asarray(grey.resize((THUMB, THUMB), Image.Resampling.BILINEAR), np.float32), grey.width / grey.height


def same_picture(a: tuple[np.ndarray, float], b: tuple[np.ndarray, float]) -> float:
    """The pixel correlation of two pictures' thumbnails at their best alignment (0 when the aspects differ).

    Decides the ground truth apart from anything ris computes: Caltech holds the same picture more than
    once (octopus 0001-0006: one engraving, its head redrawn; stop signs with other backgrounds or
    captions; yin-yang clip-art), and such a pair is no error of a duplicate finder."""
    (x, ra), (y, rb) = a, b
    if abs(np.log(ra / rb)) > SAME_ASPECT:
        return 0.0
    best, n = 0.0, THUMB
    for dx, dy in itertools.product(range(-SHIFT, SHIFT + 1), repeat=2):
        u = x[max(0, dy) : n + min(0, dy), max(0, dx) : n + min(0, dx)].ravel()
        v = y[max(0, -dy) : n + min(0, -dy), max(0, -dx) : n + min(0, -dx)].ravel()
        if u.std() > 0 and v.std() > 0:
            best = max(best, float(np.corrcoef(u, v)[0, 1]))
    return best


def pick_originals(n: int, root: Path = CALTECH, seed: int = 0, dropped: list | None = None,
                   classes: int | None = None) -> list[Path]:  # fmt: skip
    """n Caltech images spread round-robin over the classes (the first `classes` of them by name, when
    given), each class's photos in a seeded random order; a photo that is the same picture as one already
    picked from its class (same_picture) is left out, and (it, the one kept, correlation) appended to dropped."""
    rng = np.random.default_rng(seed)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and d.name not in EXCLUDED)[:classes]
    per_class = [iter(rng.permutation(sorted(c.glob("*.jpg")))) for c in classes]
    kept: dict[int, list[tuple[Path, tuple[np.ndarray, float]]]] = {i: [] for i in range(len(classes))}
    picked: list[Path] = []
    while len(picked) < n and any(per_class):
        for i, photos in enumerate(per_class):
            for path in photos or ():
                thumb = _thumb(Path(path))
                same = [(p, c) for p, t in kept[i] if (c := same_picture(thumb, t)) >= SAME_CORR]
                if same:
                    if dropped is not None:
                        dropped.append((Path(path), *same[0]))
                    continue
                kept[i].append((Path(path), thumb))
                picked.append(Path(path))
                break
            else:
                per_class[i] = None
            if len(picked) >= n:
                break
    return picked


def make_dataset(dst: Path, n_originals: int, copies_per_kind: int, seed: int = 0,
                 dropped: list | None = None, classes: int | None = None) -> dict[str, str]:  # fmt: skip
    """Copy originals into dst/<class>/ and write copies of distinct originals into dst/copies/.

    Returns {written path: path of its original} for every file (an original maps to itself). The copies'
    originals and edits are drawn from the seed too.
    """
    originals = pick_originals(n_originals, seed=seed, dropped=dropped, classes=classes)
    origin: dict[str, str] = {}
    for src in originals:
        target = dst / src.parent.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        origin[str(target.absolute())] = str(target.absolute())
    copies_dir = dst / "copies"
    copies_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    count = min(len(origin), copies_per_kind * len(COPY_KINDS))
    sources = [list(origin)[i] for i in sorted(rng.choice(len(origin), count, replace=False))]  # one copy each
    for n, (kind, src) in enumerate(zip(itertools.cycle(COPY_KINDS), rng.permutation(sources), strict=False)):
        copy = copies_dir / f"{n:04d}_{kind}_{Path(src).parent.name}_{Path(src).name}"
        COPY_KINDS[kind](Path(src), copy, edits.rng_for(seed, kind, n))
        origin[str(copy.absolute())] = str(src)
    return origin


def true_pairs(origin: dict[str, str]) -> set[frozenset[str]]:
    by_original: dict[str, list[str]] = {}
    for path, orig in origin.items():
        by_original.setdefault(orig, []).append(path)
    return {frozenset(p) for paths in by_original.values() for p in itertools.combinations(paths, 2)}


def predicted_pairs(groups: Iterable) -> set[frozenset[str]]:
    return {frozenset((a.path, b.path)) for g in groups for a, b in itertools.combinations(g.images, 2)}


def pair_scores(groups: Iterable, origin: dict[str, str], only_copies: bool = False) -> tuple[float, float, int, int]:
    """(precision, recall, predicted pairs, true pairs) of the groups' pairs against the known origins.

    only_copies=True leaves out pairs of two originals: Caltech itself holds a few near-identical
    photos (clip-art classes such as stop_sign, yin_yang), which are real duplicates, not errors.
    """
    predicted, truth = predicted_pairs(groups), true_pairs(origin)
    if only_copies:
        predicted = {p for p in predicted if any(origin[x] != x for x in p)}
    hits = len(predicted & truth)
    precision = hits / len(predicted) if predicted else 1.0
    recall = hits / len(truth) if truth else 1.0
    return precision, recall, len(predicted), len(truth)


def _similarity_by_kind(coll, origin: dict[str, str]) -> None:
    """How close each kind of copy stays to its original, and how close the closest unrelated pair gets."""
    import numpy as np

    rows, vectors = coll.vectors()
    pos = {r.path: i for i, r in enumerate(rows)}
    parts = []
    for kind in COPY_KINDS:
        sims = [float(vectors[pos[p]] @ vectors[pos[o]]) for p, o in origin.items() if p != o and f"_{kind}_" in p]
        if sims:
            parts.append(f"{kind} min {min(sims):.3f} median {float(np.median(sims)):.3f}")
    sims = vectors @ vectors.T
    related = np.array([[origin[a.path] == origin[b.path] for b in rows] for a in rows])
    sims[related] = -1
    print("# copy vs original: " + "; ".join(parts) + f"; closest unrelated pair {sims.max():.3f}")


def kind_recall(groups: Iterable, origin: dict[str, str], kind: str) -> float:
    """Share of the copies of one kind found in a group with their original."""
    copies = {p: o for p, o in origin.items() if p != o and f"_{kind}_" in Path(p).name}
    predicted = predicted_pairs(groups)
    return sum(frozenset((p, o)) in predicted for p, o in copies.items()) / len(copies) if copies else 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--originals", type=int, default=500)
    parser.add_argument("--copies-per-kind", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="draws the originals, the copied ones and the edits "
                        "(the rule was tuned on seed 0; report on another)")  # fmt: skip
    parser.add_argument("--hard", action="store_true", help="add the kinds of HARD_KINDS (social-media screenshots)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the images and collection here "
                        "(reused when it holds them: the same set for another version of ris)")  # fmt: skip
    parser.add_argument("--pooling", default=None, help="the collection's pooling (default: the model's default)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=THRESHOLDS)
    args = parser.parse_args(argv)

    from ris.collection import Collection
    from ris.tools.dupes import DUPE_INLIERS, find_duplicates  # a member under the threshold needs these matches

    if args.hard:
        COPY_KINDS.update(HARD_KINDS)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ris-dupes-"))
    saved = work / "origin.json"
    dropped: list = []
    if saved.exists():
        origin = json.loads(saved.read_text())
    else:
        origin = make_dataset(work / "images", args.originals, args.copies_per_kind, args.seed, dropped)
        saved.write_text(json.dumps(origin))
    start = time.perf_counter()
    with Collection.open_or_create(work / "c.ris", pooling=args.pooling) as coll:
        coll.index([work / "images"])
        index_s = time.perf_counter() - start
        info = coll.info()
        n_orig = sum(p == o for p, o in origin.items())
        print(f"# ris dupes precision/recall — {machine()['cpu']}, {os.cpu_count()} cores, seed {args.seed}")
        print(f"# {n_orig} originals + {len(origin) - n_orig} copies ({', '.join(COPY_KINDS)}), {info['images']} images, "
              f"dims {info['dims']} (PCA {'on' if info['pca'] else 'off'}), pooling {coll.manifest.pooling}, "
              f"indexed (or resynced) in {index_s:.1f} s")  # fmt: skip
        for path, kept, corr in dropped:
            print(f"# left out as the same picture as {Path(kept).parent.name}/{Path(kept).name} "
                  f"(pixel correlation {corr:.3f}): {Path(path).parent.name}/{Path(path).name}")  # fmt: skip
        kinds = "".join(f" {k[:8]:>8}" for k in COPY_KINDS)
        print(f"{'threshold':>9} {'verify':>6} {'precision':>9} {'copy-prec':>9} {'recall':>6}{kinds} "
              f"{'pairs':>5} {'true':>4} {'groups':>6} {'below':>5} {'seconds':>7}")  # fmt: skip
        for threshold in args.thresholds:
            for verify in (False, True):
                start = time.perf_counter()
                groups = find_duplicates(coll, threshold, verify=verify)
                seconds = time.perf_counter() - start
                precision, recall, npred, ntrue = pair_scores(groups, origin)
                copy_precision = pair_scores(groups, origin, only_copies=True)[0]
                per_kind = "".join(f" {kind_recall(groups, origin, k):8.3f}" for k in COPY_KINDS)
                below = sum(s < threshold - 1e-4 and not (n and n >= DUPE_INLIERS) for g in groups if g.kind == "near"
                            for s, n in zip(g.scores[1:], (g.inliers or [None] * len(g.images))[1:], strict=True))  # fmt: skip
                print(f"{threshold:9.2f} {str(verify):>6} {precision:9.3f} {copy_precision:9.3f} {recall:6.3f}{per_kind} "
                      f"{npred:5d} {ntrue:4d} {len(groups):6d} {below:5d} {seconds:7.3f}", flush=True)  # fmt: skip
        _similarity_by_kind(coll, origin)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
