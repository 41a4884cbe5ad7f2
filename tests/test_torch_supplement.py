"""The task-specific supplement (Section 4.2, Eq. 6): learning S̃ and storing it."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpsd.integrations.torch")  # before torch: sets its OpenMP wait policy
torch = pytest.importorskip("torch")

import mpsd  # noqa: E402
from mpsd.errors import InputError, OptionError  # noqa: E402
from mpsd.integrations.torch.supplement import (  # noqa: E402
    kd_loss,
    learn_bias,
    load_teacher,
    save_teacher,
    storage_projection,
    supplement_store,
    train_teacher,
)
from mpsd.integrations.torch.train import get_recipe  # noqa: E402

pytestmark = pytest.mark.torch


def blobs(n: int, *, size: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Grey images with a bright square whose position gives the class (3 classes)."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    x = rng.normal(60, 25, size=(n, size, size))
    for i, k in enumerate(y):
        r = 1 + 3 * k
        x[i, r : r + 4, 2:10] += 140
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return blobs(60)


@pytest.fixture(scope="module")
def teacher(data: tuple[np.ndarray, np.ndarray]) -> torch.nn.Module:
    x, y = data
    torch.manual_seed(0)
    net, result = train_teacher(x, y, recipe=get_recipe("cpu", max_epochs=6, batch_size=16, patience=0), seed=0)
    assert result.best_val_acc > 0.5
    return net


@pytest.fixture(scope="module")
def store(data: tuple[np.ndarray, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y = data
    path = tmp_path_factory.mktemp("sup") / "s.zarr"
    mpsd.compress(x, path, bond="1,1,1,1", labels=y)  # heavily truncated: a large KD gap to close
    return path


def approx_of(path: Path) -> np.ndarray:
    return mpsd.open(path).decode(slice(None), kind="float")


def test_kd_loss_is_zero_on_identical_inputs(teacher: torch.nn.Module, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    assert np.allclose(kd_loss(teacher, x, x.astype(np.float32)), 0.0, atol=1e-5)
    assert (kd_loss(teacher, x, np.zeros(x.shape, np.float32)) > 0).any()


def test_learn_bias_lowers_heldout_kd_loss(teacher: torch.nn.Module, data: tuple[np.ndarray, np.ndarray], store: Path) -> None:
    x, _ = data
    approx = approx_of(store)
    result = learn_bias(teacher, x, approx, batch_size=16, holdout=0.25, seed=0)
    assert result.bias.shape == (60, 12, 12, 1) and result.bias.dtype == np.float32
    # the held-out images never enter the fit: their loss falls only through what generalises
    held = result.heldout_indices
    assert held.size == 15
    first, last = result.history[0], result.history[-1]
    assert first["heldout_loss"] > 0
    assert last["heldout_loss"] < first["heldout_loss"]
    assert last["fit_loss"] < first["fit_loss"]
    assert result.final_loss < result.initial_loss
    # the history starts at S̃ = 0, measured like kd_loss does
    ref = kd_loss(teacher, x, approx[..., 0])
    assert result.initial_loss == pytest.approx(ref.mean(), rel=1e-4)
    assert first["heldout_loss"] == pytest.approx(ref[held].mean(), rel=1e-4)
    # MPSTotal + S̃ stays in the pixel range
    total = approx + result.bias
    assert total.min() >= -1e-3 and total.max() <= 255 + 1e-3
    assert result.shared is not None and result.shared.shape == (12, 12, 1)


def test_learn_bias_keeps_its_best_epoch(teacher: torch.nn.Module, data: tuple[np.ndarray, np.ndarray], store: Path) -> None:
    x, _ = data
    approx = approx_of(store)
    # steps far too large (100 pixels): the fit overshoots, and must give back its best epoch
    result = learn_bias(teacher, x, approx, epochs=5, lr=100.0, batch_size=8, holdout=0.25, seed=0, refit_holdout=False)
    stored = [h["stored_fit_loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(stored))
    assert 0 < result.best_epoch < 5 and stored[-1] > min(stored)  # the case this test is about
    # measured afresh: the returned bias has the kept epoch's loss on the fit images, not the last one's
    fit = np.setdiff1d(np.arange(len(x)), result.heldout_indices)
    measured = kd_loss(teacher, x, approx + result.bias)[fit].mean()
    assert measured == pytest.approx(min(stored), rel=1e-4)
    assert result.heldout_final == result.history[result.best_epoch]["heldout_loss"]
    # one epoch of 300-pixel steps is worse than no bias at all: no bias is what comes back
    worse = learn_bias(teacher, x, approx, epochs=1, lr=300.0, batch_size=8, holdout=0.25, seed=0, refit_holdout=False)
    assert worse.history[1]["stored_fit_loss"] > worse.history[0]["stored_fit_loss"]
    assert worse.best_epoch == 0
    np.testing.assert_array_equal(worse.bias, 0.0)
    assert worse.final_loss == pytest.approx(worse.initial_loss, rel=1e-6)


def test_learn_bias_options(teacher: torch.nn.Module, data: tuple[np.ndarray, np.ndarray], store: Path) -> None:
    x, y = data
    approx = approx_of(store)
    zero = learn_bias(teacher, x, approx, epochs=0)
    assert not zero.bias.any() and len(zero.history) == 1
    with_ce = learn_bias(teacher, x, approx, labels=y, alpha=0.5, epochs=1, shared=False, holdout=0, l2=1.0, temperature=2.0)
    assert with_ce.heldout_indices.size == 0 and with_ce.shared is None
    assert np.isnan(with_ce.history[0]["heldout_loss"])
    with pytest.raises(OptionError, match="alpha > 0 needs labels"):
        learn_bias(teacher, x, approx, alpha=1.0)
    with pytest.raises(OptionError, match="temperature"):
        learn_bias(teacher, x, approx, temperature=0)
    with pytest.raises(InputError, match="differ in shape"):
        learn_bias(teacher, x, approx[:10])


def test_learn_bias_with_a_projection_stays_storable(teacher: torch.nn.Module, data: tuple[np.ndarray, np.ndarray], store: Path) -> None:
    x, _ = data
    approx = approx_of(store)
    project = storage_projection(mpsd.open(store), (1, 1, 1, 1))
    result = learn_bias(teacher, x, approx, epochs=3, lr=3.0, batch_size=16, project=project)
    # the bias is (up to pixel-range clipping) its own projection, and still lowers the loss
    assert np.abs(project(result.bias) - result.bias).mean() < 0.5
    assert result.final_loss < result.initial_loss
    assert result.settings["projected"]


def test_teacher_files_and_factories(teacher: torch.nn.Module, tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = data
    path = tmp_path / "teacher.pt"
    save_teacher(teacher, path)
    loaded = load_teacher(str(path), in_channels=1, num_classes=3, image_size=(12, 12))
    xt = torch.from_numpy(x[:4, None].astype(np.float32) / 255)
    with torch.no_grad():
        assert torch.allclose(loaded(xt), teacher.eval()(xt), atol=1e-5)
    with pytest.raises(InputError, match="teacher expects 1 channel"):
        load_teacher(str(path), in_channels=3, num_classes=3, image_size=(12, 12))

    module = tmp_path / "user_nets.py"
    module.write_text(
        textwrap.dedent(
            """
            import torch

            def make(in_channels, num_classes):
                return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))

            def tiny(**kwargs):
                return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, kwargs["num_classes"]))
            """
        )
    )
    net = load_teacher(f"{module}:tiny", in_channels=1, num_classes=3, image_size=(12, 12))
    weights = tmp_path / "w.pt"
    torch.save({"state_dict": net.state_dict()}, weights)
    again = load_teacher(f"{module}:tiny", weights=weights, in_channels=1, num_classes=3, image_size=(12, 12))
    with torch.no_grad():
        assert torch.equal(again(xt), net(xt))
    with pytest.raises(InputError, match="no callable"):
        load_teacher(f"{module}:missing", in_channels=1, num_classes=3, image_size=(12, 12))
    with pytest.raises(InputError, match="cannot import"):
        load_teacher("no_such_module_xyz:make", in_channels=1, num_classes=3, image_size=(12, 12))
    with pytest.raises(OptionError, match="module:factory"):
        load_teacher("make", in_channels=1, num_classes=3, image_size=(12, 12))


def test_supplement_store_adds_a_stage_counted_in_stats(
    teacher: torch.nn.Module, data: tuple[np.ndarray, np.ndarray], store: Path, tmp_path: Path
) -> None:
    archive_mod = pytest.importorskip("mpsd.archive")
    if not hasattr(archive_mod, "add_supplement"):
        pytest.skip("mpsd.archive.add_supplement is not available yet")
    import shutil

    x, _ = data
    path = tmp_path / "s.zarr"
    shutil.copytree(store, path)
    before = mpsd.open(path)
    bytes_before = before.bytes_on_disk
    assert before.stats().supplement_bytes == 0
    report = supplement_store(path, x, teacher=teacher, bond=4, epochs=4, lr=3.0, batch_size=16)
    after = mpsd.open(path)
    stats = after.stats()
    assert stats.supplement_bytes > 0
    assert report.supplement_bytes == stats.supplement_bytes
    assert after.bytes_on_disk == report.bytes_after > bytes_before
    assert report.loss_dense < report.loss_at_zero
    assert report.loss_stored is not None and report.loss_stored < report.loss_at_zero
    # decoding now returns MPSTotal + the stored bias
    assert not np.array_equal(after.decode(slice(None), kind="float"), before.decode(slice(None), kind="float"))
    json.dumps(report.to_dict(), allow_nan=True)
    # what was stored is exactly the projection the fit used: decode(after) - decode(before)
    stored_bias = after.decode(slice(None), kind="float") - before.decode(slice(None), kind="float")
    projected = storage_projection(before, report.bond)(report.bias.bias)
    assert np.abs(stored_bias - projected).max() < 1e-2
    with pytest.raises(OptionError, match="already has a supplement"):
        supplement_store(path, x, teacher=teacher, epochs=1)


def test_supplement_store_dry_run_and_checks(teacher: torch.nn.Module, data: tuple[np.ndarray, np.ndarray], store: Path) -> None:
    x, _ = data
    before = mpsd.open(store).bytes_on_disk
    report = supplement_store(store, x, teacher=teacher, epochs=1, dry_run=True)
    assert report.loss_stored is None and mpsd.open(store).bytes_on_disk == before
    with pytest.raises(InputError, match="the original images are"):
        supplement_store(store, x[:10], teacher=teacher, epochs=1, dry_run=True)
