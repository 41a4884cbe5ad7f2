"""Budgets, and the mpsd arm at a budget (bisection on ``ratio=`` of :func:`mpsd.compress`).

A budget is either a number of bytes on disk (given on the command line as a fraction of the raw
size ``N·H·W·C`` of the training images) or the paper's parameter ratio ρ (stored parameters over
``N·H·W·C``).  For a byte budget mpsd bisects the ``ratio=`` of :func:`mpsd.compress` until the
whole store (metadata, manifest and labels included) fits.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mpsd.errors import OptionError

__all__ = ["Budget", "compress_to_budget", "parse_fractions"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """What an arm may keep.

    Attributes
    ----------
    kind : {"bytes", "ratio"}
        Bytes on disk, or parameter ratio.
    fraction : float
        For ``"bytes"``, the budget as a fraction of the raw size; for ``"ratio"``, ρ itself.
    raw_bytes : int
        ``N·H·W·C`` of the training images (uint8).
    """

    kind: str
    fraction: float
    raw_bytes: int

    @property
    def nbytes(self) -> int | None:
        """The byte budget (``None`` for a parameter-ratio budget)."""
        return int(self.fraction * self.raw_bytes) if self.kind == "bytes" else None

    @property
    def label(self) -> str:
        """Short label for tables: ``"20% bytes"`` or ``"ρ=0.4"``."""
        return f"{self.fraction:.0%} bytes" if self.kind == "bytes" else f"ρ={self.fraction:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "fraction": self.fraction, "raw_bytes": self.raw_bytes, "budget_bytes": self.nbytes, "label": self.label}


def parse_fractions(text: str | Sequence[float] | None, *, what: str) -> tuple[float, ...]:
    """Parse ``"0.1,0.2"`` (or ``"10%,20%"``) into fractions in (0, 1].

    Raises
    ------
    OptionError
        For values that are not numbers in (0, 1].
    """
    if text is None:
        return ()
    items: list[Any] = [t for t in text.replace(" ", "").split(",") if t] if isinstance(text, str) else list(text)
    out = []
    for item in items:
        try:
            value = float(item[:-1]) / 100 if isinstance(item, str) and item.endswith("%") else float(item)
        except ValueError:
            raise OptionError(f"{what} expects comma-separated fractions like 0.1,0.2, got {item!r}") from None
        if not 0 < value <= 1:
            raise OptionError(f"{what} values must be in (0, 1], got {value:g}")
        out.append(value)
    return tuple(out)


def _compress(
    images: np.ndarray, labels: np.ndarray | None, classes: Sequence[str] | None, path: Path, ratio: float, options: dict[str, Any]
) -> Any:
    from mpsd.api import compress

    # only what decoding needs counts against the budget, as for the baselines
    options = {"metrics": False, **options}
    return compress(images, path, ratio=ratio, labels=labels, classes=classes, overwrite=True, **options)


def compress_to_budget(
    images: np.ndarray,
    path: str | Path,
    budget: Budget,
    *,
    labels: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    residual_bonds: Sequence[str] = (),
    dtype: str = "int8",
    sites: str | None = None,
    order: str = "quadtree",
    colour: str = "separate",
    max_iter: int = 14,
    rel_tol: float = 0.01,
) -> tuple[Any, dict[str, Any]]:
    """Compress ``images`` into the largest mpsd store that meets ``budget``.

    Parameters
    ----------
    images : ndarray of shape (N, H, W, C), uint8
    path : str or Path
        Store to write (replaced).
    budget : Budget
        ``"ratio"``: ``compress(ratio=ρ)`` once; ``"bytes"``: bisection on ``ratio`` until the
        store's ``bytes_on_disk`` is at most the budget and within ``rel_tol`` of it (or
        ``max_iter`` tries).
    labels, classes : optional
        Stored with the images (their bytes count).
    residual_bonds : sequence of str
        Bonds of residual stages (e.g. ``["2,2,2,2"]``); their parameters come out of the ratio.
    dtype, sites, order, colour
        Passed to :func:`mpsd.compress`.

    Returns
    -------
    archive : mpsd.Archive
        The committed store at ``path``.
    settings : dict
        ``ratio`` used, ``tries``, ``residual_bonds``, ``dtype``.

    Raises
    ------
    OptionError
        When even the smallest ratio tried exceeds the byte budget.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    options: dict[str, Any] = {"residual_bonds": tuple(residual_bonds), "dtype": dtype, "order": order, "colour": colour}
    if sites is not None:
        options["sites"] = sites
    if budget.kind == "ratio":
        archive = _compress(images, labels, classes, path, budget.fraction, options)
        return archive, {"ratio": budget.fraction, "tries": 1, **_describe(options)}
    limit = budget.nbytes
    assert limit is not None
    tries: list[tuple[float, int | None]] = []
    errors: list[OptionError] = []

    def attempt(r: float) -> int | None:
        try:
            nbytes = int(_compress(images, labels, classes, path, r, options).bytes_on_disk)
        except OptionError as exc:  # e.g. the ratio is below bond 1, or the residual stages exceed it
            log.debug("ratio %.5f rejected: %s", r, exc)
            errors.append(exc)
            nbytes = None
        tries.append((r, nbytes))
        log.debug("mpsd ratio %.5f -> %s bytes (budget %d)", r, nbytes, limit)
        return nbytes

    best: tuple[float, int] | None = None
    nb = attempt(1.0)
    if nb is not None and nb <= limit:
        best = (1.0, nb)
    else:
        lo, hi = 0.0, 1.0
        # bytes ~ parameters: start near the budget fraction
        r = min(0.999, max(1e-4, budget.fraction * 0.9))
        for _ in range(max_iter):
            nb = attempt(r)
            if nb is None:
                lo = r
            elif nb <= limit:
                lo = r
                if best is None or r > best[0]:
                    best = (r, nb)
                if nb >= limit * (1 - rel_tol):
                    break
            else:
                hi = r
            if hi - lo < 1e-4:
                break
            r = (lo + hi) / 2 if lo > 0 else hi / 4 if nb is not None and nb > limit else (lo + hi) / 2
    if best is None:
        shutil.rmtree(path, ignore_errors=True)
        if all(b is None for _, b in tries):  # nothing could be written at all: say why
            raise OptionError(f"mpsd arm: {errors[-1]}") from errors[-1]
        raise OptionError(
            f"mpsd cannot fit in {limit:,} bytes ({budget.label} of {budget.raw_bytes:,}); "
            f"smallest store tried: {min((b for _, b in tries if b is not None), default=0):,} bytes"
        )
    if tries[-1][0] != best[0]:
        archive = _compress(images, labels, classes, path, best[0], options)
    else:
        from mpsd.api import open as open_store

        archive = open_store(path)
    return archive, {"ratio": best[0], "tries": len(tries), **_describe(options)}


def _describe(options: dict[str, Any]) -> dict[str, Any]:
    out = dict(options)
    out["residual_bonds"] = list(out.get("residual_bonds", ()))
    return out
