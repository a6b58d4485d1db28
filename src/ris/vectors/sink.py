"""Where extraction engines deliver features: the catalogue, through the stage-1 projection once it exists."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import reduce
from .catalog import Catalog, as_stored, from_stored
from .reduce import Projection, projects

log = logging.getLogger("ris")


class CatalogSink:
    """The extraction engines' Sink (ris.extract.pipeline.Sink) over the catalogue: raw features in, stored vectors kept.

    A collection with wide raw features keeps them raw until it holds FIT_SAMPLE images, then fits the
    projection on them (on the writer's thread, ~1 s once), rewrites them projected, and projects the rest
    as they come (ris.vectors.reduce). `sample_first` orders a run so those first images are a random sample of it.
    """

    def __init__(self, catalog: Catalog, raw_dims: int, projection: Projection | None):
        self.catalog, self.raw_dims, self.projection = catalog, raw_dims, projection
        self._raw = projects(raw_dims) and projection is None  # still keeping raw features
        self._live = len(catalog.live_slots()) if self._raw else 0
        # the fit sample as this run stores it (bfloat16 bits, in slot order), so the fit reads nothing back;
        # a run that resumes one with raw features already stored reads them all from the catalogue instead
        self._sample: list[np.ndarray] | None = [] if self._raw and not self._live else None

    def sample_first(self, todo: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """These pending images, a random FIT_SAMPLE of them first when the projection will be fitted in this run."""
        room = reduce.FIT_SAMPLE - self._live
        if not self._raw or len(todo) <= room or room <= 0:
            return todo
        first = np.zeros(len(todo), bool)
        first[np.random.default_rng(0).choice(len(todo), room, replace=False)] = True
        return [t for t, f in zip(todo, first, strict=True) if f] + [t for t, f in zip(todo, first, strict=True) if not f]

    def projecting(self, extractor: Any) -> Any:
        """The extractor, delivering projected features from the fit onwards where it can do so on its device."""
        if projects(self.raw_dims) and hasattr(extractor, "projecting"):
            return extractor.projecting(lambda: self.projection)
        return extractor

    def known(self, hashes: Sequence[str]) -> set[str]:
        return self.catalog.known_hashes(hashes)

    def commit(self, done: Sequence[tuple[int, str]], features: dict[str, np.ndarray], failed: Sequence[tuple[int, str]],
               signatures: dict[str, np.ndarray] | None = None) -> None:  # fmt: skip
        if features and self.projection is not None:
            raw = [sha for sha, f in features.items() if len(f) == self.raw_dims]
            if raw:  # an engine may deliver them projected already (ris.model.torch_runtime projects on the GPU)
                projected = self.projection(np.stack([features[sha] for sha in raw]))
                features = {**features, **dict(zip(raw, projected, strict=True))}
        self.catalog.commit_batch(done, features, failed, signatures)
        if self._raw and features:
            self._live += len(features)
            if self._sample is not None:
                self._sample.append(as_stored(list(features.values())))
            if self._live >= reduce.FIT_SAMPLE:
                self._project()

    def _project(self) -> None:
        """Fit the projection on the raw features kept so far and store every vector projected from now on."""
        slots = self.catalog.live_slots()
        kept = np.concatenate(self._sample) if self._sample else None
        if kept is not None and len(kept) == len(slots):  # else a content stored twice: its first row is not live
            proj, projected = Projection.fit_projecting(from_stored(kept), reduce.PROJECTED_DIMS, overwrite=True)
            self.catalog.rewrite(width=proj.dims, projection=(proj.mean, proj.components), live=(slots, projected))
        else:
            proj = Projection.fit(self.catalog.live_vectors(), reduce.PROJECTED_DIMS)
            self.catalog.rewrite(proj, proj.dims, (proj.mean, proj.components))
        self.projection, self._raw, self._sample = proj, False, None
        log.debug(
            "the collection stores %d-d projected vectors from now on (fitted on its first %d images)", proj.dims, len(slots)
        )
