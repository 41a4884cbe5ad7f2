"""The compiled kernels (numba) against the plain numpy/LAPACK path they replace.

Every comparison runs the same function twice, once with the kernels and once with them switched
off (``MPSD_NO_NUMBA=1``), on real images where possible.  Without numba installed the
comparisons are skipped and only the fallback is exercised (by the rest of the suite).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from mpsd.core import _kernels
from mpsd.core.codec import StageSpec, encode_batch
from mpsd.core.contract import contract
from mpsd.core.layout import choose_layout
from mpsd.core.spectra import spectra_and_left_basis, unfolding_spectra
from mpsd.core.ttsvd import SCALE_ONLY_RATIO, exact_ranks, tt_svd
from reference import contract_reference, tt_svd_reference

needs_numba = pytest.mark.skipif(not _kernels.HAVE_NUMBA, reason="numba is not installed")


@pytest.fixture
def numpy_only(monkeypatch):
    """Run the block with the compiled kernels switched off."""

    def switch(off: bool) -> None:
        if off:
            monkeypatch.setenv("MPSD_NO_NUMBA", "1")
        else:
            monkeypatch.delenv("MPSD_NO_NUMBA", raising=False)

    return switch


def both(numpy_only, fn):
    """``(fast, reference)``: ``fn()`` with the kernels on, then off."""
    numpy_only(False)
    fast = fn()
    numpy_only(True)
    try:
        ref = fn()
    finally:
        numpy_only(False)
    return fast, ref


def _tensors(cifar, n=48, order="quadtree"):
    layout = choose_layout(32, 32, 3, order=order)
    return layout.to_sites(cifar["x_train"][:n]) / 255.0


def _gram_cases():
    rng = np.random.default_rng(3)

    def spd(b, n, p):
        m = rng.normal(size=(b, n, p))
        return m @ m.transpose(0, 2, 1)

    q = np.linalg.qr(rng.normal(size=(6, 16, 16)))[0]
    repeated = q @ np.diag([3.0] * 5 + [1.0] * 11) @ q.transpose(0, 2, 1)
    return {
        "random16": spd(37, 16, 64),
        "rank2": spd(9, 16, 2),
        "zero": np.zeros((5, 16, 16)),
        "identity": np.broadcast_to(np.eye(16), (5, 16, 16)).copy(),
        "diagonal": np.stack([np.diag(rng.random(12)) for _ in range(7)]),
        "repeated": repeated,
        "blocks": np.stack([np.kron(np.eye(2), np.ones((8, 8)))] * 3),
        "n1": spd(4, 1, 3),
        "n2": spd(11, 2, 5),
        "n7": spd(13, 7, 9),
        "n56": spd(10, 56, 80),
        "tiny": spd(9, 16, 64) * 1e-200,
        "huge": spd(9, 16, 64) * 1e200,
        # each matrix is scaled on its own: tiny, huge and ordinary ones side by side in a batch
        "mixed": spd(12, 16, 64) * np.repeat([1e-200, 1.0, 1e200], 4)[:, None, None],
        # off-diagonal rounding noise far below ε·‖G‖ (the Gram matrix of a few isolated pixels,
        # found by hypothesis): inverse iteration must not take it as a pivot and overflow
        "noise": np.stack([np.diag(d) + np.diag([c] * (len(d) - 1), 1) + np.diag([c] * (len(d) - 1), -1)
                           for d, c in [([6.2e-5, 1.5e-5], -1e-159), ([1.5e-5, 6.2e-5], 1e-159),
                                        ([6.2e-5, 1.5e-5], 1e-300), ([3.0, 3.0], 1e-170)]]),
        "noise16": np.diag([6.2e-5, 1.5e-5] + [0.0] * 14)[None] + 1e-160 * (np.ones((16, 16)) - np.eye(16))[None],
    }


# ---------------------------------------------------------------- eigensolver
@needs_numba
@pytest.mark.parametrize("case", list(_gram_cases()))
def test_eigh_matches_lapack(numpy_only, case):
    g = _gram_cases()[case]
    n = g.shape[1]
    (w, v), (w0, _v0) = both(numpy_only, lambda: _kernels.eigh_desc(g, vectors=True))
    scale = max(float(np.abs(w0).max()), 1e-300)
    np.testing.assert_allclose(w, w0, rtol=0, atol=1e-13 * scale)
    assert np.all(np.diff(w, axis=1) <= 0)  # largest first
    # an orthonormal eigenbasis that rebuilds the matrix
    np.testing.assert_allclose(v.transpose(0, 2, 1) @ v, np.broadcast_to(np.eye(n), v.shape), atol=1e-12)
    np.testing.assert_allclose(np.einsum("bij,bj,bkj->bik", v, w, v), g, atol=1e-13 * scale)
    wv, none = _kernels.eigh_desc(g, vectors=False)
    assert none is None
    np.testing.assert_allclose(wv, w0, rtol=0, atol=1e-13 * scale)


@needs_numba
@pytest.mark.parametrize("case", list(_gram_cases()))
def test_eigh_leading_vectors_match_lapack(numpy_only, case):
    """``k`` leading eigenvectors (inverse iteration for k <= n/2) against LAPACK's whole basis."""
    g = _gram_cases()[case]
    b, n = g.shape[:2]
    w0, v0 = np.linalg.eigh(g)
    w0, v0 = np.maximum(w0[:, ::-1], 0.0), v0[:, :, ::-1]
    scale = np.maximum(np.abs(w0).max(axis=1), 1e-300)  # per matrix: "mixed" spans 400 decades
    values_only = _kernels.eigh_desc(g, vectors=False)[0]
    for k in sorted({1, max(n // 2, 1), max(3 * n // 4, 1), n}):
        w, v = _kernels.eigh_desc(g, vectors=True, k=k)
        assert w.shape == (b, n) and v.shape == (b, n, k)
        assert np.all(np.abs(w - w0) <= 1e-13 * scale[:, None])
        assert np.all(np.diff(w, axis=1) <= 0)
        np.testing.assert_allclose(v.transpose(0, 2, 1) @ v, np.broadcast_to(np.eye(k), (b, k, k)), atol=1e-12)
        # G v_j = λ_j v_j: holds inside clusters of equal eigenvalues too, where any basis will do
        residual = np.linalg.norm((g @ v - v * w[:, None, :k]) / scale[:, None, None], axis=(1, 2))
        assert np.all(residual <= 1e-13), residual  # one step of inverse iteration too few: 7.6e-13
        # where the k-th and (k+1)-th eigenvalues differ, the same invariant subspace as LAPACK's
        if k < n:
            gap = (w0[:, k - 1] - w0[:, k]) / scale > 1e-6
            p, p0 = v @ v.transpose(0, 2, 1), v0[:, :, :k] @ v0[:, :, :k].transpose(0, 2, 1)
            np.testing.assert_allclose(p[gap], p0[gap], atol=1e-9)
        if 4 * k <= 3 * n:  # one kernel: the values are the very same as without vectors
            np.testing.assert_array_equal(w, values_only)
        numpy_only(True)
        try:
            wn, vn = _kernels.eigh_desc(g, vectors=True, k=k)
        finally:
            numpy_only(False)
        assert vn.shape == (b, n, k)
        np.testing.assert_allclose(wn, w0, rtol=0, atol=1e-13 * float(scale.max()))


@needs_numba
def test_eigh_top_subspace_matches_lapack_on_real_grams(numpy_only, cifar):
    a = _tensors(cifar, 64).reshape(-1, 16, 64)
    g = a @ a.transpose(0, 2, 1)
    (_w, v), (_w0, v0) = both(numpy_only, lambda: _kernels.eigh_desc(g))
    for r in (4, 6, 9):
        p, p0 = v[:, :, :r] @ v[:, :, :r].transpose(0, 2, 1), v0[:, :, :r] @ v0[:, :, :r].transpose(0, 2, 1)
        np.testing.assert_allclose(p, p0, atol=1e-9)
    # up to sign, the same eigenvectors (the spectra of photos have no repeated values)
    dots = np.abs(np.einsum("bij,bij->bj", v, v0))
    np.testing.assert_allclose(dots[:, :6], 1.0, atol=1e-9)


@needs_numba
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_eigh_hands_matrices_that_are_not_finite_to_lapack(numpy_only, value):
    g = _gram_cases()["random16"][:10].copy()
    g[3, 2, 2] = value

    def outcome():
        try:
            return _kernels.eigh_desc(g)
        except np.linalg.LinAlgError as e:
            return str(e)

    fast, ref = both(numpy_only, outcome)
    if isinstance(ref, str):  # LAPACK refused the matrix: so does the fast path
        assert fast == ref
    else:
        np.testing.assert_array_equal(fast[0][3], ref[0][3])
        np.testing.assert_array_equal(fast[1][3], ref[1][3])
    fine = [i for i in range(10) if i != 3]
    w, _ = _kernels.eigh_desc(g[fine])
    w0 = np.linalg.eigvalsh(g[fine])[:, ::-1]
    np.testing.assert_allclose(w, w0, rtol=0, atol=1e-12 * np.abs(w0).max())


@needs_numba
def test_eigenvector_signs_are_fixed_the_same_way_on_every_path(numpy_only, cifar):
    """Columns sum to >= 0, so the kernels and LAPACK give the same vectors, not just up to sign."""
    a = _tensors(cifar, 30).reshape(-1, 16, 64)  # 90 matrices: more than one block of 64 lanes
    g = a @ a.transpose(0, 2, 1)
    for k in (6, None):  # inverse iteration, and QL with rotations
        (_, vf), (wr, vr) = both(numpy_only, lambda k=k: _kernels.eigh_desc(g, k=k))
        for v in (vf, vr):
            assert np.all(v.sum(axis=1) >= 0)
        # LAPACK's own signs differ from the kernels' for some columns: the fix is doing work
        lapack = np.linalg.eigh(g)[1][:, :, ::-1][:, :, : vf.shape[2]]
        assert np.any(np.abs(lapack - vf).max(axis=1) > 0.5)
        # where the eigenvalue is well separated the vectors agree entry by entry
        gap = np.minimum(np.abs(np.diff(wr, axis=1, prepend=np.inf)), np.abs(np.diff(wr, axis=1, append=-np.inf)))
        clear = (gap[:, : vf.shape[2]] > 1e-6 * wr[:, :1]) & (np.abs(vr.sum(axis=1)) > 1e-3)
        assert clear.mean() > 0.9
        np.testing.assert_allclose(vf.transpose(0, 2, 1)[clear], vr.transpose(0, 2, 1)[clear], atol=1e-7)


@needs_numba
def test_eigh_result_does_not_depend_on_the_batch_it_is_in(cifar):
    a = _tensors(cifar, 20).reshape(-1, 16, 64)
    g = a @ a.transpose(0, 2, 1)
    for k in (None, 6):
        w, v = _kernels.eigh_desc(g, k=k)
        for i in (0, 7, 13, len(g) - 1):
            wi, vi = _kernels.eigh_desc(g[i : i + 1], k=k)
            np.testing.assert_array_equal(wi[0], w[i])
            np.testing.assert_array_equal(vi[0], v[i])


# ---------------------------------------------------------------- small linear algebra
@needs_numba
@pytest.mark.parametrize("shape", [(9, 16, 64), (5, 4, 256), (6, 8, 98), (3, 12, 13), (3, 1, 7), (4, 7, 7)])
def test_gram_rows_matches_matmul(numpy_only, shape):
    m = np.random.default_rng(8).normal(size=shape)
    g, g0 = both(numpy_only, lambda: _kernels.gram_rows(m))
    np.testing.assert_allclose(g, m @ m.transpose(0, 2, 1), rtol=1e-13, atol=1e-13 * shape[2])
    np.testing.assert_array_equal(g, g.transpose(0, 2, 1))
    np.testing.assert_array_equal(g0, m @ m.transpose(0, 2, 1))  # numpy path: plain matmul


@needs_numba
@pytest.mark.parametrize("shape", [(9, 64, 16), (5, 24, 16), (3, 7, 1), (4, 7, 7), (2, 1, 5)])
def test_gram_cols_matches_matmul(numpy_only, shape):
    m = np.random.default_rng(9).normal(size=shape)
    reference = np.einsum("bij,bik->bjk", m, m)  # not the code under test: no BLAS call
    g, g0 = both(numpy_only, lambda: _kernels.gram_cols(m))
    np.testing.assert_allclose(g, reference, rtol=1e-13, atol=1e-13 * shape[1])
    np.testing.assert_array_equal(g, g.transpose(0, 2, 1))
    np.testing.assert_allclose(g0, reference, rtol=1e-13, atol=1e-13 * shape[1])


@needs_numba
@pytest.mark.parametrize("shape", [(7, 24, 6), (5, 4, 4), (3, 9, 1), (4, 64, 8)])
def test_qr_is_a_valid_reduced_qr(shape):
    rng = np.random.default_rng(1)
    x = rng.normal(size=shape)
    x[0] = 0.0  # all-zero matrix
    if shape[2] > 1:
        x[1, :, 1] = x[1, :, 0]  # rank-deficient
    q, r = _kernels.qr(x)
    k = shape[2]
    np.testing.assert_allclose(q @ r, x, atol=1e-13)
    np.testing.assert_allclose(q.transpose(0, 2, 1) @ q, np.broadcast_to(np.eye(k), (shape[0], k, k)), atol=1e-13)
    assert np.all(np.tril(r, -1) == 0)


@needs_numba
@pytest.mark.parametrize(
    "ranks", [(4, 6, 6, 4), (4, 16, 16, 4), (1, 1, 1, 1), (2, 3, 3, 2), (4, 12, 7, 4)]
)
def test_contract_matches_the_numpy_chain(numpy_only, ranks):
    rng = np.random.default_rng(4)
    full = (1, *ranks, 1)
    cores = [rng.normal(size=(9, full[k], 4, full[k + 1])) for k in range(5)]
    fast, ref = both(numpy_only, lambda: contract(cores))
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12)
    one = contract_reference([c[0] for c in cores]).ravel()
    np.testing.assert_allclose(fast[0], one, rtol=1e-12, atol=1e-12)


@needs_numba
def test_norms_and_distances_match_numpy_on_real_tensors(numpy_only, cifar):
    flat = _tensors(cifar).reshape(144, -1)
    recon = contract(tt_svd(_tensors(cifar), max_bonds=(4, 6, 6, 4)).cores)
    (norm, dist), _ = both(numpy_only, lambda: _kernels.norms_and_distances(flat, recon))
    # independent of both paths: plain numpy.linalg.norm
    np.testing.assert_allclose(norm, np.linalg.norm(flat, axis=1), rtol=1e-13)
    np.testing.assert_allclose(dist, np.linalg.norm(flat - recon, axis=1), rtol=1e-12)
    zero_norm, zero_dist = _kernels.norms_and_distances(np.zeros((2, 5)), np.ones((2, 5)))
    assert zero_norm.tolist() == [0.0, 0.0] and np.allclose(zero_dist, np.sqrt(5))


@pytest.mark.parametrize("dtype", ["int8", "float16", "float32"])
@pytest.mark.parametrize("spec", [StageSpec(bonds=(4, 6, 6, 4)), StageSpec(tol=0.05)])
def test_contract_stored_dequantises_while_copying(numpy_only, cifar, dtype, spec):
    """``contract_stored`` = contract of the dequantised cores (bit for bit on the same path)."""
    from mpsd.core.contract import contract_stored
    from mpsd.core.quantize import dequantize

    layout = choose_layout(32, 32, 3)
    stage = encode_batch(layout.to_sites(cifar["x_train"][:12]) / 255.0, [spec], dtype=dtype, metrics=False).stages[0]
    assert (stage.scales is None) == (dtype != "int8")

    def plain() -> np.ndarray:
        return contract([dequantize(c, None if stage.scales is None else stage.scales[:, k]) for k, c in enumerate(stage.cores)])

    fused = contract_stored(stage.cores, stage.scales)
    np.testing.assert_array_equal(fused, plain())
    (fast, ref) = both(numpy_only, lambda: contract_stored(stage.cores, stage.scales))
    np.testing.assert_array_equal(fast, fused)
    np.testing.assert_allclose(fast, ref, rtol=0, atol=1e-12)
    # independent: one tensor at a time, dequantised by hand
    for t in (0, 7):
        cores = [c[t].astype(np.float64) * (1.0 if stage.scales is None else float(stage.scales[t, k])) for k, c in enumerate(stage.cores)]
        np.testing.assert_allclose(fast[t], contract_reference(cores).ravel(), rtol=0, atol=1e-12)


def test_contract_still_reports_a_bond_mismatch():
    cores = [np.ones((2, 1, 4, 3)), np.ones((2, 2, 4, 1))]
    with pytest.raises(ValueError, match="bond mismatch"):
        contract(cores)


# ---------------------------------------------------------------- TT-SVD and spectra
@needs_numba
@pytest.mark.parametrize(
    "kwargs", [{"max_bonds": (4, 6, 6, 4)}, {"max_bonds": (2, 3, 3, 2)}, {"tol": 0.05}, {"tol": 0.02, "max_bonds": (4, 9, 9, 4)}, {}]
)
def test_tt_svd_fast_path_equals_reference_path(numpy_only, cifar, kwargs):
    tensors = _tensors(cifar)
    fast, ref = both(numpy_only, lambda: tt_svd(tensors, **kwargs))
    np.testing.assert_array_equal(fast.ranks, ref.ranks)
    np.testing.assert_allclose(fast.sweep_error, ref.sweep_error, rtol=1e-8, atol=1e-12)
    rec_fast = contract(fast.cores).reshape(tensors.shape)
    rec_ref = contract(ref.cores).reshape(tensors.shape)
    np.testing.assert_allclose(rec_fast, rec_ref, atol=1e-9)
    # the same cores up to the gauge: each left-orthonormal core spans the same space
    for cf, cr in zip(fast.cores[:-1], ref.cores[:-1], strict=True):
        b, r0, d, r1 = cf.shape
        uf, ur = cf.reshape(b, r0 * d, r1), cr.reshape(b, r0 * d, r1)
        # ranks of the padded batch agree, and U_f U_fᵀ = U_r U_rᵀ only holds in the same left
        # basis, which every core shares once the earlier bonds are gauge-fixed: compare norms
        np.testing.assert_allclose(np.linalg.norm(uf, axis=1), np.linalg.norm(ur, axis=1), atol=1e-9)


def _sweep_cases(cifar, fashion):
    """Tensors that take the compiled sweep's rarer branches, with the arguments to use."""
    rng = np.random.default_rng(11)
    photos = _tensors(cifar, 130)  # 390 tensors: six blocks of 64 and a partial one
    flat = photos[:70].copy()  # a block of 64 and a partial one
    flat[:10] = 0.25  # rank 1: kept σ_j of zero, so the right-side step needs Gram-Schmidt
    flat[10:20] = photos[10:20, :, :1]  # rank 1 at bond 0 (repeated along site 1)
    flat[20:30] = np.einsum("ba,bc->bac", rng.random((10, 16)), rng.random((10, 64))).reshape(10, 4, 4, 4, 4, 4)
    flat[30] = 0.0
    flat[31] *= 1e-100  # Gram matrices scaled into range by a power of two in the eigensolver
    flat[32] *= 1e100
    grey = choose_layout(28, 28, 1).to_sites(fashion["x_train"][:80].reshape(80, 28, 28, 1)) / 255.0
    per_tensor = rng.integers(1, [5, 17, 17, 5], size=(len(photos), 4))
    return {
        "photos-bond": (photos, {"max_bonds": (4, 6, 6, 4)}),
        "photos-tol": (photos, {"tol": 0.05}),
        "photos-tol-small": (photos, {"tol": 0.003}),
        "photos-per-tensor-caps": (photos, {"max_bonds": per_tensor}),
        "special-bond": (flat, {"max_bonds": (4, 6, 6, 4)}),
        "special-tol": (flat, {"tol": 0.02, "max_bonds": (4, 9, 9, 4)}),
        "fashion-bond": (grey, {"max_bonds": (2, 6, 6, 2)}),
        "fashion-tol": (grey, {"tol": 0.05}),
    }


@needs_numba
@pytest.mark.parametrize(
    "case",
    ["photos-bond", "photos-tol", "photos-tol-small", "photos-per-tensor-caps", "special-bond", "special-tol", "fashion-bond", "fashion-tol"],
)
@pytest.mark.parametrize("with_basis", [False, True])
def test_compiled_sweep_equals_the_numpy_sweep(cifar, fashion, case, with_basis):
    """The compiled sweep (one call, decisions per block of 64 tensors) against tt_svd's numpy
    loop (decisions per batch) on the same tensors: the same ranks, errors and reconstruction,
    and left-orthonormal cores (the gauge may differ).  With the spectra's left basis, which
    serves the tensors no earlier bond rotated (under tol, blocks mix them with others)."""
    tensors, kwargs = _sweep_cases(cifar, fashion)[case]
    sites = tensors.shape[1:]
    caps = np.minimum(np.max(np.atleast_2d(kwargs.get("max_bonds", exact_ranks(sites))), axis=0), exact_ranks(sites))
    assert _kernels.sweep_fits(sites, caps)  # the case does test the compiled sweep
    if with_basis:
        kwargs = {**kwargs, "left_basis": spectra_and_left_basis(tensors, caps)[1]}
    fast = tt_svd(tensors, **kwargs)
    ref = tt_svd(tensors, **kwargs, compiled=False)
    np.testing.assert_array_equal(fast.ranks, ref.ranks)
    norms = np.sqrt(np.einsum("bi,bi->b", tensors.reshape(len(tensors), -1), tensors.reshape(len(tensors), -1)))
    scale = np.maximum(norms, 1e-300)[:, None]
    # a discarded σ² of rounding size (1e-16) is a σ of 1e-8
    np.testing.assert_allclose(fast.sweep_error / scale, ref.sweep_error / scale, rtol=0, atol=1e-7)
    rec_fast = contract(fast.cores).reshape(len(tensors), -1)
    rec_ref = contract(ref.cores).reshape(len(tensors), -1)
    np.testing.assert_allclose(rec_fast / scale, rec_ref / scale, rtol=0, atol=1e-9)
    # the error the sweep reports is the error of its cores (they are orthonormal where used)
    actual = np.linalg.norm(rec_fast - tensors.reshape(len(tensors), -1), axis=1)
    reported = np.sqrt((fast.sweep_error**2).sum(axis=1))
    np.testing.assert_allclose(actual / scale[:, 0], reported / scale[:, 0], rtol=0, atol=1e-7)
    # left-orthonormal cores (on the columns in use) wherever the numpy sweep's are; a bond
    # with nothing to truncate on the right side keeps the whole matrix in both
    for core_f, core_r in zip(fast.cores[:-1], ref.cores[:-1], strict=True):
        np.testing.assert_array_equal(_left_orthonormal(core_f), _left_orthonormal(core_r))


def _left_orthonormal(core):
    """Per tensor: are the columns in use of the (r0·d, r1) matrix orthonormal (zero columns
    are not in use)."""
    b, r0, d, r1 = core.shape
    u = core.reshape(b, r0 * d, r1)
    gram = u.transpose(0, 2, 1) @ u
    used = np.abs(gram).sum(axis=1) > 0.5
    return np.array([np.allclose(g[np.ix_(c, c)], np.eye(c.sum()), atol=1e-9) for g, c in zip(gram, used, strict=True)])


@needs_numba
def test_compiled_sweep_agrees_with_tt_svd_on_its_thresholds():
    from mpsd.core import _kernels_nb

    assert _kernels_nb.scale_only_ratio == SCALE_ONLY_RATIO
    assert _kernels.sweep_fits((4, 4, 4, 4, 4), (4, 16, 16, 4))
    assert _kernels.sweep_fits((2, 4, 7, 7, 2), (2, 8, 14, 2))
    assert not _kernels.sweep_fits((4, 4, 4, 4, 4, 4), (4, 16, 64, 16, 4))  # a 64×64 Gram matrix


@needs_numba
def test_compiled_sweep_hands_what_it_cannot_decompose_to_the_numpy_path(cifar, monkeypatch):
    """Tensors the compiled kernel flags (here: made to look unconverged) are redone on the numpy
    path and merged into the batch's cores, padded to the batch's ranks."""
    tensors = _tensors(cifar, 70)
    ref = tt_svd(tensors, tol=0.05, compiled=False)
    real = _kernels.tt_sweep

    def flag_some(flat, sites, caps, delta_sq, basis):
        cores, ranks, err, bad = real(flat, sites, caps, delta_sq, basis)
        # what a failed tensor's outputs may hold: anything, and wider cores than the batch needs
        cores = [np.pad(c, ((0, 0), (0, 0 if k == 0 else 2), (0, 0), (0, 0 if k == len(cores) - 1 else 2))) for k, c in enumerate(cores)]
        for c in cores:
            c[::3] = np.nan
        ranks[::3] = 99
        bad[::3] = True
        return cores, ranks, err, bad

    monkeypatch.setattr(_kernels, "tt_sweep", flag_some)
    fast = tt_svd(tensors, tol=0.05)
    np.testing.assert_array_equal(fast.ranks, ref.ranks)
    rec = contract(fast.cores).reshape(len(tensors), -1)
    np.testing.assert_allclose(rec, contract(ref.cores).reshape(len(tensors), -1), atol=1e-9)
    assert [c.shape for c in fast.cores] == [c.shape for c in ref.cores]


@needs_numba
def test_tt_svd_fast_path_matches_the_per_image_svd_reference(cifar):
    tensors = _tensors(cifar, 16)
    tt = tt_svd(tensors, max_bonds=(4, 6, 6, 4))
    ours = contract(tt.cores).reshape(tensors.shape)
    for b in range(len(tensors)):
        ref = contract_reference(tt_svd_reference(tensors[b], bonds=(4, 6, 6, 4))[0])
        np.testing.assert_allclose(ours[b], ref, atol=1e-9)


@needs_numba
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1), (31, 30, 3)])
def test_spectra_fast_path_equals_direct_svd(numpy_only, cifar, fashion, shape):
    h, w, c = shape
    src = cifar["x_train"][:24] if c == 3 else fashion["x_train"][:24].reshape(24, 28, 28, 1)
    src = src[:, :h, :w]
    layout = choose_layout(h, w, c)
    tensors = layout.to_sites(src) / 255.0
    fast, ref = both(numpy_only, lambda: unfolding_spectra(tensors))
    dims = tensors.shape[1:]
    for k, (sf, sr) in enumerate(zip(fast, ref, strict=True)):
        scale = sr[:, :1]
        np.testing.assert_allclose(sf, sr, rtol=0, atol=1e-12 * scale.max())
        for i in (0, 11):
            sv = np.linalg.svd(tensors[i].reshape(int(np.prod(dims[: k + 1])), -1), compute_uv=False)
            np.testing.assert_allclose(np.sqrt(sf[i][: len(sv)]), sv, rtol=1e-6, atol=1e-9 * sv[0])


