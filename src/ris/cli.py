"""The `ris` command line: a thin layer over `Collection`. Errors are one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from .errors import RisError

app = typer.Typer(add_completion=True, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Reverse image search: index folders of images, find the most similar ones.")  # fmt: skip
# Markup and emoji codes off: paths and reasons are printed, and "[bold red]" or ":smile:" are file names too.
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)
out = Console(soft_wrap=True, markup=False, emoji=False)

CollectionOpt = Annotated[Path, typer.Option("--collection", "-c", help="Collection directory.")]
ModelOpt = Annotated[str | None, typer.Option("--model", help="efficientnet-lite0 (default), efficientnet-lite2, vgg16.")]
WeightsOpt = Annotated[str | None, typer.Option("--weights", help="Weights file (vgg16: torchvision .pth or Keras .h5).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
WorkersOpt = Annotated[int | None, typer.Option(help="Decode processes (default: one a core; all but two with a GPU).")]
ExcludeOpt = Annotated[list[str] | None, typer.Option(
    "--exclude", metavar="PATTERN",
    help="Leave out paths matching this glob, relative to a scanned folder (repeatable; also read from its .risignore).",
)]  # fmt: skip


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            out.print(f"ris {version('ris')}", highlight=False)
        except PackageNotFoundError:
            out.print("ris (not installed)", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Reverse image search: index folders of images, find the most similar ones."""


class PreparationDisplay:
    """Says on stderr what a first run prepares (export, calibration, compilation of the model), each
    step as it starts and, on a terminal, its own progress bar, so a first run never looks frozen."""

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.task = None

    def __call__(self, event) -> None:
        from .model.registry import cache_dir
        from .model.runtime import STEP_TEXT

        if event.step == "ready":
            self._stop()
            err.print(f"  {event.model} ready in {event.seconds:.1f} s", highlight=False, markup=False)
            return
        if not event.total:  # a step starts
            if event.index == 1:
                err.print(f"preparing {event.model} for this machine (once; cached in {cache_dir()}):",
                          highlight=False, markup=False)  # fmt: skip
            self._stop()
            text = f"  {event.index}/{event.steps} {STEP_TEXT[event.step]}"
            err.print(f"{text} …", highlight=False, markup=False)
            if err.is_terminal:
                self.bar = Progress(TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    console=err, transient=True)  # fmt: skip
                self.bar.start()
                self.task = self.bar.add_task(event.step, total=event.total or None)
        if self.bar is not None and self.task is not None and event.total:
            self.bar.update(self.task, completed=event.done, total=event.total)

    def _stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = self.task = None


