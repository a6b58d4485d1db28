"""Show results to people: a PNG contact sheet (query beside its k matches) and a self-contained page."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..images.decode import thumbnail
from ..search.results import SearchResult, thumbnail_figure

THUMB = 160
#: Rows of a contact sheet at most (a folder of queries: 100 rows are ~20,000 px tall; the HTML page shows them all).
GRID_ROWS = 100
SAME_SCENE = ' <b title="keypoints agree: the same picture or scene">✓ same scene</b>'  # a confirmed match (Match.inliers)
CAPTION = 34
PAD = 8


def _font() -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(text: str, limit: int = 24) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def grid_png(results: Sequence[SearchResult], out: str | Path) -> Path:
    """One row per query (the first GRID_ROWS): the query, then its matches with rank, score and label."""
    results = results[:GRID_ROWS]
    k = max((len(r.matches) for r in results), default=0)
    cols = k + 1
    cell_w, cell_h = THUMB + PAD, THUMB + CAPTION + PAD
    sheet = Image.new("RGB", (cols * cell_w + PAD, max(1, len(results)) * cell_h + PAD), "white")
    draw, font = ImageDraw.Draw(sheet), _font()
    for row, result in enumerate(results):
        y = PAD + row * cell_h
        cells = [(result.query, "query", _fit(Path(result.query).name))]
        cells += [(m.path, f"#{m.rank}  {m.score:.3f}", _fit(m.label or Path(m.path).name)) for m in result.matches]
        for col, (path, line1, line2) in enumerate(cells):
            x = PAD + col * cell_w
            thumb = thumbnail(path, THUMB)
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
            if col == 0:
                draw.rectangle([x - 2, y - 2, x + THUMB + 1, y + THUMB + 1], outline=(30, 100, 220), width=2)
            draw.text((x, y + THUMB + 3), line1, fill="black", font=font)
            draw.text((x, y + THUMB + 17), line2, fill=(80, 80, 80), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


def results_html(results: Sequence[SearchResult], out: str | Path, title: str = "ris search results") -> Path:
    """A single HTML file with inline thumbnails: opens anywhere, mailable, no server."""
    rows = []
    for result in results:
        figures = [thumbnail_figure(result.query, f"<b>query</b><br>{html.escape(Path(result.query).name)}")]
        figures += [
            thumbnail_figure(
                m.path, f"#{m.rank} · {m.score:.3f} <small>(similarity {m.cosine:.3f})</small>"
                f"{SAME_SCENE if m.inliers else ''}<br>"
                f"{html.escape(m.label or '')}<br>"
                f"<small>{html.escape(Path(m.path).name)}</small>",
            )
            for m in result.matches
        ]
        rows.append(f'<section><h2>{html.escape(result.query)}</h2><div class="row">{"".join(figures)}</div></section>')
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font:14px sans-serif;margin:20px}} h2{{font-size:14px;color:#444;word-break:break-all}}
.row{{display:flex;gap:10px;flex-wrap:wrap;align-items:flex-start}}</style></head>
<body><h1>{html.escape(title)}</h1>{"".join(rows)}</body></html>
"""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
