"""Batched TT-SVD (Algorithm 1 of the paper) with three ways to truncate the bonds.

All functions take a whole batch of order-n tensors ``(B, d_1, ..., d_n)`` at once; the only
Python loop is over the n−1 bonds.  Each bond is truncated with the eigendecomposition of the
Gram matrix of the smaller side of the current unfolding, in float64 (the eigenvectors of
``M Mᵀ`` are the left singular vectors of ``M``; the eigenvalues are the squared singular values).

Truncation modes
----------------
``max_bonds``
    Bond k keeps at most ``max_bonds[k]`` singular values (each capped by the exact rank
    ``min(d_1···d_k, d_{k+1}···d_n)``).  A 2-d array of shape (B, n−1) gives per-tensor caps.
``tol``
    Relative Frobenius error ``‖A − TT(A)‖_F <= tol·‖A‖_F`` per tensor: every bond discards at most
    ``δ² = tol²·‖A‖²_F/(n−1)`` of squared singular values (the δ split of Oseledets' TT-SVD), so
    the ranks differ per tensor.  ``max_bonds`` may cap it.

Ranks that differ inside a batch are stored zero-padded to the largest rank of the batch; the
padding is exact (zero rows and columns contribute nothing to the contraction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mpsd.core import _kernels
from mpsd.core.spectra import LeftBasis
from mpsd.errors import OptionError


@dataclass
class TensorTrain:
    """A batch of MPS (tensor trains).

    Attributes
    ----------
    cores : list of ndarray
        Core k has shape ``(B, R_{k-1}, d_k, R_k)`` with ``R_0 = R_n = 1`` and ``R_k`` the largest
        rank of bond k in the batch; smaller ranks are zero-padded.
    ranks : ndarray of shape (B, n-1)
        The bond dimension each tensor actually uses.
    sweep_error : ndarray of shape (B, n-1)
        Frobenius norm discarded at each bond during the left-to-right sweep.  Because the
        discarded parts are orthogonal, ``sqrt(sum(sweep_error**2, axis=1))`` equals the error
        ``‖A − TT(A)‖_F`` of the unquantised cores.
    """

    cores: list[np.ndarray]
    ranks: np.ndarray
    sweep_error: np.ndarray

    @property
    def sites(self) -> tuple[int, ...]:
        return tuple(int(c.shape[2]) for c in self.cores)

    def n_params(self) -> np.ndarray:
        """Parameters each tensor uses, ``sum_k r_{k-1}·d_k·r_k``; shape (B,)."""
        return parameter_count(self.sites, self.ranks)


def exact_ranks(sites: Sequence[int]) -> tuple[int, ...]:
    """Bond dimensions of an exact MPS: ``min(d_1···d_k, d_{k+1}···d_n)`` for k = 1..n−1."""
    sites = [int(d) for d in sites]
    return tuple(
        min(math.prod(sites[: k + 1]), math.prod(sites[k + 1 :])) for k in range(len(sites) - 1)
    )


def parameter_count(sites: Sequence[int], ranks: np.ndarray) -> np.ndarray:
    """Number of MPS parameters ``sum_k r_{k-1}·d_k·r_k`` for ranks of shape (..., n−1)."""
    ranks = np.asarray(ranks, dtype=np.int64)
    ones = np.ones((*ranks.shape[:-1], 1), dtype=np.int64)
    full = np.concatenate([ones, ranks, ones], axis=-1)
    d = np.asarray(sites, dtype=np.int64)
    return (full[..., :-1] * d * full[..., 1:]).sum(axis=-1)


def check_bonds(bonds: Sequence[int], sites: Sequence[int]) -> tuple[int, ...]:
    """Validate ``bonds`` against ``sites`` and cap each by the exact rank.

    Raises
    ------
    OptionError
        If the number of bonds is not ``len(sites) − 1`` or a bond is < 1.
    """
    bonds = [int(b) for b in bonds]
    if len(bonds) != len(sites) - 1:
        raise OptionError(
            f"expected {len(sites) - 1} bonds for the {len(sites)} sites "
            f"{','.join(map(str, sites))}, got {len(bonds)} ({','.join(map(str, bonds))})"
        )
    if any(b < 1 for b in bonds):
        raise OptionError(f"bond dimensions must be >= 1, got {','.join(map(str, bonds))}")
    return tuple(min(b, e) for b, e in zip(bonds, exact_ranks(sites), strict=True))


def _eigh_desc(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """All eigenvalues (largest first, clipped at 0) and the ``k`` leading eigenvectors, (B, n, k)."""
    w, v = _kernels.eigh_desc(gram, vectors=True, k=k)
    assert v is not None
    return w, v


#: Smallest ratio σ_j²/σ_1² of a kept column for which :func:`_orthonormal_columns` divides by
#: σ_j instead of factorising: the columns then stay orthogonal to about ε·σ_1²/σ_j² ≈ 2e-10.
SCALE_ONLY_RATIO = 1e-6


def _orthonormal_columns(x: np.ndarray, sq: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x = q r`` with orthonormal columns in ``q``, for ``x = M V`` of the right-side sweep step.

    ``V`` holds eigenvectors of ``MᵀM``, so the columns of ``x`` are orthogonal already, with
    squared norms ``sq`` (its eigenvalues): ``q = x / σ`` and ``r = diag(σ)``.  A tensor with a
    kept σ_j² below :data:`SCALE_ONLY_RATIO`·σ_1² (or σ_1 = 0) is factorised by Householder QR
    instead, where that division would amplify rounding.

    Parameters
    ----------
    x : ndarray of shape (B, m, R)
    sq : ndarray of shape (B, R)
        Eigenvalues belonging to the columns of ``V``, largest first.
    kept : ndarray of shape (B, R), bool
        Columns in use; the others are zero and stay zero.

    Returns
    -------
    q : ndarray of shape (B, m, R)
        Columns not ``kept`` are zero.
    r : ndarray of shape (B, R, R)
    """
    lead = sq[:, :1]
    scale_only = np.all(~kept | (sq >= SCALE_ONLY_RATIO * lead), axis=1) & (lead[:, 0] > 0)
    sig = np.where(kept, np.sqrt(np.maximum(sq, 0.0)), 0.0)
    # one reciprocal per column and a multiplication per entry (a division per entry cost a
    # third of this step at --tol); columns not kept get 0
    inv = np.divide(1.0, sig, out=np.zeros_like(sig), where=sig > 0)
    q = x * inv[:, None, :]
    r = sig[:, :, None] * np.eye(sq.shape[1])
    if not scale_only.all():
        bad = ~scale_only
        qb, r[bad] = _kernels.qr(x[bad])
        q[bad] = qb * kept[bad][:, None, :]  # QR completes the zero columns: keep them zero
    return q, r


