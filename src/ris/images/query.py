"""What a query can be (a path, bytes, a PIL image or an HxWx3 array), decoded as indexed images are."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..errors import DecodeError, RisError
from .decode import open_image, read_file, resize

Query = str | os.PathLike | Image.Image | np.ndarray | bytes


def query_image(query: Query, draft_size: int | None = None) -> Image.Image:
    """One query as an upright RGB image; a query that cannot be used is one clear RisError."""
    try:
        if isinstance(query, Image.Image):
            return query.convert("RGB")
        if isinstance(query, np.ndarray):
            return Image.fromarray(np.asarray(query, dtype=np.uint8)).convert("RGB")
        return open_image(query if isinstance(query, bytes) else read_file(str(query)), draft_size)
    except DecodeError as exc:
        raise RisError(f"cannot use query {query_name(query)}: {exc}") from None


def query_pixels(query: Query, size: int) -> np.ndarray:
    """Model input for one query (JPEGs decoded at reduced scale, as indexed images are)."""
    return resize(query_image(query, draft_size=size), size)


def query_name(query: Query) -> str:
    return str(query) if isinstance(query, (str, os.PathLike)) else "<image>"
