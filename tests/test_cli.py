"""The real `ris` command in a subprocess: outputs a user relies on, and one-line errors."""

from __future__ import annotations

import functools
import glob
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from .conftest import SUBSET_CLASSES, run_cli


def _assert_one_line_error(proc, needle: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_search_json_is_one_object_per_query(subset_collection: Path, subset_dir: Path) -> None:
    queries = [str(sorted((subset_dir / c).glob("*.jpg"))[0]) for c in ("panda", "cup")]
    proc = run_cli("search", *queries, "--collection", str(subset_collection), "-k", "3", "--json")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for query, line in zip(queries, lines, strict=True):
        obj = json.loads(line)
        assert set(obj) == {"query", "matches"} and obj["query"] == query
        assert [set(m) for m in obj["matches"]] == [{"rank", "path", "score", "similarity", "label", "inliers"}] * 3
        assert obj["matches"][0]["path"] == query and obj["matches"][0]["label"] in SUBSET_CLASSES
        assert obj["matches"][0]["inliers"] >= 12  # the indexed file itself: keypoints confirm it
        assert [m["rank"] for m in obj["matches"]] == [1, 2, 3]
        assert Path(obj["matches"][1]["path"]).is_absolute()


def test_search_writes_grid_and_page(subset_collection: Path, subset_dir: Path, tmp_path: Path) -> None:
    query = str(sorted((subset_dir / "sunflower").glob("*.jpg"))[1])
    proc = run_cli("search", query, "-c", str(subset_collection), "-k", "5",
                   "--grid", str(tmp_path / "g.png"), "--html", str(tmp_path / "p.html"))  # fmt: skip
    assert "sunflower" in proc.stdout  # the readable table
    grid = Image.open(tmp_path / "g.png")
    assert grid.width >= 6 * 160 and grid.height >= 160
    page = (tmp_path / "p.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 6 and "sunflower" in page
    assert page.count("✓ same scene") == 1  # the indexed file itself, confirmed by keypoints


def test_info_json(subset_collection: Path) -> None:
    info = json.loads(run_cli("info", "-c", str(subset_collection), "--json").stdout)
    for key in ("images", "skipped", "skipped_files", "model", "dims", "format_version"):
        assert key in info
    assert info["model"] == "efficientnet-lite0" and info["images"] == 60 and info["skipped"] == 0


def test_index_from_list_and_eval(subset_dir: Path, tmp_path: Path) -> None:
    files = sorted(subset_dir.glob("*/*.jpg"))[::2]
    listing = tmp_path / "list.txt"
    listing.write_text("# my photos\n" + "\n".join(map(str, files)) + "\n")
    proc = run_cli("index", "--from-list", str(listing), "-c", str(tmp_path / "c.ris"), "--json")
    report = json.loads(proc.stdout)
    assert report["images"] == len(files) and report["extracted"] == len(files)
    assert report["times"]["model"] > 0
    ev = json.loads(run_cli("eval", "-c", str(tmp_path / "c.ris"), "--json").stdout)
    assert ev["images"] == len(files) and 0.5 < ev["precision@5"] <= 1 and 0.5 < ev["map"] <= 1


def test_demo_runs_offline_and_finds_every_original(tmp_path: Path) -> None:
    proc = run_cli("demo", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert proc.stdout.count("(found the original)") == 4 and "MISSED" not in proc.stdout
    assert (tmp_path / "demo" / "results.png").stat().st_size > 10_000
    assert (tmp_path / "demo" / "results.html").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["index", "/no/such/folder", "-c", "{tmp}/c.ris"], "no such file or folder: /no/such/folder"),
        (["index", "{tmp}/empty", "-c", "{tmp}/c.ris"], "no files found"),
        (["search", "{tmp}/q.jpg", "-c", "{tmp}/nothing.ris"], "no collection at"),
        (["search", "{tmp}/notes.txt", "-c", "{coll}"], "cannot use query"),
        (["search", "{tmp}/missing.jpg", "-c", "{coll}"], "unreadable"),
        (["index", "{tmp}/empty", "-c", "{tmp}/c2.ris", "--model", "resnet9000"], "unknown model"),
        (["index", "{tmp}/empty", "-c", "{coll}", "--model", "vgg16"], "built with model efficientnet-lite0"),
        (["search", "{tmp}/notes.txt", "-c", "{coll}", "-k", "0"], "k must be at least 1"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], needle: str, tmp_path: Path, subset_collection: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "q.jpg").write_bytes(b"")
    proc = run_cli(*[a.format(tmp=tmp_path, coll=subset_collection) for a in args], check=False)
    _assert_one_line_error(proc, needle)


def test_bench_reports_both_sides_and_their_ratio(subset_dir: Path) -> None:
    proc = run_cli("bench", str(subset_dir), "--limit", "24", "--baseline-limit", "4", "--device", "cpu", "--json")
    r = json.loads(proc.stdout)
    assert r["images"] == 24 and r["indexed"] == 24 and r["images_per_s"] > 0 and r["baseline_images_per_s"] > 0
    assert abs(r["ratio"] - r["images_per_s"] / r["baseline_images_per_s"]) <= 0.02 * r["ratio"] + 0.1  # rounding
    assert {"model", "write", "model waiting for decode"} <= set(r["stages_s"]) and r["peak_rss_mb"] > 0
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]


