"""Compiled kernels for the tiny batched linear algebra of the TT-SVD (optional numba).

The TT-SVD of an image tensor is a handful of eigenproblems of 4×4 … 64×64 symmetric Gram
matrices.  LAPACK spends most of its time on call overhead at these sizes (``numpy.linalg.eigh``
of a 16×16 matrix costs ~15–20 µs, ~20× its arithmetic), so with numba installed these kernels
replace it:

* :func:`eigh_desc` — Householder tridiagonalisation (EISPACK ``tred2``) and implicit QL with
  Wilkinson shifts (``tql2``), float64 throughout.  The Householder step runs on 16 matrices
  stored lane-innermost, so that its loops over the matrices are vector loops (1.3–1.9× faster
  than one matrix at a time); the QL step runs on 8 matrices in lock step so that the
  latency-bound rotation chains of independent matrices overlap.  A matrix whose rotations have
  converged takes identity rotations, and every lane does the same arithmetic in the same
  order, so every matrix gets exactly the arithmetic it would get alone: results do not depend
  on how a batch is split.
* :func:`gram_rows` — Gram matrices ``M Mᵀ`` of a batch of small wide matrices.
* :func:`qr` — Householder QR of a batch of small tall matrices.
* :func:`contract_cores`, :func:`decode_rounded` — contraction of a batch of MPS from both ends
  (``decode_rounded`` also sums the stages and rounds each tensor into its image in the same pass).
* :func:`stage_errors` — the metrics of a batch's last stage (its contraction compared with the
  tensors and their images in the same pass).
* :func:`gauge_quantize_int8` — gauge balancing and int8 quantisation of a batch of MPS.
* :func:`fold_scaled`, :func:`unfold_rounded` — images to site tensors and back in one pass each.
* :func:`pack_rows`, :func:`unpack_rows` — cores to the row-packed storage layout and back
  (:mod:`mpsd.core.packing`).

Without numba (or with ``MPSD_NO_NUMBA=1`` in the environment) the same functions run on
numpy/LAPACK.  Both paths agree to rounding (``tests/test_fastpath.py``).  numba is imported
lazily, on the first call that needs it; kernels are cached on disk by numba when possible.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Whether numba can be imported (checked without importing it).
HAVE_NUMBA: bool = importlib.util.find_spec("numba") is not None

#: Matrices handled in lock step by the QL kernel.
LANES = 8
#: Matrices in the vector lanes of the eigenvalue and top-k kernel (``eigh_top_batch``).
WIDE_LANES = 64
#: Largest bond the compiled contraction takes.  CIFAR-10 at ``--tol 0.05`` (bonds up to
#: 4,16,16,4), 2026-12-07: contracting the stored stage for the metrics 35 -> 18 µs per image
#: against numpy's matmul chain, whole-store decode +5 %.  Larger bonds were not measured.
CONTRACT_MAX_RANK = 16
#: QL iterations allowed per eigenvalue before a matrix is handed to LAPACK instead.
MAX_QL_ITERATIONS = 30
#: Steps of inverse iteration per eigenvector.  From an eigenvalue computed to working
#: precision the first step converges and the second is LAPACK dstein's confirming step; a
#: third changed nothing measurable (worst relative residual ‖Gv − λv‖ and orthogonality on the
#: test suite's hard cases and on 9,000 CIFAR-10 Gram matrices: 1.6e-15 and 2.1e-15 with two or
#: three steps; one step leaves 7.6e-13 on repeated eigenvalues).  Two steps: 3.2 -> 2.8 µs per
#: 16×16 matrix with six vectors.
INVERSE_ITERATION_STEPS = 2
#: Largest order for ``eigh_top_batch``; larger matrices go to the one-at-a-time QL kernels.
TOP_MAX_ORDER = 32

_lock = threading.Lock()
_compiled: dict[str, Any] | None = None


def use_numba() -> bool:
    """True when the compiled kernels are used (numba installed and not disabled)."""
    return HAVE_NUMBA and os.environ.get("MPSD_NO_NUMBA", "") in ("", "0")


def _kernels() -> dict[str, Any]:
    global _compiled
    if _compiled is None:
        with _lock:
            if _compiled is None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from mpsd.core import _kernels_nb as nb

                    # compile (or load from numba's cache) now, inside the warning filter
                    g = np.eye(2)[None].copy()
                    for vec in (False, True):
                        nb.eigh_batch(
                            g, vec, MAX_QL_ITERATIONS, np.empty((1, 2)), np.empty((1, 2, 2)),
                            np.zeros(1, dtype=np.bool_),
                        )
                    for k in (0, 1):
                        nb.eigh_top_batch(
                            g, k, MAX_QL_ITERATIONS, INVERSE_ITERATION_STEPS, np.empty((1, 2)),
                            np.empty((1, 2, 1)), np.zeros(1, dtype=np.bool_),
                        )
                    a = np.ones((1, 2, 2))
                    nb.qr_batch(a, np.empty((1, 2, 2)), np.empty((1, 2, 2)))
                    nb.gram_rows(a, np.empty((1, 2, 2)))
                    nb.gram_cols(a, np.empty((1, 2, 2)))
                    nb.entropy_rows(np.ones((1, 2)), 0, np.empty((1, 1)))
                    nb.tail_rows(np.ones((1, 2)), np.ones((1, 1), dtype=np.int64), 0, np.empty((1, 1)))
                    nb.tt_sweep(np.ones((1, 4)), np.array([2, 2]), np.array([[2]]), np.zeros(1), False, -1,
                                np.zeros((1, 1)), np.zeros((1, 1, 1)), MAX_QL_ITERATIONS, INVERSE_ITERATION_STEPS,
                                np.array([1, 2, 1]), np.array([0, 4]), np.zeros((1, 8)),
                                np.zeros((1, 1), dtype=np.int64), np.zeros((1, 1)), np.zeros(1, dtype=np.bool_))
                    nb.norms_and_distances(np.ones((1, 2)), np.ones((1, 2)), np.empty(1), np.empty(1))
                    nb.gauge_quantize(np.ones((1, 2)), np.array([0, 1]), np.array([1, 1]),
                                      np.empty((1, 2), dtype=np.int8), np.empty((1, 2), dtype=np.float32))
                    nb.contract_packed(np.ones((1, 2)), np.array([0, 1]), np.array([1, 1]),
                                       np.array([1, 1, 1]), 1, np.empty((1, 1)))
                    nb.errors_rows(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1, dtype=np.int64), 255.0,
                                   np.empty(1), np.empty(1), np.zeros(1))
                    nb.contract_errors(np.ones((1, 2)), np.array([0, 1]), np.array([1, 1]), np.array([1, 1, 1]), 1,
                                       np.zeros((1, 1)), False, np.zeros((1, 1)), np.zeros(1, dtype=np.int64),
                                       255.0, np.empty(1), np.empty(1), np.zeros(1))
                    ix = np.zeros(2, dtype=np.int64)
                    for dt in (np.uint8, np.uint16):
                        im = np.zeros((1, 2), dtype=dt)
                        nb.gather_scale(im, ix, 255.0, np.empty((1, 2)))
                        nb.gather_table(im, ix, _scale_table(255, 255), np.empty((1, 2)))  # read-only, as used
                        nb.scatter_round(np.zeros((1, 2)), ix, 255.0, im)
                        nb.decode_round(np.ones((1, 2)), np.array([[0, 1]]), np.array([1, 1]),
                                        np.array([[1, 1, 1]]), np.array([1]), ix, 255.0, im)
                        for st in (np.int8, np.float32):
                            nb.decode_round_rows(np.ones((1, 2), dtype=st), np.array([[0, 1]]), np.ones((1, 1, 2)),
                                                 np.array([1, 1]), np.ones((1, 1, 3), dtype=np.int64),
                                                 np.array([1]), ix, 255.0, im)
                    for src in (np.zeros((2, 4), dtype=np.int8), np.zeros((2, 4)), np.zeros((2, 4), dtype=np.float32)):
                        for view in (src, src[:, :2]):  # C and strided rows, scales as used
                            nb.pack_scaled(view, np.ones((2, 2))[:, 0], True, np.zeros((2, 4)), 0)
                            nb.pack_scaled(view, np.ones(1), False, np.zeros((2, 4)), 0)
                    one = np.ones(1, dtype=np.int64)
                    for dt in _COPY_TYPES.values():
                        nb.pack_rows(np.zeros((1, 1, 1, 1), dtype=dt), one, one, np.zeros((1, 1), dtype=dt))
                        nb.unpack_rows(np.zeros((1, 1), dtype=dt), one, one, np.zeros((1, 1, 1, 1), dtype=dt))
                _compiled = {
                    "eigh_batch": nb.eigh_batch, "eigh_top_batch": nb.eigh_top_batch,
                    "qr": nb.qr_batch, "gram_rows": nb.gram_rows, "gram_cols": nb.gram_cols,
                    "entropy_rows": nb.entropy_rows, "tail_rows": nb.tail_rows, "tt_sweep": nb.tt_sweep,
                    "norms_and_distances": nb.norms_and_distances, "gather_scale": nb.gather_scale,
                    "gather_table": nb.gather_table,
                    "scatter_round": nb.scatter_round,
                    "contract_packed": nb.contract_packed, "decode_round": nb.decode_round,
                    "contract_errors": nb.contract_errors, "errors_rows": nb.errors_rows,
                    "gauge_quantize": nb.gauge_quantize,
                    "pack_rows": nb.pack_rows, "pack_scaled": nb.pack_scaled, "unpack_rows": nb.unpack_rows,
                    "decode_round_rows": nb.decode_round_rows,
                }
    return _compiled


# ---------------------------------------------------------------------- public functions
def eigh_desc_numpy(
    gram: np.ndarray, vectors: bool = True, k: int | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference path: ``numpy.linalg.eigh``; eigenvalues largest first, clipped at 0."""
    if not vectors:
        w = np.linalg.eigvalsh(gram)
        return np.maximum(w[..., ::-1], 0.0), None
    w, v = np.linalg.eigh(gram)
    v = v[..., ::-1]
    return np.maximum(w[..., ::-1], 0.0), (v if k is None else np.ascontiguousarray(v[..., :k]))


