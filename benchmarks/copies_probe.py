"""Cache what copy-detection experiments need, once: the collection's features and the copies' features.

    python benchmarks/copies_probe.py COLLECTION OUT [--n 300] [--seed 0] [--sets harsh,heldout,mild]

Writes under OUT (keyed by the collection's config): db_raw.npy (float16 raw features, row order of
`Collection.vectors`), db_ids.npy, db_plain.npy (reduced), db_served.npy (what the index holds: with DBA the
augmented vectors), and per copy set and seed: <set>-s<seed>-n<n>/{picked.npy, <edit>.npy (raw float16),
<edit>/<item>.png}. The copies are those `ris eval --copies N --copy-set SET --seed S` searches with.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ris import evaluate
from ris.collection import Collection
from ris.decode import open_image, read_file


def cache_db(coll: Collection, out: Path) -> None:
    if (out / "db_served.npy").exists():
        return
    rows, plain = coll.vectors()
    ids = np.array([r.id for r in rows], np.int64)
    raw = np.concatenate([coll.catalog.features(ids[i : i + 1024], coll.manifest.raw_dims) for i in range(0, len(ids), 1024)])
    _, reducer = coll._searchable()
    served = coll._served(reducer)(ids)
    np.save(out / "db_ids.npy", ids)
    np.save(out / "db_raw.npy", raw.astype(np.float16))
    np.save(out / "db_plain.npy", plain)
    np.save(out / "db_served.npy", served.astype(np.float32))
    (out / "db_paths.txt").write_text("\n".join(f"{r.path}\t{r.label or ''}" for r in rows) + "\n")


def cache_copies(coll: Collection, out: Path, n: int, seed: int, copy_set: str, only: list[str] | None = None) -> None:
    """only: redo these edits (after changing them), whatever is cached."""
    rows = coll.catalog.all_rows()
    target = out / f"{copy_set}-s{seed}-n{n}"
    if (target / "done").exists() and not only:
        return
    target.mkdir(parents=True, exist_ok=True)
    picked, copies = evaluate.make_copies(rows, n, seed, copy_set, lambda p: open_image(read_file(p)), only)
    np.save(target / "picked.npy", np.array([r.id for r in picked], np.int64))
    ext = coll.extractor("cpu")
    for name, imgs in copies.items():
        (target / name).mkdir(exist_ok=True)
        for i, img in enumerate(imgs):
            img.save(target / name / f"{i:04d}.png")
        pixels = np.stack([coll.query_pixels(img) for img in imgs])
        raw = np.concatenate([ext(pixels[i : i + 32]) for i in range(0, len(pixels), 32)])
        np.save(target / f"{name}.npy", raw.astype(np.float16))
        print(f"{copy_set} {name}: {len(imgs)} copies", flush=True)
    (target / "done").write_text("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("collection")
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sets", default="harsh,heldout,mild")
    ap.add_argument("--only", default=None, help="comma-separated edits to redo")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with Collection.open(args.collection) as coll:
        cache_db(coll, args.out)
        for copy_set in args.sets.split(","):
            cache_copies(coll, args.out, args.n, args.seed, copy_set, args.only.split(",") if args.only else None)


if __name__ == "__main__":
    main()
