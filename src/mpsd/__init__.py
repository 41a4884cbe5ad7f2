"""mpsd: compress image datasets with matrix product states.

>>> import mpsd                                   # doctest: +SKIP
>>> store = mpsd.compress(images, "out.zarr", bond="4,6,6,4", residual_bonds=["4,6,6,4"])
>>> mpsd.open("out.zarr")[0:10]                   # (10, H, W[, C]) uint8
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Archive", "__version__", "compress", "open", "open_source"]

if TYPE_CHECKING:
    from mpsd.api import compress, open
    from mpsd.archive.reader import Archive
    from mpsd.readers import open_source


def __getattr__(name: str) -> Any:
    # import lazily so that `import mpsd` stays cheap (no zarr/scipy until needed)
    if name in ("compress", "open"):
        from mpsd import api

        return getattr(api, name)
    if name == "Archive":
        from mpsd.archive.reader import Archive

        return Archive
    if name == "open_source":
        from mpsd.readers import open_source

        return open_source
    raise AttributeError(f"module 'mpsd' has no attribute {name!r}")