@contextmanager
def progress_bar(enabled: bool = True, before: Callable[[], object] | None = None):
    """A factory handing `Collection.index` a tick function; shows images/s and ETA on stderr.

    before: called once there is something to extract, before the bar appears (the model is loaded
    there, so a first run's preparation is reported first instead of behind a bar stuck at 0).
    """
    columns = [TextColumn("[bold]extracting"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} img/s"), TimeRemainingColumn()]  # fmt: skip
    bar = Progress(*columns, console=err, disable=not enabled, transient=False)

    def start(total: int, scanned: int) -> Callable[[int], None]:
        if before is not None:
            before()
        bar.start()
        task = bar.add_task("extract", total=total, rate="-")

        def tick(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[task].speed
            bar.update(task, rate=f"{speed:.0f}" if speed else "-")

        return tick

    try:
        yield start
    finally:
        bar.stop()


def _paths(paths: list[str] | None, from_list: Path | None) -> list[str]:
    from .files.sources import read_list_file

    items = list(paths or [])
    if from_list:
        items += read_list_file(from_list)
    if not items:
        raise RisError("give at least one folder or file to index (or --from-list FILE)")
    return items


def _print_report(report, as_json: bool) -> None:
    if as_json:
        data = {k: v for k, v in report.__dict__.items() if k != "times"}
        data["times"] = report.times.as_dict()
        sys.stdout.write(json.dumps(data, ensure_ascii=True) + "\n")  # one line; non-UTF-8 names as \udcXX escapes
        return
    t = report.times
    rate = f", {t.extracted / t.wall:.0f} img/s" if t.wall and t.extracted else ""
    err.print(
        f"{report.images} images searchable; this run: {report.new} new, {report.changed} changed, "
        f"{report.removed} removed, {report.extracted} extracted{rate}; {report.skipped} skipped"
    )
    if report.ignored:
        from .files.sources import ignored_summary

        err.print(f"ignored {report.ignored} non-image files (by extension: {ignored_summary(report.ignored_types)})",
                  highlight=False)  # fmt: skip
    if n := report.raw_beside_image:
        err.print(f"left out {n} camera RAW file{'s' * (n != 1)} beside an image of the same name (IMG_1.CR2 beside "
                  "IMG_1.JPG): the image stands for both", highlight=False)  # fmt: skip
    for item in report.skipped_files[:10]:
        err.print(f"  skipped {item['path']}: {item['reason']}", highlight=False)
    if len(report.skipped_files) > 10:
        err.print(f"  … and {len(report.skipped_files) - 10} more (see `ris info`)")


@app.command()
def index(
    paths: Annotated[list[str] | None, typer.Argument(help="Folders (walked recursively) or image files.")] = None,
    collection: CollectionOpt = Path("collection.ris"),
    from_list: Annotated[Path | None, typer.Option("--from-list", help="File with one path per line.")] = None,
    model: ModelOpt = None,
    weights: WeightsOpt = None,
    pooling: Annotated[str | None, typer.Option(help="grid3 (default: 3x3 GeM cells), grid (2x2), rmac, gem or avg.")] = None,
    precision: Annotated[str | None, typer.Option(help="int8 (default) or fp32 on the CPU.")] = None,
    dims: Annotated[int | None, typer.Option(help="PCA dimensions (default 256; 0 keeps raw features).")] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model call.")] = 32,
    workers: WorkersOpt = None,
    ray: Annotated[str | None, typer.Option("--ray", metavar="ADDRESS", help="Ray: local, auto, ray://H:P.")] = None,
    index_factory: Annotated[
        str | None, typer.Option("--index", help='FAISS factory string (Milvus store: FLAT, HNSW, …), or "auto".')
    ] = None,
    nprobe: Annotated[int | None, typer.Option("--nprobe", help="IVF lists visited per search (0 = default).")] = None,
    store: Annotated[
        str | None,
        typer.Option(
            "--store", metavar="URI", help="New collections: faiss (default), milvus://HOST:PORT or milvus-lite://PATH.db."
        ),
    ] = None,
    dba: Annotated[
        int | None, typer.Option("--dba", help="Database-side augmentation: neighbours averaged into indexed vectors (0: off).")
    ] = None,
    verify: Annotated[
        bool | None, typer.Option("--verify/--no-verify", help="Searches verify their first result geometrically (new: on).")
    ] = None,
    exclude: ExcludeOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run report as one line of JSON.")] = False,
) -> None:
    """Index (or resync) folders: new and changed files are extracted, vanished ones dropped.

    In folders, image files are found by extension (files without one by content); other files
    (sidecars, videos, documents) are ignored and counted, hidden files and folders skipped."""
    options = dict(model=model, pooling=pooling, precision=precision, dims=dims, index_factory=index_factory,
                   nprobe=nprobe, store=store, dba=dba, verify=verify)  # fmt: skip
    _index(_paths(paths, from_list), collection, weights=weights, options=options, device=device, batch_size=batch_size,
           workers=workers, json_out=json_out, resync=True, ray=ray, exclude=exclude)  # fmt: skip


@app.command()
def add(
    paths: Annotated[list[str] | None, typer.Argument(help="Folders or image files to add.")] = None,
    collection: CollectionOpt = Path("collection.ris"),
    from_list: Annotated[Path | None, typer.Option("--from-list", help="File with one path per line.")] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model call.")] = 32,
    workers: WorkersOpt = None,
    exclude: ExcludeOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the run report as one line of JSON.")] = False,
) -> None:
    """Add images to an existing collection (nothing is dropped)."""
    _index(_paths(paths, from_list), collection, weights=weights, options=None, device=device, batch_size=batch_size,
           workers=workers, json_out=json_out, resync=False, exclude=exclude)  # fmt: skip


def _index(paths: list[str], collection: Path, *, weights: str | None, options: dict[str, Any] | None, device: str,
           batch_size: int, workers: int | None, json_out: bool, resync: bool, ray: str | None = None,
           exclude: list[str] | None = None) -> None:  # fmt: skip
    """Index into a collection opened as it is (options None: `ris add`) or opened or created with these options
    (ris.manifest.Options fields; None: not asked)."""
    from .collection import Collection

    if batch_size < 1:
        raise RisError("--batch-size must be at least 1")
    if ray is not None:  # a wrong address form is told before a collection is created
        from .extract.ray import check_address

        check_address(ray)
    for path in paths:  # before the collection is created: a mistyped folder must not leave an empty one behind
        if not os.path.exists(os.path.expanduser(path)):
            raise RisError(f"no such file or folder: {path}")
    fresh = options is not None and not collection.exists()
    if options is None:
        coll = Collection.open(collection, weights)
    else:
        coll = Collection.open_or_create(collection, weights, **options)
    # the model is loaded before the bar appears (Collection.index reuses it: same device, default threads)
    before = None if ray is not None else (lambda: coll.extractor(device))
    try:
        with coll, progress_bar(enabled=not json_out, before=before) as bar:
            report = coll.index(paths, resync=resync, batch_size=batch_size, workers=workers, device=device,
                                progress=bar, ray=ray, exclude=exclude or ())  # fmt: skip
    except RisError:
        if fresh:
            _drop_if_empty(collection)
        raise
    _print_report(report, json_out)
    if ray is not None and not json_out:  # evidence that the cluster's nodes shared the work (JSON: times.nodes)
        for node, counts in sorted(report.times.nodes.items()):
            err.print(f"  node {node}: {counts['decoded']} decoded, {counts['extracted']} through the model", highlight=False)


def _drop_if_empty(path: Path) -> None:
    """A collection this run created and then indexed nothing into (a folder of no images) is not left behind."""
    from .collection import Collection

    try:
        with Collection.open(path) as coll:
            empty = not coll.info()["images"]
    except RisError:
        return
    if empty:
        shutil.rmtree(path, ignore_errors=True)


@app.command()
def remove(
    patterns: Annotated[list[str], typer.Argument(help="Paths, folders or globs of indexed images.")],
    collection: CollectionOpt = Path("collection.ris"),
) -> None:
    """Remove images from the collection (the files themselves are not touched)."""
    from .collection import Collection

    # a relative glob is relative to here, as a relative path is (indexed paths are absolute)
    absolute = [p if os.path.isabs(os.path.expanduser(p)) else os.path.join(os.getcwd(), p) for p in patterns]
    with Collection.open(collection) as coll:
        n = coll.remove(absolute)
        left = coll.info()["images"]
    if n:
        err.print(f"removed {n} image{'s' * (n != 1)}; {left} remain", highlight=False)
    else:  # not an error (removing what is gone is done), but a mistyped path must not look like success
        err.print(f"removed nothing: no indexed image matches {', '.join(patterns)}; {left} remain", highlight=False)


@app.command()
def reindex(
    collection: CollectionOpt = Path("collection.ris"),
    refit_pca: Annotated[
        bool, typer.Option("--refit-pca", help="Refit PCA on the stored vectors (seconds; no re-extraction).")
    ] = False,
) -> None:
    """Rebuild every derived file (PCA, DBA graph, index) from the catalogue, beside the current ones: searches keep
    working meanwhile, and damaged or missing derived files are healed. --refit-pca refits PCA too."""
    from .collection import Collection

    with Collection.open(collection) as coll:
        coll.reindex(refit_pca)
        info = coll.info()
        err.print(f"index rebuilt: {info['images']} images, {info['dims']} dims")


#: How long a URL query may take to start answering and between reads (seconds).
URL_TIMEOUT_S = 20.0


def _download(url: str) -> bytes:
    """A URL query's bytes, refused past RIS_MAX_FILE_MB (checked as they arrive, not trusted from headers)."""
    import urllib.error
    import urllib.request

    from .images.decode import MAX_FILE_ENV, max_file_bytes

    cap = max_file_bytes()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "ris"}), timeout=URL_TIMEOUT_S) as r:
            data = r.read(cap + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RisError(f"cannot download query {url}: {getattr(exc, 'reason', None) or exc}") from None
    if len(data) > cap:
        raise RisError(f"query {url} is larger than {cap / 2**20:,.6g} MB (set {MAX_FILE_ENV} to change it)")
    return data


def _query(arg: str) -> str | bytes:
    """A query argument as Collection.search takes it: '-' reads the image from stdin, an http(s) URL is
    downloaded, anything else is a path."""
    if arg == "-":
        from .images.decode import max_file_bytes

        cap = max_file_bytes()
        data = sys.stdin.buffer.read(cap + 1)
        if len(data) > cap:
            raise RisError(f"the image on stdin is larger than {cap / 2**20:,.6g} MB")
        return data
    if arg.lower().startswith(("http://", "https://")):
        return _download(arg)
    return arg


#: Queries searched at once by `ris search`: each batch's results print as it ends, and memory stays bounded.
SEARCH_BATCH = 32


def _queries(args: list[str]) -> list[tuple[str, str | bytes, bool]]:
    """(name shown, query, named explicitly) for each query argument; a folder gives its image files, found as
    `ris index` finds them (recursively, hidden and .risignore'd names left out), named under the folder as given."""
    from .files.sources import scan

    items: list[tuple[str, str | bytes, bool]] = []
    for arg in args:
        if arg != "-" and not arg.lower().startswith(("http://", "https://")) and os.path.isdir(arg):
            root = os.path.normpath(os.path.abspath(os.path.expanduser(arg)))
            items += [(path, path, False) for path in (os.path.join(arg, os.path.relpath(f.path, root)) for f in scan([arg]))]
        else:
            items.append((arg, _query(arg), True))
    return items


def _searched(coll, batch: list[tuple[str, str | bytes, bool]], **options: Any) -> list[tuple[str, Any]]:
    """(name, result) for a batch of queries. A file found in a folder that cannot be used is skipped with a line
    (as `ris index` skips it); a query named explicitly that cannot be used is the command's error."""
    try:
        return list(zip([name for name, _, _ in batch], coll.search_many([q for _, q, _ in batch], **options), strict=True))
    except RisError:
        if len(batch) == 1 and batch[0][2]:
            raise
    found = []
    for name, query, explicit in batch:  # rare: find which query it was, one by one
        try:
            found.append((name, coll.search_many([query], **options)[0]))
        except RisError as exc:
            if explicit:
                raise
            err.print(f"skipped: {exc}", highlight=False)
    return found


def _print_table(r) -> None:
    """One query's matches: a table on a terminal; elsewhere tab-separated lines, never wrapped, for pipes."""
    if not out.is_terminal:
        sys.stdout.write(f"query: {r.query}\n")
        for m in r.matches:
            sys.stdout.write(f"{m.rank}\t{m.score:.3f}\t{m.cosine:.3f}\t{m.label or '-'}\t{m.path}\n")
        return
    marked = any(m.inliers for m in r.matches)
    table = Table(title=f"query: {r.query}", title_justify="left",
                  caption="✓ keypoints agree: the same picture or scene" if marked else None)  # fmt: skip
    for col in ("rank", "score", "similarity", "", "label", "path"):
        table.add_column(col, overflow="fold")
    for m in r.matches:
        table.add_row(str(m.rank), f"{m.score:.3f}", f"{m.cosine:.3f}", "✓" if m.inliers else "", m.label or "-", m.path)
    out.print(table)


def _written(what: str, write: Callable[[], Path]) -> None:
    """Write an output file; an unwritable path is blamed on itself, not on the collection."""
    try:
        err.print(f"{what} written to {write()}", highlight=False)
    except OSError as exc:
        raise RisError(f"cannot write {exc.filename or what}: {exc.strerror or exc}") from None


@app.command()
def search(
    queries: Annotated[list[str], typer.Argument(
        help="Query images: files, folders (their images), http(s) URLs, or - for stdin.")],  # fmt: skip
    collection: CollectionOpt = Path("collection.ris"),
    k: Annotated[int, typer.Option("-k", help="Matches per query.")] = 5,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per query, one per line.")] = False,
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="table (default), json (as --json) or paths (matched paths only, one a line, for pipes).",
    )] = "table",  # fmt: skip
    grid: Annotated[Path | None, typer.Option(help="Write a PNG: each query beside its matches.")] = None,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write a self-contained HTML page.")] = None,
    qe: Annotated[int | None, typer.Option("--qe", help="Query expansion neighbours (default: the collection's).")] = None,
    nprobe: Annotated[int | None, typer.Option("--nprobe", help="IVF lists visited (default: the collection's).")] = None,
    verify: Annotated[
        bool | None, typer.Option("--verify/--no-verify", help="Geometric check of the top 5 (default: the collection's).")
    ] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Find the k most similar indexed images for each query image.

    Each match shows its score (what ranked it: never increases down the list) and its similarity (the plain
    cosine similarity of query and image, 1 = identical); they differ where DBA, query expansion or
    verification re-rank."""
    from .collection import Collection
    from .tools.render import GRID_ROWS, grid_png, results_html

    if fmt not in ("table", "json", "paths"):
        raise RisError(f"--format must be table, json or paths, not {fmt!r}")
    if queries.count("-") > 1:
        raise RisError("stdin (-) can be read once: give it as one query only")
    items = _queries(queries)
    results = []
    with Collection.open(collection, weights) as coll:
        for start in range(0, len(items), SEARCH_BATCH):
            for name, r in _searched(coll, items[start : start + SEARCH_BATCH], k=k, device=device, qe=qe, nprobe=nprobe,
                                     verify=verify):  # fmt: skip
                r.query = name  # as given: "-", the URL or the path under the folder named, not "<image>"
                if json_out or fmt == "json":
                    sys.stdout.write(json.dumps(r.as_json()) + "\n")
                elif fmt == "paths":
                    sys.stdout.writelines(m.path + "\n" for m in r.matches)
                else:
                    _print_table(r)
                sys.stdout.flush()
                results.append(r)
    if not results:
        n = len(items)
        raise RisError(f"nothing searched: no usable image among the {n} file{'s' * (n != 1)} found in {', '.join(queries)}")
    if grid:
        _written("grid", lambda: grid_png(results, grid))
        if len(results) > GRID_ROWS:
            err.print(f"  (its first {GRID_ROWS} of {len(results)} queries; --html shows them all)", highlight=False)
    if html_out:
        _written("page", lambda: results_html(results, html_out))


@app.command()
def info(
    collection: CollectionOpt = Path("collection.ris"),
    json_out: Annotated[bool, typer.Option("--json", help="Print it as one line of JSON.")] = False,
) -> None:
    """What a collection holds: counts, model, dims, skipped files."""
    from .collection import Collection

    with Collection.open(collection) as coll:
        data = coll.info()
    if json_out:
        sys.stdout.write(json.dumps(data) + "\n")
        return
    for key, value in data.items():
        if key != "skipped_files":
            out.print(f"{key:>16}: {value}", highlight=False)
    for item in data["skipped_files"]:
        out.print(f"  skipped {item['path']}: {item['reason']}", highlight=False)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Where the demo collection and results go.")] = Path("ris-demo"),
    k: Annotated[int, typer.Option("-k", help="Matches per query.")] = 5,
) -> None:
    """Run the whole job offline on sample photos bundled with ris, with the bundled model."""
    from .collection import Collection
    from .tools.demo import make_queries, sample_paths
    from .tools.render import grid_png, results_html

    files = [str(p) for p in sample_paths()]
    err.print(f"indexing {len(files)} sample photos bundled with ris …")
    with Collection.open_or_create(out_dir / "collection.ris") as coll:
        with progress_bar(before=coll.extractor) as bar:
            report = coll.index(files, resync=True, progress=bar)
        _print_report(report, False)
        pairs = make_queries(out_dir / "queries")
        results = coll.search_many([str(q) for q, _ in pairs], k=k)
    for (query, original), result in zip(pairs, results, strict=True):
        top = result.matches[0] if result.matches else None
        verdict = "found" if top and Path(top.path) == original else "MISSED"
        out.print(f"{query.name:<28} -> {Path(top.path).name if top else '-':<24} "
                  f"score {top.score if top else 0:.3f}  ({verdict} the original)", highlight=False)  # fmt: skip
    png = grid_png(results, out_dir / "results.png")
    page = results_html(results, out_dir / "results.html", title="ris demo")
    out.print(f"result grid: {png.absolute()}\nresult page: {page.absolute()}", highlight=False)


@app.command(name="eval")
def evaluate(
    collection: CollectionOpt = Path("collection.ris"),
    queries: Annotated[Path | None, typer.Option("--queries", help="Folder of labelled queries (by subfolder).")] = None,
    k: Annotated[int, typer.Option("-k", help="Also report precision@k.")] = 5,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Labels left out (default BACKGROUND_Google).")] = None,
    copies: Annotated[int, typer.Option("--copies", help="Copy detection: edit N indexed images, find them.")] = 0,
    copy_set: Annotated[str, typer.Option("--copy-set", help="--copies: mild (crop, flip, JPEG, …), harsh (chained "
                        "edits: blur, picture-in-picture, thumbnails, rotations, …), heldout (never tuned on), unseen, "
                        "fresh (newer), turned (on its side, upside down), joined (beside other pictures) or all.")] = "mild",
    harsh: Annotated[bool, typer.Option("--harsh", help="Same as --copy-set harsh.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="--copies: which images, and each edit's parameters.")] = 0,
    qe: Annotated[int | None, typer.Option("--qe", help="Query expansion neighbours (default: the collection's).")] = None,
    dba: Annotated[
        int | None, typer.Option("--dba", help="Rank as if indexed with --dba N (default: the collection's; not --copies).")
    ] = None,
    verify: Annotated[
        bool | None, typer.Option("--verify/--no-verify", help="--copies: geometric verification (default: the collection's).")
    ] = None,
    votes: Annotated[bool, typer.Option("--votes/--no-votes", help="--copies: keep the indexed images' keypoints first and "
                     "search with their votes, as `ris serve` does (default); --no-votes: as a one-off `ris search`.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as one line of JSON.")] = False,
) -> None:
    """Retrieval quality: leave-one-out precision@1/5/10 and mAP by folder label, or copy detection.

    A collection with --dba is evaluated as it serves: an augmented database, plain queries; in
    leave-one-out no database vector holds the query itself (ris.vectors.dba.without_query).
    """
    from .collection import Collection
    from .threads import cpu_threads
    from .tools import evaluate as ev

    ks = sorted({1, 5, 10, k})
    excluded = tuple(exclude) if exclude else ev.DEFAULT_EXCLUDE
    if copies:
        with Collection.open(collection) as coll:
            if dba is not None and dba != coll.manifest.dba:
                raise RisError(f"copy detection searches the collection as indexed (--dba {coll.manifest.dba}); "
                               f"to measure --dba {dba}, run `ris index … --dba {dba}` on it first")  # fmt: skip
            chosen = "harsh" if harsh else copy_set
            ev.copy_edits(chosen)  # an unknown set is refused before the keypoints are found
            if votes and (coll.manifest.verify if verify is None else verify):
                err.print("keeping the indexed images' keypoints, as `ris serve` does…", highlight=False)
                coll.ranker.keep_keypoints(cpu_threads())
            report = ev.copy_detection(coll, copies, seed=seed, k=k, qe=qe, verify=verify, copy_set=chosen)
        if json_out:
            sys.stdout.write(json.dumps({"copies": copies, "copy_set": chosen, "seed": seed, "transforms": report}) + "\n")
            return
        for name, scores in report.items():
            out.print(f"{name:>16}: " + "  ".join(f"{key} {v:.3f}" for key, v in scores.items()), highlight=False)
        return
    with Collection.open(collection) as coll, progress_bar(enabled=not json_out) as bar:
        report = ev.evaluate_collection(coll, ks, excluded, qe=qe, dba=dba, queries=str(queries) if queries else None,
                                        progress=bar)  # fmt: skip
    if json_out:
        sys.stdout.write(json.dumps(report.as_json()) + "\n")
        return
    figures = "  ".join(f"precision@{kk} {v:.3f}" for kk, v in report.precision.items())
    out.print(f"{report.images} images, {report.classes} classes: {figures}  mAP {report.map:.3f}", highlight=False)
    if report.per_class:
        out.print("worst classes: " + ", ".join(f"{lab} (mAP {s['map']:.2f})" for lab, s in report.worst()), highlight=False)


@app.command()
def bench(
    folder: Annotated[str, typer.Argument(help="Folder of images to index.")],
    model: Annotated[str, typer.Option("--model", help="efficientnet-lite0, efficientnet-lite2, vgg16.")] = "efficientnet-lite0",
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[str | None, typer.Option(help="int8 (CPU default) or fp32.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per model call.")] = 32,
    workers: WorkersOpt = None,
    limit: Annotated[int | None, typer.Option(help="Use at most N images (spread over the folder).")] = None,
    baseline: Annotated[str, typer.Option(help="torch (eager, per image; needs PyTorch), keras (the tutorial's "
                                          "loop) or none.")] = "torch",
    baseline_limit: Annotated[int, typer.Option("--baseline-limit", help="Images for the slow baseline.")] = 100,
    baseline_weights: Annotated[str | None, typer.Option("--baseline-weights", help="Keras VGG16 .h5 weights.")] = None,
    pooling: Annotated[str | None, typer.Option(help="Descriptor pooling (default: the default collection's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as one line of JSON.")] = False,
) -> None:
    """Measure end-to-end indexing throughput against the tutorial's one-image loop, in one run."""
    from .model.registry import DEFAULT_POOLING
    from .tools.bench import run_bench

    result = run_bench(folder, model=model, weights=weights, device=device, precision=precision, batch_size=batch_size,
                       workers=workers, limit=limit, baseline=baseline, baseline_limit=baseline_limit,
                       baseline_weights=baseline_weights, pooling=pooling or DEFAULT_POOLING)  # fmt: skip
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    m = result["machine"]
    out.print(f"machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cores']} cores, GPU {m['gpu'] or 'none'}", highlight=False)
    out.print(f"ris index   : {result['images_per_s']:>8.1f} img/s  ({result['images']} images in {result['seconds']} s, "
              f"{result['model']} {result['precision']} on {result['device']})", highlight=False)  # fmt: skip
    if result["ratio"] is not None:
        out.print(f"tutorial    : {result['baseline_images_per_s']:>8.2f} img/s  ({result['baseline']}, "
                  f"{result['baseline_images']} images)", highlight=False)  # fmt: skip
        out.print(f"ratio       : {result['ratio']}x", highlight=False)
    out.print(f"peak RSS    : {result['peak_rss_mb']:.0f} MB", highlight=False)
    out.print("stages (s)  : " + ", ".join(f"{k} {v}" for k, v in result["stages_s"].items()), highlight=False)


