"""Search results: plain data that prints as a table, serialises to JSON, and shows in Jupyter."""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


@dataclass(frozen=True)
class Match:
    """One result. `score`: what ranked it (never increases down a list); `similarity`: the plain cosine
    similarity of query and image (equal to score unless the collection re-ranks: DBA, αQE, verification);
    `inliers`: the agreeing keypoint matches that confirm it shows the query's picture or scene (verification's
    MIN_INLIERS or more: an edited copy's original, or another shot of the same place; None: not confirmed, or
    not checked)."""

    rank: int
    path: str
    score: float
    label: str | None
    id: int
    similarity: float | None = None
    inliers: int | None = None

    @property
    def cosine(self) -> float:
        """The plain cosine similarity (the score where no re-ranking happened)."""
        return self.score if self.similarity is None else self.similarity

    def as_json(self) -> dict[str, Any]:
        sim = self.cosine
        return {"rank": self.rank, "path": self.path, "score": round(self.score, 6), "similarity": round(sim, 6),
                "label": self.label, "inliers": self.inliers}  # fmt: skip


@dataclass
class SearchResult:
    query: str
    matches: list[Match] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        """Exactly the documented shape of one `ris search --json` line."""
        return {"query": self.query, "matches": [m.as_json() for m in self.matches]}

    def as_dict(self) -> dict[str, Any]:
        return {"query": self.query, "matches": [asdict(m) for m in self.matches]}

    def __str__(self) -> str:
        lines = [f"query: {self.query}"]
        for m in self.matches:
            sim = m.cosine
            lines.append(f"  {m.rank:>3}  {m.score:6.3f}  {sim:6.3f}  {m.label or '-':<20}  {m.path}")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        """A row of thumbnails with scores: how a result shows itself in a notebook."""
        cells = [thumbnail_figure(self.query, f"query: {html.escape(Path(self.query).name)}")]
        cells += [
            thumbnail_figure(m.path, f"#{m.rank} {m.score:.3f}{' ✓' if m.inliers else ''}<br>{html.escape(m.label or '')}")
            for m in self.matches
        ]
        return '<div style="display:flex;gap:8px;flex-wrap:wrap;align-items:flex-start">' + "".join(cells) + "</div>"


def thumbnail_data_uri(source: str | Path | Image.Image, size: int = 160) -> str:
    """A JPEG thumbnail as a data: URI (self-contained pages, no file server needed)."""
    from ..images.decode import thumbnail

    img = thumbnail(source if isinstance(source, Image.Image) else str(source), size)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def thumbnail_figure(source: str | Path, caption_html: str, size: int = 160) -> str:
    return (
        f'<figure style="margin:0;width:{size}px;font:12px sans-serif;text-align:center">'
        f'<img src="{thumbnail_data_uri(source, size)}" style="max-width:{size}px;max-height:{size}px" '
        f'title="{html.escape(str(source))}"><figcaption>{caption_html}</figcaption></figure>'
    )
