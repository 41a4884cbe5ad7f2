"""The numpy kernel against independent per-image references (tests/reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpsd.core.codec import StageSpec, encode_batch
from mpsd.core.contract import contract
from mpsd.core.layout import choose_layout
from mpsd.core.spectra import (
    entanglement_entropy,
    local_truncation_errors,
    spectra_and_left_basis,
    theorem1_bound,
    unfolding_spectra,
)
from mpsd.core.ttsvd import exact_ranks, parameter_count, tt_svd
from mpsd.errors import OptionError
from reference import contract_reference, entropy_reference, fold_quadtree, tt_svd_reference


# ---------------------------------------------------------------- layout
@pytest.mark.parametrize(
    ("size", "sites"),
    [(32, (4, 4, 4, 4, 4)), (28, (2, 4, 7, 7, 2)), (224, (7, 8, 16, 8, 7))],
)
def test_automatic_sites_follow_table4(size, sites):
    layout = choose_layout(size, size, 1)
    assert layout.sites == sites
    assert layout.padded_height == size and layout.padded_width == size


def test_quadtree_folding_matches_explicit_mixed_radix_indexing(cifar):
    layout = choose_layout(28, 28, 1)
    image = np.random.default_rng(1).integers(0, 255, (28, 28))
    expected = fold_quadtree(image.astype(float), layout.row_factors, layout.col_factors)
    got = layout.to_sites(image[None, :, :, None])[0]
    np.testing.assert_array_equal(got, expected)


def test_quadtree_site_one_is_the_coarsest_scale():
    layout = choose_layout(32, 32, 1)
    image = np.zeros((32, 32))
    image[16:, :16] = 1.0  # bottom-left quadrant
    t = layout.to_sites(image[None, :, :, None])[0]
    # site 1 index = 2·row_half + col_half: the quadrant alone decides it
    assert t[2].min() == 1.0 and t[[0, 1, 3]].max() == 0.0


def test_row_order_is_a_plain_reshape():
    layout = choose_layout(32, 32, 1, order="row")
    image = np.arange(1024.0).reshape(32, 32)
    np.testing.assert_array_equal(layout.to_sites(image[None, :, :, None])[0], image.reshape(layout.sites))


@pytest.mark.parametrize("order", ["quadtree", "row"])
@pytest.mark.parametrize("colour", ["separate", "site"])
@pytest.mark.parametrize("shape", [(32, 32, 3), (28, 28, 1), (31, 30, 3), (20, 45, 4)])
def test_folding_round_trip_with_padding(order, colour, shape):
    h, w, c = shape
    images = np.random.default_rng(0).random((3, h, w, c))
    layout = choose_layout(h, w, c, order=order, colour=colour)
    tensors = layout.to_sites(images)
    assert tensors.shape[1:] == layout.sites
    assert math.prod(layout.sites) == layout.padded_height * layout.padded_width * (c if colour == "site" else 1)
    np.testing.assert_array_equal(layout.from_sites(tensors), images)


def test_padding_to_a_size_that_factors():
    layout = choose_layout(31, 31, 1)
    assert layout.padded_height == 32 and min(layout.sites) >= 2


def test_explicit_sites_are_split_into_row_and_column_factors():
    layout = choose_layout(32, 32, 3, sites="4,4,4,4,4")
    assert layout.row_factors == (2, 2, 2, 2, 2) and layout.col_factors == (2, 2, 2, 2, 2)
    assert choose_layout(32, 32, 1, sites="2x2,2x2,2x2,2x2,2x2").sites == (4, 4, 4, 4, 4)
    with pytest.raises(OptionError, match="smaller than the image"):
        choose_layout(32, 32, 1, sites="4,4,4")


# ---------------------------------------------------------------- TT-SVD
def _channels(cifar, n=24, order="quadtree"):
    layout = choose_layout(32, 32, 3, order=order)
    return layout.to_sites(cifar["x_train"][:n]) / 255.0


def test_full_bonds_reconstruct_exactly(cifar):
    tensors = _channels(cifar)
    tt = tt_svd(tensors)
    assert tt.ranks.tolist()[0] == list(exact_ranks(tensors.shape[1:]))
    np.testing.assert_allclose(contract(tt.cores).reshape(tensors.shape), tensors, atol=1e-12)


@pytest.mark.parametrize("bonds", [(4, 6, 6, 4), (2, 3, 3, 2), (4, 12, 9, 4), (1, 1, 1, 1)])
def test_truncated_bonds_match_per_image_numpy_svd(cifar, bonds):
    tensors = _channels(cifar)
    tt = tt_svd(tensors, max_bonds=bonds)
    ours = contract(tt.cores).reshape(tensors.shape)
    for b in range(tensors.shape[0]):
        ref_cores, _ = tt_svd_reference(tensors[b], bonds=bonds)
        ref = contract_reference(ref_cores)
        err_ref = np.linalg.norm(ref - tensors[b])
        err_ours = np.linalg.norm(ours[b] - tensors[b])
        assert err_ours == pytest.approx(err_ref, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(ours[b], ref, atol=1e-8)
    # the discarded weight reported by the sweep is the actual error (orthogonality)
    actual = np.linalg.norm((ours - tensors).reshape(len(tensors), -1), axis=1)
    np.testing.assert_allclose(np.sqrt((tt.sweep_error**2).sum(axis=1)), actual, rtol=1e-8, atol=1e-12)


def test_parameter_count_matches_core_sizes(cifar):
    tensors = _channels(cifar, 4)
    tt = tt_svd(tensors, max_bonds=(4, 6, 6, 4))
    assert tt.n_params().tolist() == [sum(c[0].size for c in tt.cores)] * len(tensors)
    assert parameter_count((4, 4, 4, 4, 4), np.array([4, 6, 6, 4])) == 368  # Table 4, CIFAR 36% per stage


@pytest.mark.parametrize("tol", [0.02, 0.05, 0.1, 0.3])
def test_tol_meets_its_tolerance_on_every_image(cifar, tol):
    tensors = _channels(cifar, 48)
    b = len(tensors)
    tt = tt_svd(tensors, tol=tol)
    rec = contract(tt.cores).reshape(tensors.shape)
    rel = np.linalg.norm((rec - tensors).reshape(b, -1), axis=1) / np.linalg.norm(tensors.reshape(b, -1), axis=1)
    assert (rel <= tol * (1 + 1e-9)).all()
    # ranks differ per image, and equal those of the per-image reference
    for i in range(0, b, 7):
        ref_cores, _ = tt_svd_reference(tensors[i], tol=tol)
        assert tt.ranks[i].tolist() == [c.shape[2] for c in ref_cores[:-1]]


def test_bonds_cap_tol(cifar):
    tensors = _channels(cifar, 16)
    tt = tt_svd(tensors, tol=0.001, max_bonds=(3, 5, 5, 3))
    assert (tt.ranks <= np.array([3, 5, 5, 3])).all()


def test_bond_count_must_fit_the_sites():
    with pytest.raises(OptionError, match="expected 4 bonds"):
        tt_svd(np.zeros((2, 4, 4, 4, 4, 4)), max_bonds=(4, 6, 6))


# ---------------------------------------------------------------- spectra
def test_entropy_equals_direct_svd_of_each_unfolding(cifar):
    tensors = _channels(cifar, 12)
    ours = entanglement_entropy(unfolding_spectra(tensors))
    for i in range(len(tensors)):
        np.testing.assert_allclose(ours[i], entropy_reference(tensors[i]), atol=1e-9)


def test_entropy_of_a_product_state_is_zero_and_of_black_image_is_zero():
    a = np.einsum("i,j,k->ijk", [1.0, 2.0], [3.0, 1.0, 0.5], [1.0, -1.0])[None]
    assert np.allclose(entanglement_entropy(unfolding_spectra(a)), 0.0)
    assert np.array_equal(entanglement_entropy(unfolding_spectra(np.zeros((1, 4, 4, 4)))), np.zeros((1, 2)))


def test_theorem1_bound_holds(cifar):
    tensors = _channels(cifar, 40)
    b = len(tensors)
    for bonds in [(4, 6, 6, 4), (2, 2, 2, 2), (4, 10, 10, 4)]:
        tt = tt_svd(tensors, max_bonds=bonds)
        err = np.linalg.norm((contract(tt.cores).reshape(tensors.shape) - tensors).reshape(b, -1), axis=1)
        spectra = unfolding_spectra(tensors)
        bound = theorem1_bound(local_truncation_errors(spectra, tt.ranks))
        assert (err <= bound * (1 + 1e-9) + 1e-12).all()
        # and the local error of each bond alone is a lower bound (best rank-r approximation)
        assert (err >= local_truncation_errors(spectra, tt.ranks).max(axis=1) * (1 - 1e-9)).all()


@pytest.mark.parametrize("kwargs", [{"max_bonds": (4, 6, 6, 4)}, {"tol": 0.05}])
def test_tt_svd_reuses_the_left_basis_of_the_spectra(cifar, kwargs):
    tensors = _channels(cifar, 24)
    spectra, basis = spectra_and_left_basis(tensors)
    assert basis is not None and basis.bond == 1  # 4,4,4,4,4: G of the 16 × 64 unfolding
    np.testing.assert_array_equal(basis.values, spectra[1])
    plain = tt_svd(tensors, **kwargs)
    reused = tt_svd(tensors, left_basis=basis, **kwargs)
    np.testing.assert_array_equal(reused.ranks, plain.ranks)
    np.testing.assert_allclose(
        contract(reused.cores), contract(plain.cores), atol=1e-12 * np.abs(tensors).max()
    )
    # it is used, not recomputed: a basis of other tensors gives other cores
    other = spectra_and_left_basis(tensors[::-1].copy())[1]
    swapped = tt_svd(tensors, left_basis=other, **kwargs)
    assert not np.allclose(contract(swapped.cores), contract(plain.cores), atol=1e-6)
    with pytest.raises(ValueError, match="left_basis has shape"):
        tt_svd(tensors[:5], left_basis=basis, **kwargs)


def test_left_basis_is_used_for_the_tensors_no_earlier_bond_rotated(cifar):
    """Under ``tol`` a tensor that keeps its whole left space at bond 0 keeps the identity there,
    so the spectra's basis of bond 1 still fits it; the tensors bond 0 truncated get their own."""
    tensors = _channels(cifar, 20)
    tensors[::2] = tensors[::2, :1]  # even tensors: one slice repeated along site 1, rank 1 at bond 0
    basis = spectra_and_left_basis(tensors)[1]
    plain = tt_svd(tensors, tol=0.05)
    assert (plain.ranks[::2, 0] == 1).all() and (plain.ranks[1::2, 0] == 4).all()
    reused = tt_svd(tensors, tol=0.05, left_basis=basis)
    np.testing.assert_array_equal(reused.ranks, plain.ranks)
    scale = np.abs(tensors).max()
    np.testing.assert_allclose(contract(reused.cores), contract(plain.cores), atol=1e-12 * scale)
    # bond 0 of the odd tensors is the identity: nothing rotated, nothing discarded
    np.testing.assert_array_equal(reused.cores[0][1::2, 0], np.broadcast_to(np.eye(4), (len(tensors) // 2, 4, 4)))
    assert (reused.sweep_error[1::2, 0] == 0).all()
    # the basis is read for the odd tensors only: a foreign one changes their result alone
    foreign = spectra_and_left_basis(tensors[::-1].copy())[1]
    swapped = contract(tt_svd(tensors, tol=0.05, left_basis=foreign).cores)
    np.testing.assert_allclose(swapped[::2], contract(plain.cores)[::2], atol=1e-12 * scale)
    assert not np.allclose(swapped[1::2], contract(plain.cores)[1::2], atol=1e-6)
    # and the decomposition is still within the tolerance of every tensor
    flat = tensors.reshape(len(tensors), -1)
    err = np.linalg.norm(contract(reused.cores) - flat, axis=1)
    assert (err <= 0.05 * np.linalg.norm(flat, axis=1) * (1 + 1e-9)).all()


def test_left_basis_with_only_the_kept_vectors(cifar):
    """``basis_ranks``: the spectra keep only the leading eigenvectors the sweep can use."""
    tensors = _channels(cifar, 30)  # 90 channels: more than one block of the compiled kernel's 64 lanes
    bonds = (4, 6, 6, 4)
    spectra_all, full = spectra_and_left_basis(tensors)
    spectra, basis = spectra_and_left_basis(tensors, bonds)
    assert full is not None and basis is not None and basis.vectors.shape == (len(tensors), 16, 6)
    for s, s_all in zip(spectra, spectra_all, strict=True):
        np.testing.assert_allclose(s, s_all, rtol=0, atol=1e-12 * s_all.max())
    # the same subspace as the whole basis, up to the sign of each column
    overlap = np.abs(np.einsum("bij,bij->bj", basis.vectors, full.vectors[:, :, :6]))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-8)
    reused = tt_svd(tensors, max_bonds=bonds, left_basis=basis)
    plain = tt_svd(tensors, max_bonds=bonds)
    np.testing.assert_array_equal(reused.ranks, plain.ranks)
    np.testing.assert_allclose(contract(reused.cores), contract(plain.cores), atol=1e-9 * np.abs(tensors).max())
    # a bond 1 that keeps more than the basis holds cannot use it
    with pytest.raises(ValueError, match="left_basis has shape"):
        tt_svd(tensors, max_bonds=(4, 8, 6, 4), left_basis=basis)


# ---------------------------------------------------------------- stages and ratio
@pytest.mark.parametrize("case", ["photos", "rank_deficient", "zero", "masked", "rank_deficient_masked"])
def test_right_step_columns_are_orthonormal_and_exact(cifar, case):
    """q r = x with orthonormal q, whether the columns are only rescaled or factorised by QR."""
    from mpsd.core import ttsvd

    layout = choose_layout(32, 32, 3)
    m = layout.to_sites(cifar["x_train"][:40]).reshape(-1, 64, 16) / 255.0  # 120 bond-3-shaped matrices
    if case.startswith("rank_deficient"):
        m[:, :, 3:] = m[:, :, :1] * np.arange(13)  # rank 3: kept columns beyond it have σ = 0
    elif case == "zero":
        m[::2] = 0.0
    w, v = np.linalg.eigh(m.transpose(0, 2, 1) @ m)
    sq, v = np.maximum(w[:, ::-1], 0.0)[:, :8], v[:, :, ::-1][:, :, :8]
    kept = np.ones(sq.shape, dtype=bool)
    if case.endswith("masked"):
        kept[::3, 5:] = False
        v = v * kept[:, None, :]
        sq = sq * kept
    x = m @ v
    q, r = ttsvd._orthonormal_columns(x, sq, kept)
    np.testing.assert_allclose(q @ r, x, atol=1e-12)
    assert np.all(q[np.broadcast_to(~kept[:, None, :], q.shape)] == 0)  # columns not kept are zero
    qk = q * kept[:, None, :]
    gram = qk.transpose(0, 2, 1) @ qk
    np.testing.assert_allclose(gram, kept[:, :, None] * np.eye(8) * kept[:, None, :], atol=1e-9)
    if case == "photos":  # real photos: every tensor is only rescaled, r is diagonal
        assert np.all(r == r * np.eye(8))


def test_residual_stage_fits_what_the_first_left(cifar):
    tensors = _channels(cifar, 32)
    one = encode_batch(tensors, [StageSpec(bonds=(4, 6, 6, 4))], dtype="float32")
    two = encode_batch(tensors, [StageSpec(bonds=(4, 6, 6, 4)), StageSpec(bonds=(4, 6, 6, 4))], dtype="float32")
    assert (two.error < one.error).all()
    # stage 2 is the TT-SVD of S − stage 1, checked against the reference
    resid = tensors[0] - one.reconstruction[0].reshape(tensors.shape[1:])
    ref = contract_reference(tt_svd_reference(resid, bonds=(4, 6, 6, 4))[0])
    expected = one.reconstruction[0] + ref.ravel()
    np.testing.assert_allclose(two.reconstruction[0], expected, atol=2e-5)


def test_ratio_meets_budget_and_beats_uniform_bonds(cifar):
    tensors = _channels(cifar, 60)
    uniform = encode_batch(tensors, [StageSpec(bonds=(4, 6, 6, 4))], dtype="float32")
    budget = 368 / 1024
    adaptive = encode_batch(tensors, [StageSpec(ratio=budget)], dtype="float32")
    params = parameter_count(tensors.shape[1:], adaptive.stages[0].ranks).sum()
    assert params <= budget * 1024 * len(tensors)
    assert (adaptive.error**2).sum() < (uniform.error**2).sum()


def test_ratio_too_small_is_an_error(cifar):
    with pytest.raises(OptionError, match="too small"):
        encode_batch(_channels(cifar, 4), [StageSpec(ratio=0.001)])
