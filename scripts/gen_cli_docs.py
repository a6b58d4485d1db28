"""Write docs/cli.md from the commands' own `--help`: `python scripts/gen_cli_docs.py` (after changing the CLI).

tests/test_packaging.py checks the file is current, so the reference never drifts from the code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
WIDTH = 100

INTRO = """# Command line reference

Generated from each command's `--help` by `scripts/gen_cli_docs.py`. Every command takes
`--collection/-c PATH` (default `./collection.ris`). Errors are one `error: …` line on stderr and a
non-zero exit, never a traceback. Examples:

```bash
ris index PHOTOS/ MORE/ -c my.ris            # index or resync (new and changed files only; vanished ones dropped)
ris index --from-list files.txt -c my.ris    # one path per line
ris add NEW/ -c my.ris                       # add without dropping anything
ris remove 'PHOTOS/holiday/*' -c my.ris      # by path, folder or glob
ris search q.jpg other.jpg -c my.ris -k 5 --json      # one JSON object per query and line
ris search q.jpg -c my.ris --grid out.png --html out.html
ris search EDITED/ -c my.ris -k 1 -f paths   # every image in a folder (as index finds them); bad files skipped
ris eval -c my.ris                           # leave-one-out precision@k and mAP by folder label (docs/quality.md)
ris eval -c my.ris --copies 200              # copy detection: recall@1/@5 per transform
ris dupes -c my.ris --csv                    # exact and near-duplicate groups
ris map -c my.ris --out map.png --html map.html        # needs the map extra
ris export -c my.ris --format parquet --out feats.parquet   # parquet needs the parquet extra
ris serve -c my.ris --port 8000 [--token SECRET]       # web page + REST API (docs at /docs)
```

`ris search --json` prints `{"query": "q.jpg", "matches": [{"rank": 1, "path": "/abs/x.jpg", "score": 0.93,
"similarity": 0.97, "label": "cat", "inliers": 245}, …]}`: `score` is what ranked the match (higher is closer; it
never increases down the list), `similarity` the plain cosine similarity of query and image (1 = identical),
`inliers` the agreeing keypoint matches where they confirm the image shows the query's picture or scene (12 or
more: an edited copy's original, or another shot of the place; null otherwise: the table marks those ✓).
Labels are parent-folder names (Caltech-101 style).

The web page and REST API of `ris serve`: drop, pick or paste an image; click a result for "more like
this"; the API is documented at `/docs` (`POST /api/search` with form fields `file`, `k` and `verify`,
`GET /api/images/{id}`, `…/thumbnail`, `/api/health`, `/api/collection`; add/remove only with `--token`).
It binds to loopback unless told otherwise.
"""


def help_text(args: list[str]) -> str:
    """What `ris ARGS --help` prints at a fixed width, without colours."""
    import contextlib
    import io

    from typer.main import get_command

    from ris.cli import app

    os.environ.update({"COLUMNS": str(WIDTH), "NO_COLOR": "1", "TERM": "dumb"})
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        get_command(app).main([*args, "--help"], prog_name="ris", standalone_mode=True)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()).strip("\n")


def render() -> str:
    from typer.main import get_command

    from ris.cli import app

    parts = [INTRO, "## ris\n", f"```text\n{help_text([])}\n```\n"]
    for name in get_command(app).commands:  # in the order `ris --help` lists them
        parts += [f"## ris {name}\n", f"```text\n{help_text([name])}\n```\n"]
    return "\n".join(parts)


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC}", file=sys.stderr)
