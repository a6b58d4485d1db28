"""Find the image files to index: folders walked recursively, or a list file, labels from folders."""

from __future__ import annotations

import fnmatch
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RisError
from ..images.decode import max_file_bytes


@dataclass(frozen=True)
class SourceFile:
    """A candidate file; whether it is an image is decided by its content when decoded."""

    path: str  # absolute, normalised
    size: int
    mtime_ns: int
    label: str | None


def _source(path: str) -> SourceFile | None:
    """The file at this normalised absolute path, or None when it is not a regular file.

    One stat a file, plain strings: a million-file scan is bound by this loop (pathlib and repeated
    stats took 1.0 s for 18,000 files on a GPU host, ahead of a 3 s extraction).
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return None
    return SourceFile(path, st.st_size, st.st_mtime_ns, os.path.basename(os.path.dirname(path)) or None)


#: Files with these extensions (any case) are tried; other extensions (sidecars such as .xmp .json .aae, videos,
#: documents) are ignored and counted. Files without an extension are tried too: their content decides.
#: Camera RAW files, read through LibRaw (ris.images.raw). Not `.raw`, which names any binary dump.
CAMERA_RAW_EXTENSIONS = frozenset(
    ".dng .cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .raf .orf .rw2 .rwl .pef .srw .x3f .3fr .iiq .erf .kdc .dcr .mrw "
    ".mef .mos".split()
)
IMAGE_EXTENSIONS = CAMERA_RAW_EXTENSIONS | frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .dib .webp .tif .tiff .heic .heif .hif .avif .ppm .pgm .pbm .pnm .jp2 .j2k "
    ".tga .qoi .pcx .sgi .psd".split()
)
#: A file of glob patterns (one a line, '#' comments) in a scanned folder: matching paths are left out.
IGNORE_FILE = ".risignore"


class Scan(list):
    """scan()'s files (a list of SourceFile), the non-image files it ignored (by extension), and how many camera
    RAW files it left out for the image of the same name beside them."""

    ignored_types: dict[str, int] = {}  # noqa: RUF012 (replaced per scan, never mutated)
    raw_beside_image: int = 0

    @property
    def ignored(self) -> int:
        return sum(self.ignored_types.values())

    def counts(self) -> dict[str, Any]:
        """What an index report says of the scan beside its files."""
        return {"ignored": self.ignored, "ignored_types": self.ignored_types, "raw_beside_image": self.raw_beside_image}


def is_image_name(path: str) -> bool:
    """Whether a file is worth decoding by its name: an image extension, or none at all."""
    ext = os.path.splitext(os.path.basename(path))[1].lower()
    return not ext or ext in IMAGE_EXTENSIONS


def read_ignore_file(root: str) -> list[str]:
    """The glob patterns of root's .risignore (none when it has no such file)."""
    try:
        text = Path(root, IGNORE_FILE).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def excluded(rel: str, patterns: Iterable[str]) -> bool:
    """Whether a path relative to the scanned root matches a pattern: a glob on the whole relative path
    (`raw/*`, `*/tmp`), or, for a pattern without '/', on its name at any depth (`*.tmp`, `Trash`)."""
    name = os.path.basename(rel)
    for pat in patterns:
        pat = pat.strip().rstrip("/")
        if fnmatch.fnmatchcase(rel, pat) or ("/" not in pat and fnmatch.fnmatchcase(name, pat)):
            return True
    return False


def _walk(root: str, exclude: Iterable[str] = ()) -> Iterator[str]:
    """Every regular, non-hidden, not excluded file below root, in a stable order (sorted per folder).

    Symlinked folders are followed (photo libraries are often assembled from links), each real
    folder once, so a link loop cannot recurse forever. exclude: globs on the path relative to root.
    """
    patterns = [*exclude, *read_ignore_file(root)]
    visited: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in visited:
            dirnames[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        rel_dir = os.path.relpath(dirpath, root)
        prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and not excluded(prefix + d, patterns))
        for name in sorted(filenames):
            if not name.startswith(".") and not excluded(prefix + name, patterns):
                yield os.path.join(dirpath, name)


def read_list_file(list_file: str | os.PathLike) -> list[str]:
    """Paths from a file with one path per line; blank lines and '#' comments are ignored."""
    try:  # names that are not UTF-8 come through as os.walk gives them (surrogate escapes)
        text = Path(list_file).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise RisError(f"cannot read list file {list_file}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def scan(paths: Iterable[str | os.PathLike], exclude: Iterable[str] = ()) -> Scan:
    """The image files under the given folders (or the given files themselves), deduplicated.

    In folders, hidden names, paths matching `exclude` or the folder's .risignore (globs on the path
    relative to it) are left out, and files whose extension is not an image's are counted in
    `.ignored`, not returned, as are camera RAW files beside an image of the same name (counted in
    `.raw_beside_image`); a file named explicitly is always tried. A missing path is an error
    (the user mistyped), an empty result too: indexing nothing would silently drop every image of an
    existing collection.
    """
    max_file_bytes()  # a bad RIS_MAX_FILE_MB fails the run here, not every file in the decode workers
    exclude = list(exclude)
    found: dict[str, SourceFile] = {}
    ignored: Counter[str] = Counter()
    named: set[str] = set()  # files named explicitly: indexed whatever lies beside them
    for raw in paths:
        root = os.path.normpath(os.path.abspath(os.path.expanduser(os.fspath(raw))))
        try:
            is_dir = stat.S_ISDIR(os.stat(root).st_mode)
        except OSError:
            raise RisError(f"no such file or folder: {raw}") from None
        for path in _walk(root, exclude) if is_dir else [root]:
            path = os.path.normpath(path)
            if path in found:
                continue
            if is_dir and not is_image_name(path):
                ignored[os.path.splitext(path)[1].lower()] += 1
                continue
            try:
                source = _source(path)
            except OSError:
                continue  # vanished or unreadable while walking: not ours to index
            if source is not None:
                found[path] = source
                if not is_dir:
                    named.add(path)
    if not found:
        n = sum(ignored.values())
        what = f"no image files found ({n} non-image files ignored: {ignored_summary(ignored)})" if n else "no files found"
        raise RisError(f"{what} in: " + ", ".join(str(p) for p in paths))
    paired = _raw_beside_image(found) - named
    result = Scan(sorted((f for p, f in found.items() if p not in paired), key=lambda f: f.path))
    result.ignored_types = dict(ignored.most_common())
    result.raw_beside_image = len(paired)
    return result


def _raw_beside_image(found: dict[str, SourceFile]) -> set[str]:
    """The camera RAW files with an image of the same name in their folder (IMG_0001.CR2 beside IMG_0001.JPG, as a
    camera set to RAW + JPEG writes them): that image stands for both, or every search would show each photo twice.
    One split of each name: a million-file scan pays 0.8 s here (1.8 s splitting each name three times)."""
    stems: set[str] = set()
    raws: dict[str, str] = {}
    for path in found:
        stem, ext = os.path.splitext(path)
        if ext.lower() in CAMERA_RAW_EXTENSIONS:
            raws[path] = stem.lower()
        else:
            stems.add(stem.lower())
    return {path for path, stem in raws.items() if stem in stems}


def ignored_summary(types: dict[str, int], most: int = 6) -> str:
    """Ignored files by extension, the commonest first: ".xmp 118, .aae 40, .mov 3"."""
    items = sorted(types.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{ext} {n}" for ext, n in items[:most])
    more = len(items) - most
    return text + (f", {more} more kind{'s' * (more != 1)}" if more > 0 else "")