def _tol_ranks(sq_sv: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
    """Smallest r with ``sum_{j>=r} σ_j² <= δ²`` per row; ``sq_sv`` descending, shape (B, m)."""
    # tail[:, r] = sum_{j >= r} σ_j²  (r = 0..m)
    tail = np.concatenate(
        [np.cumsum(sq_sv[:, ::-1], axis=1)[:, ::-1], np.zeros((sq_sv.shape[0], 1))], axis=1
    )
    ok = tail <= delta_sq[:, None] * (1 + 1e-12)
    return np.argmax(ok, axis=1)  # first r that satisfies (r = m always does)


def tt_svd(
    tensors: np.ndarray,
    *,
    max_bonds: Sequence[int] | np.ndarray | None = None,
    tol: float | None = None,
    left_basis: LeftBasis | None = None,
    compiled: bool = True,
) -> TensorTrain:
    """Decompose a batch of tensors into MPS by a left-to-right sweep of truncated SVDs.

    Parameters
    ----------
    tensors : ndarray of shape (B, d_1, ..., d_n)
        The tensors; converted to float64.
    max_bonds : sequence of n−1 int, or ndarray of shape (B, n−1), optional
        Largest bond dimension of each bond (see module docstring).
    tol : float, optional
        Relative Frobenius error allowed per tensor.
    left_basis : LeftBasis, optional
        The eigendecomposition of one left unfolding of these very ``tensors``, from
        :func:`mpsd.core.spectra.spectra_and_left_basis`; the sweep uses it instead of decomposing
        the same Gram matrix again for every tensor that no earlier bond rotated (a tensor that
        keeps its whole left space at a bond keeps the identity there and stays unchanged).  It
        must hold at least as many vectors as the bond can keep.
    compiled : bool
        Use the compiled sweep (:func:`mpsd.core._kernels.tt_sweep`) where it applies: one call
        for the whole batch instead of numpy calls per bond.  Both make the same decisions, per
        block of 64 tensors there and per batch here, and agree to rounding.

    Returns
    -------
    TensorTrain
        With no truncation at all the decomposition is exact.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.random.default_rng(0).random((3, 4, 4, 4))
    >>> tt = tt_svd(a)
    >>> tt.ranks[0].tolist()
    [4, 4]
    >>> from mpsd.core.contract import contract
    >>> bool(np.allclose(contract(tt.cores).reshape(a.shape), a))
    True
    """
    a = np.asarray(tensors, dtype=np.float64)
    if a.ndim < 3:
        raise OptionError(f"need a batch of tensors of order >= 2, got shape {a.shape}")
    b, sites = a.shape[0], a.shape[1:]
    n = len(sites)
    exact = np.asarray(exact_ranks(sites), dtype=np.int64)
    if max_bonds is None:
        caps = np.broadcast_to(exact, (b, n - 1))
    else:
        caps_in = np.asarray(max_bonds, dtype=np.int64)
        if caps_in.shape[-1] != n - 1:
            raise OptionError(f"expected {n - 1} bonds for {n} sites, got {caps_in.shape[-1]}")
        if (caps_in < 1).any():
            raise OptionError("bond dimensions must be >= 1")
        caps = np.minimum(np.broadcast_to(caps_in, (b, n - 1)), exact)
    if tol is not None:
        if not (tol >= 0 and math.isfinite(tol)):
            raise OptionError(f"tol must be a finite number >= 0, got {tol}")
        delta_sq = (tol**2 / max(n - 1, 1)) * np.einsum("bi,bi->b", a.reshape(b, -1), a.reshape(b, -1))

    if compiled and b and _kernels.sweep_fits(sites, caps.max(axis=0)):
        return _tt_svd_compiled(a, caps, tol, delta_sq if tol is not None else None, left_basis)

    cores: list[np.ndarray] = []
    ranks = np.zeros((b, n - 1), dtype=np.int64)
    sweep_error = np.zeros((b, n - 1))
    rows = np.ones(b, dtype=np.int64)  # r_{k-1} per tensor
    m_mat = a.reshape(b, 1, -1)  # (B, R_{k-1}, rest)
    # per tensor: m_mat[t] is still an unfolding of a[t] itself (only identity cores so far)
    unchanged = np.ones(b, dtype=bool)
    for k in range(n - 1):
        r_prev = m_mat.shape[1]
        d = sites[k]
        m_mat = m_mat.reshape(b, r_prev * d, -1)
        m, p = m_mat.shape[1:]
        full = np.minimum(rows * d, p)  # exact rank of this unfolding per tensor (upper bound)
        want = np.minimum(caps[:, k], full)
        if tol is None and np.all(want == rows * d) and m <= p:
            # nothing to truncate on the left side: identity core, matrix unchanged
            r_max = m
            cores.append(np.broadcast_to(np.eye(m).reshape(1, r_prev, d, m), (b, r_prev, d, m)).copy())
            ranks[:, k] = rows * d
            rows = rows * d
            continue
        if tol is None and np.all(want == p) and m > p:
            # nothing to truncate on the right side: the core takes the whole matrix
            cores.append(m_mat.reshape(b, r_prev, d, p).copy())
            ranks[:, k] = p
            rows = np.full(b, p, dtype=np.int64)
            m_mat = np.broadcast_to(np.eye(p), (b, p, p))
            unchanged[:] = False
            continue
        # no tensor keeps more than want.max() columns: only those eigenvectors are computed
        n_vectors = int(want.max())
        if m <= p and unchanged.any() and left_basis is not None and left_basis.bond == k:
            shape = left_basis.vectors.shape
            if shape[:2] != (b, m) or shape[2] < n_vectors:
                raise ValueError(f"left_basis has shape {shape}, bond {k} needs {(b, m, n_vectors)} or more columns")
            sq_sv, vecs = left_basis.values, left_basis.vectors
            if not unchanged.all():  # the tensors an earlier bond rotated need their own
                changed = ~unchanged
                sq_c, vecs_c = _eigh_desc(_kernels.gram_rows(m_mat[changed]), n_vectors)
                sq_sv, vecs = sq_sv.copy(), vecs[:, :, :n_vectors].copy()
                sq_sv[changed], vecs[changed] = sq_c, vecs_c
        elif m <= p:
            sq_sv, vecs = _eigh_desc(_kernels.gram_rows(m_mat), n_vectors)
        else:
            sq_sv, vecs = _eigh_desc(_kernels.gram_cols(m_mat), n_vectors)
        r = want
        if tol is not None:
            r = np.minimum(r, np.maximum(_tol_ranks(sq_sv, delta_sq), 1))
        r = np.maximum(r, 1)
        # a tensor that keeps the whole left space needs no rotation: the identity is an exact
        # basis of it (nothing discarded), and its matrix stays an unfolding of ``a``
        whole = (r == m) & (rows * d == m) if m <= p else np.zeros(b, dtype=bool)
        if whole.all():
            cores.append(np.broadcast_to(np.eye(m).reshape(1, r_prev, d, m), (b, r_prev, d, m)).copy())
            ranks[:, k] = m
            rows = r
            continue
        r_max = int(r.max())
        keep = (np.arange(r_max)[None, :] < r[:, None]).astype(np.float64)[:, None, :]  # (B,1,R)
        tail = np.where(np.arange(sq_sv.shape[1])[None, :] >= r[:, None], sq_sv, 0.0).sum(axis=1)
        sweep_error[:, k] = np.sqrt(tail)
        # columns past a tensor's own rank are zeroed (none are when every tensor keeps r_max)
        kept_vecs = vecs[:, :, :r_max] if bool((r == r_max).all()) else vecs[:, :, :r_max] * keep
        if m <= p:
            u = kept_vecs  # (B, m, R)
            if whole.any():  # then R = m
                u = u.copy()
                u[whole] = np.eye(m)
            cores.append(u.reshape(b, r_prev, d, r_max))
            m_mat = u.transpose(0, 2, 1) @ m_mat  # (B, R, p); the identity leaves a tensor's as it was
            unchanged &= whole
        else:
            v = kept_vecs  # (B, p, R)
            q, rf = _orthonormal_columns(m_mat @ v, sq_sv[:, :r_max], keep[:, 0, :] > 0)  # (B, m, R), (B, R, R)
            cores.append(q.reshape(b, r_prev, d, r_max))
            m_mat = rf @ v.transpose(0, 2, 1)  # (B, R, p)
            unchanged[:] = False
        ranks[:, k] = r
        rows = r
    cores.append(np.ascontiguousarray(m_mat).reshape(b, m_mat.shape[1], sites[-1], 1))
    return TensorTrain(cores=cores, ranks=ranks, sweep_error=sweep_error)


def _tt_svd_compiled(
    a: np.ndarray,
    caps: np.ndarray,
    tol: float | None,
    delta_sq: np.ndarray | None,
    left_basis: LeftBasis | None,
) -> TensorTrain:
    """:func:`tt_svd` through the compiled sweep; tensors it could not take (a Gram matrix that is
    not finite, an eigenvalue that did not converge) are redone on the numpy path, with LAPACK."""
    b, sites = a.shape[0], a.shape[1:]
    basis = None
    if left_basis is not None:
        bond = left_basis.bond
        m, p = math.prod(sites[: bond + 1]), math.prod(sites[bond + 1 :])
        need = min(int(caps[:, bond].max()), m, p)  # what a tensor it serves can keep there
        if left_basis.vectors.shape[:2] != (b, m) or left_basis.vectors.shape[2] < need:
            raise ValueError(f"left_basis has shape {left_basis.vectors.shape}, bond {bond} needs {(b, m, need)} or more columns")
        basis = (bond, left_basis.values, left_basis.vectors)
    cores, ranks, err, bad = _kernels.tt_sweep(a.reshape(b, -1), sites, caps, delta_sq, basis)
    if bad.any():
        redo = tt_svd(a[bad], max_bonds=caps[bad], tol=tol, compiled=False)
        ranks[bad], err[bad] = redo.ranks, redo.sweep_error
        # the batch's widths from its final ranks: the flagged tensors' own numbers may have been
        # larger, and past its rank a tensor's core only meets zeros of its neighbour
        widths = [1, *(int(x) for x in ranks.max(axis=0)), 1]
        merged = []
        for k, (core, part) in enumerate(zip(cores, redo.cores, strict=True)):
            w0, w1 = widths[k], widths[k + 1]
            out = np.zeros((b, w0, sites[k], w1))
            out[:, : min(w0, core.shape[1]), :, : min(w1, core.shape[3])] = core[:, :w0, :, :w1]
            out[bad] = 0.0
            out[np.flatnonzero(bad), : part.shape[1], :, : part.shape[3]] = part
            merged.append(out)
        cores = merged
    return TensorTrain(cores=cores, ranks=ranks, sweep_error=err)