def _check_port(host: str, port: int) -> None:
    """Fail in one line, before the collection and model load, when the port cannot be bound (in use, no
    permission) instead of a server log and exit 3 from uvicorn."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RisError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            sock.bind(address)
        except OSError as exc:
            raise RisError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None


@app.command()
def serve(
    collection: CollectionOpt = Path("collection.ris"),
    host: Annotated[str, typer.Option(help="Interface to bind; loopback unless you mean it.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port to listen on.")] = 8000,
    token: Annotated[str | None, typer.Option(envvar="RIS_TOKEN", help="Enables add/remove over the API.")] = None,
    max_upload_mb: Annotated[float | None, typer.Option(
        "--max-upload-mb", help="Larger uploads get 413 (default: RIS_MAX_FILE_MB, 100 MB).", show_default=False,
    )] = None,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", metavar="NAME", help="Also answer for this Host name (repeatable; '*': any). Loopback names always.",
    )] = None,
    allow_origin: Annotated[list[str] | None, typer.Option(
        "--allow-origin", metavar="URL", help="Let pages of this site (http://host:port) POST and DELETE here (repeatable).",
    )] = None,
    weights: WeightsOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Serve the web page and the REST API (docs at /docs)."""
    from .server import run

    _check_port(host, port)
    run(collection, host=host, port=port, token=token, weights=weights, device=device,
        max_upload_bytes=None if max_upload_mb is None else int(max_upload_mb * 1024 * 1024), allow_hosts=tuple(allow_host or ()),
        allow_origins=tuple(allow_origin or ()), say=lambda line: err.print(line, highlight=False))  # fmt: skip


