"""The tutorial notebook runs end to end; results show themselves; `ris map` through the real CLI."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ris.errors import RisError

from .conftest import run_cli

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "reverse_image_search.ipynb"


@pytest.fixture(scope="module")
def sample_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled sample photos, indexed once with the default model."""
    from ris.collection import Collection
    from ris.demo import sample_paths

    path = tmp_path_factory.mktemp("samples") / "samples.ris"
    with Collection.open_or_create(path) as coll:
        coll.index(sample_paths())
    return path


def _outputs(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]


@pytest.mark.timeout(300)
def test_notebook_runs_on_the_bundled_photos(monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.delenv("RIS_NOTEBOOK_DATA", raising=False)  # the default: no data of the user's
    monkeypatch.delenv("LIMIT_PER_CLASS", raising=False)
    monkeypatch.delenv("RIS_NOTEBOOK_LIMIT_PER_CLASS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # A failing cell raises CellExecutionError with the cell's traceback.
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()  # fmt: skip

    outputs = _outputs(nb)
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o.data["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    results = [h for h in html if "data:image/jpeg;base64" in h]
    assert results and results[0].count("<img") == 6  # the query and K=5 matches
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 2  # the explained-variance plot and the map
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    markdown = "".join(o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {}))
    assert re.search(r"\d+ images searchable", text)
    assert "original first: True" in text
    assert "tutorial loop" in markdown and "| crop |" in markdown
    assert "precision@k is not meaningful" in markdown  # the bundled photos carry one label only


def test_result_prints_as_table_and_renders_thumbnails(sample_collection: Path) -> None:
    from ris.collection import Collection
    from ris.demo import sample_paths

    query = str(sample_paths()[3])
    with Collection.open(sample_collection) as coll:
        result = coll.search(query, k=3)
    lines = str(result).splitlines()
    assert lines[0] == f"query: {query}"
    ranks, scores = [], []
    for line in lines[1:]:
        rank, score, _label, path = line.split(maxsplit=3)
        ranks.append(int(rank))
        scores.append(float(score))
        assert Path(path).is_absolute()
    assert ranks == [1, 2, 3] and scores == sorted(scores, reverse=True)
    assert lines[1].split()[-1] == query  # an indexed image finds itself first
    page = result._repr_html_()
    assert page.count("<img") == 4 and page.count("data:image/jpeg;base64,") == 4
    assert "#1 " in page and f"{result.matches[0].score:.3f}" in page


def test_map_cli_draws_thumbnails(sample_collection: Path, tmp_path: Path) -> None:
    out = tmp_path / "maps" / "map.png"
    proc = run_cli("map", "--collection", str(sample_collection), "--out", str(out))
    assert f"wrote {out}" in proc.stderr.replace("\n", "")  # after a note when scikit-learn is missing
    pixels = np.asarray(Image.open(out).convert("RGB"))
    assert pixels.shape == (2000, 2000, 3)
    non_white = (pixels < 250).any(axis=2).mean()
    assert 0.005 < non_white < 0.5  # 21 thumbnails of 48 px on a white canvas


def test_map_command_samples_with_a_fixed_seed(sample_collection: Path, tmp_path: Path, capsys) -> None:
    from ris.maps import map_command

    first = map_command(sample_collection, tmp_path / "a.png", method="pca", limit=5)
    assert "(5 of 21 images, pca)" in capsys.readouterr().err.replace("\n", " ")
    second = map_command(sample_collection, tmp_path / "b.png", method="pca", limit=5)
    assert Image.open(first).size == (2000, 2000)
    assert first.read_bytes() == second.read_bytes()  # the same sample, the same picture


def _assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_map_cli_errors(tmp_path: Path) -> None:
    from ris.collection import Collection
    from ris.demo import sample_paths

    proc = run_cli("map", "--collection", str(tmp_path / "missing.ris"), "--out", str(tmp_path / "m.png"), check=False)
    _assert_one_line_error(proc, "no collection at")
    assert not (tmp_path / "m.png").exists()

    small = tmp_path / "two.ris"
    with Collection.open_or_create(small) as coll:
        coll.index(sample_paths()[:2])
    proc = run_cli("map", "-c", str(small), "--out", str(tmp_path / "m.png"), check=False)
    _assert_one_line_error(proc, "at least 3 images")


def test_layout_and_draw_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ris import maps

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(12, 16)).astype(np.float32)
    assert maps.layout(vectors, "pca").shape == (12, 2)
    np.testing.assert_allclose(maps.layout(vectors, "pca"), maps.layout(vectors[::-1], "pca")[::-1], atol=1e-6)
    with pytest.raises(RisError, match="at least 3"):
        maps.layout(vectors[:2])
    with pytest.raises(RisError, match="unknown map method"):
        maps.layout(vectors, "umap")
    monkeypatch.setattr(maps, "tsne_available", lambda: False)  # scikit-learn is optional
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert maps.layout(vectors, "tsne").shape == (12, 2)
    assert any("PCA instead of t-SNE" in str(w.message) for w in caught)

    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (40, 20), (255, 0, 0)).save(red)
    Image.new("RGB", (20, 40), (0, 0, 255)).save(blue)
    out = maps.draw_map([red, blue], np.array([[0.0, 0.0], [1.0, 1.0]]), tmp_path / "m.png", thumb=20, canvas=100)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (100, 100, 3)
    assert tuple(img[90, 5]) == (255, 0, 0)  # the smallest x and y: bottom left
    assert tuple(img[5, 90]) == (0, 0, 255)  # the largest: top right
    assert tuple(img[50, 50]) == (255, 255, 255)
