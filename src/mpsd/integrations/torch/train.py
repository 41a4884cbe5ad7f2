"""Training and evaluation of classifiers: recipes, early stopping, devices, seeds.

A :class:`Recipe` fixes everything about how a model is trained; :func:`fit` trains with it,
selecting the model with the best accuracy on a validation set and stopping once that accuracy has
not improved for ``patience`` epochs.  Two recipes ship (:data:`RECIPES`):

``"cpu"`` (default)
    SGD (lr 0.05, momentum 0.9, weight decay 5e-4), batch 64, learning rate divided by 5 when the
    validation accuracy stalls for 4 epochs, early stop after 10 epochs without improvement, at
    most 60 epochs.  Fits the small CNN on a few thousand images in about a minute on 2 cores.
``"paper"``
    Section 5 of the paper: SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, 180 epochs,
    cosine schedule, random crop + flip (patience 40 epochs).

An *epoch* is ``steps_per_epoch`` optimiser steps (by default one pass over the training data);
setting it to the step count of a larger dataset gives the *equal-steps* comparison for coresets.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from mpsd.errors import OptionError
from mpsd.evaluate.split import split_indices

__all__ = [
    "RECIPES",
    "EpochRecord",
    "FitResult",
    "Recipe",
    "augment_batch",
    "configure_threads",
    "evaluate",
    "fit",
    "get_recipe",
    "predict_logits",
    "seed_everything",
    "select_device",
    "split_indices",
]

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "step", "plateau", "constant")
AUGMENTS = ("none", "crop", "flip", "crop+flip")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """How to train a classifier (every arm of an evaluation gets the same one).

    Parameters
    ----------
    name : str
        Label shown in reports.
    max_epochs : int
        Upper bound on epochs (the cosine and step schedules span this many).
    batch_size : int
        Training batch size.
    optimizer : {"sgd", "adam"}
    lr : float
        Initial learning rate.
    momentum : float
        SGD momentum.
    weight_decay : float
        L2 weight decay.
    nesterov : bool
        Nesterov momentum for SGD.
    schedule : {"cosine", "step", "plateau", "constant"}
        ``"step"`` multiplies the rate by ``gamma`` at ``milestones`` (fractions of ``max_epochs``);
        ``"plateau"`` multiplies it by ``gamma`` after ``plateau_patience`` epochs without a better
        validation accuracy.
    milestones : tuple of float
        For ``"step"``.
    gamma : float
        Factor for ``"step"`` and ``"plateau"``.
    plateau_patience : int
        For ``"plateau"``.
    warmup_epochs : int
        Linear warm-up of the learning rate over this many epochs.
    patience : int
        Stop after this many epochs without a better validation accuracy (0: never stop early).
    min_delta : float
        Improvement in validation accuracy that counts as better.
    val_fraction : float
        Share of the training data held out for validation when no validation set is given.
    augment : {"none", "crop", "flip", "crop+flip"}
        Batch augmentation: random crop after zero padding by ``crop_padding``, horizontal flip.
    crop_padding : int
        Padding for the random crop.
    label_smoothing : float
        Cross-entropy label smoothing.
    eval_batch_size : int
        Batch size for evaluation.
    """

    name: str = "cpu"
    max_epochs: int = 60
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "plateau"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.2
    plateau_patience: int = 4
    warmup_epochs: int = 0
    patience: int = 10
    min_delta: float = 0.0
    val_fraction: float = 0.1
    augment: str = "none"
    crop_padding: int = 2
    label_smoothing: float = 0.0
    eval_batch_size: int = 500

    def __post_init__(self) -> None:
        if self.max_epochs < 1:
            raise OptionError(f"max_epochs must be >= 1, got {self.max_epochs}")
        if self.batch_size < 1:
            raise OptionError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in OPTIMIZERS:
            raise OptionError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise OptionError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.augment not in AUGMENTS:
            raise OptionError(f"augment must be one of {AUGMENTS}, got {self.augment!r}")
        if not self.lr > 0:
            raise OptionError(f"lr must be > 0, got {self.lr}")
        if self.patience < 0 or self.plateau_patience < 1 or self.warmup_epochs < 0:
            raise OptionError("patience and warmup_epochs must be >= 0, plateau_patience >= 1")
        if not 0 <= self.val_fraction < 1:
            raise OptionError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 < self.gamma <= 1:
            raise OptionError(f"gamma must be in (0, 1], got {self.gamma}")

    def with_options(self, **changes: Any) -> Recipe:
        """A copy with some fields changed (unknown names raise :class:`OptionError`)."""
        known = set(self.__dataclass_fields__)
        bad = sorted(set(changes) - known)
        if bad:
            raise OptionError(f"unknown recipe option(s) {bad}; known: {sorted(known)}")
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d


#: The shipped recipes, by name.
RECIPES: dict[str, Recipe] = {
    "cpu": Recipe(),
    "paper": Recipe(
        name="paper",
        max_epochs=180,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        schedule="cosine",
        patience=40,
        augment="crop+flip",
        crop_padding=4,
    ),
}


def get_recipe(name_or_recipe: str | Recipe, **overrides: Any) -> Recipe:
    """Look a recipe up by name (``"cpu"`` or ``"paper"``) and apply overrides (``None`` ignored)."""
    if isinstance(name_or_recipe, Recipe):
        recipe = name_or_recipe
    else:
        key = name_or_recipe.lower()
        if key not in RECIPES:
            raise OptionError(f"unknown recipe {name_or_recipe!r}; expected one of {', '.join(RECIPES)}")
        recipe = RECIPES[key]
    changes = {k: v for k, v in overrides.items() if v is not None}
    return recipe.with_options(**changes) if changes else recipe


# --------------------------------------------------------------------------- environment
def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: the CPUs available to this process).

    Returns the number set.  Inter-op threads are left alone (torch allows setting them only once).
    """
    n = max(1, int(threads) if threads else available_cpus())
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """Pick a device: ``"auto"`` gives CUDA when present, else Apple MPS, else the CPU.

    Raises
    ------
    OptionError
        When the named device is not available.
    """
    if isinstance(name, torch.device):
        return name
    key = (name or "auto").lower()
    if key == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(key)
    except RuntimeError as exc:
        raise OptionError(f"unknown device {name!r} (use auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {name!r} asked for, but CUDA is not available")
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise OptionError(f"device {name!r} asked for, but MPS is not available")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a CPU generator seeded with ``seed`` for sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - libraries that use the global state
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# --------------------------------------------------------------------------- augmentation
def augment_batch(x: torch.Tensor, mode: str, *, padding: int = 2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop (after zero padding) and/or horizontal flip of a batch.

    Parameters
    ----------
    x : Tensor of shape (B, C, H, W)
    mode : {"none", "crop", "flip", "crop+flip"}
    padding : int
        Zero padding before the crop.
    generator : torch.Generator, optional
        CPU generator for reproducible draws.

    Returns
    -------
    Tensor of shape (B, C, H, W)
    """
    if mode == "none" or x.shape[0] == 0:
        return x
    b, c, h, w = x.shape
    if "crop" in mode and padding > 0:
        p = padding
        padded = nn.functional.pad(x, (p, p, p, p))
        di = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        dj = torch.randint(0, 2 * p + 1, (b,), generator=generator).to(x.device)
        rows = (di[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]
        cols = (dj[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if "flip" in mode:
        flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


# --------------------------------------------------------------------------- evaluation
def _loader(dataset: Dataset, batch_size: int, *, shuffle: bool, generator: torch.Generator | None, workers: int) -> DataLoader:
    sampler = RandomSampler(dataset, generator=generator) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        drop_last=False,
    )


@torch.no_grad()
def predict_logits(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu", batch_size: int = 500, workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole dataset (model in eval mode).

    Returns
    -------
    logits : Tensor of shape (N, K), on the CPU
    labels : Tensor of shape (N,), on the CPU
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    outs, ys = [], []
    for x, y in _loader(dataset, batch_size, shuffle=False, generator=None, workers=workers):
        outs.append(model(x.to(device, non_blocking=True)).float().cpu())
        ys.append(y)
    model.train(was_training)
    if not outs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64)
    return torch.cat(outs), torch.cat(ys)


def evaluate(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu", batch_size: int = 500, workers: int = 0) -> tuple[float, float]:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy of ``model`` on a labelled dataset."""
    logits, y = predict_logits(model, dataset, device=device, batch_size=batch_size, workers=workers)
    if y.numel() == 0:
        return float("nan"), float("nan")
    if (y < 0).any():
        raise OptionError("evaluation needs labels, but the dataset has images without one")
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    return acc, loss


# --------------------------------------------------------------------------- training
@dataclass
class EpochRecord:
    """What happened in one epoch of :func:`fit`."""

    epoch: int
    steps: int
    lr: float
    train_loss: float
    train_acc: float
    val_acc: float
    val_loss: float
    seconds: float
    best: bool


@dataclass
class FitResult:
    """Outcome of :func:`fit`; the model passed in ends with the best-validation weights.

    Attributes
    ----------
    best_epoch : int
        Epoch (1-based) whose weights were kept.
    best_val_acc, best_val_loss : float
    epochs : int
        Epochs run.
    steps : int
        Optimiser steps run.
    stopped_early : bool
        Whether patience ran out before ``max_epochs``.
    seconds : float
    history : list of EpochRecord
    """

    best_epoch: int
    best_val_acc: float
    best_val_loss: float
    epochs: int
    steps: int
    stopped_early: bool
    seconds: float
    history: list[EpochRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


def _batches(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise OptionError("cannot train on an empty dataset")


def _lr_factor(recipe: Recipe, step: int, total_steps: int, steps_per_epoch: int) -> float:
    warm = recipe.warmup_epochs * steps_per_epoch
    if warm and step < warm:
        return (step + 1) / warm
    if recipe.schedule == "cosine":
        t = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    if recipe.schedule == "step":
        epoch = step / steps_per_epoch
        return recipe.gamma ** sum(epoch >= m * recipe.max_epochs for m in recipe.milestones)
    return 1.0


def fit(
    model: nn.Module,
    train_data: Dataset,
    val_data: Dataset,
    recipe: Recipe,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    steps_per_epoch: int | None = None,
    workers: int = 0,
    progress: Callable[[str, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``model`` with ``recipe``, keeping the weights of the best validation accuracy.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(B, C, H, W)`` in ``[0, 1]`` to logits; moved to ``device`` and trained in place.
    train_data, val_data : Dataset
        Yield ``(x, y)`` with ``x`` of shape ``(C, H, W)`` in ``[0, 1]``.
    recipe : Recipe
    device : torch.device or str
    seed : int
        Seeds initial sampling order and augmentation (the caller seeds the model's init).
    steps_per_epoch : int, optional
        Optimiser steps between two validations (default: one pass over ``train_data``).
    workers : int
        DataLoader worker processes.
    progress : callable, optional
        ``progress(event, info)`` with event ``"start"`` (info: ``epochs``, ``steps_per_epoch``),
        ``"step"`` (``step``, ``loss``) and ``"epoch"`` (an :class:`EpochRecord` as a dict).

    Returns
    -------
    FitResult
    """
    device = torch.device(device)
    if len(train_data) == 0:  # type: ignore[arg-type]
        raise OptionError("cannot train on an empty dataset")
    gen = torch.Generator()
    gen.manual_seed(seed)
    aug_gen = torch.Generator()
    aug_gen.manual_seed(seed + 1)
    batch_size = min(recipe.batch_size, len(train_data))  # type: ignore[arg-type]
    loader = _loader(train_data, batch_size, shuffle=True, generator=gen, workers=workers)
    spe = int(steps_per_epoch) if steps_per_epoch else max(1, math.ceil(len(train_data) / batch_size))  # type: ignore[arg-type]
    total_steps = spe * recipe.max_epochs
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if recipe.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay, nesterov=recipe.nesterov and recipe.momentum > 0)
    else:
        opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    plateau_scale = 1.0
    since_plateau = 0
    best = (-1.0, math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch = 0
    since_best = 0
    history: list[EpochRecord] = []
    step = 0
    stopped_early = False
    t_start = time.perf_counter()
    if progress is not None:
        progress("start", {"epochs": recipe.max_epochs, "steps_per_epoch": spe})
    batches = _batches(loader)
    try:
        for epoch in range(1, recipe.max_epochs + 1):
            t0 = time.perf_counter()
            model.train()
            loss_sum = 0.0
            correct = 0
            seen = 0
            lr = recipe.lr
            for _ in range(spe):
                x, y = next(batches)
                x = x.to(device, non_blocking=True)
                y = y.to(device, non_blocking=True)
                x = augment_batch(x, recipe.augment, padding=recipe.crop_padding, generator=aug_gen)
                lr = recipe.lr * plateau_scale * _lr_factor(recipe, step, total_steps, spe)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.zero_grad(set_to_none=True)
                out = model(x)
                loss = criterion(out, y)
                if not torch.isfinite(loss):
                    raise OptionError(f"training diverged (loss {loss.item()}) at epoch {epoch}; lower the learning rate")
                loss.backward()
                opt.step()
                step += 1
                n = int(y.shape[0])
                loss_sum += float(loss.item()) * n
                correct += int((out.argmax(1) == y).sum().item())
                seen += n
                if progress is not None:
                    progress("step", {"step": step, "loss": float(loss.item())})
            val_acc, val_loss = evaluate(model, val_data, device=device, batch_size=recipe.eval_batch_size, workers=0)
            improved = val_acc > best[0] + recipe.min_delta or (
                abs(val_acc - best[0]) <= recipe.min_delta and val_loss < best[1]
            )
            if improved:
                # a better accuracy resets patience; an equal accuracy with lower loss only updates the weights
                if val_acc > best[0] + recipe.min_delta:
                    since_best = 0
                    since_plateau = 0
                else:
                    since_best += 1
                    since_plateau += 1
                best = (val_acc, val_loss)
                best_epoch = epoch
                best_state = copy.deepcopy({k: v.detach().clone() for k, v in model.state_dict().items()})
            else:
                since_best += 1
                since_plateau += 1
            if recipe.schedule == "plateau" and since_plateau >= recipe.plateau_patience:
                plateau_scale *= recipe.gamma
                since_plateau = 0
            record = EpochRecord(
                epoch=epoch,
                steps=step,
                lr=lr,
                train_loss=loss_sum / max(1, seen),
                train_acc=correct / max(1, seen),
                val_acc=val_acc,
                val_loss=val_loss,
                seconds=time.perf_counter() - t0,
                best=improved,
            )
            history.append(record)
            log.debug("epoch %d: %s", epoch, record)
            if progress is not None:
                progress("epoch", asdict(record))
            if recipe.patience and since_best >= recipe.patience:
                stopped_early = epoch < recipe.max_epochs
                break
    finally:
        batches.close()  # stops DataLoader workers now, not at garbage collection

    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(
        best_epoch=best_epoch,
        best_val_acc=best[0],
        best_val_loss=best[1],
        epochs=len(history),
        steps=step,
        stopped_early=stopped_early,
        seconds=time.perf_counter() - t_start,
        history=history,
    )