@needs_numba
def test_entropy_kernel_equals_the_numpy_formula(numpy_only, cifar):
    from mpsd.core.spectra import entanglement_entropy

    spectra = unfolding_spectra(_tensors(cifar, 30))
    spectra[1][4] = 0.0  # an all-zero row: entropy 0
    spectra[2][5, 1:] = 0.0  # one value: entropy 0, the zeros left out
    fast, ref = both(numpy_only, lambda: entanglement_entropy(spectra))
    np.testing.assert_allclose(fast, ref, rtol=1e-13, atol=1e-15)
    assert fast[4, 1] == 0.0 and fast[5, 2] == 0.0 and (fast > 0).sum() == fast.size - 2


@needs_numba
def test_local_error_kernel_equals_the_numpy_formula(numpy_only, cifar):
    from mpsd.core.spectra import local_truncation_errors

    spectra = unfolding_spectra(_tensors(cifar, 30))
    ranks = np.random.default_rng(2).integers(1, 17, size=(len(spectra[0]), 4))
    ranks[0] = (4, 16, 16, 4)  # nothing discarded: 0
    fast, ref = both(numpy_only, lambda: local_truncation_errors(spectra, ranks))
    np.testing.assert_allclose(fast, ref, rtol=1e-13, atol=1e-15)
    assert (fast[0] == 0).all() and (fast[1:] > 0).any()


