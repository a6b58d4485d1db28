"""Upgrading collections written by older ris, one format step at a time (the ladder rclip's db.py keeps).

Format 1 -> 2: raw features (23 KB an image for grid3) leave SQLite; each content keeps one stored vector
in vectors.1.bf16 (raw below reduce.FIT_SAMPLE images, else their projection, fitted on a random sample of
them), and the derived files are rebuilt as generation 1. Runs once, under the writer lock, when a writable
collection is opened; a read-only one says how to upgrade it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CollectionLocked, RisError
from ..manifest import FORMAT_VERSION
from . import reduce
from .catalog import Catalog
from .reduce import Projection, projects

if TYPE_CHECKING:
    from ..collection import Collection

log = logging.getLogger("ris")


def upgrade(coll: Collection) -> None:
    """Bring an opened collection to FORMAT_VERSION in place (a no-op when it is there)."""
    m = coll.manifest
    try:
        coll.lock()
    except CollectionLocked:
        raise
    except RisError:
        raise RisError(f"collection {coll.path} was written by an older ris (format {m.format_version}) and must be "
                       "upgraded once where it can be written (any `ris` command there does it)") from None  # fmt: skip
    try:
        log.warning("upgrading collection %s to format %d (compact catalogue); this happens once", coll.path, FORMAT_VERSION)

        def plan(catalog: Catalog):
            shas = catalog.old_hashes()
            if not projects(m.raw_dims) or len(shas) <= reduce.FIT_SAMPLE:
                return None, None
            sample = np.random.default_rng(0).choice(len(shas), reduce.FIT_SAMPLE, replace=False)
            proj = Projection.fit(catalog.old_features([shas[i] for i in np.sort(sample)]), reduce.PROJECTED_DIMS)
            return proj, (proj.mean, proj.components)

        coll.catalog.upgrade(plan)
        coll.derived.update(rebuild=True)
        for old in ("pca.npz", "dba.npz", "index.faiss"):  # format 1's derived files
            (coll.path / old).unlink(missing_ok=True)
        coll.manifest = m.with_options(format_version=FORMAT_VERSION)
        coll.manifest.write(coll.path / "manifest.json")
        coll.record_built()
    finally:
        coll.unlock()
