"""Properties over random shapes and contents (RELIABILITY.md F1–F3)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as npst

import mpsd

settings.register_profile("default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

shapes = st.tuples(st.integers(1, 4), st.integers(2, 20), st.integers(2, 20), st.sampled_from([1, 3]))


@st.composite
def image_batches(draw, dtype):
    n, h, w, c = draw(shapes)
    return draw(npst.arrays(dtype, (n, h, w, c), elements=st.integers(0, np.iinfo(dtype).max)))


@given(images=st.one_of(image_batches(np.uint8), image_batches(np.uint16)),
       order=st.sampled_from(["quadtree", "row"]), colour=st.sampled_from(["separate", "site"]))
def test_full_rank_float32_is_lossless(tmp_path_factory, images, order, colour):
    from mpsd.core.layout import choose_layout
    from mpsd.core.ttsvd import exact_ranks

    path = tmp_path_factory.mktemp("p") / "s.zarr"
    _, h, w, c = images.shape
    full = exact_ranks(choose_layout(h, w, c, order=order, colour=colour).sites)
    store = mpsd.compress(images, path, bond=full, dtype="float32", order=order, colour=colour)
    np.testing.assert_array_equal(store.decode(slice(None)), images)


@given(images=image_batches(np.uint8), tol=st.sampled_from([0.01, 0.05, 0.2]))
def test_lossy_error_is_within_the_declared_tolerance(tmp_path_factory, images, tol):
    path = tmp_path_factory.mktemp("p") / "s.zarr"
    store = mpsd.compress(images, path, tol=tol, dtype="float32")
    x = images.astype(np.float64)
    got = store.decode(slice(None), kind="float").astype(np.float64)
    err = np.linalg.norm((got - x).reshape(len(x), -1), axis=1)
    assert (err <= tol * np.linalg.norm(x.reshape(len(x), -1), axis=1) * (1 + 1e-4) + 1e-2).all()


def _chunk_hashes(path):
    from mpsd.archive.format import MANIFEST_NAME

    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out[p.relative_to(path).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_same_input_same_store_bit_for_bit_whatever_the_worker_count(tmp_path, cifar):
    x = cifar["x_train"][:150]
    a = mpsd.compress(x, tmp_path / "a.zarr", bond="4,6,6,4", residual_bonds=["2,2,2,2"], workers=1, chunk_images=64)
    b = mpsd.compress(x, tmp_path / "b.zarr", bond="4,6,6,4", residual_bonds=["2,2,2,2"], workers=2, chunk_images=64)
    assert _chunk_hashes(a.path) == _chunk_hashes(b.path)



def test_large_images_go_in_smaller_tasks_and_the_store_stays_the_same(tmp_path, cifar, monkeypatch):
    from mpsd import api

    assert api.task_images(32 * 32 * 3) == api.TASK_IMAGES  # CIFAR-10: 3 MiB of float64 per task
    assert api.task_images(28 * 28) == api.TASK_IMAGES
    assert api.task_images(128 * 128 * 3) * 128 * 128 * 3 * 8 <= api.TASK_BYTES
    assert api.task_images(224 * 224 * 3) == 16  # the floor: 48 matrices, whole blocks of lanes
    x = cifar["x_train"][:150]
    a = mpsd.compress(x, tmp_path / "a.zarr", tol=0.05, workers=2, chunk_images=64)
    sizes: list[int] = []
    encode = api._encode_images

    def counted(images, *args, **kwargs):
        sizes.append(len(images))
        return encode(images, *args, **kwargs)

    monkeypatch.setattr(api, "_encode_images", counted)
    monkeypatch.setattr(api, "TASK_BYTES", 1)  # every image "large": tasks of 16
    b = mpsd.compress(x, tmp_path / "b.zarr", tol=0.05, workers=2, chunk_images=64)
    assert sorted(sizes) == [11, 11] + [16] * 8  # chunks of 64, 64 and 22 images
    assert _chunk_hashes(a.path) == _chunk_hashes(b.path)

@st.composite
def padded_cores(draw):
    """A batch of zero-padded cores (B, R0, d, R1), each tensor with its own ranks."""
    b, r0, d, r1 = draw(st.integers(0, 6)), draw(st.integers(1, 5)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    left = np.array(draw(st.lists(st.integers(1, r0), min_size=b, max_size=b)), dtype=np.int64)
    right = np.array(draw(st.lists(st.integers(1, r1), min_size=b, max_size=b)), dtype=np.int64)
    dtype = draw(st.sampled_from([np.int8, np.float16, np.float32]))
    core = draw(npst.arrays(dtype, (b, r0, d, r1), elements=st.integers(-127, 127)))
    i, k = np.arange(r0)[None, :, None, None], np.arange(r1)[None, None, None, :]
    core[np.broadcast_to((i >= left.reshape(-1, 1, 1, 1)) | (k >= right.reshape(-1, 1, 1, 1)), core.shape)] = 0
    return core, left, right, draw(st.integers(0, 3))


@given(case=padded_cores())
def test_pack_then_unpack_is_the_identity(case):
    from mpsd.core.packing import pack_core, unpack_core

    core, left, right, extra = case
    b, r0, d, r1 = core.shape
    rows = pack_core(core, left, right, r0 * d * r1 + extra)
    # each row: the tensor's own entries in C order, then zeros
    for t in range(b):
        used = core[t, : left[t], :, : right[t]].ravel()
        assert np.array_equal(rows[t, : used.size], used) and not rows[t, used.size :].any()
    np.testing.assert_array_equal(unpack_core(rows, left, right, r0, d, r1), core)
