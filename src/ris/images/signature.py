"""A picture's signature: its model input reduced to 16 x 16 grey levels, kept per stored image (256 bytes).

Copies that keep the picture's layout but lose its detail or its tones (strong blur, a thumbnail a fifth of
the size at JPEG quality 10-20, brightness, contrast, greyscale, noise) move a CNN descriptor far enough that
their original leaves the nearest few, and leave too few keypoints for verification (ris.search.verify). Their
16 x 16 grey layout barely changes: the normalised cross-correlation (NCC: mean removed, unit norm) of a copy's
signature and its original's is ~0.99, and a match at NCC >= ris.search.copies.MIN_NCC is taken as the copy
(ris.search.copies). Box means of the model input, so an image squashed to the model's square gets the same
signature however it was stretched, and a mirror image's signature is the signature mirrored.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

#: Signatures are SIDE x SIDE grey levels.
SIDE = 16
WIDTH = SIDE * SIDE
#: Rec. 601 luma, as OpenCV's and Pillow's RGB -> grey.
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
#: A signature whose grey levels vary less than this (standard deviation) is a flat picture: it has none.
MIN_STD = 2.0


def area(size: int) -> np.ndarray:
    """(SIDE, size) weights of each input pixel in each output cell: box means over fractional cells, as OpenCV's
    INTER_AREA takes them (`of_tensor` on the GPU gives `of_pixels`' grey levels to within 1)."""
    edges = np.arange(SIDE + 1) * size / SIDE
    lo, hi = np.arange(size), np.arange(size) + 1
    overlap = np.clip(np.minimum(hi[None], edges[1:, None]) - np.maximum(lo[None], edges[:-1, None]), 0, None)
    return (overlap / (size / SIDE)).astype(np.float32)


def of_pixels(pixels: np.ndarray) -> np.ndarray:
    """Signatures (n, WIDTH) uint8 of model inputs (n, size, size, 3) uint8, or (WIDTH,) of one (size, size, 3):
    OpenCV's grey and INTER_AREA box means. Where the cells are whole pixels (224: 14 x 14) the batch is one tall
    picture whose cells never straddle two images: one grey conversion and one uint8 box mean for all, 24 us an
    image instead of 34 one by one (the same grey levels: 0 of 260k cells differ on Caltech-101)."""
    if pixels.ndim == 3:
        return of_pixels(pixels[None])[0]
    n, size = len(pixels), pixels.shape[1]
    if size % SIDE == 0 and pixels.shape[2] == size:
        tall = cv2.cvtColor(np.ascontiguousarray(pixels).reshape(n * size, size, 3), cv2.COLOR_RGB2GRAY)
        return cv2.resize(tall, (SIDE, n * SIDE), interpolation=cv2.INTER_AREA).reshape(n, WIDTH)
    out = np.empty((len(pixels), WIDTH), np.uint8)
    for i, image in enumerate(pixels):
        grey = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY).astype(np.float32)
        out[i] = np.rint(cv2.resize(grey, (SIDE, SIDE), interpolation=cv2.INTER_AREA)).astype(np.uint8).ravel()
    return out


def of_image(img: Any, size: int = 224) -> np.ndarray:
    """The signature of a PIL image, squashed to the model's square as a query is (ris.images.decode.resize)."""
    from .decode import resize

    return of_pixels(resize(img.convert("RGB"), size))


def of_tensor(pixels: Any) -> np.ndarray:
    """`of_pixels` for an NHWC uint8 torch tensor on any device (GPU-decoded batches): the same sums."""
    import torch

    grey = pixels.float() @ torch.as_tensor(LUMA, device=pixels.device)
    rows, cols = (torch.as_tensor(area(n), device=pixels.device) for n in pixels.shape[1:3])
    means = (rows @ grey @ cols.T).round_().clamp_(0, 255).to("cpu")
    return means.numpy().astype(np.uint8).reshape(len(means), WIDTH)


def unit(signatures: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 rows with their mean removed and unit norm, which rows are signatures at all): their inner
    product is the NCC. All-zero rows (images stored before signatures were kept) and flat pictures are not."""
    x = np.asarray(signatures, np.float32).reshape(-1, WIDTH)
    x = x - x.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    valid = norm[:, 0] >= MIN_STD * np.sqrt(WIDTH)
    return np.where(valid[:, None], x / np.maximum(norm, 1e-6), 0).astype(np.float32), valid


def mirrored(signatures: np.ndarray) -> np.ndarray:
    """The signatures of the mirror images (left-right); of `unit` rows too (their dtype kept)."""
    return np.ascontiguousarray(np.asarray(signatures).reshape(-1, SIDE, SIDE)[:, :, ::-1].reshape(-1, WIDTH))
