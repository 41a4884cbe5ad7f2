"""Tests of the baselines (mpsd.baselines): budgets, shapes, and checks against references."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import mpsd
from mpsd.archive.codecs import stored_nbytes
from mpsd.baselines import BASELINES, Baseline, Reconstruction, get_baseline
from mpsd.baselines.base import search_largest
from mpsd.baselines.coreset import FarthestFirst
from mpsd.baselines.ice import uniform_bonds
from mpsd.baselines.lowrank import cp_als
from mpsd.core.layout import choose_layout
from mpsd.core.ttsvd import parameter_count
from mpsd.errors import OptionError

DATA = Path(mpsd.__file__).parent / "data"
RECONSTRUCTING = ("ice", "svd", "cp", "tucker", "jpeg", "webp")
FACTOR_MODELS = ("ice", "svd", "cp", "tucker")
CODECS = ("jpeg", "webp")


# ---------------------------------------------------------------------- data
def _smooth_images(n: int, h: int, w: int, c: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Realistic-enough smooth images: low-frequency cosines plus a class-dependent blob."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    labels = rng.permutation(np.arange(n) % 3)
    out = np.zeros((n, h, w, c))
    for i in range(n):
        for ch in range(c):
            for _ in range(12):
                fy, fx = rng.integers(0, 10, 2)
                out[i, :, :, ch] += rng.normal() * np.cos(
                    np.pi * (fy * yy + fx * xx) + rng.uniform(0, 6.3)
                )
            cy, cx = rng.uniform(0.2, 0.8, 2)
            out[i, :, :, ch] += (2 + labels[i]) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
    out += 0.3 * rng.normal(size=out.shape)
    lo, hi = out.min(axis=(1, 2, 3), keepdims=True), out.max(axis=(1, 2, 3), keepdims=True)
    return np.rint(255 * (out - lo) / (hi - lo)).astype(np.uint8), labels.astype(np.int64)


def _load(name: str, n: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The first n training images of a shipped sample, or smooth synthetic images without it."""
    path = DATA / name
    if path.exists():
        with np.load(path) as data:
            x, y = data["x_train"][:n], data["y_train"][:n].astype(np.int64)
        return (x[..., None] if x.ndim == 3 else x), y
    return _smooth_images(n, *shape, seed=len(name))


