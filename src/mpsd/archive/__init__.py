"""The Zarr v3 store: format, writing, reading, verifying, supplements."""

from __future__ import annotations

from typing import Any

__all__ = ["add_supplement"]


def __getattr__(name: str) -> Any:
    if name == "add_supplement":
        from mpsd.archive.supplement import add_supplement

        return add_supplement
    raise AttributeError(name)
