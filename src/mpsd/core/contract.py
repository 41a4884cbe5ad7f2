"""Contract batches of MPS cores back into dense tensors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mpsd.core import _kernels
from mpsd.core.quantize import dequantize


def contract(cores: Sequence[np.ndarray], *, dtype: type = np.float64) -> np.ndarray:
    """Multiply out a batch of MPS.

    Parameters
    ----------
    cores : sequence of ndarray
        Core k of shape ``(B, R_{k-1}, d_k, R_k)``, ``R_0 = R_n = 1``.
    dtype : numpy dtype
        Arithmetic and result dtype.

    Returns
    -------
    ndarray of shape (B, d_1·d_2···d_n)
        The contracted tensors, flattened in C order over ``(d_1, ..., d_n)``.
    """
    if np.dtype(dtype) == np.float64:
        fast = _kernels.contract_cores([np.asarray(c, dtype=np.float64) for c in cores])
        if fast is not None:
            return fast
    first = np.asarray(cores[0], dtype=dtype)
    b = first.shape[0]
    acc = first.reshape(b, -1, first.shape[-1])  # (B, d_1, R_1)
    for core in cores[1:]:
        core = np.asarray(core, dtype=dtype)
        r_prev, d, r_next = core.shape[1:]
        if acc.shape[-1] != r_prev:
            raise ValueError(f"bond mismatch: left side has {acc.shape[-1]}, core expects {r_prev}")
        acc = np.matmul(acc, core.reshape(b, r_prev, d * r_next))
        acc = acc.reshape(b, -1, r_next)
    return acc.reshape(b, -1)


def contract_stored(cores: Sequence[np.ndarray], scales: np.ndarray | None) -> np.ndarray:
    """Multiply out a batch of MPS as stored: ``contract([dequantize(c, scales[:, k]) …])``.

    Parameters
    ----------
    cores : sequence of ndarray
        Stored cores (int8, float16 or float32), core k of shape ``(B, R_{k-1}, d_k, R_k)``.
    scales : ndarray of shape (B, n), or None
        Per-tensor scale of every core (int8 storage).

    Returns
    -------
    ndarray of shape (B, d_1·d_2···d_n), float64
        Bit for bit the plain dequantise-then-contract; the compiled path dequantises while it
        copies the cores in, with no float copy of each core.
    """
    fast = _kernels.contract_cores(list(cores), scales)
    if fast is not None:
        return fast
    return contract([dequantize(c, None if scales is None else scales[:, k]) for k, c in enumerate(cores)])
