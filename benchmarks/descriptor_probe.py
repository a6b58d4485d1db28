"""Descriptor variants on the full Caltech-101, from one extraction: what the default's gap is made of.

    python benchmarks/descriptor_probe.py CALTECH_DIR WORKDIR [--copies 200]

One pass of EfficientNet-Lite0 (PyTorch fp32, 224 px, the project's decode) over the 101 object
categories keeps, per image, several poolings of the last map (GeM, R-MAC, a 2x2 grid of GeM cells) and
the ImageNet classifier's logits. Then, without re-extracting: leave-one-out precision@1/@5 and mAP
(`ris.evaluate.leave_one_out`, PCA by `ris.reduce.Reducer`) for PCA sizes, PCA-whitening, logits fused
with the descriptor, the grid, and the labels with Faces/Faces_easy (tight crops of the same photos)
merged; and copy recall@1 over the transforms of `ris eval --copies` for the main candidates.
The features are cached in WORKDIR (features.npz); figures go to stdout as Markdown.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ris import evaluate
from ris.bench import machine
from ris.decode import decode_file, open_image, read_file, resize
from ris.demo import TRANSFORMS
from ris.reduce import Reducer, l2_normalize

MODEL = "efficientnet-lite0"
SIZE = 224


def images(folder: Path) -> tuple[list[str], np.ndarray]:
    paths = sorted(str(p) for p in folder.glob("*/*") if p.parent.name not in evaluate.DEFAULT_EXCLUDE
                   and p.suffix.lower() in {".jpg", ".jpeg", ".png"})  # fmt: skip
    return paths, np.array([Path(p).parent.name for p in paths])


def poolings(net) -> Callable[[np.ndarray], dict[str, np.ndarray]]:
    """uint8 NHWC pixels -> {pooling name: (n, d) features} from one forward pass."""
    import torch

    from ris.networks import _gem, regional_gem

    lite = net.backbone.net

    def run(pixels: np.ndarray) -> dict[str, np.ndarray]:
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() - 127.0) / 128.0
        with torch.inference_mode():
            fmap = lite.extract_features(x)
            h, w = fmap.shape[2:]
            ch, cw = (h + 1) // 2, (w + 1) // 2
            cells = [fmap[:, :, :ch, :cw], fmap[:, :, :ch, w - cw :], fmap[:, :, h - ch :, :cw], fmap[:, :, h - ch :, w - cw :]]
            out = {"gem": _gem(fmap), "rmac": regional_gem(fmap), "grid2x2": torch.cat([_gem(c) for c in cells], 1),
                   "logits": lite._fc(fmap.mean(dim=(2, 3)))}  # fmt: skip
        return {k: v.numpy() for k, v in out.items()}

    return run


def extract(paths: list[str], run, batch: int = 64) -> dict[str, np.ndarray]:
    from concurrent.futures import ThreadPoolExecutor

    parts: dict[str, list[np.ndarray]] = {}
    with ThreadPoolExecutor(2) as pool:
        for start in range(0, len(paths), batch):
            pixels = np.stack(list(pool.map(lambda p: decode_file(p, SIZE).pixels, paths[start : start + batch])))
            for k, v in run(pixels).items():
                parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def reduced(x: np.ndarray, dims: int, whiten: float = 0.0) -> tuple[Reducer, np.ndarray]:
    r = Reducer.fit(x, dims)
    v = r(x)
    if whiten:  # divide each axis by (its variance)^whiten before the final L2
        v = l2_normalize(((l2_normalize(x) - r.mean) @ r.components.T) / (r.ratio**whiten))
    return r, v


def loo_row(name: str, v: np.ndarray, labels: np.ndarray, dba: int = 0) -> None:
    rep = evaluate.leave_one_out(v, labels, dba=dba)
    print(f"| {name} | {v.shape[1]} | {rep.precision[1]:.3f} | {rep.precision[5]:.3f} | {rep.map:.3f} |", flush=True)


def confusions(v: np.ndarray, labels: np.ndarray, top: int = 8) -> None:
    """The label pairs behind most wrong top-5 neighbours (query label -> neighbour label)."""
    from collections import Counter

    from ris import index

    _, nn = index.search(index.flat(v), v, 6)
    wrong = Counter((labels[i], labels[j]) for i, row in enumerate(nn) for j in row[row != i][:5] if labels[j] != labels[i])
    total = sum(wrong.values())
    print(f"\nwrong top-5 neighbours: {total}; " + ", ".join(f"{a} -> {b} {c}" for (a, b), c in wrong.most_common(top)))


def copy_rows(paths: list[str], feats: dict[str, np.ndarray], run, n: int, configs: list[tuple[str, int]]) -> None:
    """Recall@1 of transformed copies of n random images among the 8,677 (one draw for every descriptor;
    not `ris eval --copies`' draw, which picks among all indexed images, BACKGROUND_Google included)."""
    pick = np.random.default_rng(0).choice(len(paths), size=n, replace=False)
    originals = [open_image(read_file(paths[i])) for i in pick]
    reducers = {c: reduced(feats[c[0]], c[1]) for c in configs}
    hits: dict[tuple[str, int], list[float]] = {c: [] for c in configs}
    names = list(TRANSFORMS)
    for t in names:
        q = run(np.stack([resize(TRANSFORMS[t](img), SIZE) for img in originals]))
        for c, (r, db) in reducers.items():
            hits[c].append(float(((r(q[c[0]]) @ db.T).argmax(1) == pick).mean()))
    print("\n| descriptor | dims | " + " | ".join(names) + " | all |\n|---|---|" + "---|" * (len(names) + 1))
    for c, h in hits.items():
        print(f"| {c[0]} | {c[1]} | " + " | ".join(f"{x:.3f}" for x in h) + f" | **{np.mean(h):.3f}** |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--copies", type=int, default=200)
    args = ap.parse_args()
    import torch

    from ris.networks import BUILDERS

    torch.set_num_threads(2)
    net, _ = BUILDERS["lite"](MODEL, "rmac", None)
    run = poolings(net.eval())
    paths, labels = images(args.folder)
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.work / "features.npz"
    m = machine()
    print(f"# {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{len(paths)} images, {MODEL} fp32 PyTorch")  # fmt: skip
    if cache.exists():
        feats = dict(np.load(cache))
    else:
        t = time.perf_counter()
        feats = extract(paths, run)
        np.savez(cache, **feats)
        print(f"extraction: {time.perf_counter() - t:.0f} s")
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
        loo_row(f"grid2x2 (4 GeM cells), PCA {dims}", reduced(feats["grid2x2"], dims)[1], labels)
    loo_row("grid2x2, PCA 128, --dba 10", reduced(feats["grid2x2"], 128)[1], labels, dba=10)
    merged = np.where(labels == "Faces_easy", "Faces", labels)
    loo_row("rmac, PCA 256, Faces_easy counted as Faces", base, merged)
    confusions(base, labels)
    if args.copies:
        copy_rows(paths, feats, run, args.copies, [("rmac", 256), ("rmac", 128), ("grid2x2", 128), ("grid2x2", 256)])


if __name__ == "__main__":
    main()
