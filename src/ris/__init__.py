"""ris: reverse image search. Index folders of images; find the most similar ones to a query image.

    >>> from ris import Collection
    >>> coll = Collection.open_or_create("photos.ris")
    >>> coll.index(["~/Pictures"])
    >>> coll.search("query.jpg", k=5)

The public API is `__all__`; docs/python-api.md describes it.
"""

__version__ = "0.1.0"


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