@app.command(name="map")
def map_(
    collection: CollectionOpt = Path("collection.ris"),
    out_file: Annotated[Path, typer.Option("--out", help="PNG to write.")] = Path("map.png"),
    html_out: Annotated[Path | None, typer.Option("--html", help="Also write the map as a self-contained page.")] = None,
    method: Annotated[str, typer.Option(help="tsne (neighbours side by side) or pca (the two main axes).")] = "tsne",
    limit: Annotated[int, typer.Option(help="At most this many images (a random sample beyond).")] = 2000,
    thumb: Annotated[int | None, typer.Option(help="Thumbnail size in px (default: fits ~2,400 px across).")] = None,
) -> None:
    """Draw a map of the collection: thumbnails on a grid, similar images side by side, folder labels.

    Needs the map extra (scikit-learn's t-SNE, SciPy): pip install "ris[map]".
    """
    from .tools.maps import make_map

    written, drawn, total = make_map(collection, out_file, method=method, limit=limit, html_out=html_out, thumb=thumb)
    err.print(f"wrote {written[0]} ({drawn} of {total} images, {method})", highlight=False, markup=False)
    for extra in written[1:]:
        err.print(f"wrote {extra}", highlight=False, markup=False)


@app.command()
def dupes(
    collection: CollectionOpt = Path("collection.ris"),
    threshold: Annotated[float | None, typer.Option(help="Cosine similarity at or above which images are near-duplicates "
                                                    "unless their keypoints disagree (default 0.88; 0.80 before the "
                                                    "collection has its PCA).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Groups, and each image with its duplicates and scores.")] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="Print one CSV row per image in a group.")] = False,
    html_out: Annotated[Path | None, typer.Option("--html", help="Write a review page of each group's thumbnails.")] = None,
    keep: Annotated[str | None, typer.Option("--keep", help="largest|newest|first: print the others of each group "
                                             "(path, tab, the one kept) as a list to delete; deletes nothing.")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Match the keypoints of candidate pairs: "
                                         "rotated, cropped or framed copies below the threshold join, look-alike "
                                         "photos above it stay apart. --no-verify: the cosine alone.")] = True,
) -> None:
    """Groups of exact (same content hash) and near-duplicate images.

    Each group is a representative and its near-duplicates (no chains of look-alikes); an image joins
    the representative it matches best. A group's similarity is the lowest cosine to the representative."""
    from .tools.dupes import dupes_output

    text, page = dupes_output(collection, threshold=threshold, as_json=json_out, as_csv=csv_out,
                              html_out=str(html_out) if html_out else None, keep=keep, verify=verify)  # fmt: skip
    if page:
        sys.stderr.write(f"review page: {page.absolute()}\n")
    sys.stdout.write(text)