def test_bench_without_pytorch_or_a_baseline(subset_dir: Path, tmp_path: Path) -> None:
    """The default install has no PyTorch: `ris bench --baseline none` still measures ris, and a baseline that cannot
    run is refused in one line before the indexing run, not after it."""
    code = ("import sys\nsys.modules['torch'] = None\nsys.modules['keras'] = None\nsys.argv = ['ris'] + sys.argv[1:]\n"
            "from ris.cli import main\nmain()\n")  # fmt: skip
    base = ["bench", str(subset_dir), "--limit", "8", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-c", code, *base, "--baseline", "none", "--json"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["indexed"] == 8 and r["ratio"] is None and r["machine"]["torch"] is None
    for extra, needle in (["--baseline", "torch"], "PyTorch"), (["--baseline", "keras", "--baseline-weights", "w.h5"], "Keras"):
        proc = subprocess.run([sys.executable, "-c", code, *base, *extra], capture_output=True, text=True, timeout=600,
                              cwd=tmp_path)  # fmt: skip
        _assert_one_line_error(proc, needle)
    _assert_one_line_error(run_cli(*base, "--baseline", "tensorflow", check=False), "torch, keras or none")


def test_eval_copies_and_query_expansion(subset_collection: Path, subset_dir: Path) -> None:
    copies = json.loads(run_cli("eval", "-c", str(subset_collection), "--copies", "12", "--json").stdout)
    assert set(copies["transforms"]) >= {"crop", "flip", "jpeg30", "half", "rotate10", "border", "text", "all"}
    assert copies["transforms"]["flip"]["recall@1"] >= 0.9 and copies["transforms"]["all"]["recall@5"] >= 0.9
    plain = json.loads(run_cli("eval", "-c", str(subset_collection), "--json", "--qe", "0").stdout)
    expanded = json.loads(run_cli("eval", "-c", str(subset_collection), "--json", "--qe", "3").stdout)
    assert expanded["map"] != plain["map"] and expanded["map"] > 0.6
    query = str(sorted((subset_dir / "panda").glob("*.jpg"))[0])
    line = json.loads(run_cli("search", query, "-c", str(subset_collection), "--qe", "3", "--json").stdout)
    assert line["matches"][0]["path"] == query


def test_index_factory_and_nprobe_options(subset_dir: Path, tmp_path: Path) -> None:
    coll = str(tmp_path / "ivf.ris")
    run_cli("index", str(subset_dir), "-c", coll, "--index", "IVF4,Flat", "--nprobe", "2", "--json")
    info = json.loads(run_cli("info", "-c", coll, "--json").stdout)
    assert info["index"] == "IVF4,Flat" and info["index_built"] == "IVF4,Flat" and info["nprobe"] == 2
    query = str(sorted((subset_dir / "cup").glob("*.jpg"))[1])
    line = json.loads(run_cli("search", query, "-c", coll, "--nprobe", "4", "--json").stdout)
    assert line["matches"][0]["path"] == query
    bad = run_cli("index", str(subset_dir), "-c", str(tmp_path / "bad.ris"), "--index", "NoSuchIndex", check=False)
    _assert_one_line_error(bad, "index")


@pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="a GPU machine may import PyTorch to use it")
def test_a_cpu_search_does_not_import_pytorch(subset_collection: Path, subset_dir: Path) -> None:
    """The CPU path runs the cached export: no network built, no PyTorch imported (1.4 s of a CLI search)."""
    query = str(sorted(subset_dir.rglob("*.jpg"))[0])
    script = ("import sys; from ris.collection import Collection; "
              f"m = Collection.open({str(subset_collection)!r}).search({query!r}, k=1).matches; "
              "print(m[0].path, 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    assert out == [query, "False"]


def test_first_run_says_what_it_prepares_before_the_bar(subset_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """With an empty model cache, `ris index` names the model it prepares and each step, before the
    extraction bar; a second run on the warm cache prepares nothing."""
    monkeypatch.setenv("RIS_CACHE_DIR", str(tmp_path / "empty-cache"))
    files = sorted(subset_dir.glob("*/*.jpg"))[:4]
    proc = run_cli("index", *map(str, files), "-c", str(tmp_path / "first.ris"))
    lines = [line.strip() for line in proc.stderr.splitlines() if line.strip()]
    first = next(i for i, line in enumerate(lines) if line.startswith("preparing efficientnet-lite0 (grid3, int8)"))
    step = next(i for i, line in enumerate(lines) if line.startswith("1/1 compiling for this CPU"))
    ready = next(i for i, line in enumerate(lines) if line.startswith("efficientnet-lite0 (grid3, int8) ready in"))
    bar = next(i for i, line in enumerate(lines) if line.startswith("extracting"))
    assert first < step < ready < bar, proc.stderr
    again = run_cli("index", *map(str, files), "-c", str(tmp_path / "second.ris"))
    assert "preparing" not in again.stderr and "extracting" in again.stderr


def test_version_and_shell_completion() -> None:
    from importlib.metadata import version

    assert run_cli("--version").stdout.strip() == f"ris {version('ris')}"
    assert "--install-completion" in run_cli("--help").stdout


def test_index_json_is_one_line_and_a_missing_folder_leaves_no_collection(subset_dir: Path, tmp_path: Path) -> None:
    proc = run_cli("index", str(subset_dir / "cup"), "-c", str(tmp_path / "c.ris"), "--json")
    assert len(proc.stdout.splitlines()) == 1 and json.loads(proc.stdout)["images"] == 10
    proc = run_cli("index", "/nope", "-c", str(tmp_path / "new.ris"), check=False)
    _assert_one_line_error(proc, "no such file or folder: /nope")
    assert not (tmp_path / "new.ris").exists()


def test_remove_resolves_a_relative_glob_against_the_current_folder(subset_dir: Path, tmp_path: Path) -> None:
    coll = str(tmp_path / "c.ris")
    run_cli("index", str(subset_dir / "cup"), str(subset_dir / "panda"), "-c", coll)
    proc = run_cli("remove", "cup/*_000[12].jpg", "-c", coll, cwd=subset_dir)
    assert "removed 2 images; 18 remain" in proc.stderr
    proc = run_cli("remove", "cup/*_000[12].jpg", "cups/x.jpg", "-c", coll, cwd=subset_dir)  # gone, and a typo
    assert proc.stderr.strip() == "removed nothing: no indexed image matches cup/*_000[12].jpg, cups/x.jpg; 18 remain"


def _search(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`ris search` with bytes on stdin; stdout is a pipe, as in `ris search … | xargs`."""
    return subprocess.run([sys.executable, "-m", "ris", "search", *args], input=stdin, capture_output=True,
                          env={**os.environ, "COLUMNS": "40", **(env or {})}, timeout=600)  # fmt: skip


def test_search_output_for_pipes_stdin_and_urls(subset_collection: Path, subset_dir: Path) -> None:
    query = sorted((subset_dir / "panda").glob("*.jpg"))[0]
    coll = str(subset_collection)
    paths = _search(str(query), "-c", coll, "-k", "3", "--format", "paths")
    lines = paths.stdout.decode().splitlines()
    assert paths.returncode == 0 and len(lines) == 3 and lines[0] == str(query) and all(Path(p).is_file() for p in lines)
    table = _search(str(query), "-c", coll, "-k", "3").stdout.decode()  # COLUMNS=40: long paths still whole
    assert table.splitlines()[0] == f"query: {query}" and f"\t{query}" in table

    piped = _search("-", "-c", coll, "-k", "3", "--json", stdin=query.read_bytes())
    obj = json.loads(piped.stdout)
    assert obj["query"] == "-" and obj["matches"][0]["path"] == str(query)

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(subset_dir))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/panda/{query.name}"
        obj = json.loads(_search(url, "-c", coll, "-k", "1", "--json").stdout)
        assert obj["query"] == url and obj["matches"][0]["path"] == str(query)
        too_big = _search(url, "-c", coll, env={"RIS_MAX_FILE_MB": "0.001"})
        _assert_one_line_error(_text(too_big), "is larger than 0.000999451 MB (set RIS_MAX_FILE_MB")
        missing = _search(url + ".nope", "-c", coll)
        _assert_one_line_error(_text(missing), "cannot download query")
        httpd.shutdown()


def _text(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    proc.stdout, proc.stderr = proc.stdout.decode(), proc.stderr.decode()
    return proc


def test_errors_blame_the_right_thing(subset_collection: Path, subset_dir: Path) -> None:
    query = str(sorted((subset_dir / "cup").glob("*.jpg"))[0])
    proc = run_cli("search", query, "-c", str(subset_collection), "--grid", "/proc/x.png", check=False)
    _assert_one_line_error(proc, "cannot write /proc/x.png")
    assert "collection" not in proc.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        proc = run_cli("serve", "-c", str(subset_collection), "--port", port, check=False)
    _assert_one_line_error(proc, f"cannot serve on 127.0.0.1:{port}")


def test_every_option_has_help() -> None:
    import typer.main

    from ris.cli import app

    commands = typer.main.get_command(app).commands
    missing = [f"{name} {p.opts[0]}" for name, cmd in commands.items() for p in cmd.params
               if p.param_type_name == "option" and not getattr(p, "help", None)]  # fmt: skip
    assert not missing, missing


def test_serving_beyond_loopback_says_so_once_ready(subset_collection: Path) -> None:
    """The lines a person exposing a collection must read come from the CLI, after the collection has loaded."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "ris", "serve", "-c", str(subset_collection), "--host", "0.0.0.0",
                             "--port", port], stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        lines = [proc.stderr.readline() for _ in range(2)]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert lines[0].startswith("warning: listening on 0.0.0.0: anyone who can reach this machine can search")
    assert lines[1].startswith("note: requests are answered for the host names ") and "localhost" in lines[1]


def test_settings_prints_the_documented_table() -> None:
    from ris.config import markdown

    proc = run_cli("settings")
    assert proc.stdout == markdown() and "| `RIS_MAX_FILE_MB` | 100 |" in proc.stdout


def test_search_a_folder_of_queries(subset_collection: Path, subset_dir: Path, tmp_path: Path) -> None:
    """A folder given to `ris search` searches its images as `ris index` would find them (recursively; hidden,
    non-image names left out), in batches, each shown under the folder as named; one that cannot be used is skipped
    with a line, and a folder of nothing usable is a one-line error."""
    originals = sorted(subset_dir.rglob("*.jpg"))[:35]  # more than one batch (SEARCH_BATCH)
    folder = tmp_path / "edited"
    for i, src in enumerate(originals):
        dst = folder / ("sub" if i % 3 == 0 else "") / f"{i:02d}.jpg"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(src.read_bytes())
    (folder / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 64)
    (folder / "notes.txt").write_text("not a picture")
    (folder / ".hidden.jpg").write_bytes(originals[0].read_bytes())
    proc = run_cli("search", "edited", str(originals[5]), "-c", str(subset_collection), "-k", "1", "--json", cwd=tmp_path)
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = sorted((f"edited/{p.relative_to(folder)}", originals[int(p.stem)]) for p in folder.rglob("[0-9]*.jpg"))
    assert [(g["query"], g["matches"][0]["path"]) for g in got] == [(q, str(o)) for q, o in expected] + [
        (str(originals[5]), str(originals[5]))]  # fmt: skip
    assert proc.stderr.strip() == "skipped: cannot use query edited/bad.jpg: not an image (or an unsupported format)"

    useless = tmp_path / "useless"
    useless.mkdir()
    (useless / "a.jpg").write_bytes(b"not an image")
    proc = run_cli("search", str(useless), "-c", str(subset_collection), check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and not proc.stdout
    assert lines[0].startswith("skipped: ")
    assert lines[1] == f"error: nothing searched: no usable image among the 1 file found in {useless}"


def test_a_contact_sheet_of_a_big_folder_holds_its_first_rows(subset_collection: Path, subset_dir: Path, tmp_path: Path) -> None:
    """`--grid` for a folder of many queries draws the first GRID_ROWS (a PNG one can open) and says so; the page has all."""
    from ris.tools.render import CAPTION, GRID_ROWS, PAD, THUMB

    photos = sorted(subset_dir.rglob("*.jpg"))
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(GRID_ROWS + 1):
        (folder / f"{i:03d}.jpg").write_bytes(photos[i % len(photos)].read_bytes())
    proc = run_cli("search", str(folder), "-c", str(subset_collection), "-k", "1", "--format", "paths",
                   "--grid", str(tmp_path / "g.png"), "--html", str(tmp_path / "p.html"))  # fmt: skip
    assert len(proc.stdout.splitlines()) == GRID_ROWS + 1
    assert f"  (its first {GRID_ROWS} of {GRID_ROWS + 1} queries; --html shows them all)" in proc.stderr.splitlines()
    assert Image.open(tmp_path / "g.png").height == GRID_ROWS * (THUMB + CAPTION + PAD) + PAD
    assert (tmp_path / "p.html").read_text().count("<section>") == GRID_ROWS + 1