@needs_numba
@pytest.mark.parametrize(
    "stages",
    [
        [StageSpec(bonds=(4, 6, 6, 4))],
        [StageSpec(bonds=(4, 6, 6, 4)), StageSpec(bonds=(2, 2, 2, 2))],
        [StageSpec(tol=0.05)],
        [StageSpec(ratio=0.3)],
    ],
)
def test_encode_batch_fast_path_equals_reference_path(numpy_only, cifar, stages):
    tensors = _tensors(cifar, 40)
    fast, ref = both(numpy_only, lambda: encode_batch(tensors, stages, dtype="float32"))
    np.testing.assert_allclose(fast.reconstruction, ref.reconstruction, atol=1e-5)
    np.testing.assert_allclose(fast.entropy, ref.entropy, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fast.error, ref.error, rtol=1e-5, atol=1e-7)
    for sf, sr in zip(fast.stages, ref.stages, strict=True):
        np.testing.assert_array_equal(sf.ranks, sr.ranks)
        np.testing.assert_allclose(sf.local_errors, sr.local_errors, rtol=1e-6, atol=1e-9)


@needs_numba
@pytest.mark.parametrize(
    ("case", "stages", "dtype"),
    [
        ("cifar", [StageSpec(bonds=(4, 6, 6, 4))], "int8"),
        ("cifar", [StageSpec(bonds=(4, 6, 6, 4)), StageSpec(bonds=(2, 2, 2, 2))], "int8"),
        ("cifar", [StageSpec(tol=0.05)], "float32"),
        ("padded", [StageSpec(bonds=(3, 5, 5, 3))], "int8"),  # 31×29 colour, padded to 32×30
        ("cifar", [StageSpec(bonds=(1, 1, 1, 1))], "int8"),  # rank-1 cores
        ("fashion", [StageSpec(bonds=(2, 6, 5, 2))], "int8"),  # grey 2,4,7,7,2: unfused path, one MPS per image
    ],
)
def test_last_stage_metrics_in_one_pass_equal_the_plain_path(numpy_only, cifar, fashion, case, stages, dtype):
    # encode_batch(pixels=...) compares the last stage with the tensors and the images while each
    # tensor is in cache; the numbers must be those of the stages' sum, computed independently
    from mpsd.core.codec import Pixels
    from mpsd.core.quantize import dequantize

    if case == "cifar":
        images = cifar["x_train"][:30]
    elif case == "fashion":
        images = fashion["x_train"][:30, :, :, None]
    else:
        images = np.ascontiguousarray(cifar["x_train"][:30, :31, :29])
        images[0] = 255  # a saturated image: clipping at the top
    layout = choose_layout(*images.shape[1:])
    assert case != "padded" or layout.padded_height * layout.padded_width > 31 * 29
    tensors = layout.to_sites(images) / 255.0
    pixels = Pixels(layout, 255)
    fused = encode_batch(tensors, stages, dtype=dtype, pixels=pixels)
    assert fused.reconstruction.shape == (len(tensors), 0)
    assert fused.pixel_squared_error is not None and fused.pixel_squared_error.shape == (len(images),)
    # independent reference: each stored stage dequantised and contracted one tensor at a time
    total = sum(
        np.stack([
            contract_reference([dequantize(c[t : t + 1], None if st.scales is None else st.scales[t : t + 1, k])[0]
                                for k, c in enumerate(st.cores)])
            for t in range(len(tensors))
        ])
        for st in fused.stages
    ).reshape(len(tensors), -1)
    flat = tensors.reshape(len(tensors), -1)
    np.testing.assert_allclose(fused.norm, np.linalg.norm(flat, axis=1), rtol=1e-13)
    np.testing.assert_allclose(fused.error, np.linalg.norm(flat - total, axis=1), rtol=1e-9, atol=1e-12)
    decoded = np.clip(np.rint(layout.from_sites(total) * 255), 0, 255)
    expected = ((decoded - images) ** 2).reshape(len(images), -1).sum(axis=1)
    np.testing.assert_array_equal(fused.pixel_squared_error, expected)  # integers (no x.5 within 1e-13 here)
    assert expected.min() > 0  # the numbers are not trivially zero
    # and what the unfused kernels give on the same stores (the sum, then its norms and pixels)
    assert (_kernels._contract_plan([c.shape for c in fused.stages[-1].cores]) is None) == (case == "fashion")
    plain = encode_batch(tensors, stages, dtype=dtype)
    for a, b in zip(fused.stages[-1].cores, plain.stages[-1].cores, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(fused.error, _kernels.norms_and_distances(flat, plain.reconstruction)[1], rtol=1e-12)
    np.testing.assert_array_equal(fused.pixel_squared_error, _kernels.errors_against_pixels(flat, plain.reconstruction, layout, 255)[2])
    # without numba: the same numbers through the numpy path (its own stores)
    numpy_only(True)
    ref = encode_batch(tensors, stages, dtype=dtype, pixels=pixels)
    numpy_only(False)
    assert ref.reconstruction.shape == (len(tensors), 0) and ref.pixel_squared_error is not None
    ref_total = sum(contract([dequantize(c, None if st.scales is None else st.scales[:, k]) for k, c in enumerate(st.cores)])
                    for st in ref.stages)
    np.testing.assert_allclose(ref.error, np.linalg.norm(flat - ref_total, axis=1), rtol=1e-9, atol=1e-12)
    ref_decoded = np.clip(np.rint(layout.from_sites(ref_total) * 255), 0, 255)
    np.testing.assert_array_equal(ref.pixel_squared_error, ((ref_decoded - images) ** 2).reshape(len(images), -1).sum(axis=1))


# ---------------------------------------------------------------- folding images
@needs_numba
@pytest.mark.parametrize("order", ["quadtree", "row"])
@pytest.mark.parametrize("colour", ["separate", "site"])
@pytest.mark.parametrize(("shape", "dtype"), [((32, 32, 3), np.uint8), ((31, 30, 3), np.uint8), ((20, 45, 1), np.uint16)])
def test_folding_kernels_equal_the_layout(numpy_only, order, colour, shape, dtype):
    h, w, c = shape
    rng = np.random.default_rng(5)
    top = np.iinfo(dtype).max
    images = rng.integers(0, top, (6, h, w, c), endpoint=True).astype(dtype)
    layout = choose_layout(h, w, c, order=order, colour=colour)
    fast, ref = both(numpy_only, lambda: _kernels.fold_scaled(images, layout, top))
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(fast, layout.to_sites(images) / top)
    recon = fast.reshape(fast.shape[0], -1) + rng.normal(scale=0.01, size=(fast.shape[0], fast[0].size))
    recon[0, :5] = [-0.2, 1.3, 0.5 / top, 1.5 / top, 0.0]  # clipping and rounding ties
    tensors = fast.reshape(recon.shape)
    fast, ref = both(numpy_only, lambda: _kernels.errors_against_pixels(tensors, recon, layout, top))
    decoded = np.clip(np.rint(layout.from_sites(recon) * top), 0, top)
    sq = ((decoded - images) ** 2).reshape(len(images), -1).sum(axis=1)  # independent: in pixel space
    for got in (fast, ref):
        np.testing.assert_array_equal(got[2], sq)
        np.testing.assert_allclose(got[0], np.linalg.norm(tensors, axis=1), rtol=1e-13)
        np.testing.assert_allclose(got[1], np.linalg.norm(tensors - recon, axis=1), rtol=1e-12)
    fast, ref = both(numpy_only, lambda: _kernels.unfold_rounded(recon, layout, top, images.dtype))
    np.testing.assert_array_equal(fast, ref)
    assert fast.dtype == images.dtype


@needs_numba
def test_folding_signed_images_divides_instead_of_a_table(numpy_only):
    """uint8/uint16 pixels go through a table of v / max; other integers divide, same numbers."""
    rng = np.random.default_rng(6)
    images = rng.integers(0, 1000, (4, 28, 28, 1)).astype(np.int16)
    layout = choose_layout(28, 28, 1)
    fast, ref = both(numpy_only, lambda: _kernels.fold_scaled(images, layout, 1000))
    np.testing.assert_array_equal(fast, ref)
    np.testing.assert_array_equal(fast, layout.to_sites(images) / 1000)


# ---------------------------------------------------------------- decoding whole images
@needs_numba
@pytest.mark.parametrize("dtype", ["int8", "float16", "float32"])
@pytest.mark.parametrize(
    "stages",
    [[StageSpec(bonds=(4, 6, 6, 4))], [StageSpec(bonds=(4, 6, 6, 4)), StageSpec(bonds=(2, 4, 4, 2))], [StageSpec(tol=0.05)]],
)
def test_fused_decode_equals_contract_then_round(numpy_only, cifar, dtype, stages):
    from mpsd.core.codec import decode_stages

    images = cifar["x_train"][:20]
    layout = choose_layout(32, 32, 3)
    batch = encode_batch(layout.to_sites(images) / 255.0, stages, dtype=dtype)
    stored = [(s.cores, s.scales) for s in batch.stages]
    fused = _kernels.decode_rounded(stored, layout, 255, np.uint8)
    assert fused is not None  # tol pads to the exact ranks, 4,16,16,4: within CONTRACT_MAX_RANK
    numpy_only(True)
    try:
        plain = _kernels.unfold_rounded(decode_stages(stored), layout, 255, np.uint8)
    finally:
        numpy_only(False)
    np.testing.assert_array_equal(fused, plain)
    # and against an independent per-image reference: contract each stage alone, sum, round
    # (image 1 is tensors 3, 4, 5: one per colour channel)
    total = np.stack([
        sum(
            contract_reference([c[t].astype(np.float64) * (1.0 if sc is None else float(sc[t, k])) for k, c in enumerate(cores)])
            for cores, sc in stored
        )
        for t in (3, 4, 5)
    ])
    ref = np.clip(np.rint(layout.from_sites(total)[0] * 255), 0, 255)
    assert np.abs(fused[1].astype(int) - ref).max() <= 1  # ±1 only at rounding ties
    assert (fused[1] == ref).mean() > 0.99


@needs_numba
@pytest.mark.parametrize("tol", [0.01, None])
def test_sweep_of_a_few_isolated_pixels_is_exact(numpy_only, tol):
    # found by hypothesis (test_properties): two pixels of 1 and 2 in a 16×16 grey image give
    # Gram matrices whose off-diagonals are rounding noise of 1e-160; the compiled sweep's
    # inverse iteration took such a number as a pivot and returned inf/NaN cores
    layout = choose_layout(16, 16, 1)
    images = np.zeros((3, 16, 16, 1), dtype=np.uint8)
    images[1, 7, 8], images[1, 14, 10] = 1, 2
    images[2, 7, 8], images[2, 14, 10] = 2, 1
    tensors = layout.to_sites(images) / 255.0
    kwargs = {"tol": tol} if tol else {"max_bonds": (2, 2, 2, 2)}
    fast, ref = both(numpy_only, lambda: tt_svd(tensors, **kwargs))
    for cores in (fast.cores, ref.cores):
        assert all(np.isfinite(c).all() for c in cores)
        rec = contract(cores).reshape(len(tensors), -1)
        np.testing.assert_allclose(rec, tensors.reshape(len(tensors), -1), rtol=0, atol=1e-15)  # rank 2: exact
    np.testing.assert_array_equal(fast.ranks, ref.ranks)


@needs_numba
@pytest.mark.parametrize("mode", ["bond", "tol"])
def test_quantising_in_the_sweeps_buffer_equals_the_numpy_path_on_copies(numpy_only, cifar, mode):
    # _store_cores balances the gauge in the buffer the compiled sweep returns its cores in
    # (side by side; with --tol trimmed to the batch's ranks first), not in a packed copy
    from mpsd.core.codec import _store_cores

    kwargs = {"max_bonds": (4, 6, 6, 4)} if mode == "bond" else {"max_bonds": (4, 16, 16, 4), "tol": 0.08}
    cores = tt_svd(_tensors(cifar, 40), **kwargs).cores
    buffer = _kernels._side_by_side(cores)
    assert buffer is not None and buffer.shape[1] == sum(c[0].size for c in cores)
    if mode == "tol":
        assert max(c.shape[3] for c in cores[:-1]) < 16  # trimmed: not the storage shape
    copies = [c.copy() for c in cores]
    numpy_only(True)
    rq, rs = _store_cores([c.copy() for c in copies], "int8")
    numpy_only(False)
    fq, fs = _store_cores(cores, "int8")
    np.testing.assert_array_equal(fs, rs)
    for a, b in zip(fq, rq, strict=True):
        np.testing.assert_array_equal(a, b)
    # the gauge was balanced in place: the buffer changed, the MPS it holds did not
    assert not all(np.array_equal(a, b) for a, b in zip(cores, copies, strict=True))
    np.testing.assert_allclose(contract(cores), contract(copies), rtol=1e-12, atol=1e-12)


@needs_numba
def test_side_by_side_accepts_only_cores_that_fill_one_buffer_in_order():
    b, sizes = 5, [(1, 4, 4), (4, 4, 6), (6, 4, 1)]
    widths = [int(np.prod(s)) for s in sizes]
    buffer = np.zeros((b, sum(widths)))
    starts = np.cumsum([0, *widths[:-1]])
    views = [buffer[:, o : o + w].reshape(b, *s) for o, w, s in zip(starts, widths, sizes, strict=True)]
    assert _kernels._side_by_side(views) is buffer
    assert _kernels._side_by_side([v.copy() for v in views]) is None  # separate arrays
    assert _kernels._side_by_side(views[:2]) is None  # the buffer holds more than these cores
    assert _kernels._side_by_side([views[1], views[0], views[2]]) is None  # out of order
    wider = np.zeros((b, sum(widths) + 3))
    gap = [wider[:, o + (k > 0) : o + (k > 0) + w].reshape(b, *s)  # a gap after the first core
           for k, (o, w, s) in enumerate(zip(starts, widths, sizes, strict=True))]
    assert _kernels._side_by_side(gap) is None
    transposed = buffer.T.copy().T  # same values, Fortran order
    assert _kernels._side_by_side([transposed[:, o : o + w].reshape(b, *s)
                                   for o, w, s in zip(starts, widths, sizes, strict=True)]) is None
    as32 = buffer.astype(np.float32)
    assert _kernels._side_by_side([as32[:, o : o + w].reshape(b, *s)
                                   for o, w, s in zip(starts, widths, sizes, strict=True)]) is None


@needs_numba
@pytest.mark.parametrize("which", ["cifar", "fashion"])
def test_gauge_and_int8_quantisation_kernel_equals_the_numpy_path(numpy_only, cifar, fashion, which):
    from mpsd.core.codec import _store_cores

    if which == "cifar":
        tensors = _tensors(cifar, 24)
        bonds = (4, 6, 6, 4)
    else:  # 2,4,7,7,2: cores of 4, 48, 210, 70 and 4 numbers, not all multiples of the kernel's unrolling
        tensors = choose_layout(28, 28, 1).to_sites(fashion["x_train"][:24, :, :, None]) / 255.0
        bonds = (2, 6, 5, 2)
    tensors[3] = 0.0  # an all-zero tensor: every peak is 0, scales 0
    cores = tt_svd(tensors, max_bonds=bonds).cores
    cores[1][5, 0, 0, 0] = 0.5 * cores[1][5].max()  # half the peak: near a rounding tie (q ≈ 63.5)
    last = cores[2][7].reshape(-1)  # a view: the peak in a core's last number
    last[-1] = -3.0 * np.abs(last).max()
    (fq, fs), (rq, rs) = both(numpy_only, lambda: _store_cores([c.copy() for c in cores], "int8"))
    np.testing.assert_array_equal(fs, rs)
    assert fs.dtype == np.float32 and fs.shape == (len(tensors), 5)
    for a, b, c in zip(fq, rq, cores, strict=True):
        assert a.dtype == np.int8 and a.shape == c.shape
        np.testing.assert_array_equal(a, b)
    # and it is a faithful int8 copy: dequantised cores multiply out to the tensors
    deq = [q.astype(np.float64) * fs[:, k, None, None, None] for k, q in enumerate(fq)]
    err = np.linalg.norm(contract(deq) - contract(cores), axis=1) / np.maximum(np.linalg.norm(contract(cores), axis=1), 1e-300)
    assert err[3] == 0 and np.median(err) < 0.02


@needs_numba
def test_blas_limit_reaches_the_blas_of_the_compiled_kernels():
    """blas_single_thread() pins scipy's OpenBLAS too, which numba loads on a kernel's first use.

    In a fresh process (nothing of scipy loaded yet) with OpenBLAS defaulting to two threads:
    after a compiled kernel that calls BLAS ran inside the limit, every OpenBLAS of the process
    must be at one thread.
    """
    code = textwrap.dedent(
        """
        import numpy as np
        from threadpoolctl import threadpool_info
        from mpsd._threads import blas_single_thread
        from mpsd.core import _kernels

        with blas_single_thread():
            _kernels.gram_cols(np.random.default_rng(0).random((4, 64, 16)))  # np.dot in numba
            libs = [(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["internal_api"] == "openblas"]
        assert libs, libs  # numpy's and (pip wheels) scipy's, the one numba calls
        assert all(n == 1 for _, n in libs), libs
        """
    )
    env = dict(os.environ, OPENBLAS_NUM_THREADS="2", MPSD_NO_NUMBA="")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
