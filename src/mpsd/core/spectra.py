"""The paper's numbers: entanglement entropy (Eq. 3), local truncation errors (Definition 1)
and the Theorem 1 bound, all computed from the singular values of the unfoldings of a tensor."""

from __future__ import annotations

import numpy as np


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
    """
    a = np.asarray(tensors, dtype=np.float64)
    b, sites = a.shape[0], a.shape[1:]
    out = []
    left = 1
    for d in sites[:-1]:
        left *= d
        m = a.reshape(b, left, -1)
        gram = m @ m.transpose(0, 2, 1) if m.shape[1] <= m.shape[2] else m.transpose(0, 2, 1) @ m
        w = np.linalg.eigvalsh(gram)[:, ::-1]
        out.append(np.maximum(w, 0.0))
    return out


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
    cols = []
    for k, sq in enumerate(spectra):
        j = np.arange(sq.shape[1])[None, :]
        cols.append(np.sqrt(np.where(j >= ranks[:, k : k + 1], sq, 0.0).sum(axis=1)))
    return np.stack(cols, axis=1)


def theorem1_bound(local_errors: np.ndarray) -> np.ndarray:
    """Theorem 1: ``‖A − MPS(A)‖_F <= sqrt(Σ_k ε_k²)``; shape (B,) from (B, n−1)."""
    return np.sqrt((np.asarray(local_errors) ** 2).sum(axis=-1))
