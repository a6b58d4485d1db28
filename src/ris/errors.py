"""User-facing errors: the CLI prints them as one line and exits non-zero, never a traceback."""


class RisError(Exception):
    """A problem the user can fix (bad path, wrong collection, missing weights)."""


class CollectionLocked(RisError):
    """Another process is writing to the collection."""


class DecodeError(Exception):
    """One image file could not be turned into pixels; the reason is recorded, indexing goes on."""
