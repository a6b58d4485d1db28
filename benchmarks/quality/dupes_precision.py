"""Precision/recall of `ris dupes` on real Caltech-101 images with generated copies, per threshold.

Distinct originals from many classes (several per class: different photos of the same kind of object)
plus copies of some of them (resized to 50%, re-encoded as JPEG quality 30, centre-cropped to 80%, exact
byte copies, rotated by 20-30 degrees and rescaled) are indexed into a fresh collection; a predicted pair
(two images in one group) is correct when both derive from the same original. Each threshold is run with
and without geometric verification; "below" counts group members under the threshold against their
representative that verification did not confirm (must be 0).

    python benchmarks/quality/dupes_precision.py [--originals 500] [--copies-per-kind 40]

tests/test_dupes.py reuses `make_dataset` and `pair_scores` on a smaller set.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from PIL import Image

from ris.tools.bench import machine

CALTECH = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "caltech101" / "101_ObjectCategories"
# Faces/Faces_easy hold the same photos cropped differently; BACKGROUND_Google is not one class.
EXCLUDED = {"BACKGROUND_Google", "Faces_easy"}
THRESHOLDS = (0.85, 0.88, 0.92)


def _resize(src: Path, dst: Path) -> None:
    img = Image.open(src).convert("RGB")
    img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BILINEAR).save(dst, "JPEG", quality=90)


def _jpeg30(src: Path, dst: Path) -> None:
    Image.open(src).convert("RGB").save(dst, "JPEG", quality=30)


def _crop80(src: Path, dst: Path) -> None:
    img = Image.open(src).convert("RGB")
    dx, dy = img.width // 10, img.height // 10
    img.crop((dx, dy, img.width - dx, img.height - dy)).save(dst, "JPEG", quality=90)


def _exact(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)


def _rotscale(src: Path, dst: Path) -> None:
    """Rotated by 20-30 degrees either way (corners black, or cropped away) and rescaled by 0.6-1.4."""
    import zlib

    import numpy as np

    from ris.images.edits import _rotate, _scale

    rng = np.random.default_rng(zlib.crc32(src.name.encode()))
    img = Image.open(src).convert("RGB")
    angle = float(rng.uniform(20, 30) * rng.choice([-1, 1]))
    _scale(_rotate(img, angle, crop=rng.random() < 0.5), rng.uniform(0.6, 1.4)).save(dst, "JPEG", quality=90)


COPY_KINDS: dict[str, Callable[[Path, Path], None]] = {"resize50": _resize, "jpeg30": _jpeg30, "crop80": _crop80, "exact": _exact,
                                                       "rotscale": _rotscale}  # fmt: skip


def pick_originals(n: int, root: Path = CALTECH) -> list[Path]:
    """n Caltech images spread round-robin over the classes (so most pairs are of different classes)."""
    classes = sorted(d for d in root.iterdir() if d.is_dir() and d.name not in EXCLUDED)
    per_class = [sorted(c.glob("*.jpg")) for c in classes]
    picked: list[Path] = []
    for column in itertools.zip_longest(*per_class):
        picked.extend(p for p in column if p is not None)
        if len(picked) >= n:
            break
    return picked[:n]


def make_dataset(dst: Path, n_originals: int, copies_per_kind: int) -> dict[str, str]:
    """Copy originals into dst/<class>/ and write copies of distinct originals into dst/copies/.

    Returns {written path: path of its original} for every file (an original maps to itself).
    """
    originals = pick_originals(n_originals)
    origin: dict[str, str] = {}
    for src in originals:
        target = dst / src.parent.name / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        origin[str(target.absolute())] = str(target.absolute())
    copies_dir = dst / "copies"
    copies_dir.mkdir(exist_ok=True)
    sources = list(origin)[:: max(1, len(origin) // (copies_per_kind * len(COPY_KINDS)))]  # spread over classes
    for n, (kind, src) in enumerate(zip(itertools.cycle(COPY_KINDS), sources[: copies_per_kind * len(COPY_KINDS)], strict=False)):
        copy = copies_dir / f"{n:04d}_{kind}_{Path(src).parent.name}_{Path(src).name}"
        COPY_KINDS[kind](Path(src), copy)
        origin[str(copy.absolute())] = src
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
    parser.add_argument("--copies-per-kind", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the images and collection here")
    parser.add_argument("--pooling", default=None, help="the collection's pooling (default: the model's default)")
    args = parser.parse_args(argv)

    from ris.collection import Collection
    from ris.tools.dupes import find_duplicates

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ris-dupes-"))
    origin = make_dataset(work / "images", args.originals, args.copies_per_kind)
    start = time.perf_counter()
    with Collection.open_or_create(work / "c.ris", pooling=args.pooling) as coll:
        report = coll.index([work / "images"])
        index_s = time.perf_counter() - start
        info = coll.info()
        print(f"# ris dupes precision/recall — {machine()['cpu']}, {os.cpu_count()} cores")
        print(f"# {args.originals} originals + {len(origin) - args.originals} copies "
              f"({', '.join(COPY_KINDS)}), {report.images} images, dims {info['dims']} "
              f"(PCA {'on' if info['pca'] else 'off'}), pooling {coll.manifest.pooling}, indexed in {index_s:.1f} s")  # fmt: skip
        kinds = "".join(f" {k:>8}" for k in COPY_KINDS)
        print(f"{'threshold':>9} {'verify':>6} {'precision':>9} {'copy-prec':>9} {'recall':>6}{kinds} "
              f"{'pairs':>5} {'true':>4} {'groups':>6} {'below':>5} {'seconds':>7}")  # fmt: skip
        for threshold in THRESHOLDS:
            for verify in (False, True):
                start = time.perf_counter()
                groups = find_duplicates(coll, threshold, verify=verify)
                seconds = time.perf_counter() - start
                precision, recall, npred, ntrue = pair_scores(groups, origin)
                copy_precision = pair_scores(groups, origin, only_copies=True)[0]
                per_kind = "".join(f" {kind_recall(groups, origin, k):8.3f}" for k in COPY_KINDS)
                below = sum(s < threshold - 1e-4 and not n for g in groups if g.kind == "near"
                            for s, n in zip(g.scores[1:], (g.inliers or [None] * len(g.images))[1:], strict=True))  # fmt: skip
                print(f"{threshold:9.2f} {str(verify):>6} {precision:9.3f} {copy_precision:9.3f} {recall:6.3f}{per_kind} "
                      f"{npred:5d} {ntrue:4d} {len(groups):6d} {below:5d} {seconds:7.3f}", flush=True)  # fmt: skip
        _similarity_by_kind(coll, origin)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
