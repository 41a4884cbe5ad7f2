"""Store MPS cores as scaled integers or small floats.

``int8`` (default)
    Per tensor and per core, ``q = round(x · (1/s))`` with ``s = max|x| / 127``; ``s`` is stored as
    float32 beside the core.  Decoding is ``q·s``.
``float16`` / ``float32``
    A plain cast; no scale is stored.
"""

from __future__ import annotations

import numpy as np

from mpsd.errors import OptionError

STORAGE_DTYPES = ("int8", "float16", "float32")


def check_storage_dtype(name: str) -> str:
    if name not in STORAGE_DTYPES:
        raise OptionError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return name


def quantize(core: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Quantise a batch of cores.

    Parameters
    ----------
    core : ndarray of shape (B, ...)
        Float cores, one per tensor of the batch.
    dtype : {"int8", "float16", "float32"}

    Returns
    -------
    stored : ndarray of shape (B, ...)
        The values to store.
    scale : ndarray of shape (B,) float32, or None
        Per-tensor scale (int8 only).
    """
    check_storage_dtype(dtype)
    if dtype != "int8":
        return core.astype(dtype), None
    b = core.shape[0]
    peak = np.abs(core.reshape(b, -1)).max(axis=1) if core.size else np.zeros(b)
    scale = (peak / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float64)
    # x · (1/s): one division per tensor, then multiplications (the compiled encoder does the same)
    q = np.rint(core * (1.0 / safe).reshape((b,) + (1,) * (core.ndim - 1)))
    return np.clip(q, -127, 127).astype(np.int8), scale


def dequantize(stored: np.ndarray, scale: np.ndarray | None, *, dtype: type = np.float64) -> np.ndarray:
    """Inverse of :func:`quantize`: float cores of shape ``stored.shape``."""
    values = stored.astype(dtype)
    if scale is None:
        return values
    return values * np.asarray(scale, dtype=dtype).reshape((stored.shape[0],) + (1,) * (stored.ndim - 1))
