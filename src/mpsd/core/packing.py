"""Row-packed storage of MPS cores whose ranks differ from tensor to tensor.

A batch of MPS is computed with common, zero-padded bond dimensions ``R`` (the largest rank of
the batch), but each tensor uses its own ranks ``r`` (shape (B, n−1)).  Stored, core k of a
tensor keeps only its ``r_{k-1}·d_k·r_k`` entries, in C order ``(r_{k-1}, d_k, r_k)``, at the
front of a row of fixed width (the store's storage bonds); the rest of the row is zero, one run
that the compressor reduces to a few bytes.  Zero padding scattered through every row, as in a
plain padded array, costs 10–40 % more bytes at the ratios where ranks vary most
(``docs/format.md``).

Packing is a copy: :func:`pack_core` then :func:`unpack_core` gives back the padded core bit for
bit (its padding is zero by construction of the TT-SVD).
"""

from __future__ import annotations

import numpy as np

from mpsd.core import _kernels

__all__ = ["bond_ranks", "pack_core", "unpack_core"]


def bond_ranks(ranks: np.ndarray) -> np.ndarray:
    """Ranks ``(B, n−1)`` with the boundary bonds added: ``(B, n+1)``, ``[1, r_1, …, r_{n−1}, 1]``."""
    ranks = np.asarray(ranks, dtype=np.int64)
    ones = np.ones((ranks.shape[0], 1), dtype=np.int64)
    return np.concatenate([ones, ranks, ones], axis=1)


def _valid(b: int, r0: int, d: int, r1: int, left: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the used entries of padded cores (B, R0, d, R1) and their positions in packed rows."""
    i = np.arange(r0).reshape(1, r0, 1, 1)
    j = np.arange(d).reshape(1, 1, d, 1)
    k = np.arange(r1).reshape(1, 1, 1, r1)
    lt = left.reshape(b, 1, 1, 1)
    rt = right.reshape(b, 1, 1, 1)
    mask = (i < lt) & (k < rt) & (j >= 0)
    pos = (i * d + j) * rt + k
    return mask, pos


def _fits(left: np.ndarray, right: np.ndarray, r0: int, r1: int, where: str) -> None:
    if left.size and (left.min() < 1 or left.max() > r0 or right.min() < 1 or right.max() > r1):
        raise ValueError(f"{where}: ranks outside 1..{r0} / 1..{r1}")


def pack_core(core: np.ndarray, left: np.ndarray, right: np.ndarray, width: int) -> np.ndarray:
    """Pack a batch of zero-padded cores into rows.

    Parameters
    ----------
    core : ndarray of shape (B, R0, d, R1)
        Core k of every tensor, zero-padded to the batch's bond dimensions.
    left, right : ndarray of shape (B,), int
        Each tensor's ranks ``r_{k-1}`` and ``r_k`` (1 ≤ left ≤ R0, 1 ≤ right ≤ R1).
    width : int
        Row width, at least ``R0·d·R1``.

    Returns
    -------
    ndarray of shape (B, width), dtype of ``core``
        Row t holds ``core[t, :left[t], :, :right[t]]`` in C order, then zeros.
    """
    b, r0, d, r1 = core.shape
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    _fits(left, right, r0, r1, "pack_core")
    if width < r0 * d * r1:
        raise ValueError(f"pack_core: width {width} < {r0}·{d}·{r1}")
    out = np.zeros((b, width), dtype=core.dtype)
    if b == 0:
        return out
    if (left == r0).all() and (right == r1).all():
        out[:, : r0 * d * r1] = core.reshape(b, -1)
        return out
    if _kernels.pack_rows(core, left, right, out):
        return out
    mask, pos = _valid(b, r0, d, r1, left, right)
    mask = np.broadcast_to(mask, core.shape)
    rows = np.broadcast_to(np.arange(b).reshape(b, 1, 1, 1), core.shape)
    out[rows[mask], np.broadcast_to(pos, core.shape)[mask]] = core[mask]
    return out


def unpack_core(rows: np.ndarray, left: np.ndarray, right: np.ndarray, r0: int, d: int, r1: int) -> np.ndarray:
    """Inverse of :func:`pack_core`: zero-padded cores (B, r0, d, r1) from packed rows.

    Parameters
    ----------
    rows : ndarray of shape (B, W)
        Packed rows, ``W >= max(left·d·right)``.
    left, right : ndarray of shape (B,), int
        Each tensor's ranks, ``1 ≤ left ≤ r0``, ``1 ≤ right ≤ r1``.
    r0, d, r1 : int
        Padded shape of the result.

    Returns
    -------
    ndarray of shape (B, r0, d, r1), dtype of ``rows``
    """
    b, width = rows.shape
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    _fits(left, right, r0, r1, "unpack_core")
    if b and int((left * right).max()) * d > width:
        raise ValueError(f"unpack_core: rows of {width} entries cannot hold ranks up to {r0}·{d}·{r1}")
    if b and (left == r0).all() and (right == r1).all():
        return np.ascontiguousarray(rows[:, : r0 * d * r1]).reshape(b, r0, d, r1)
    out = np.zeros((b, r0, d, r1), dtype=rows.dtype)
    if b == 0 or _kernels.unpack_rows(rows, left, right, out):
        return out
    mask, pos = _valid(b, r0, d, r1, left, right)
    mask = np.broadcast_to(mask, out.shape)
    index = np.broadcast_to(np.arange(b).reshape(b, 1, 1, 1), out.shape)
    out[mask] = rows[index[mask], np.broadcast_to(pos, out.shape)[mask]]
    return out
