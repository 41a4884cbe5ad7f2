"""Exceptions raised by mpsd.

Every error a user can cause derives from :class:`MpsdError`, which also subclasses
:class:`ValueError`, so callers may catch either.  The CLI turns an :class:`MpsdError` into one
line on stderr and exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MpsdError(ValueError):
    """Base class of every error a user of mpsd can cause (bad input, bad options, bad store)."""


class InputError(MpsdError):
    """An input file or folder cannot be read as images (missing, malformed, hostile)."""


class OptionError(MpsdError):
    """An option or argument is invalid, or options do not fit each other or the data."""


class StoreError(MpsdError):
    """A store is missing, incomplete, of an unknown format, or fails validation."""


class CorruptChunkError(StoreError):
    """A chunk of a store failed its checksum, or does not match the manifest.

    Parameters
    ----------
    array : str
        Path of the array inside the store.
    key : str
        Store key of the damaged chunk.
    detail : str
        What was wrong.
    """

    def __init__(self, array: str, key: str, detail: str = "checksum mismatch") -> None:
        self.array = array
        self.key = key
        self.detail = detail
        super().__init__(f"corrupt chunk {key!r} of array {array!r}: {detail}")


class ChunkNotFoundError(StoreError):
    """A chunk listed in the manifest is missing from the store."""

    def __init__(self, array: str, key: str) -> None:
        self.array = array
        self.key = key
        super().__init__(f"missing chunk {key!r} of array {array!r}")


class StoreLockedError(StoreError):
    """Another process is writing the same store."""


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{feature} needs {package}, which is not installed: "
            f"pip install 'mpsd[{extra}]'"
            + (" (torch is pinned to 2.13.0; an unpinned torch pulls a multi-GB CUDA build)" if extra == "torch" else "")
        )