@app.command()
def export(
    collection: CollectionOpt = Path("collection.ris"),
    out_path: Annotated[Path, typer.Option("--out", help="Output file (.parquet) or folder (npy).")] = Path("export"),
    fmt: Annotated[str, typer.Option("--format", help="parquet or npy.")] = "npy",
) -> None:
    """Write features and metadata for other tools."""
    from .collection import Collection
    from .tools.export import export as write_export

    with Collection.open(collection) as coll:  # stdout stays clean: the note goes to stderr
        n = coll.info()["images"]
        written = write_export(coll, out_path, fmt)
    err.print(f"exported {n} images to {written} ({fmt})", highlight=False, markup=False)


@app.command()
def settings() -> None:
    """The environment variables ris reads: default, values, what each does (the table of docs/configuration.md)."""
    from .config import markdown

    out.print(markdown(), end="", highlight=False)


def _bytes_safe_streams() -> None:
    """File names that are not UTF-8 (held as surrogate escapes) are written as their original bytes, as
    `ls` does, instead of failing the print; JSON output escapes them (as \\udcXX) and stays ASCII."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") == "utf8":
            stream.reconfigure(errors="surrogateescape")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1, never a traceback."""
    import logging

    from .model.runtime import preparation_listener

    _bytes_safe_streams()
    # pydantic's notice about a dependency's own Field() use (seen once in CI, ahead of `ris serve`'s first line):
    # never about the user's input, so never theirs to read
    warnings.filterwarnings("ignore", message=r"The '\w+' attribute with value .* was provided to the `Field\(\)` function")
    handler = logging.StreamHandler(sys.stderr)  # the library's notices (a collection's upgrade, ...) as plain lines
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("ris").addHandler(handler)
    logging.getLogger("ris").setLevel(logging.INFO)
    try:
        with preparation_listener(PreparationDisplay()):
            app()
    except RisError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(1)
    except (sqlite3.OperationalError, OSError) as exc:  # disk full, read-only media, permissions
        err.print(f"error: cannot read or write the collection: {exc} (disk full or no permission?); "
                  "batches committed before this are kept", highlight=False, markup=False)  # fmt: skip
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted; committed batches are kept, run again to resume", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
