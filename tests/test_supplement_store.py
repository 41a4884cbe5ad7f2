"""Storing a task-specific bias as a supplement stage (no torch needed)."""

from __future__ import annotations

import numpy as np
import pytest

import mpsd
from mpsd.archive import add_supplement
from mpsd.archive.verify import verify_store
from mpsd.errors import OptionError


def test_supplement_is_added_to_decoding_and_counted_in_stats(tmp_path, cifar):
    x = cifar["x_train"][:40]
    path = tmp_path / "s.zarr"
    base = mpsd.compress(x, path, bond="4,6,6,4", dtype="float32", chunk_images=16)
    before = base.decode(slice(None), kind="float")
    stats_before = base.stats()
    # a bias that a low-bond MPS represents exactly: a constant per channel (rank 1 everywhere)
    bias = np.broadcast_to(np.array([3.0, -2.0, 1.5], dtype=np.float32), (40, 32, 32, 3)).copy()
    store = add_supplement(path, bias, bond="1,1,1,1", settings={"teacher": "test"})
    after = store.decode(slice(None), kind="float")
    np.testing.assert_allclose(after - before, bias, atol=1e-4)
    s = store.stats()
    assert s.supplement_bytes > 0
    assert s.bytes_on_disk > stats_before.bytes_on_disk
    assert s.param_ratio == pytest.approx(stats_before.param_ratio)  # task-agnostic ratio unchanged
    assert [st.role for st in s.stages] == ["image", "supplement"]
    assert verify_store(path).ok
    # replacing the supplement keeps one supplement stage
    store = add_supplement(path, np.zeros_like(bias), bond="1,1,1,1")
    assert [st.role for st in store.meta.stages] == ["image", "supplement"]
    np.testing.assert_allclose(store.decode(slice(None), kind="float"), before, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]


def test_supplement_shape_must_match(tmp_path, cifar):
    path = tmp_path / "s.zarr"
    mpsd.compress(cifar["x_train"][:10], path, bond="2,2,2,2")
    with pytest.raises(OptionError, match="shape"):
        add_supplement(path, np.zeros((9, 32, 32, 3)), bond="1,1,1,1")
    with pytest.raises(OptionError, match="expected 4 bonds"):
        add_supplement(path, np.zeros((10, 32, 32, 3)), bond="1,1")
