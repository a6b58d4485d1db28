"""The package's shape: a folder per stage the data passes through, no import cycles (what Python runs when it
imports a module), and a facade that stays small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ris"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Modules of the package this file imports at import time (not under `if TYPE_CHECKING`, not inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            continue
        for sub in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else ():
            if isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - sub.level + 1] if sub.level else []
                target = ".".join([*base, sub.module] if sub.module else base) if sub.level else sub.module or ""
                found.add(target)
                found.update(f"{target}.{a.name}" for a in sub.names)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    result: list[list[str]] = []

    def visit(v: str) -> None:
        order[v] = low[v] = len(order)
        stack.append(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                result.append(sorted([v, *component]))

    for v in graph:
        if v not in order:
            visit(v)
    return result


def test_no_import_cycles() -> None:
    files = list(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    assert len(graph) > 20 and graph["ris.collection"]  # the walk sees the package
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


#: the stages in the order the data passes through them: files -> images -> model -> extract -> vectors -> search,
#: and the tools built on a collection; each a package whose docstring says what the stage does
STAGES = ("files", "images", "model", "extract", "vectors", "search", "tools")
#: what sits at the top level: the public API, the facade and what every stage shares, and the two front ends
TOP_LEVEL = {"__init__.py", "__main__.py", "collection.py", "manifest.py", "config.py", "errors.py", "extras.py", "threads.py",
             "cli.py", "server.py"}  # fmt: skip


def test_each_stage_has_its_folder() -> None:
    for stage in STAGES:
        init = PACKAGE / stage / "__init__.py"
        assert init.is_file(), stage
        assert ast.get_docstring(ast.parse(init.read_text())), f"{stage}/__init__.py says what the stage does"


def test_no_module_sits_at_the_top_level_outside_the_allowed_list() -> None:
    assert {p.name for p in PACKAGE.glob("*.py")} <= TOP_LEVEL
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == {*STAGES, "static"}


def test_the_facade_stays_small() -> None:
    assert len((PACKAGE / "collection.py").read_text().splitlines()) <= 350


def test_files_are_replaced_in_one_place() -> None:
    """Every temp-file-and-rename goes through ris.files.atomic (fsync of the file and its folder)."""
    renamers = [p.name for p in PACKAGE.rglob("*.py") if p.name != "atomic.py" and ("os.replace(" in p.read_text()
                or "os.rename(" in p.read_text())]  # fmt: skip
    assert renamers == []


def test_environment_knobs_are_read_in_one_place_and_documented_from_it() -> None:
    from ris.config import SETTINGS, markdown

    readers = [p.name for p in PACKAGE.rglob("*.py") if p.name != "config.py" and "os.environ.get(\"RIS_" in p.read_text()]
    assert readers == []
    docs = (PACKAGE.parents[1] / "docs" / "configuration.md").read_text()
    assert markdown() in docs and len(SETTINGS) >= 10


def test_importing_ris_makes_openmp_threads_sleep_unless_the_user_chose() -> None:
    """FAISS's spinning OpenMP threads held the second core a served search's threads wanted (docs/configuration.md)."""
    import os
    import subprocess
    import sys

    probe = "import os, ris, faiss; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = lambda extra: subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True,  # noqa: E731
                                       text=True, check=True).stdout.strip()  # fmt: skip
    assert run({}) == "PASSIVE"
    assert run({"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
