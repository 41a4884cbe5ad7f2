"""The paper's numbers: entanglement entropy (Eq. 3), local truncation errors (Definition 1)
and the Theorem 1 bound, all computed from the singular values of the unfoldings of a tensor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpsd.core import _kernels


@dataclass(frozen=True)
class LeftBasis:
    """Eigendecomposition of the Gram matrix ``G_k = A_(k) A_(k)ᵀ`` of one left unfolding.

    Kept by :func:`spectra_and_left_basis` for :func:`mpsd.core.ttsvd.tt_svd`, whose sweep meets
    the same matrix at bond ``k`` whenever no earlier bond changed the tensors.

    Attributes
    ----------
    bond : int
        k (0-based, as the bonds of ``tt_svd``): the unfolding ``A[j_1..j_{k+1} ; j_{k+2}..j_n]``.
    values : ndarray of shape (B, m)
        Eigenvalues, largest first (squared singular values of the unfolding).
    vectors : ndarray of shape (B, m, k), k <= m
        Column j belongs to ``values[:, j]``: the eigenvectors of the k largest eigenvalues.
    """

    bond: int
    values: np.ndarray
    vectors: np.ndarray


def unfolding_spectra(tensors: np.ndarray) -> list[np.ndarray]:
    """Squared singular values of every unfolding ``A[j_1..j_k ; j_{k+1}..j_n]``.

    Parameters
    ----------
    tensors : ndarray of shape (B, d_1, ..., d_n)

    Returns
    -------
    list of n−1 ndarray
        Item k−1 has shape (B, min(d_1···d_k, d_{k+1}···d_n)): the squared singular values of the
        k-th unfolding, largest first (eigenvalues of the Gram matrix of the smaller side, float64).

    Notes
    -----
    Only two Gram matrices are formed from the data: that of the largest unfolding whose row side
    is the smaller one, ``G_k = A_(k) A_(k)ᵀ``, and that of the first unfolding whose column side is
    the smaller one, ``H_k = A_(k)ᵀ A_(k)``.  The others follow by partial traces,
    ``G_{k-1} = Σ_{j_k} G_k[(·, j_k), (·, j_k)]`` and ``H_{k+1} = Σ_{j_{k+1}} H_k[(j_{k+1}, ·), (j_{k+1}, ·)]``,
    which are the same sums regrouped.
    """
    return spectra_and_left_basis(tensors)[0]


def spectra_and_left_basis(
    tensors: np.ndarray, basis_ranks: Sequence[int] | None = None
) -> tuple[list[np.ndarray], LeftBasis | None]:
    """:func:`unfolding_spectra`, and the eigenvectors of ``G_k`` it computed on the way.

    Parameters
    ----------
    tensors : ndarray of shape (B, d_1, ..., d_n)
    basis_ranks : sequence of n−1 int, optional
        Largest rank the sweep will keep at each bond (its ``max_bonds``): only that many
        leading eigenvectors of ``G_k`` are computed (all of them by default).

    Returns
    -------
    spectra : list of n−1 ndarray
        As :func:`unfolding_spectra`.
    basis : LeftBasis or None
        The eigendecomposition of ``G_k`` (None when no unfolding has the smaller row side), to
        pass to :func:`mpsd.core.ttsvd.tt_svd` as ``left_basis``.
    """
    a = np.asarray(tensors, dtype=np.float64)
    b, sites = a.shape[0], a.shape[1:]
    n = len(sites)
    left = [math.prod(sites[:k]) for k in range(1, n)]
    right = [math.prod(sites[k:]) for k in range(1, n)]
    out: list[np.ndarray] = [np.zeros((b, 0))] * (n - 1)
    on_left = [k for k in range(n - 1) if left[k] <= right[k]]
    on_right = [k for k in range(n - 1) if left[k] > right[k]]
    basis = None
    if on_left:
        k = on_left[-1]
        m = a.reshape(b, left[k], right[k])
        g = _kernels.gram_rows(m)
        n_vectors = left[k] if basis_ranks is None else min(int(basis_ranks[k]), left[k])
        w, v = _kernels.eigh_desc(g, vectors=True, k=n_vectors)
        assert v is not None
        basis = LeftBasis(bond=k, values=w, vectors=v)
        out[k] = w
        for k in reversed(on_left[:-1]):
            d = sites[k + 1]
            g = np.einsum("zaibi->zab", g.reshape(b, left[k], d, left[k], d))
            out[k] = _kernels.eigh_desc(g, vectors=False)[0]
    if on_right:
        k = on_right[0]
        m = a.reshape(b, left[k], right[k])
        h = _kernels.gram_cols(m)
        out[k] = _kernels.eigh_desc(h, vectors=False)[0]
        for k in on_right[1:]:
            d = sites[k]
            h = np.einsum("zaiaj->zij", h.reshape(b, d, right[k], d, right[k]))
            out[k] = _kernels.eigh_desc(h, vectors=False)[0]
    return out, basis


def entanglement_entropy(spectra: list[np.ndarray]) -> np.ndarray:
    """Entanglement entropy at every bond, Eq. 3 with natural log.

    ``E_k = −Σ_j p_j ln p_j`` with ``p_j = λ_j² / Σ λ²`` over the singular values λ of the k-th
    unfolding.  An all-zero tensor has entropy 0.

    Parameters
    ----------
    spectra : list of ndarray of shape (B, m_k)
        Squared singular values, from :func:`unfolding_spectra`.

    Returns
    -------
    ndarray of shape (B, n−1)
    """
    fast = _kernels.entanglement_entropy(spectra)
    if fast is not None:
        return fast
    cols = []
    for sq in spectra:
        total = sq.sum(axis=1, keepdims=True)
        p = np.divide(sq, total, out=np.zeros_like(sq), where=total > 0)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        cols.append(-plogp.sum(axis=1))
    return np.stack(cols, axis=1)


def local_truncation_errors(spectra: list[np.ndarray], ranks: np.ndarray) -> np.ndarray:
    """Local truncation error ε_k of Definition 1: ``sqrt(Σ_{j > r_k} λ_j²)`` of unfolding k.

    Parameters
    ----------
    spectra : list of ndarray of shape (B, m_k)
        Squared singular values of the unfoldings.
    ranks : ndarray of shape (B, n−1)
        Bond dimensions kept.

    Returns
    -------
    ndarray of shape (B, n−1)
    """
    fast = _kernels.local_truncation_errors(spectra, ranks)
    if fast is not None:
        return fast
    cols = []
    for k, sq in enumerate(spectra):
        j = np.arange(sq.shape[1])[None, :]
        cols.append(np.sqrt(np.where(j >= ranks[:, k : k + 1], sq, 0.0).sum(axis=1)))
    return np.stack(cols, axis=1)


def theorem1_bound(local_errors: np.ndarray) -> np.ndarray:
    """Theorem 1: ``‖A − MPS(A)‖_F <= sqrt(Σ_k ε_k²)``; shape (B,) from (B, n−1)."""
    return np.sqrt((np.asarray(local_errors) ** 2).sum(axis=-1))
