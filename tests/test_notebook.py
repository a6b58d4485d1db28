"""The tutorial notebook runs end to end; results show themselves; `ris map` through the real CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ris.errors import RisError
from ris.tools.demo import sample_paths

from .conftest import SUBSET_CLASSES, caltech_files, run_cli

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "reverse_image_search.ipynb"


@pytest.fixture(scope="module")
def sample_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample photos, indexed once with the default model."""
    from ris.collection import Collection

    path = tmp_path_factory.mktemp("samples") / "samples.ris"
    with Collection.open_or_create(path) as coll:
        coll.index(sample_paths())
    return path


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


#: The tests' run of the notebook: the whole story, on fewer images than a reader's default (12 classes x 8, the
#: tutorial's loop timed on 12): each code path and table is there, the run takes about half the time.
SMALL = {"RIS_NOTEBOOK_LIMIT_PER_CLASS": "5", "RIS_NOTEBOOK_BASELINE_IMAGES": "4"}


def _run_notebook(monkeypatch: pytest.MonkeyPatch, data: str | None):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    for name in ("RIS_NOTEBOOK_DATA", "RIS_NOTEBOOK_CLASSES", "RIS_NOTEBOOK_LIMIT_PER_CLASS", "RIS_NOTEBOOK_BASELINE_IMAGES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in SMALL.items():
        monkeypatch.setenv(name, value)
    if data:
        monkeypatch.setenv("RIS_NOTEBOOK_DATA", data)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A failing cell raises CellExecutionError with the cell's traceback.
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # fmt: skip
    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    markdown = "".join(o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    results = [h for h in html if "data:image/jpeg;base64" in h]
    assert results and results[0].count("<img") == 6  # the query and K=5 matches
    assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 2  # the explained-variance plot and the map
    assert re.search(r"\d+ images searchable", text) and "original first: True" in text
    assert "tutorial loop" in markdown and "| crop |" in markdown
    # what the text says about the model comes from the collection
    assert "pooling gives 11,520-d features per image" in text and "int8 on OpenVINO (CPU)" in text
    assert "ris model only: OpenVINO fp32" in markdown
    work = Path(re.search(r"removed (\S+): True", text).group(1))
    assert work.name.startswith("ris-notebook-") and not work.exists()  # nothing left behind
    return text, markdown


@pytest.mark.timeout(300)
def test_notebook_tells_the_story_on_caltech(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default data, with Caltech-101 next to the checkout: a dozen classes, evaluated as `ris eval` does."""
    caltech_files("panda", 1)  # skips without the data
    text, markdown = _run_notebook(monkeypatch, None)
    assert re.search(r"60 files in 12 folders from .*101_ObjectCategories", text)
    assert "as `ris eval` ranks: DBA 10 neighbours" in text
    figures = re.search(r"\| 60 \| 12 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|", markdown)
    assert figures and 0.7 < float(figures.group(4)) <= 1  # mAP of 12 distinct categories
    assert "hardest classes" in markdown and "precision@k is not meaningful" not in markdown


@pytest.mark.timeout(300)
def test_notebook_runs_on_the_bundled_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    text, markdown = _run_notebook(monkeypatch, "samples")
    assert f"{len(sample_paths())} files in 1 folders" in text
    assert "precision@k is not meaningful" in markdown  # the bundled photos carry one label only


def test_notebook_evaluates_as_ris_eval(subset_collection: Path) -> None:
    """`ris eval` and the notebook's evaluation are one library function (figures agree exactly)."""
    from ris.collection import Collection
    from ris.tools import evaluate

    cli = json.loads(run_cli("eval", "-c", str(subset_collection), "--json").stdout)
    with Collection.open(subset_collection) as coll:
        lib = evaluate.evaluate_collection(coll, ks=(1, 5, 10)).as_json()
    assert cli == lib and cli["images"] == 60
    assert "evaluate.evaluate_collection(coll)" in NOTEBOOK.read_text()


def test_result_prints_as_table_and_renders_thumbnails(sample_collection: Path) -> None:
    from ris.collection import Collection

    query = str(sample_paths()[3])
    with Collection.open(sample_collection) as coll:
        result = coll.search(query, k=3)
    lines = str(result).splitlines()
    assert lines[0] == f"query: {query}"
    ranks, scores = [], []
    for line in lines[1:]:
        rank, score, _similarity, _label, path = line.split(maxsplit=4)
        ranks.append(int(rank))
        scores.append(float(score))
        assert Path(path).is_absolute()
    assert ranks == [1, 2, 3] and scores == sorted(scores, reverse=True)
    assert lines[1].split()[-1] == query  # an indexed image finds itself first
    page = result._repr_html_()
    assert page.count("<img") == 4 and page.count("data:image/jpeg;base64,") == 4
    assert "#1 " in page and f"{result.matches[0].score:.3f}" in page


def test_map_cli_draws_a_labelled_grid(subset_collection: Path, tmp_path: Path) -> None:
    """`ris map` on labelled Caltech images: a grid of whole thumbnails where images of a class sit side
    by side, every folder label written, and the same map as a page."""
    from ris.collection import Collection
    from ris.tools import maps

    out, page = tmp_path / "maps" / "map.png", tmp_path / "maps" / "map.html"
    proc = run_cli("map", "--collection", str(subset_collection), "--out", str(out), "--html", str(page), "--thumb", "60")
    assert f"wrote {out}" in proc.stderr and f"wrote {page}" in proc.stderr
    cols, rows = maps.grid_shape(60)
    img = Image.open(out)
    assert img.size == (cols * 60 + 2 * maps.MARGIN, rows * 60 + maps.TITLE + maps.MARGIN)
    pixels = np.asarray(img.convert("RGB"))
    # nothing cut off: the margins hold no thumbnail, at most the grey and white of a label kept inside the picture
    for margin in (pixels[:, : maps.MARGIN], pixels[:, -maps.MARGIN :], pixels[-maps.MARGIN :]):
        assert (margin.max(axis=2) == margin.min(axis=2)).all()

    html = page.read_text()
    assert html.count("<img ") == 60 and html.count("data:image/jpeg;base64,") == 60
    assert sorted(re.findall(r'<span class="label"[^>]*>([^<]+)</span>', html)) == sorted(SUBSET_CLASSES)

    # the layout itself: neighbouring cells mostly hold images of the same class
    with Collection.open(subset_collection) as coll:
        catalogue, vectors = coll.vectors()
    cells = maps.snap_to_grid(maps.layout(vectors), cols, rows)
    assert len({tuple(c) for c in cells}) == 60 and cells.min() >= 0 and (cells.max(axis=0) < (cols, rows)).all()
    where = {tuple(c): r.label for c, r in zip(cells, catalogue, strict=True)}
    pairs = [(where[c], where.get((c[0] + 1, c[1]))) for c in where] + [(where[c], where.get((c[0], c[1] + 1))) for c in where]
    same = [a == b for a, b in pairs if b is not None]
    assert sum(same) / len(same) > 0.6, sum(same) / len(same)  # 6 classes at random: ~0.17


def test_map_samples_with_a_fixed_seed(sample_collection: Path, tmp_path: Path) -> None:
    from ris.tools.maps import make_map

    n = len(sample_paths())
    (first,), drawn, total = make_map(sample_collection, tmp_path / "a.png", method="pca", limit=5, thumb=40)
    assert (drawn, total) == (5, n)
    (second,), _, _ = make_map(sample_collection, tmp_path / "b.png", method="pca", limit=5, thumb=40)
    assert first.read_bytes() == second.read_bytes()  # the same sample, the same picture


def test_map_without_its_extra_says_which_to_install(sample_collection: Path, tmp_path: Path) -> None:
    """Without scikit-learn (the map extra) `ris map` is one line naming the extra, and writes nothing."""
    argv = ["ris", "map", "-c", str(sample_collection), "--out", str(tmp_path / "m.png")]
    code = f"import sys; sys.modules['sklearn'] = None; from ris.cli import main; sys.argv = {argv!r}; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    _assert_one_line_error(proc, 'ris map\'s t-SNE layout needs scikit-learn, which is not installed: pip install "ris[map]"')
    assert not (tmp_path / "m.png").exists()


def _assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_map_cli_errors(tmp_path: Path) -> None:
    from ris.collection import Collection

    proc = run_cli("map", "--collection", str(tmp_path / "missing.ris"), "--out", str(tmp_path / "m.png"), check=False)
    _assert_one_line_error(proc, "no collection at")
    assert not (tmp_path / "m.png").exists()

    small = tmp_path / "two.ris"
    with Collection.open_or_create(small) as coll:
        coll.index(sample_paths()[:2])
    proc = run_cli("map", "-c", str(small), "--out", str(tmp_path / "m.png"), check=False)
    _assert_one_line_error(proc, "at least 3 images")


def test_layout_grid_and_labels(tmp_path: Path) -> None:
    from ris.tools import maps

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(12, 16)).astype(np.float32)
    assert maps.layout(vectors, "pca").shape == maps.layout(vectors, "tsne").shape == (12, 2)
    np.testing.assert_allclose(maps.layout(vectors, "pca"), maps.layout(vectors[::-1], "pca")[::-1], atol=1e-6)
    with pytest.raises(RisError, match="at least 3"):
        maps.layout(vectors[:2])
    with pytest.raises(RisError, match="unknown map method"):
        maps.layout(vectors, "umap")
    assert maps.grid_shape(12) == (4, 3) and maps.grid_shape(16) == (4, 4) and maps.grid_shape(2000) == (45, 45)

    # points already on a 3x2 grid keep their cells (row 0 is the top: y grows upwards)
    points = np.array([[x, y] for y in (1.0, 0.0) for x in (0.0, 0.5, 1.0)])
    order = np.array([4, 0, 5, 2, 1, 3])
    assert maps.snap_to_grid(points[order], 3, 2).tolist() == [[c % 3, c // 3] for c in order]
    with pytest.raises(RisError, match="cannot hold"):
        maps.snap_to_grid(points, 2, 2)

    labels = ["a", "a", "b", "b", "b", None]
    cells = np.array([[0, 0], [1, 0], [0, 1], [1, 1], [2, 1], [2, 0]])
    assert maps.label_anchors(labels, cells) == [("b", 1, 1), ("a", 0, 0)]
    assert maps.label_anchors(["x"] * 6, cells) == []  # one folder: nothing to tell apart

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(red)
    Image.new("RGB", (20, 40), (0, 0, 255)).save(blue)
    out = maps.draw_map([red, blue], np.array([[0, 1], [1, 0]]), tmp_path / "m.png", thumb=20)
    img = np.asarray(Image.open(out).convert("RGB"))
    m = maps.MARGIN
    assert img.shape == (2 * 20 + 2 * m, 2 * 20 + 2 * m, 3)
    assert tuple(img[m + 30, m + 10]) == (255, 0, 0)  # column 0, row 1: bottom left
    assert tuple(img[m + 10, m + 30]) == (0, 0, 255)  # column 1, row 0: top right
    assert tuple(img[m + 10, m + 10]) == (255, 255, 255)  # an empty cell