@pytest.fixture(scope="module", autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """Batches of tiny matrices: BLAS threads only contend (2-3x slower on a busy machine)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def colour() -> tuple[np.ndarray, np.ndarray]:
    return _load("cifar10_sample.npz", 24, (32, 32, 3))


@pytest.fixture(scope="module")
def grey() -> tuple[np.ndarray, np.ndarray]:
    return _load("fashion_mnist_sample.npz", 48, (28, 28, 1))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _size(rec: Reconstruction) -> int:
    """The scanned setting of a result, as one number (larger = more storage)."""
    s = rec.settings
    for key in ("rank", "bond", "quality", "k"):
        if key in s:
            return int(s[key])
    return int(s["ranks"][0])  # tucker


#: Byte budgets as fractions of the raw pixel bytes that every method can meet on each data set
#: (fixed Zarr metadata and JPEG headers make the smallest settings costly on a few dozen images).
BUDGETS = {"colour": (0.3, 0.45, 0.6), "grey": (0.55, 0.62, 0.69)}


def _data(request: pytest.FixtureRequest, kind: str) -> tuple[np.ndarray, np.ndarray]:
    return request.getfixturevalue(kind)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- registry and validation
def test_registry() -> None:
    assert BASELINES == ("ice", "svd", "cp", "tucker", "random", "kcenter", "jpeg", "webp")
    for name in BASELINES:
        b = get_baseline(name)
        assert b.name == name and isinstance(b, Baseline)
    assert get_baseline("SVD").name == "svd"
    with pytest.raises(OptionError, match="unknown baseline 'pca'"):
        get_baseline("pca")
    with pytest.raises(OptionError, match=r"unknown option.*rank.*'svd'"):
        get_baseline("svd", rank=3)
    with pytest.raises(OptionError, match="dtype"):
        get_baseline("tucker", dtype="int4")


def test_budget_arguments(colour: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = colour
    svd = get_baseline("svd")
    with pytest.raises(OptionError, match="exactly one"):
        svd.fit(x, y)
    with pytest.raises(OptionError, match="exactly one"):
        svd.fit(x, y, budget_bytes=10_000, param_ratio=0.5)
    with pytest.raises(OptionError, match="positive"):
        svd.fit(x, y, budget_bytes=0)
    with pytest.raises(OptionError, match="positive"):
        svd.fit(x, y, param_ratio=float("nan"))
    with pytest.raises(OptionError, match="uint8"):
        svd.fit(x.astype(np.float32), y, param_ratio=0.5)
    with pytest.raises(OptionError, match="labels"):
        svd.fit(x, y[:-1], param_ratio=0.5)
    with pytest.raises(OptionError, match="no parameter ratio"):
        get_baseline("jpeg").fit(x, y, param_ratio=0.5)


@pytest.mark.parametrize("name", BASELINES)
def test_too_small_budget_names_method_and_size(
    name: str, colour: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = colour
    with pytest.raises(
        OptionError, match=rf"^{name}: even the smallest setting \(.*\) takes [\d,]+ bytes"
    ):
        get_baseline(name).fit(x, y, budget_bytes=100)


def test_search_largest() -> None:
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 40))
        monotone = trial % 2 == 0
        costs = np.cumsum(rng.integers(0 if monotone else -2, 4, n))
        budget = float(rng.integers(-2, int(costs.max()) + 2))
        start = None if trial % 3 == 0 else int(rng.integers(0, n))
        calls: list[int] = []

        def cost(i: int, costs: np.ndarray = costs, calls: list[int] = calls) -> float:
            calls.append(i)
            return float(costs[i])

        got = search_largest(n, cost, budget, start=start)
        assert len(calls) == len(set(calls))  # each setting evaluated once
        if got is None:
            assert costs[0] > budget
            continue
        assert costs[got] <= budget
        assert got + 1 == n or costs[got + 1] > budget  # locally the largest
        if monotone:
            assert got == int(np.flatnonzero(costs <= budget).max())
    # a non-monotone step found by the search is used: index 4 fits although index 3 does not
    assert search_largest(8, lambda i: [1, 2, 3, 5, 4, 9, 9, 10][i], 4.5, start=4) == 4


# ---------------------------------------------------------------------- every method at a byte budget
@pytest.mark.parametrize("kind", ["colour", "grey"])
@pytest.mark.parametrize("name", BASELINES)
def test_byte_budget(name: str, kind: str, request: pytest.FixtureRequest) -> None:
    x, y = _data(request, kind)
    budget = int(BUDGETS[kind][1] * x.nbytes)
    rec = get_baseline(name).fit(x, y, budget_bytes=budget, seed=1)
    assert rec.method == name
    assert 0 < rec.bytes_on_disk <= budget
    assert rec.images.dtype == np.uint8 and rec.images.shape[1:] == x.shape[1:]
    assert rec.labels is not None and rec.labels.dtype == np.int64
    json.dumps(rec.settings, allow_nan=False)
    if name in ("random", "kcenter"):
        assert rec.indices is not None and rec.indices.dtype == np.int64
        assert np.all(np.diff(rec.indices) > 0)
        np.testing.assert_array_equal(rec.images, x[rec.indices])
        np.testing.assert_array_equal(rec.labels, y[rec.indices])
        assert rec.bytes_on_disk == stored_nbytes(
            {"images": x[rec.indices], "labels": y[rec.indices]}
        )
        assert rec.param_ratio == pytest.approx(rec.indices.size / x.shape[0])
    else:
        assert rec.indices is None and rec.images.shape == x.shape
        np.testing.assert_array_equal(rec.labels, y)
        assert (rec.param_ratio is None) == (name in CODECS)
    # the largest setting that fits: the same budget gives the same, one byte less a smaller one
    again = get_baseline(name).fit(x, y, budget_bytes=rec.bytes_on_disk, seed=1)
    assert (_size(again), again.bytes_on_disk) == (_size(rec), rec.bytes_on_disk)
    try:
        less = get_baseline(name).fit(x, y, budget_bytes=rec.bytes_on_disk - 1, seed=1)
    except OptionError:
        return
    assert _size(less) < _size(rec)


@pytest.mark.parametrize("name", [n for n in BASELINES if n not in CODECS])
def test_param_ratio_budget(name: str, colour: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = colour
    rec = get_baseline(name).fit(x, y, param_ratio=0.3)
    assert rec.param_ratio is not None and 0 < rec.param_ratio <= 0.3
    assert rec.bytes_on_disk > 0 and rec.images.dtype == np.uint8
    same = get_baseline(name).fit(x, y, param_ratio=rec.param_ratio)
    assert _size(same) == _size(rec)
    try:
        less = get_baseline(name).fit(x, y, param_ratio=rec.param_ratio * (1 - 1e-6))
    except OptionError:
        return
    assert _size(less) < _size(rec)


def test_param_ratio_counts(colour: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = colour
    n, h, w, c = x.shape
    total = x.size
    svd = get_baseline("svd").fit(x, y, param_ratio=0.4)
    r = svd.settings["rank"]
    assert svd.param_ratio == n * c * r * (h + w) / total
    assert n * c * (r + 1) * (h + w) / total > 0.4
    cp = get_baseline("cp").fit(x, y, param_ratio=0.4)
    r = cp.settings["rank"]
    assert cp.param_ratio == n * r * (h + w + c) / total
    assert n * (r + 1) * (h + w + c) / total > 0.4
    tucker = get_baseline("tucker").fit(x, y, param_ratio=0.4)
    r1, r2, r3 = tucker.settings["ranks"]
    assert tucker.param_ratio == n * (r1 * r2 * r3 + h * r1 + w * r2 + c * r3) / total
    ice = get_baseline("ice").fit(x, y, param_ratio=0.4)
    sites = tuple(ice.settings["sites"])
    assert tuple(ice.settings["bonds"]) == uniform_bonds(sites, ice.settings["bond"])
    per_mps = int(parameter_count(sites, np.asarray(ice.settings["bonds"])))
    assert ice.param_ratio == n * c * per_mps / total
    bigger = int(parameter_count(sites, np.asarray(uniform_bonds(sites, ice.settings["bond"] + 1))))
    assert n * c * bigger / total > 0.4
    random = get_baseline("random").fit(x, y, param_ratio=0.4)
    assert random.settings["k"] == math.floor(0.4 * n)


@pytest.mark.parametrize("kind", ["colour", "grey"])
@pytest.mark.parametrize(
    ("name", "dtype"),
    [(n, "int8") for n in FACTOR_MODELS]
    + [(n, "float32") for n in FACTOR_MODELS]
    + [(n, None) for n in CODECS],
)
def test_larger_budget_never_worse(
    name: str, dtype: str | None, kind: str, request: pytest.FixtureRequest
) -> None:
    # int8 storage has a noise floor (one scale per core): far above these budgets' truncation
    # error, a larger setting can add more quantisation noise than it removes (ICE near 33 dB)
    x, y = _data(request, kind)
    options = {} if dtype is None else {"dtype": dtype}
    scale = 3.0 if dtype == "float32" else 1.0  # four bytes a parameter
    results = [
        get_baseline(name, **options).fit(x, y, budget_bytes=int(scale * f * x.nbytes))
        for f in BUDGETS[kind]
    ]
    sizes = [_size(r) for r in results]
    psnrs = [_psnr(r.images, x) for r in results]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    assert psnrs == sorted(psnrs), psnrs
    assert psnrs[0] > 15


# ---------------------------------------------------------------------- SVD
def test_svd_matches_numpy_truncation(colour: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = colour
    rec = get_baseline("svd").fit(x, y, budget_bytes=int(0.3 * x.nbytes))
    r = rec.settings["rank"]
    n, h, w, c = x.shape
    for i in range(n):
        for ch in range(c):
            u, s, vt = np.linalg.svd(x[i, :, :, ch].astype(np.float64))
            left, right = u[:, :r] * np.sqrt(s[:r]), np.sqrt(s[:r])[:, None] * vt[:r]
            truncated = left @ right
            # int8 quantisation moves each entry by at most half a step (max|F|/127 / 2)
            e_left = np.abs(left).max() / 254 * math.sqrt(left.size)
            e_right = np.abs(right).max() / 254 * math.sqrt(right.size)
            bound = (
                e_left * math.sqrt(s[0])
                + (math.sqrt(s[0]) + e_left) * e_right
                + 0.5 * math.sqrt(h * w)
            )
            err = np.linalg.norm(rec.images[i, :, :, ch] - np.clip(truncated, 0, 255))
            assert err <= bound, (i, ch, err, bound)
            # and the truncation error itself is that of rank r, not another rank
            other = np.linalg.norm(x[i, :, :, ch].astype(np.float64) - rec.images[i, :, :, ch])
            assert abs(other - math.sqrt(np.sum(s[r:] ** 2))) <= bound


def test_svd_full_rank_float32_is_lossless(grey: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = grey
    rec = get_baseline("svd", dtype="float32").fit(x, y, param_ratio=2.0)
    assert rec.settings["rank"] == 28
    np.testing.assert_array_equal(rec.images, x)


# ---------------------------------------------------------------------- ICE
@pytest.mark.parametrize("transform", ["dct", "none"])
def test_ice_full_bonds_recover_images(
    transform: str, colour: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = colour
    exact = get_baseline("ice", dtype="float32", transform=transform).fit(x, y, param_ratio=10.0)
    assert exact.settings["bonds"] == [4, 16, 16, 4]
    np.testing.assert_array_equal(exact.images, x)
    quantised = get_baseline("ice", transform=transform).fit(x, y, param_ratio=10.0)
    assert _psnr(quantised.images, x) > 30


def test_ice_uses_the_dct(colour: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = colour
    dct = get_baseline("ice", dtype="float32").fit(x, y, param_ratio=0.25)
    pixels = get_baseline("ice", dtype="float32", transform="none").fit(x, y, param_ratio=0.25)
    assert dct.settings["bond"] == pixels.settings["bond"]
    assert not np.array_equal(dct.images, pixels.images)
    layout = choose_layout(32, 32, 3, order="quadtree")
    assert dct.settings["layout"] == layout.to_dict() and dct.settings["sites"] == [4, 4, 4, 4, 4]


def test_ice_is_stored_as_an_mpsd_stage(colour: tuple[np.ndarray, np.ndarray]) -> None:
    from mpsd.core.codec import StageSpec, encode_batch

    x, y = colour
    rec = get_baseline("ice", transform="none").fit(x, y, budget_bytes=int(0.45 * x.nbytes))
    layout = choose_layout(32, 32, 3, order="quadtree")
    tensors = layout.to_sites(x.astype(np.float64))
    batch = encode_batch(tensors, [StageSpec(bonds=tuple(rec.settings["bonds"]))])
    stage = batch.stages[0]
    arrays = {f"core_{k}": core for k, core in enumerate(stage.cores)}
    assert rec.bytes_on_disk == stored_nbytes({**arrays, "scales": stage.scales, "labels": y})
    expected = np.clip(np.rint(layout.from_sites(batch.reconstruction)), 0, 255)
    np.testing.assert_array_equal(rec.images, expected)


# ---------------------------------------------------------------------- Tucker
def _hosvd_reference(image: np.ndarray, ranks: tuple[int, int, int]) -> np.ndarray:
    t = image.astype(np.float64)
    h, w, c = t.shape
    unfoldings = [
        t.reshape(h, -1),
        t.transpose(1, 0, 2).reshape(w, -1),
        t.transpose(2, 0, 1).reshape(c, -1),
    ]
    f = [
        np.linalg.svd(m, full_matrices=False)[0][:, :r]
        for m, r in zip(unfoldings, ranks, strict=True)
    ]
    core = np.einsum("hwc,ha,wb,cd->abd", t, *f)
    return np.einsum("abd,ha,wb,cd->hwc", core, *f)


def test_tucker_matches_hosvd_reference(colour: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = colour
    rec = get_baseline("tucker", dtype="float32").fit(x, y, param_ratio=0.3)
    ranks = tuple(rec.settings["ranks"])
    assert ranks[2] == 3
    for i in range(x.shape[0]):
        ref = np.clip(np.rint(_hosvd_reference(x[i], ranks)), 0, 255)
        assert np.abs(rec.images[i].astype(np.float64) - ref).max() <= 1
    channel1 = get_baseline("tucker", channel_rank=1).fit(x, y, param_ratio=0.3)
    assert channel1.settings["ranks"][2] == 1


def test_tucker_balance(colour: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = colour
    # exact in floating point: the same reconstruction either way
    plain = get_baseline("tucker", dtype="float32", balance=False).fit(x, y, param_ratio=0.3)
    balanced = get_baseline("tucker", dtype="float32").fit(x, y, param_ratio=0.3)
    np.testing.assert_array_equal(plain.images, balanced.images)
    # with int8, an unbalanced core loses its small entries: the PSNR stalls
    plain = get_baseline("tucker", balance=False).fit(x, y, param_ratio=0.8)
    balanced = get_baseline("tucker").fit(x, y, param_ratio=0.8)
    assert plain.settings["ranks"] == balanced.settings["ranks"]
    assert _psnr(balanced.images, x) > _psnr(plain.images, x) + 3


def test_tucker_full_ranks_float32_is_lossless(grey: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = grey
    rec = get_baseline("tucker", dtype="float32").fit(x, y, param_ratio=4.0)
    assert rec.settings["ranks"] == [28, 28, 1]
    np.testing.assert_array_equal(rec.images, x)


# ---------------------------------------------------------------------- CP
def test_cp_als_reports_its_error(colour: tuple[np.ndarray, np.ndarray]) -> None:
    x = colour[0][:6].astype(np.float64)
    factors, rel, n_iter = cp_als(x, 5, n_iter_max=30, tol=0.0)
    assert n_iter == 30
    model = np.einsum("nhr,nwr,ncr->nhwc", *factors)
    direct = np.linalg.norm((x - model).reshape(6, -1), axis=1) / np.linalg.norm(
        x.reshape(6, -1), axis=1
    )
    np.testing.assert_allclose(rel, direct, rtol=1e-6)
    norms = [np.linalg.norm(f, axis=1) for f in factors]
    np.testing.assert_allclose(norms[0], norms[1], rtol=1e-9)  # balanced before quantisation
    np.testing.assert_allclose(norms[0], norms[2], rtol=1e-9)


def test_cp_numpy_matches_tensorly(colour: tuple[np.ndarray, np.ndarray]) -> None:
    pytest.importorskip("tensorly", reason="the reference CP needs tensorly (mpsd[bench])")
    x, y = colour[0][:6], colour[1][:6]
    ours = get_baseline("cp", dtype="float32").fit(x, y, param_ratio=0.15)
    ref = get_baseline("cp", dtype="float32", backend="tensorly").fit(x, y, param_ratio=0.15)
    assert ours.settings["rank"] == ref.settings["rank"] >= 4
    assert ref.settings["backend"] == "tensorly"
    # same algorithm and initialisation: reconstructions of the same quality
    assert abs(_psnr(ours.images, x) - _psnr(ref.images, x)) < 0.5


# ---------------------------------------------------------------------- coresets
def test_random_is_stratified_seeded_and_nested(grey: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = grey
    n = x.shape[0]
    classes, class_counts = np.unique(y, return_counts=True)
    previous = np.zeros(0, dtype=np.int64)
    for ratio in (0.1, 0.25, 0.5, 0.8):
        rec = get_baseline("random").fit(x, y, param_ratio=ratio, seed=3)
        k = rec.settings["k"]
        assert rec.indices is not None and rec.indices.size == k == math.floor(ratio * n)
        counts = np.array([(rec.labels == c).sum() for c in classes])
        assert np.all(np.abs(counts - k * class_counts / n) <= 1), counts
        assert np.isin(previous, rec.indices).all()  # a larger budget keeps a superset
        previous = rec.indices
    a = get_baseline("random").fit(x, y, param_ratio=0.3, seed=3)
    b = get_baseline("random").fit(x, y, param_ratio=0.3, seed=3)
    c = get_baseline("random").fit(x, y, param_ratio=0.3, seed=4)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)
    plain = get_baseline("random", stratify=False).fit(x, None, param_ratio=0.3, seed=3)
    assert plain.labels is None and plain.settings["stratified"] is False


def _naive_greedy(points: np.ndarray, first: int, k: int) -> list[int]:
    pts = points.astype(np.float32)

    def sq(p: int) -> np.ndarray:
        diff = pts - pts[p]
        return np.einsum("ij,ij->i", diff, diff, dtype=np.float64)

    order, dist = [first], sq(first)
    while len(order) < k:
        p = int(np.argmax(dist))
        order.append(p)
        dist = np.minimum(dist, sq(p))
    return order


@pytest.mark.parametrize("proj_dim", [2, 8, 64])
def test_kcenter_equals_unpruned_greedy(proj_dim: int) -> None:
    rng = np.random.default_rng(5)
    centres = rng.normal(scale=40, size=(12, 30))
    points = np.rint(centres[rng.integers(0, 12, 600)] + rng.normal(scale=8, size=(600, 30)))
    ff = FarthestFirst(points, 17, np.random.default_rng(0), proj_dim=proj_dim)
    got = ff.extend(150)
    assert got == _naive_greedy(points, 17, 150)
    if proj_dim == 8:
        assert ff.n_exact < 0.5 * 600 * 150  # the lower bounds do prune
    full = (
        np.sqrt(((points[:, None, :] - points[None, got[:40], :]) ** 2).sum(-1)).min(axis=1).max()
    )
    assert ff.covering_radius(40) == pytest.approx(full)


def _covering_radius(points: np.ndarray, chosen: np.ndarray) -> float:
    d = ((points[:, None, :] - points[None, chosen, :]) ** 2).sum(-1)
    return float(np.sqrt(d.min(axis=1).max()))


def test_kcenter_covers_better_than_random() -> None:
    rng = np.random.default_rng(0)
    # clustered data: three big clusters and two small ones, as 4x4 grey images
    sizes = [100, 100, 100, 3, 3]
    means = rng.uniform(30, 225, size=(len(sizes), 4, 4, 1))
    images = np.concatenate(
        [
            np.clip(rng.normal(m, 5, size=(s, 4, 4, 1)), 0, 255)
            for s, m in zip(sizes, means, strict=True)
        ]
    )
    images = np.rint(images).astype(np.uint8)
    points = images.reshape(len(images), -1).astype(np.float64)
    kc = get_baseline("kcenter").fit(images, None, param_ratio=0.02)
    rnd = get_baseline("random").fit(images, None, param_ratio=0.02)
    assert kc.indices is not None and rnd.indices is not None
    r_kc, r_rnd = _covering_radius(points, kc.indices), _covering_radius(points, rnd.indices)
    assert r_kc <= r_rnd and r_kc < 0.5 * r_rnd
    assert kc.settings["covering_radius"] == pytest.approx(r_kc)


def test_kcenter_on_features_and_stratified(grey: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = grey
    n = x.shape[0]
    # features that only tell the classes apart: the first centres cover every class
    classes = np.unique(y)
    features = (y[:, None] == classes[None, :]).astype(np.float32) * 100
    k = len(classes)
    rec = get_baseline("kcenter").fit(x, y, param_ratio=k / n, features=features)
    assert sorted(rec.labels.tolist()) == classes.tolist()
    assert rec.settings["space"] == f"features ({len(classes)})"
    with pytest.raises(OptionError, match="features"):
        get_baseline("kcenter").fit(x, y, param_ratio=0.5, features=features[:-1])
    strat = get_baseline("kcenter", stratify=True).fit(x, y, param_ratio=0.5)
    _, class_counts = np.unique(y, return_counts=True)
    counts = np.array([(strat.labels == c).sum() for c in classes])
    assert np.all(np.abs(counts - strat.settings["k"] * class_counts / n) <= 1)


# ---------------------------------------------------------------------- codecs
def _pillow_files(x: np.ndarray, fmt: str, quality: int) -> list[bytes]:
    from PIL import Image

    files = []
    for image in x:
        arr = image[..., 0] if image.shape[2] == 1 and fmt == "JPEG" else image
        if fmt == "WEBP" and image.shape[2] == 1:
            arr = np.repeat(image, 3, axis=2)
        buf = io.BytesIO()
        Image.fromarray(arr).save(
            buf, format=fmt, quality=quality, **({"method": 4} if fmt == "WEBP" else {})
        )
        files.append(buf.getvalue())
    return files


@pytest.mark.parametrize("kind", ["colour", "grey"])
@pytest.mark.parametrize("name", CODECS)
def test_codec_bytes_are_pillow_files(name: str, kind: str, request: pytest.FixtureRequest) -> None:
    from PIL import Image

    x, y = _data(request, kind)
    budget = int(BUDGETS[kind][1] * x.nbytes)
    rec = get_baseline(name, backend="pillow").fit(x, y, budget_bytes=budget)
    q = rec.settings["quality"]
    fmt = "JPEG" if name == "jpeg" else "WEBP"
    labels = stored_nbytes({"labels": y})
    files = _pillow_files(x, fmt, q)
    assert rec.bytes_on_disk == sum(map(len, files)) + labels
    if q < 100:
        assert sum(map(len, _pillow_files(x, fmt, q + 1))) + labels > budget
    decoded = np.stack(
        [
            np.asarray(Image.open(io.BytesIO(f)).convert("L" if x.shape[3] == 1 else "RGB"))
            for f in files
        ]
    )
    np.testing.assert_array_equal(rec.images, decoded.reshape(x.shape))


@pytest.mark.parametrize("name", CODECS)
def test_codec_backends_agree(
    name: str, colour: tuple[np.ndarray, np.ndarray], grey: tuple[np.ndarray, np.ndarray]
) -> None:
    pytest.importorskip(
        "imagecodecs", reason="the imagecodecs backend needs imagecodecs (mpsd[bench])"
    )
    for x, y in (colour, grey):
        budget = int(0.5 * x.nbytes)
        fast = get_baseline(name, backend="imagecodecs").fit(x, y, budget_bytes=budget)
        slow = get_baseline(name, backend="pillow").fit(x, y, budget_bytes=budget)
        assert fast.settings["backend"] == "imagecodecs" and slow.settings["backend"] == "pillow"
        assert fast.bytes_on_disk == slow.bytes_on_disk
        assert fast.settings["quality"] == slow.settings["quality"]
        np.testing.assert_array_equal(fast.images, slow.images)