def eigh_desc(gram: np.ndarray, vectors: bool = True, k: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Eigenpairs of a batch of symmetric matrices, largest first; eigenvalues clipped at 0.

    Parameters
    ----------
    gram : ndarray of shape (B, n, n)
        Symmetric (only read as a whole; both triangles must agree).
    vectors : bool
        Also return the eigenvectors.
    k : int, optional
        Return only the eigenvectors of the ``k`` largest eigenvalues (all n by default).  With
        ``k <= 3n/4`` (:func:`_top_k_pays`) the compiled path finds them by inverse iteration instead of
        accumulating all n, which is cheaper.

    Returns
    -------
    values : ndarray of shape (B, n), float64, descending
    vectors : ndarray of shape (B, n, k) (column j belongs to value j) or None
        Each column's sign is chosen so that its entries sum to >= 0 (see Notes).

    Notes
    -----
    Eigenvectors are only defined up to sign, and the two compiled kernels and LAPACK choose
    differently.  The fixed sign makes every path give the same vectors (up to rounding, unless a
    column sums to about 0) and makes the cores of similar images alike: with the signs inverse
    iteration happens to give, CIFAR-10 stores at ``--bond 4,6,6,4`` took 1.1 % more bytes.

    Compiled paths: for the values alone, and for ``k <= 3n/4`` vectors of matrices up to
    :data:`TOP_MAX_ORDER`, ``eigh_top_batch`` (rational QL and inverse iteration, 64 matrices in
    the vector lanes); otherwise ``eigh_batch`` (QL with rotations).  The two round differently,
    so the values of one matrix may differ in the last bits between ``k`` small and ``k = n``;
    ``vectors=False`` and any ``k <= 3n/4`` give the very same values.
    """
    g = np.ascontiguousarray(gram, dtype=np.float64)
    n = g.shape[-1] if g.ndim else 0
    kk = n if k is None else int(k)
    if vectors and not 0 <= kk <= n:
        raise ValueError(f"k must be between 0 and {n}, got {k}")
    if not use_numba() or g.ndim != 3 or g.shape[0] == 0 or g.shape[1] == 0:
        w, v = eigh_desc_numpy(g, vectors, kk)
        return w, (None if v is None else _fix_signs(v))
    b = g.shape[0]
    vals = np.empty((b, n))
    bad = np.zeros(b, dtype=np.bool_)
    if 2 <= n <= TOP_MAX_ORDER and (not vectors or _top_k_pays(kk, n)):
        kv = kk if vectors else 0
        vecs = np.empty((b, n, kv))
        _kernels()["eigh_top_batch"](g, kv, MAX_QL_ITERATIONS, INVERSE_ITERATION_STEPS, vals, vecs, bad)
    else:
        vecs = np.empty((b, n, n)) if vectors else np.empty((0, 0, 0))
        _kernels()["eigh_batch"](g, vectors, MAX_QL_ITERATIONS, vals, vecs, bad)
        if vectors and kk < n:
            vecs = np.ascontiguousarray(vecs[:, :, :kk])
    if bad.any():  # safety net: not converged or not finite, LAPACK decides
        w2, v2 = eigh_desc_numpy(g[bad], vectors, kk)
        vals[bad] = w2
        if vectors:
            assert v2 is not None
            vecs[bad] = _fix_signs(v2)
    return vals, (vecs if vectors else None)


def _top_k_pays(k: int, n: int) -> bool:
    """Whether ``k`` eigenvectors of an n×n matrix are cheaper by inverse iteration.

    Measured 2026-12-07 (one thread, 4,096 matrices, µs per matrix, QL with vectors against
    inverse iteration): n = 8: 0.92 against 0.78 for k = 6; n = 16: 3.99 against 3.56 for k = 12
    and 4.08 for k = 15; n = 24: 9.54 against 9.56 for k = 18; n = 32: 17.85 against 18.05 for
    k = 24.  So up to three quarters of n.
    """
    return 4 * k <= 3 * n


def _fix_signs(vecs: np.ndarray) -> np.ndarray:
    """Flip columns of ``vecs`` ((..., n, k)) whose entries sum to < 0, in place; returns it.

    For LAPACK's vectors; the compiled kernels flip theirs as they write them out.
    """
    vecs *= np.where(vecs.sum(axis=-2, keepdims=True) < 0, -1.0, 1.0)
    return vecs


def gram_rows(m: np.ndarray) -> np.ndarray:
    """``m @ mᵀ`` for a batch of wide matrices (B, r, p), r <= p: shape (B, r, r), exactly symmetric.

    With numba, dot products of rows computed once per pair (half of ``matmul``'s arithmetic);
    otherwise ``numpy.matmul``.  The two differ by rounding only.
    """
    if not use_numba() or m.ndim != 3 or m.shape[0] == 0 or m.shape[1] > m.shape[2]:
        return m @ m.transpose(0, 2, 1)
    b, r, _ = m.shape
    out = np.empty((b, r, r))
    _kernels()["gram_rows"](np.ascontiguousarray(m, dtype=np.float64), out)
    return out


def entanglement_entropy(spectra: list[np.ndarray]) -> np.ndarray | None:
    """:func:`mpsd.core.spectra.entanglement_entropy` in one compiled loop per bond, or None.

    The same sums in another order (``p = sq · (1/Σ sq)``, libm's log): agrees to about 1e-15.
    """
    return _per_bond("entropy_rows", spectra)


def local_truncation_errors(spectra: list[np.ndarray], ranks: np.ndarray) -> np.ndarray | None:
    """:func:`mpsd.core.spectra.local_truncation_errors` in one compiled loop per bond, or None."""
    return _per_bond("tail_rows", spectra, np.ascontiguousarray(ranks, dtype=np.int64))


def _per_bond(name: str, spectra: list[np.ndarray], *args: np.ndarray) -> np.ndarray | None:
    """(B, n−1): column k from kernel ``name(spectra[k], *args, k, out)``; None without numba."""
    if not use_numba() or not spectra or spectra[0].shape[0] == 0:
        return None
    out = np.empty((spectra[0].shape[0], len(spectra)))
    kernel = _kernels()[name]
    for k, sq in enumerate(spectra):
        kernel(np.ascontiguousarray(sq, dtype=np.float64), *args, k, out)
    return out


def gram_cols(m: np.ndarray) -> np.ndarray:
    """``mᵀ @ m`` for a batch of tall matrices (B, r, p): shape (B, p, p), exactly symmetric.

    With numba, one BLAS call per matrix from compiled code; otherwise ``numpy.matmul``.  The
    two differ by rounding only.
    """
    if not use_numba() or m.ndim != 3 or m.shape[0] == 0 or m.shape[2] == 0:
        return m.transpose(0, 2, 1) @ m
    out = np.empty((m.shape[0], m.shape[2], m.shape[2]))
    _kernels()["gram_cols"](np.ascontiguousarray(m, dtype=np.float64), out)
    return out


def sweep_fits(sites: Sequence[int], storage_ranks: Sequence[int]) -> bool:
    """Whether :func:`tt_sweep` takes tensors with these sites and largest bond dimensions.

    Every Gram matrix of the sweep must be of order 2 to :data:`TOP_MAX_ORDER`: the compiled
    eigensolver's range.  Larger ones (images from about 64×64 up) stay on the numpy path.
    """
    if not use_numba() or len(sites) < 2:
        return False
    full = [1, *storage_ranks]
    right = math.prod(sites)
    for k in range(len(sites) - 1):
        right //= sites[k]
        order = min(full[k] * sites[k], right)
        if not 2 <= order <= TOP_MAX_ORDER:
            return False
    return True


def tt_sweep(
    flat: np.ndarray,
    sites: Sequence[int],
    caps: np.ndarray,
    delta_sq: np.ndarray | None,
    basis: tuple[int, np.ndarray, np.ndarray] | None,
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """The TT-SVD sweep of :func:`mpsd.core.ttsvd.tt_svd` in one compiled call (see there).

    Parameters
    ----------
    flat : ndarray of shape (B, prod d), B >= 1
        The tensors, flattened.
    sites : sequence of n int
    caps : ndarray of shape (B, n−1)
        Largest rank of every bond and tensor, at most the exact rank; :func:`sweep_fits` must
        hold for ``caps.max(axis=0)``.
    delta_sq : ndarray of shape (B,), optional
        δ² of every tensor for a ``tol`` truncation (None: ranks from ``caps`` alone).
    basis : (bond, values (B, m), vectors (B, m, k)), optional
        A left basis (:class:`mpsd.core.spectra.LeftBasis`) with at least as many columns k as a
        tensor it serves can keep at that bond (checked by the caller).

    Returns
    -------
    cores : list of n ndarray
        Core k of shape (B, R_{k−1}, d_k, R_k), R_k the largest rank of bond k in the batch: views
        of one (B, P) buffer, side by side (what ``gauge_quantize_int8(overwrite=True)`` uses).
    ranks, sweep_error : ndarray of shape (B, n−1)
    bad : ndarray of shape (B,), bool
        Tensors whose Gram matrices were not finite or whose eigenvalues did not converge: their
        entries in the other outputs are meaningless.
    """
    b = flat.shape[0]
    n = len(sites)
    store = [1, *(int(x) for x in caps.max(axis=0)), 1]
    sizes = [store[k] * sites[k] * store[k + 1] for k in range(n)]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    packed = np.empty((b, sum(sizes)))
    ranks = np.zeros((b, n - 1), dtype=np.int64)
    err = np.zeros((b, n - 1))
    bad = np.zeros(b, dtype=np.bool_)
    if basis is None:
        bond, values, vectors = -1, np.zeros((1, 1)), np.zeros((1, 1, 1))
    else:
        bond, values, vectors = basis
    _kernels()["tt_sweep"](
        np.ascontiguousarray(flat, dtype=np.float64), np.asarray(sites, dtype=np.int64),
        np.ascontiguousarray(caps, dtype=np.int64),
        np.zeros(b) if delta_sq is None else np.ascontiguousarray(delta_sq, dtype=np.float64),
        delta_sq is not None, bond, np.ascontiguousarray(values, dtype=np.float64),
        np.ascontiguousarray(vectors, dtype=np.float64), MAX_QL_ITERATIONS, INVERSE_ITERATION_STEPS,
        np.asarray(store, dtype=np.int64), offsets, packed, ranks, err, bad,
    )
    used = [1, *(int(x) for x in ranks.max(axis=0)), 1]
    cores = [
        packed[:, offsets[k] : offsets[k] + sizes[k]].reshape(b, store[k], sites[k], store[k + 1])
        for k in range(n)
    ]
    if used != store:  # trimmed to the batch's ranks, again side by side in one buffer
        trimmed = [used[k] * sites[k] * used[k + 1] for k in range(n)]
        out = np.empty((b, sum(trimmed)))
        start = 0
        for k in range(n):
            view = out[:, start : start + trimmed[k]].reshape(b, used[k], sites[k], used[k + 1])
            view[...] = cores[k][:, : used[k], :, : used[k + 1]]
            cores[k] = view
            start += trimmed[k]
    return cores, ranks, err, bad


def norms_and_distances(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``‖a_i‖`` and ``‖a_i − b_i‖`` of every row of two (N, P) float64 arrays, shapes (N,), (N,)."""
    if not use_numba() or a.shape != b.shape or a.ndim != 2:
        diff = a - b
        return np.sqrt(np.einsum("bp,bp->b", a, a)), np.sqrt(np.einsum("bp,bp->b", diff, diff))
    norm, dist = np.empty(a.shape[0]), np.empty(a.shape[0])
    _kernels()["norms_and_distances"](
        np.ascontiguousarray(a, dtype=np.float64), np.ascontiguousarray(b, dtype=np.float64), norm, dist
    )
    return norm, dist


def qr(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reduced QR of a batch of tall matrices (B, m, k), m >= k: ``q`` (B, m, k), ``r`` (B, k, k).

    Householder reflections (numba), or ``numpy.linalg.qr``.  Signs may differ between the two
    (any ``q`` with orthonormal columns and upper-triangular ``r`` with ``q r = x`` is valid).
    """
    if not use_numba() or x.ndim != 3 or x.shape[0] == 0 or x.shape[1] < x.shape[2] or x.shape[2] > 8:
        return np.linalg.qr(x)
    nb, m, k = x.shape
    q, r = np.empty((nb, m, k)), np.empty((nb, k, k))
    _kernels()["qr"](np.ascontiguousarray(x, dtype=np.float64), q, r)
    return q, r


#: Integer types that core entries are copied as, by item size (the copy kernels move bits).
_COPY_TYPES = {1: np.int8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _copy(kernel: str, src: np.ndarray, left: np.ndarray, right: np.ndarray, out: np.ndarray) -> bool:
    kind = _COPY_TYPES.get(src.dtype.itemsize)
    if not use_numba() or kind is None or out.dtype != src.dtype:
        return False
    _kernels()[kernel](
        np.ascontiguousarray(src).view(kind), np.ascontiguousarray(left, dtype=np.int64),
        np.ascontiguousarray(right, dtype=np.int64), out.view(kind),
    )  # fmt: skip
    return True


def pack_rows(core: np.ndarray, left: np.ndarray, right: np.ndarray, out: np.ndarray) -> bool:
    """Compiled body of :func:`mpsd.core.packing.pack_core`; False (nothing done) without numba."""
    return _copy("pack_rows", core, left, right, out)


def unpack_rows(rows: np.ndarray, left: np.ndarray, right: np.ndarray, out: np.ndarray) -> bool:
    """Compiled body of :func:`mpsd.core.packing.unpack_core` (``out`` zeroed); False without numba."""
    return _copy("unpack_rows", rows, left, right, out)


def _best_split(dims: np.ndarray, ranks: np.ndarray) -> int:
    """The bond where contracting an MPS (``ranks`` = [1, R_1, …, 1]) from both ends costs the fewest multiplications."""
    n = len(dims)
    best, split = None, 1
    for s in range(1, n):
        cost = 0
        rows = int(dims[0])
        for j in range(1, s):
            cost += rows * int(ranks[j]) * int(dims[j] * ranks[j + 1])
            rows *= int(dims[j])
        cols = int(dims[-1])
        for j in range(n - 2, s - 1, -1):
            cost += int(ranks[j] * dims[j]) * int(ranks[j + 1]) * cols
            cols *= int(dims[j])
        cost += rows * int(ranks[s]) * cols
        if best is None or cost < best:
            best, split = cost, s
    return split


def _contract_plan(shapes: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(dims, ranks, split)`` for the compiled contraction of cores of these shapes, or None.

    The split is the bond where contracting from both ends costs the fewest multiplications.
    None when the shapes do not chain, or when BLAS does better (rows of fewer than 4 numbers or
    bonds above :data:`CONTRACT_MAX_RANK`, measured on the CIFAR and Fashion-MNIST shapes).
    """
    if len(shapes) < 2:
        return None
    b = shapes[0][0]
    dims = np.array([c[2] for c in shapes], dtype=np.int64)
    ranks = np.array([1] + [c[3] for c in shapes], dtype=np.int64)
    if ranks[-1] != 1 or shapes[0][1] != 1 or any(
        c[1] != r or c[0] != b for c, r in zip(shapes, ranks[:-1], strict=True)
    ):
        return None  # let the plain path report the mismatch
    n = len(shapes)
    split = _best_split(dims, ranks)
    # the compiled loops only pay off with rows of several numbers; tiny ones stay with numpy
    widths = [int(dims[j] * ranks[j + 1]) for j in range(1, split)]
    cols = int(dims[-1])
    for j in range(n - 2, split - 1, -1):
        widths.append(cols)
        cols *= int(dims[j])
    widths.append(cols)
    if min(widths) < 4 or int(ranks.max()) > CONTRACT_MAX_RANK:
        return None
    return dims, ranks, split


def _pack(cores: list[np.ndarray], scales: np.ndarray | None, out: np.ndarray, start: int) -> list[int]:
    """Copy (and dequantise: ``q·scale``) a batch's cores side by side into ``out[:, start:]``.

    Returns the column offset of every core.
    """
    b = cores[0].shape[0]
    offsets = []
    o = start
    scale64 = None if scales is None else np.asarray(scales, dtype=np.float64)
    kernel = _kernels()["pack_scaled"] if use_numba() else None
    for k, c in enumerate(cores):
        size = math.prod(c.shape[1:])
        rows = c.reshape(b, size)
        if kernel is not None and rows.dtype in _PACK_TYPES and out.flags.c_contiguous:
            # exactly as below, without numpy's casting loop over a strided view
            kernel(rows, scale64[:, k] if scale64 is not None else _ONE, scale64 is not None, out, o)
        elif scale64 is None:
            out[:, o : o + size] = rows
        else:  # exactly quantize.dequantize: float64(q) · float64(scale)
            np.multiply(rows, scale64[:, k, None], out=out[:, o : o + size])
        offsets.append(o)
        o += size
    return offsets


#: Core dtypes that ``pack_scaled`` takes (float16 stays with numpy).
_PACK_TYPES = (np.dtype(np.int8), np.dtype(np.float32), np.dtype(np.float64))
_ONE = np.ones(1)


def contract_cores(cores: list[np.ndarray], scales: np.ndarray | None = None) -> np.ndarray | None:
    """Contract a batch of MPS in one compiled pass, or None when numba is not used.

    Contracts from both ends towards the bond where that costs the fewest multiplications and
    multiplies the two halves, keeping every intermediate of a tensor in cache.  Returns
    (B, prod d) float64 (C order over the sites).  Cores of any real dtype are read as float64;
    with ``scales`` ((B, n), int8 storage) core k is first multiplied by ``scales[:, k]``, exactly
    as :func:`mpsd.core.quantize.dequantize` does, while it is copied in.
    """
    ready = _packed_for_contraction(cores, scales)
    if ready is None:
        return None
    packed, offsets, dims, ranks, split = ready
    out = np.empty((packed.shape[0], int(np.prod(dims))))
    _kernels()["contract_packed"](packed, offsets, dims, ranks, split, out)
    return out


def _packed_for_contraction(
    cores: list[np.ndarray], scales: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int] | None:
    """``(packed, offsets, dims, ranks, split)`` for the compiled contraction, or None.

    None when numba is not used, the batch is empty or :func:`_contract_plan` declines the shapes;
    otherwise the cores dequantised side by side (:func:`_pack`) with their column offsets.
    """
    if not use_numba() or len(cores) < 2 or cores[0].shape[0] == 0:
        return None
    plan = _contract_plan([c.shape for c in cores])
    if plan is None:
        return None
    packed = np.empty((cores[0].shape[0], sum(math.prod(c.shape[1:]) for c in cores)))
    offsets = np.array(_pack(cores, scales, packed, 0), dtype=np.int64)
    return (packed, offsets, *plan)


def stage_errors(
    cores: list[np.ndarray],
    scales: np.ndarray | None,
    previous: np.ndarray | None,
    flat: np.ndarray,
    layout: Any,
    max_value: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The numbers of a batch's last stage in one compiled pass, without the stages' sum.

    With ``total = contract_stored(cores, scales) (+ previous)``, returns what
    :func:`errors_against_pixels` ``(flat, total, layout, max_value)`` returns for the integer
    images ``flat`` was folded from (``fold_scaled(images, layout, max_value)``): the squared
    errors exactly, the norms to rounding.  Each tensor is contracted into the cache and compared
    there; the images are read back from ``flat`` (``rint(flat·max_value)`` is every pixel
    exactly).  None when numba is not used or the cores have shapes the compiled contraction does
    not take (:func:`contract_cores` returns None for them).

    Parameters
    ----------
    cores : list of ndarray
        Stored cores of the last stage, core k of shape (B·M, R_{k-1}, d_k, R_k).
    scales : ndarray of shape (B·M, n), or None
    previous : ndarray of shape (B·M, P), or None
        The earlier stages' sum, as stored.
    flat : ndarray of shape (B·M, P)
        The tensors encoded, P = prod d: B images folded by ``layout`` (M tensors each) and
        divided by ``max_value``.

    Returns
    -------
    norm, dist : ndarray of shape (B·M,)
    squared_error : ndarray of shape (B,)
    """
    ready = _packed_for_contraction(cores, scales)
    if ready is None:
        return None
    packed, offsets, dims, ranks, split = ready
    b = packed.shape[0]
    if b % layout.mps_per_image or flat.shape != (b, dims.prod()) or dims.prod() != layout.pixels_per_mps:
        raise ValueError(f"{b} tensors of {flat.shape[1:]} are not images folded by {layout}")
    flat = np.ascontiguousarray(flat, dtype=np.float64)
    norm, dist, sq = np.empty(b), np.empty(b), np.zeros(b // layout.mps_per_image)
    _kernels()["contract_errors"](
        packed, offsets, dims, ranks, split,
        flat if previous is None else np.ascontiguousarray(previous, dtype=np.float64), previous is not None,
        flat, site_index(layout), float(max_value), norm, dist, sq,
    )
    return norm, dist, sq


def errors_against_pixels(
    flat: np.ndarray, total: np.ndarray, layout: Any, max_value: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`stage_errors` for a sum that is already there: ``total`` (B·M, P), float64.

    Returns ``‖flat_t‖``, ``‖flat_t − total_t‖`` (B·M,) and per image ``Σ (clip(rint(total·max),
    0, max) − pixel)²`` (B,), the pixels read back from ``flat`` as ``rint(flat·max)`` (exactly
    them), padding entries (:func:`site_index` < 0) left out.
    """
    b, q = flat.shape
    m = layout.mps_per_image
    if b % m or total.shape != flat.shape or q != layout.pixels_per_mps:
        raise ValueError(f"{b} tensors of {flat.shape[1:]} are not images folded by {layout}")
    if use_numba():
        norm, dist, sq = np.empty(b), np.empty(b), np.zeros(b // m)
        _kernels()["errors_rows"](
            np.ascontiguousarray(flat, dtype=np.float64), np.ascontiguousarray(total, dtype=np.float64),
            site_index(layout), float(max_value), norm, dist, sq,
        )
        return norm, dist, sq
    norm, dist = norms_and_distances(flat, total)
    top = float(max_value)
    diff = np.clip(np.rint(total * top), 0.0, top) - np.rint(flat * top)
    diff = diff.reshape(b // m, m * q)  # one row per image
    diff[:, site_index(layout) < 0] = 0.0
    return norm, dist, np.einsum("ip,ip->i", diff, diff)


def gauge_quantize_int8(
    cores: list[np.ndarray], *, overwrite: bool = False
) -> tuple[list[np.ndarray], np.ndarray] | None:
    """Balance the gauge and quantise a batch of MPS to int8 in one compiled pass, or None.

    Bit for bit ``[quantize(c, "int8") for c in codec.balance_gauge(cores)]`` for finite cores:
    the same divisions, multiplications and rounding, per tensor while its cores are in cache.

    Parameters
    ----------
    cores : list of ndarray
        Core k of shape (B, R_{k-1}, d_k, R_k), float64.
    overwrite : bool
        The cores may be overwritten (as scipy's ``overwrite_a``): when they lie side by side in
        one (B, P) buffer, as :func:`tt_sweep` returns them, the gauge is balanced in that buffer
        instead of a packed copy.

    Returns
    -------
    stored : list of ndarray
        int8 cores, shapes as ``cores``.
    scales : ndarray of shape (B, n), float32
    """
    if not use_numba() or not cores or cores[0].shape[0] == 0:
        return None
    b = cores[0].shape[0]
    sizes = [math.prod(c.shape[1:]) for c in cores]
    packed = _side_by_side(cores) if overwrite else None
    if packed is not None:
        offsets = list(itertools.accumulate(sizes[:-1], initial=0))
    else:
        packed = np.empty((b, sum(sizes)))
        offsets = _pack(cores, None, packed, 0)
    q = np.empty((b, sum(sizes)), dtype=np.int8)
    scales = np.empty((b, len(cores)), dtype=np.float32)
    _kernels()["gauge_quantize"](packed, np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64), q, scales)
    stored = [q[:, o : o + s].reshape(c.shape) for c, o, s in zip(cores, offsets, sizes, strict=True)]
    return stored, scales


def _side_by_side(cores: list[np.ndarray]) -> np.ndarray | None:
    """The (B, P) float64 buffer whose columns hold ``cores`` one after another, or None.

    Core k must be the C-order view ``buffer[:, o_k : o_k + size_k]`` with o_0 = 0, each core
    starting where the one before ends and the last ending at P (what :func:`tt_sweep` returns).
    """
    buffer = cores[0].base
    while isinstance(buffer, np.ndarray) and buffer.base is not None and buffer.ndim != 2:
        buffer = buffer.base
    if not isinstance(buffer, np.ndarray) or buffer.ndim != 2 or buffer.dtype != np.float64:
        return None
    if not buffer.flags.c_contiguous or buffer.shape[0] != cores[0].shape[0]:
        return None
    start = buffer.__array_interface__["data"][0]
    row = buffer.strides[0]
    offset = 0
    for c in cores:  # plain ints: numpy calls on these tiny shapes cost ~100 µs per batch
        inner = []
        step = 8
        for d in reversed(c.shape[1:]):
            inner.append(step)
            step *= d
        if (
            c.dtype != np.float64
            or c.__array_interface__["data"][0] != start + 8 * offset
            or c.strides != (row, *reversed(inner))
        ):
            return None
        offset += step // 8
    return buffer if offset == buffer.shape[1] else None


def decode_rounded(
    stages: list[tuple[list[np.ndarray], np.ndarray | None]],
    layout: Any,
    max_value: int,
    dtype: np.dtype,
    out: np.ndarray | None = None,
) -> np.ndarray | None:
    """Stored stages straight to rounded images in one compiled pass, or None if not possible.

    Equals ``unfold_rounded(codec.decode_stages(stages), layout, max_value, dtype, out)`` bit for
    bit, but each tensor is contracted, summed over the stages and rounded into its image while it
    is still in cache (no (B·M, prod sites) float array).  None when numba is not used, the
    image dtype is not an integer or a stage has shapes the compiled contraction does not take.

    Parameters
    ----------
    stages : list of (cores, scales)
        Stored cores of every stage, core k of shape (B·M, R_{k-1}, d_k, R_k), and their int8
        scales ((B·M, n)) or None.
    out : ndarray of shape (B, H, W, C), optional
        C-contiguous, of ``dtype``.
    """
    if not use_numba() or np.dtype(dtype).kind not in "ui" or not stages or stages[0][0][0].shape[0] == 0:
        return None
    plans = [_contract_plan([c.shape for c in cores]) for cores, _ in stages]
    if any(p is None for p in plans) or any(not np.array_equal(p[0], plans[0][0]) for p in plans):  # type: ignore[index]
        return None
    rows = stages[0][0][0].shape[0]
    width = sum(int(np.prod(c.shape[1:])) for cores, _ in stages for c in cores)
    packed = np.empty((rows, width))
    offsets, start = [], 0
    for cores, scales in stages:
        offsets.append(_pack(cores, scales, packed, start))
        start += sum(int(np.prod(c.shape[1:])) for c in cores)
    n = rows // layout.mps_per_image
    if out is None:
        out = np.empty((n, layout.height, layout.width, layout.channels), dtype=dtype)
    _kernels()["decode_round"](
        packed, np.array(offsets, dtype=np.int64), plans[0][0],  # type: ignore[index]
        np.stack([p[1] for p in plans]), np.array([p[2] for p in plans], dtype=np.int64),  # type: ignore[index]
        site_index(layout), float(max_value), out.reshape(n, -1),
    )
    return out


def decode_rounded_rows(
    stages: list[tuple[list[np.ndarray], np.ndarray | None, np.ndarray]],
    layout: Any,
    max_value: int,
    dtype: np.dtype,
    out: np.ndarray | None = None,
) -> np.ndarray | None:
    """Row-packed stored stages (store format 2) straight to rounded images, or None without numba.

    Like :func:`decode_rounded`, but every tensor is contracted at its own ranks, straight from
    the packed rows: nothing is unpacked, and a chunk of mostly low-rank tensors costs what its
    tensors need, not what the largest of them needs.  Equals unpacking
    (:func:`mpsd.core.packing.unpack_core`) followed by ``decode_stages`` and rounding, up to the
    order of floating-point additions.

    Parameters
    ----------
    stages : list of (rows, scales, ranks)
        Per stage: core k as stored rows (T, P_k) (int8, float16 or float32), int8 scales
        (T, n) or None, and the ranks (T, n−1) of every tensor (validated: 1 ≤ r ≤ the storage
        bonds implied by P_k).
    out : ndarray of shape (B, H, W, C), optional
        C-contiguous, of ``dtype``.
    """
    if not use_numba() or np.dtype(dtype).kind not in "ui" or not stages or stages[0][0][0].shape[0] == 0:
        return None
    from mpsd.core.packing import bond_ranks

    t = stages[0][0][0].shape[0]
    dims = np.asarray(layout.sites, dtype=np.int64)
    n = dims.size
    blocks, offsets, start = [], [], 0
    for rows, _, _ in stages:
        row_offsets = []
        for r in rows:
            blocks.append(r)
            row_offsets.append(start)
            start += r.shape[1]
        offsets.append(row_offsets)
    stored = np.concatenate(blocks, axis=1)
    if stored.dtype == np.float16:
        stored = stored.astype(np.float32)
    scales = np.ones((t, len(stages), n))
    ranks = np.empty((t, len(stages), n + 1), dtype=np.int64)
    splits = []
    for s, (_, sc, rk) in enumerate(stages):
        if sc is not None:
            scales[:, s] = sc
        ranks[:, s] = bond_ranks(rk)
        splits.append(_best_split(dims, ranks[:, s].max(axis=0)))
    images = t // layout.mps_per_image
    if out is None:
        out = np.empty((images, layout.height, layout.width, layout.channels), dtype=dtype)
    _kernels()["decode_round_rows"](
        stored, np.array(offsets, dtype=np.int64), scales, dims, ranks, np.array(splits, dtype=np.int64),
        site_index(layout), float(max_value), out.reshape(images, -1),
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------- folding images
@functools.lru_cache(maxsize=64)
def site_index(layout: Any) -> np.ndarray:
    """Flat pixel offset ``(y·W + x)·C + c`` of every entry of one image's site tensors.

    Shape ``(mps_per_image · prod(sites),)`` in the order of ``layout.to_sites`` (one image's
    tensors one after another); −1 marks padding.  Built by folding an image of offsets with
    ``layout.to_sites`` itself, so it is exactly that permutation.
    """
    h, w, c = layout.height, layout.width, layout.channels
    ramp = (np.arange(h * w * c, dtype=np.float64) + 1.0).reshape(1, h, w, c)
    idx = layout.to_sites(ramp).reshape(-1).astype(np.int64) - 1
    idx.setflags(write=False)
    return idx


def fold_scaled(images: np.ndarray, layout: Any, max_value: int) -> np.ndarray:
    """``layout.to_sites(images) / max_value`` (float64), in one pass when numba is available."""
    if not use_numba() or images.dtype.kind not in "ui":
        return layout.to_sites(images) / max_value
    n = images.shape[0]
    idx = site_index(layout)
    out = np.empty((n * layout.mps_per_image, *layout.sites))
    src = np.ascontiguousarray(images).reshape(n, -1)
    if images.dtype.kind == "u" and images.dtype.itemsize <= 2:  # every pixel value in a table
        top = int(np.iinfo(images.dtype).max)
        _kernels()["gather_table"](src, idx, _scale_table(top, max_value), out.reshape(n, -1))
    else:
        _kernels()["gather_scale"](src, idx, float(max_value), out.reshape(n, -1))
    return out


@functools.cache
def _scale_table(top: int, max_value: int) -> np.ndarray:
    """``arange(top + 1) / max_value``: every uint8/uint16 pixel value in normalised units, by
    the same division ``layout.to_sites(images) / max_value`` does (read-only, shared)."""
    table = np.arange(top + 1) / max_value
    table.flags.writeable = False
    return table


def unfold_rounded(
    recon: np.ndarray, layout: Any, max_value: int, dtype: np.dtype, out: np.ndarray | None = None
) -> np.ndarray:
    """``clip(rint(from_sites(recon)·max), 0, max).astype(dtype)``: (N, H, W, C) images.

    ``out``, if given, is a C-contiguous (N, H, W, C) array of ``dtype`` to write into.
    """
    c = layout.channels
    n = recon.shape[0] // layout.mps_per_image
    shape = (n, layout.height, layout.width, c)
    if not use_numba() or np.dtype(dtype).kind not in "ui":
        values = np.clip(np.rint(layout.from_sites(recon) * max_value), 0, max_value).astype(dtype)
        if out is None:
            return values
        out[...] = values
        return out
    if out is None:
        out = np.empty(shape, dtype=dtype)
    _kernels()["scatter_round"](
        np.ascontiguousarray(recon, dtype=np.float64).reshape(n, -1), site_index(layout),
        float(max_value), out.reshape(n, -1),
    )
    return out


# ---------------------------------------------------------------------- allocator
_malloc_tuned = False


def tune_allocator() -> None:
    """Keep freed memory for reuse instead of handing it back to the OS (glibc only, once).

    Encoding and decoding allocate and free float temporaries of a few MB per batch.  glibc
    returns such blocks to the OS (``mmap``/trim) and the next batch faults the pages in again;
    on virtual machines a page fault costs microseconds, ~10% of the encoder's time.  Raising
    ``M_MMAP_THRESHOLD`` to 8 MiB (above the per-task temporaries, below whole outputs) and
    ``M_TRIM_THRESHOLD`` to 128 MiB keeps them in the heap,
    and ``M_ARENA_MAX`` (one heap per CPU, 2..8) stops every worker, I/O and zarr thread from
    keeping a heap of its own, so memory stays bounded by the working set and does not creep
    with the number of batches.  ``MPSD_NO_MALLOC_TUNING=1`` leaves the allocator alone.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if os.environ.get("MPSD_NO_MALLOC_TUNING", "") not in ("", "0"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_mmap_threshold, 8 * 2**20)
    mallopt(m_trim_threshold, 128 * 2**20)
    # one heap per CPU at most: every extra per-thread heap would keep its own free memory
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 2
    mallopt(m_arena_max, min(max(cpus, 2), 8))
