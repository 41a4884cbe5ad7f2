"""Models and the training loop of the torch integration (tiny data, a few seconds)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("mpsd.integrations.torch")  # before torch: sets its OpenMP wait policy
torch = pytest.importorskip("torch")

from mpsd.errors import OptionError  # noqa: E402
from mpsd.integrations.torch.data import ArrayDataset  # noqa: E402
from mpsd.integrations.torch.models import MODEL_NAMES, build_model, canonical_model_name  # noqa: E402
from mpsd.integrations.torch.train import (  # noqa: E402
    RECIPES,
    Recipe,
    augment_batch,
    evaluate,
    fit,
    get_recipe,
    select_device,
)

pytestmark = pytest.mark.torch


def stripes(n: int, *, size: int = 12, channels: int = 1, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is the orientation/frequency of a stripe pattern, plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    yy, xx = np.mgrid[0:size, 0:size]
    patterns = [np.sin(xx * (1 + k)) if k % 2 == 0 else np.sin(yy * (1 + k)) for k in range(classes)]
    x = np.stack([patterns[k] for k in y])[..., None].repeat(channels, axis=3)
    x = 127.5 + 90 * x + rng.normal(0, 20, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32)])
def test_models_accept_grey_28_and_rgb_32(name: str, channels: int, size: int) -> None:
    model = build_model(name, channels, 10, size, mean=[0.5] * channels, std=[0.25] * channels)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 10)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_models_are_channels_last_and_agree_with_nchw(name: str) -> None:
    """build_model's weights are channels-last; the same weights in NCHW give the same outputs."""
    torch.manual_seed(0)
    model = build_model(name, 3, 10, 32, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2]).eval()
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    reference = build_model(name, 3, 10, 32, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])
    reference = reference.to(memory_format=torch.contiguous_format).eval()
    reference.load_state_dict(model.state_dict())
    assert all(m.weight.is_contiguous() for m in reference.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        out, expected = model(x), reference(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_model_names_and_errors() -> None:
    assert canonical_model_name("ResNet-18") == "resnet18"
    assert canonical_model_name("small-cnn") == "small_cnn"
    assert canonical_model_name("MobileNet_V2") == "mobilenetv2"
    with pytest.raises(OptionError, match="unknown model"):
        build_model("alexnet", 1, 10, 28)
    with pytest.raises(OptionError, match="at least 8x8"):
        build_model("small_cnn", 1, 10, 4)
    with pytest.raises(OptionError, match="mean has 1 values for 3 channels"):
        build_model("small_cnn", 3, 10, 32, mean=[0.5], std=[0.5])


def test_recipes() -> None:
    paper = RECIPES["paper"]
    assert (paper.lr, paper.momentum, paper.weight_decay, paper.batch_size, paper.max_epochs) == (0.1, 0.9, 5e-4, 128, 180)
    assert paper.schedule == "cosine"
    cpu = get_recipe("cpu", max_epochs=3, lr=None)
    assert cpu.max_epochs == 3 and cpu.lr == RECIPES["cpu"].lr
    with pytest.raises(OptionError, match="unknown recipe option"):
        get_recipe("cpu", learning_rate=0.1)
    with pytest.raises(OptionError, match="unknown recipe"):
        get_recipe("fast")
    with pytest.raises(OptionError, match="schedule"):
        Recipe(schedule="linear")


def test_select_device() -> None:
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match="CUDA is not available"):
            select_device("cuda")
    with pytest.raises(OptionError, match="unknown device"):
        select_device("tpu-9")


def test_augment_batch_shapes_and_flip() -> None:
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    for mode in ("none", "crop", "flip", "crop+flip"):
        assert augment_batch(x, mode, padding=1, generator=g).shape == x.shape
    flipped = augment_batch(x, "flip", generator=torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(flipped[i], x[i]) or torch.equal(flipped[i], x[i].flip(2))
    # a crop never invents values other than the image's and the zero padding
    cropped = augment_batch(x, "crop", padding=1, generator=g)
    assert set(cropped.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_fit_learns_stops_early_and_keeps_best_weights() -> None:
    x, y = stripes(96, seed=0)
    xv, yv = stripes(30, seed=1)
    torch.manual_seed(0)
    model = build_model("small_cnn", 1, 3, 12, width=8)
    recipe = get_recipe("cpu", max_epochs=25, patience=3, batch_size=16, lr=0.05)
    events: list[str] = []
    result = fit(model, ArrayDataset(x, y), ArrayDataset(xv, yv), recipe, seed=0, progress=lambda e, _i: events.append(e))
    assert result.best_val_acc >= 0.9
    assert result.stopped_early and result.epochs < 25
    # patience counts epochs since the best accuracy was first reached (ties on accuracy with a
    # lower loss update the weights but do not reset it)
    first_best = next(h.epoch for h in result.history if h.val_acc == result.best_val_acc)
    assert result.epochs - first_best == recipe.patience
    assert result.history[result.best_epoch - 1].best
    # the model ends with the best epoch's weights
    acc, _ = evaluate(model, ArrayDataset(xv, yv))
    assert acc == pytest.approx(result.best_val_acc)
    assert events[0] == "start" and events.count("epoch") == result.epochs
    assert result.steps == result.epochs * 6


def test_fit_steps_per_epoch_gives_equal_steps() -> None:
    x, y = stripes(20)
    xv, yv = stripes(9, seed=1)
    model = build_model("small_cnn", 1, 3, 12, width=4)
    recipe = get_recipe("cpu", max_epochs=2, patience=0, batch_size=8)
    result = fit(model, ArrayDataset(x, y), ArrayDataset(xv, yv), recipe, steps_per_epoch=7)
    assert result.steps == 14 and result.epochs == 2 and not result.stopped_early


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_fit_schedules_run(schedule: str) -> None:
    x, y = stripes(16)
    model = build_model("small_cnn", 1, 3, 12, width=4)
    recipe = get_recipe("cpu", max_epochs=2, patience=0, batch_size=8, schedule=schedule, augment="crop+flip", warmup_epochs=1)
    result = fit(model, ArrayDataset(x, y), ArrayDataset(x, y), recipe)
    assert len(result.history) == 2
    if schedule == "cosine":
        assert result.history[-1].lr < result.history[0].lr
