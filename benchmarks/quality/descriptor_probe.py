"""Descriptor variants on the full Caltech-101, from one extraction: what the default's gap is made of.

    python benchmarks/quality/descriptor_probe.py CALTECH_DIR WORKDIR [--copies 200] [--only-neighbourhood | --scales 160,288]

One pass of EfficientNet-Lite0 (PyTorch fp32, 224 px, the project's decode) over the 101 object
categories keeps each image's last 7x7 map (float16, 1.1 GB in WORKDIR/maps.npy). Every descriptor is
then pooled from the maps without re-extracting — GeM, R-MAC, n x n grids of GeM cells (the project's
`ris.model.networks` functions), other GeM powers, the flattened map, the ImageNet classifier's logits — and
scored by leave-one-out precision@1/@5 and mAP (`ris.tools.evaluate.leave_one_out`, PCA by
`ris.vectors.reduce.Reducer`): PCA sizes, PCA-whitening, logits fused in, DBA, the labels with Faces/Faces_easy
(tight crops of the same photos) merged, DBA and αQE on the grids with and without the anchored first
result; then copy recall@1 over the transforms of `ris eval --copies`
for the main candidates. Figures go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ris.images.decode import decode_file, open_image, read_file, resize
from ris.tools import evaluate
from ris.tools.bench import machine
from ris.tools.demo import TRANSFORMS
from ris.vectors.reduce import Reducer, l2_normalize

MODEL = "efficientnet-lite0"
SIZE = 224


def images(folder: Path) -> tuple[list[str], np.ndarray]:
    paths = sorted(str(p) for p in folder.glob("*/*") if p.parent.name not in evaluate.DEFAULT_EXCLUDE
                   and p.suffix.lower() in {".jpg", ".jpeg", ".png"})  # fmt: skip
    return paths, np.array([Path(p).parent.name for p in paths])


def maps_of(lite, pixels: np.ndarray):
    """uint8 NHWC pixels -> the last feature maps (n, 1280, 7, 7), fp32 PyTorch."""
    import torch

    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 127.0) / 128.0
    with torch.inference_mode():
        return lite.extract_features(x)


def descriptors(lite) -> dict[str, Callable]:
    """Pooling name -> function of a batch of maps (torch) giving (n, d) features."""
    import torch

    from ris.model.networks import _gem, grid_gem, regional_gem

    return {"gem": _gem, "rmac": regional_gem, "grid": lambda f: grid_gem(f, 2), "grid3": lambda f: grid_gem(f, 3),
            "grid4": lambda f: grid_gem(f, 4), "grid p2": lambda f: grid_gem(f, 2, 2.0), "grid p4": lambda f: grid_gem(f, 2, 4.0),
            "grid + gem": lambda f: torch.cat([_gem(f), grid_gem(f, 2)], dim=1), "map": lambda f: f.clamp(min=0).flatten(1),
            "logits": lambda f: lite._fc(f.mean(dim=(2, 3)))}  # fmt: skip


def pooled(maps: np.ndarray, fn: Callable, chunk: int = 512) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return np.concatenate([fn(torch.from_numpy(np.asarray(maps[s : s + chunk], np.float32))).numpy()
                               for s in range(0, len(maps), chunk)])  # fmt: skip


def extract(paths: list[str], lite, out: Path, batch: int = 64, size: int = SIZE) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    maps = None
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(paths), batch):
            pixels = np.stack(list(pool.map(lambda p: decode_file(p, size).pixels, paths[start : start + batch])))
            m = maps_of(lite, pixels).numpy()
            if maps is None:
                maps = np.lib.format.open_memmap(out, mode="w+", dtype=np.float16, shape=(len(paths), *m.shape[1:]))
            maps[start : start + batch] = m
    maps.flush()
    return maps


def reduced(x: np.ndarray, dims: int, whiten: float = 0.0) -> tuple[Reducer, np.ndarray]:
    r = Reducer.fit(x, dims)
    v = r(x)
    if whiten:  # divide each axis by (its variance)^whiten before the final L2
        v = l2_normalize(((l2_normalize(x) - r.mean) @ r.components.T) / (r.ratio**whiten))
    return r, v


def loo_row(name: str, v: np.ndarray, labels: np.ndarray, dba: int = 0, qe: int = 0, anchor: int = 0) -> None:
    rep = evaluate.leave_one_out(v, labels, dba=dba, qe=qe, anchor=anchor)
    print(f"| {name} | {v.shape[1]} | {rep.precision[1]:.3f} | {rep.precision[5]:.3f} | {rep.map:.3f} |", flush=True)


def neighbourhood_rows(feats: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """DBA and αQE on the grid poolings, ranked as served: the first result the plain nearest of the
    top ANCHOR_POOL (ris.tools.evaluate.anchor_first), and without that anchor."""
    from ris.search.ranking import ANCHOR_POOL

    print("\n| descriptor (PCA 256), DBA N, αQE n | dims | P@1 | P@5 | mAP |\n|---|---|---|---|---|")
    for name in ("grid", "grid3"):
        v = reduced(feats[name], 256)[1]
        for dba, qe in ((0, 0), (0, 5), (0, 10), (10, 0), (15, 0), (20, 0), (10, 3), (10, 5)):
            loo_row(f"{name}, DBA {dba}, αQE {qe}", v, labels, dba=dba, qe=qe)
            if dba or qe:
                loo_row(f"{name}, DBA {dba}, αQE {qe}, first result anchored", v, labels, dba=dba, qe=qe, anchor=ANCHOR_POOL)


def confusions(v: np.ndarray, labels: np.ndarray, top: int = 8) -> None:
    """The label pairs behind most wrong top-5 neighbours (query label -> neighbour label)."""
    from collections import Counter

    from ris.vectors import faiss_index as index

    _, nn = index.search(index.flat(v), v, 6)
    wrong = Counter((labels[i], labels[j]) for i, row in enumerate(nn) for j in row[row != i][:5] if labels[j] != labels[i])
    total = sum(wrong.values())
    print(f"\nwrong top-5 neighbours: {total}; " + ", ".join(f"{a} -> {b} {c}" for (a, b), c in wrong.most_common(top)))


def copy_rows(paths: list[str], feats: dict[str, np.ndarray], lite, pools: dict[str, Callable], n: int,
              configs: list[tuple[str, int]]) -> None:  # fmt: skip
    """Recall@1 of transformed copies of n random images among the 8,677 (one draw for every descriptor;
    not `ris eval --copies`' draw, which picks among all indexed images, BACKGROUND_Google included)."""
    import torch

    pick = np.random.default_rng(0).choice(len(paths), size=n, replace=False)
    originals = [open_image(read_file(paths[i])) for i in pick]
    reducers = {c: reduced(feats[c[0]], c[1]) for c in configs}
    hits: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    names = list(TRANSFORMS)
    for t in names:
        maps = maps_of(lite, np.stack([resize(TRANSFORMS[t](img), SIZE) for img in originals]))
        for c, (r, db) in reducers.items():
            with torch.inference_mode():
                q = r(pools[c[0]](maps).numpy())
            hits[c].append(float(((q @ db.T).argmax(1) == pick).mean()))
    print("\n| descriptor | dims | " + " | ".join(names) + " | all |\n|---|---|" + "---|" * (len(names) + 1))
    for c, h in hits.items():
        print(f"| {c[0]} | {c[1]} | " + " | ".join(f"{x:.3f}" for x in h) + f" | **{np.mean(h):.3f}** |", flush=True)


def multiscale_rows(maps: np.ndarray, paths: list[str], labels: np.ndarray, lite, work: Path, scales: list[int]) -> None:
    """Multi-scale extraction: the grid3 descriptor of the image at other input sizes too (maps cached per
    size), each L2-normalised, summed; plain and as served with DBA 10. Model cost grows with the pixels."""
    from ris.model.networks import grid_gem
    from ris.search.ranking import ANCHOR_POOL

    def grid3_of(m: np.ndarray) -> np.ndarray:
        return l2_normalize(pooled(m, lambda f: grid_gem(f, 3)))

    per_scale = {SIZE: grid3_of(maps)}
    for size in scales:
        cache = work / f"maps_{size}.npy"
        t = time.perf_counter()
        per_scale[size] = grid3_of(np.load(cache, mmap_mode="r") if cache.exists() else extract(paths, lite, cache, size=size))
        print(f"scale {size}: {time.perf_counter() - t:.0f} s (extraction and pooling)", flush=True)
    print("\n| grid3 at input sizes (px), PCA 256 | model pixels vs 224 | P@1 | P@5 | mAP |\n|---|---|---|---|---|")
    combos = [[SIZE]] + [[SIZE, s] for s in scales] + ([[SIZE, *scales]] if len(scales) > 1 else [])
    for combo in combos:
        v = reduced(sum(per_scale[s] for s in combo), 256)[1]
        cost = sum(s * s for s in combo) / SIZE**2
        for dba in (0, 10):
            rep = evaluate.leave_one_out(v, labels, dba=dba, anchor=ANCHOR_POOL if dba else 0)
            name = " + ".join(map(str, combo)) + (", DBA 10 as served" if dba else "")
            print(f"| {name} | {cost:.2f}× | {rep.precision[1]:.3f} | {rep.precision[5]:.3f} | {rep.map:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--copies", type=int, default=200)
    ap.add_argument("--only-neighbourhood", action="store_true", help="just the DBA / αQE / anchored-first table")
    ap.add_argument("--scales", default="", help="multi-scale table only: other input sizes, e.g. 160,288")
    args = ap.parse_args()
    import torch

    from ris.model.networks import BUILDERS

    torch.set_num_threads(2)
    net, _ = BUILDERS["lite"](MODEL, "rmac", None)
    lite = net.eval().backbone.net
    pools = descriptors(lite)
    paths, labels = images(args.folder)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "maps.npy"
    m = machine()
    print(f"# {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{len(paths)} images, {MODEL} fp32 PyTorch")  # fmt: skip
    if cache.exists():
        maps = np.load(cache, mmap_mode="r")
    else:
        t = time.perf_counter()
        maps = extract(paths, lite, cache)
        print(f"extraction: {time.perf_counter() - t:.0f} s")
    if args.scales:
        multiscale_rows(maps, paths, labels, lite, args.work, [int(x) for x in args.scales.split(",")])
        return
    if args.only_neighbourhood:
        neighbourhood_rows({name: pooled(maps, pools[name]) for name in ("grid", "grid3")}, labels)
        return
    feats = {name: pooled(maps, fn) for name, fn in pools.items()}
    print("\n| descriptor | dims | P@1 | P@5 | mAP |\n|---|---|---|---|---|")
    for dims in (64, 96, 128, 192, 256):
        loo_row(f"rmac, PCA {dims}", reduced(feats["rmac"], dims)[1], labels)
    for w in (0.25, 0.5):
        loo_row(f"rmac, PCA 256, whitened^{w}", reduced(feats["rmac"], 256, w)[1], labels)
    loo_row("gem, PCA 256", reduced(feats["gem"], 256)[1], labels)
    loo_row("logits (L2)", l2_normalize(feats["logits"]), labels)
    base = reduced(feats["rmac"], 256)[1]
    logits = l2_normalize(feats["logits"] - feats["logits"].mean(0))
    for w in (0.3, 0.5):
        loo_row(f"rmac PCA 256 ⊕ centred logits, weight {w}", np.hstack([np.sqrt(1 - w) * base, np.sqrt(w) * logits]), labels)
    for dims in (128, 256):
        loo_row(f"grid (2x2 GeM cells), PCA {dims}", reduced(feats["grid"], dims)[1], labels)
    loo_row("grid, PCA 128, --dba 10", reduced(feats["grid"], 128)[1], labels, dba=10)
    for name in ("grid p2", "grid p4", "grid + gem", "grid3", "grid4", "map"):
        loo_row(f"{name}, PCA 256", reduced(feats[name], 256)[1], labels)
    loo_row("grid3, PCA 128", reduced(feats["grid3"], 128)[1], labels)
    merged = np.where(labels == "Faces_easy", "Faces", labels)
    loo_row("rmac, PCA 256, Faces_easy counted as Faces", base, merged)
    confusions(base, labels)
    neighbourhood_rows(feats, labels)
    if args.copies:
        configs = [("rmac", 256), ("rmac", 128), ("grid", 128), ("grid", 256), ("grid3", 256), ("grid4", 256), ("map", 256)]
        copy_rows(paths, feats, lite, pools, args.copies, configs)


if __name__ == "__main__":
    main()
