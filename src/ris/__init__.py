"""ris: reverse image search. Index folders of images; find the most similar ones to a query image.

    >>> from ris import Collection
    >>> coll = Collection.open_or_create("photos.ris")
    >>> coll.index(["~/Pictures"])
    >>> coll.search("query.jpg", k=5)

The public API is `__all__`; docs/python-api.md describes it.
"""

import os as _os

__version__ = "0.1.0"

# OpenMP threads (FAISS's) spin for a few ms after each parallel region unless told to sleep. A served search runs
# many short FAISS calls beside threads of its own (ris.threads), which the spinners kept off the second core: 2-3
# ms late on every verification step, 12 ms of CPU a query. Read once, when FAISS loads libgomp: set here first.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def __getattr__(name: str):
    # Lazy: worker processes import ris.images.decode and must not pay for torch/faiss imports.
    if name in ("Collection", "Manifest", "IndexReport"):
        from . import collection

        return getattr(collection, name)
    if name in ("SearchResult", "Match"):
        from .search import results as search

        return getattr(search, name)
    if name == "RisError":
        from .errors import RisError

        return RisError
    raise AttributeError(name)


def __dir__() -> list[str]:
    return sorted(__all__)


#: The public API (README, docs/python-api.md). Everything else lives in submodules (ris.tools.maps, ris.tools.evaluate, …),
#: importable but not promised to stay as it is.
__all__ = ["Collection", "IndexReport", "Manifest", "Match", "RisError", "SearchResult", "__version__"]
