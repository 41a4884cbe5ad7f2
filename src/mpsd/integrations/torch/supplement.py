"""Task-specific information supplementation (Section 4.2, Eq. 6 of the paper).

A fixed *teacher* model f, trained on the original images S, sees the compressed images
MPSTotal(S).  We learn a bias S̃, initialised at zero, so that f's outputs on MPSTotal(S) + S̃
match its outputs on S, by minimising the knowledge-distillation loss

    L = T² · KL( softmax(f(S)/T) ‖ softmax(f(MPSTotal(S) + S̃)/T) )  (+ α · CE(f(MPSTotal(S) + S̃), y))

averaged over images, with Adam on S̃ and the teacher frozen (eval mode).  After every step S̃ is
projected so that MPSTotal(S) + S̃ stays inside the pixel range.

S̃ has two parts, both initialised at zero: a bias shared by every image, ``G`` of shape
(H, W, C) (``shared=True``), and a per-image bias ``D_i``.  A held-out share of the images is left
out of the fit; their loss (with ``G`` and ``D_i = 0``) is recorded after every epoch, which shows
whether the learned correction generalises rather than just fits.  The held-out images then get
their own ``D_i`` in a second, short pass with ``G`` fixed (``refit_holdout=True``), so every
image ends with its own bias.

:func:`learn_bias` returns the dense bias ``G + D_i`` (N, H, W, C) in pixel units; the caller
stores it compactly (``mpsd.archive.add_supplement`` compresses it into a low-bond MPS stage).

Teachers: :func:`train_teacher` trains a built-in model; :func:`load_teacher` builds a user's
model from ``module:factory`` (+ weights) or a file written by :func:`save_teacher`.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpsd.errors import InputError, OptionError
from mpsd.integrations.torch.data import ArrayDataset, channel_stats, nhwc
from mpsd.integrations.torch.models import build_model, canonical_model_name
from mpsd.integrations.torch.train import FitResult, Recipe, fit, seed_everything, split_indices

__all__ = [
    "TEACHER_FORMAT",
    "BiasResult",
    "SupplementReport",
    "kd_loss",
    "learn_bias",
    "load_teacher",
    "save_teacher",
    "storage_projection",
    "supplement_store",
    "train_teacher",
]

log = logging.getLogger(__name__)

#: ``format`` field of teacher files written by :func:`save_teacher`.
TEACHER_FORMAT = "mpsd-teacher"

Progress = Callable[[str, dict[str, Any]], None]


@dataclass
class BiasResult:
    """Outcome of :func:`learn_bias`.

    Attributes
    ----------
    bias : ndarray of shape (N, H, W, C), float32
        The dense bias S̃ in pixel units; ``approx + bias`` lies inside ``[0, max_value]``.
    shared : ndarray of shape (H, W, C), float32, or None
        The shared part ``G`` (None when ``shared=False``).
    history : list of dict
        One entry per epoch of the fit (entry 0: at S̃ = 0) with ``epoch``, ``fit_loss`` (mean KD
        loss over the fit images during the epoch's pass), ``stored_fit_loss`` (mean KD loss over
        the fit images with the bias as it stands after the epoch, projection included) and
        ``heldout_loss`` (mean KD loss over the held-out images, which the fit never updates; NaN
        when there are none).
    best_epoch : int
        The epoch whose bias is returned: the one with the lowest ``stored_fit_loss``, epoch 0 (no
        bias at all) included, so a fit that gets worse (too large a step, a projection that
        fights the gradient) gives back its best state, not its last.
    initial_loss : float
        Mean KD loss over all images at S̃ = 0.
    final_loss : float
        Mean KD loss over all images with the returned bias.
    heldout_indices : ndarray of int64
        The held-out images.
    seconds : float
    settings : dict
        The options used.
    """

    bias: np.ndarray
    shared: np.ndarray | None
    history: list[dict[str, float]]
    initial_loss: float
    final_loss: float
    heldout_indices: np.ndarray
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)
    best_epoch: int = -1

    @property
    def heldout_initial(self) -> float:
        """Held-out KD loss at S̃ = 0."""
        return self.history[0]["heldout_loss"] if self.history else math.nan

    @property
    def heldout_final(self) -> float:
        """Held-out KD loss with the kept epoch's bias (before the held-out images got their own)."""
        return self.history[self.best_epoch]["heldout_loss"] if self.history else math.nan

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no arrays)."""
        return {
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "heldout_images": int(self.heldout_indices.size),
            "heldout_initial": self.heldout_initial,
            "heldout_final": self.heldout_final,
            "best_epoch": self.best_epoch,
            "bias_rms": float(np.sqrt(np.mean(np.square(self.bias, dtype=np.float64)))) if self.bias.size else 0.0,
            "seconds": self.seconds,
            "history": self.history,
            "settings": self.settings,
        }


def _to_pixels_nchw(images: np.ndarray, name: str) -> torch.Tensor:
    arr = nhwc(images)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{name} holds NaN or Inf values")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2).contiguous()


def _kd_per_image(logits: torch.Tensor, target_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(p ‖ q) per image, p = target_probs, q = softmax(logits / T): shape (B,)."""
    log_q = torch.log_softmax(logits / temperature, dim=1)
    log_p = torch.log(target_probs.clamp_min(1e-12))
    return (temperature**2) * (target_probs * (log_p - log_q)).sum(dim=1)


@torch.no_grad()
def _soft_targets(teacher: nn.Module, pixels: torch.Tensor, max_value: float, temperature: float, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for s in range(0, pixels.shape[0], batch_size):
        x = pixels[s : s + batch_size].to(device) / max_value
        out.append(torch.softmax(teacher(x).float() / temperature, dim=1))
    return torch.cat(out) if out else torch.zeros(0, 0, device=device)


class _Frozen:
    """Context: teacher in eval mode with gradients off for its parameters; restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> nn.Module:
        self.training = self.model.training
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self.model

    def __exit__(self, *exc: object) -> None:
        for p, flag in zip(self.model.parameters(), self.flags, strict=True):
            p.requires_grad_(flag)
        self.model.train(self.training)


def kd_loss(
    teacher: nn.Module,
    original: np.ndarray,
    reconstruction: np.ndarray,
    *,
    temperature: float = 4.0,
    max_value: float = 255.0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Per-image KD loss of Eq. 6 between a teacher's outputs on two versions of the images.

    Parameters
    ----------
    teacher : torch.nn.Module
        Maps ``(B, C, H, W)`` in ``[0, 1]`` to logits.
    original : ndarray of shape (N, H, W[, C])
        The images S (pixel units).
    reconstruction : ndarray of shape (N, H, W[, C])
        What the teacher sees instead (pixel units), e.g. MPSTotal(S) + S̃.
    temperature : float
    max_value : float
        Pixel value that maps to 1.

    Returns
    -------
    ndarray of shape (N,), float64
        ``T² · KL(softmax(f(S)/T) ‖ softmax(f(reconstruction)/T))`` for each image.
    """
    device = torch.device(device)
    orig = _to_pixels_nchw(original, "original")
    rec = _to_pixels_nchw(reconstruction, "reconstruction")
    if orig.shape != rec.shape:
        raise InputError(f"original {tuple(orig.shape)} and reconstruction {tuple(rec.shape)} differ in shape")
    with _Frozen(teacher.to(device)) as t, torch.no_grad():
        p = _soft_targets(t, orig, max_value, temperature, batch_size, device)
        out = []
        for s in range(0, rec.shape[0], batch_size):
            x = rec[s : s + batch_size].to(device).clamp(0, max_value) / max_value
            out.append(_kd_per_image(t(x).float(), p[s : s + batch_size], temperature).cpu())
    return torch.cat(out).double().numpy() if out else np.zeros(0)


def learn_bias(
    teacher: nn.Module,
    original: np.ndarray,
    approx: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    temperature: float = 4.0,
    alpha: float = 0.0,
    epochs: int = 5,
    lr: float = 1.0,
    batch_size: int = 128,
    holdout: float = 0.1,
    shared: bool = True,
    refit_holdout: bool = True,
    l2: float = 0.0,
    max_value: float = 255.0,
    project: Callable[[np.ndarray], np.ndarray] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: Progress | None = None,
) -> BiasResult:
    """Learn the task-specific bias S̃ of Eq. 6 by knowledge distillation from a fixed teacher.

    Parameters
    ----------
    teacher : torch.nn.Module
        The fixed model f: ``(B, C, H, W)`` float32 in ``[0, 1]`` to logits ``(B, K)``.  It is put
        in eval mode with its parameters frozen for the duration, then restored.
    original : ndarray of shape (N, H, W) or (N, H, W, C)
        The original images S (uint8/uint16 or float, pixel units).
    approx : ndarray of shape (N, H, W) or (N, H, W, C)
        MPSTotal(S): the decoded store before rounding (float32, pixel units), e.g.
        ``archive.decode(slice(None), kind="float")``.
    labels : ndarray of shape (N,), optional
        Needed when ``alpha > 0``.
    temperature : float
        Softmax temperature T of the KD loss (> 0).
    alpha : float
        Weight of the optional cross-entropy term with the labels.
    epochs : int
        Passes over the fit images (and again over the held-out images when refitting them).
    lr : float
        Adam learning rate in pixel units (roughly the largest change of a pixel per step).
    batch_size : int
    holdout : float
        Share of the images held out of the fit, in [0, 1).
    shared : bool
        Learn a bias shared by all images in addition to the per-image one.
    refit_holdout : bool
        After the fit, give the held-out images their own per-image bias (``G`` fixed).
    l2 : float
        Weight of an L2 penalty on the bias, in ``(bias / max_value)²`` units.
    max_value : float
        Top of the pixel range (255 for uint8).
    project : callable, optional
        Maps a bias ``(N, H, W, C)`` to the nearest bias that can be stored (e.g.
        :func:`storage_projection`: its low-bond MPS approximation).  Applied after every epoch,
        which makes the fit a projected gradient descent: the bias stays storable, so the loss
        after storing is (nearly) the loss reached here.
    device : torch.device or str
    seed : int
        Seeds the held-out split and the batch order.
    progress : callable, optional
        ``progress(event, info)``: ``"start"`` (``epochs``, ``steps``), ``"step"`` and ``"epoch"``
        (a history entry).

    Returns
    -------
    BiasResult
        ``bias`` is float32 (N, H, W, C), in pixel units.

    Notes
    -----
    The per-image bias uses a *lazy* Adam: only the rows of the images in a batch are updated,
    with per-image step counts, so images outside the batch do not drift on stale momentum.
    Memory: about 16 bytes per pixel value (approximation, bias and two Adam moments).
    """
    t_start = time.perf_counter()
    if temperature <= 0:
        raise OptionError(f"temperature must be > 0, got {temperature}")
    if alpha < 0 or l2 < 0:
        raise OptionError("alpha and l2 must be >= 0")
    if epochs < 0:
        raise OptionError(f"epochs must be >= 0, got {epochs}")
    if not lr > 0:
        raise OptionError(f"lr must be > 0, got {lr}")
    if not 0 <= holdout < 1:
        raise OptionError(f"holdout must be in [0, 1), got {holdout}")
    if batch_size < 1:
        raise OptionError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    orig = _to_pixels_nchw(original, "original")
    appr = _to_pixels_nchw(approx, "approx")
    if orig.shape != appr.shape:
        raise InputError(f"original images {tuple(orig.shape)} and approx {tuple(appr.shape)} differ in shape")
    n = int(orig.shape[0])
    y: torch.Tensor | None = None
    if alpha > 0:
        if labels is None:
            raise OptionError("alpha > 0 needs labels")
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise InputError(f"{n} images but labels of shape {lab.shape}")
        y = torch.from_numpy(lab.astype(np.int64)).to(device)
    settings = {
        "temperature": temperature, "alpha": alpha, "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "holdout": holdout, "shared": shared,
        "refit_holdout": refit_holdout, "l2": l2, "seed": seed, "device": str(device),
        "projected": project is not None,
    }  # fmt: skip
    gen = torch.Generator()
    gen.manual_seed(seed)
    fit_idx, hold_idx = split_indices(n, holdout, seed=seed) if n else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    appr = appr.clamp_(0, max_value).to(device)
    b1, b2, eps = 0.9, 0.999, 1e-8
    d = torch.zeros_like(appr)
    m = torch.zeros_like(appr)
    v = torch.zeros_like(appr)
    t_rows = torch.zeros(n, device=device)
    g = torch.zeros((1, *appr.shape[1:]), device=device, requires_grad=True)
    g_opt = torch.optim.Adam([g], lr=lr) if shared else None

    with _Frozen(teacher.to(device)) as f:
        targets = _soft_targets(f, orig, max_value, temperature, 512, device)
        del orig

        def losses(idx: torch.Tensor, d_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(total per image, KD per image) for the images ``idx`` with bias rows ``d_rows``."""
            bias = g + d_rows if shared else d_rows
            x = (appr[idx] + bias).clamp(0, max_value) / max_value
            logits = f(x).float()
            kd = _kd_per_image(logits, targets[idx], temperature)
            total = kd
            if y is not None:
                total = total + alpha * nn.functional.cross_entropy(logits, y[idx], reduction="none")
            if l2 > 0:
                total = total + l2 * (bias / max_value).pow(2).flatten(1).mean(1)
            return total, kd

        @torch.no_grad()
        def mean_kd(index: np.ndarray) -> float:
            if index.size == 0:
                return math.nan
            acc = 0.0
            for s in range(0, index.size, 512):
                idx = torch.from_numpy(index[s : s + 512]).to(device)
                acc += float(losses(idx, d[idx])[1].sum())
            return acc / index.size

        def run_epoch(index: np.ndarray, update_shared: bool) -> float:
            if index.size == 0:
                return math.nan
            perm = index[torch.randperm(index.size, generator=gen).numpy()]
            acc = 0.0
            for s in range(0, perm.size, batch_size):
                idx = torch.from_numpy(perm[s : s + batch_size]).to(device)
                d_rows = d[idx].clone().requires_grad_(True)
                if g_opt is not None:
                    g_opt.zero_grad(set_to_none=True)
                total, kd = losses(idx, d_rows)
                total.mean().backward()
                with torch.no_grad():
                    grad = d_rows.grad
                    assert grad is not None
                    t_rows[idx] += 1
                    tt = t_rows[idx].view(-1, *([1] * (appr.dim() - 1)))
                    m[idx] = b1 * m[idx] + (1 - b1) * grad
                    v[idx] = b2 * v[idx] + (1 - b2) * grad * grad
                    step = lr * (m[idx] / (1 - b1**tt)) / ((v[idx] / (1 - b2**tt)).sqrt() + eps)
                    if g_opt is not None and update_shared:
                        g_opt.step()
                        g.clamp_(-max_value, max_value)
                    base = appr[idx] + (g if shared else 0.0)
                    d[idx] = (base + d_rows - step).clamp(0, max_value) - base
                acc += float(kd.detach().sum())
                if progress is not None:
                    progress("step", {"loss": float(kd.detach().mean())})
            return acc / index.size

        def apply_projection() -> None:
            if project is None:
                return
            with torch.no_grad():
                total = (g + d) if shared else d
                arr = total.permute(0, 2, 3, 1).cpu().numpy()
                proj = np.asarray(project(arr), dtype=np.float32).reshape(arr.shape)
                new = torch.from_numpy(proj).permute(0, 3, 1, 2).to(device)
                d.copy_(new - g if shared else new)
                base = appr + (g if shared else 0.0)
                d.copy_((base + d).clamp(0, max_value) - base)

        start = mean_kd(fit_idx)
        history = [{"epoch": 0, "fit_loss": start, "stored_fit_loss": start, "heldout_loss": mean_kd(hold_idx)}]
        # the best state so far (epoch 0: no bias); restored after the fit if a later one was worse
        best_epoch, best_loss = 0, start
        best_g, best_d = g.detach().clone(), d.clone()
        initial_loss = mean_kd(np.arange(n))
        if progress is not None:
            steps = math.ceil(fit_idx.size / batch_size) * epochs
            if refit_holdout:
                steps += math.ceil(hold_idx.size / batch_size) * epochs
            progress("start", {"epochs": epochs, "steps": steps, "initial": history[0]})
        for epoch in range(1, epochs + 1):
            fit_loss = run_epoch(fit_idx, update_shared=True)
            apply_projection()
            stored = mean_kd(fit_idx)
            entry = {"epoch": epoch, "fit_loss": fit_loss, "stored_fit_loss": stored, "heldout_loss": mean_kd(hold_idx)}
            history.append(entry)
            if stored < best_loss or (math.isnan(best_loss) and not math.isnan(stored)):
                best_epoch, best_loss = epoch, stored
                best_g.copy_(g.detach())
                best_d.copy_(d)
            log.debug("supplement epoch %d: %s", epoch, entry)
            if progress is not None:
                progress("epoch", dict(entry))
        if best_epoch != epochs:
            log.info("supplement: keeping epoch %d of %d (lowest KD loss on the fit images)", best_epoch, epochs)
            with torch.no_grad():
                g.copy_(best_g)
                d.copy_(best_d)
        del best_g, best_d
        if refit_holdout and hold_idx.size:
            for _ in range(epochs):
                run_epoch(hold_idx, update_shared=False)
                apply_projection()
        final_loss = mean_kd(np.arange(n))
        with torch.no_grad():
            total_bias = (appr + (g if shared else 0.0) + d).clamp(0, max_value) - appr
    bias = total_bias.permute(0, 2, 3, 1).contiguous().cpu().numpy().astype(np.float32)
    shared_arr = g.detach().permute(0, 2, 3, 1)[0].cpu().numpy().astype(np.float32) if shared else None
    return BiasResult(
        bias=bias,
        shared=shared_arr,
        history=history,
        initial_loss=initial_loss,
        final_loss=final_loss,
        heldout_indices=hold_idx,
        seconds=time.perf_counter() - t_start,
        settings=settings,
        best_epoch=best_epoch,
    )


# --------------------------------------------------------------------------- teachers
def train_teacher(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    model: str = "small_cnn",
    recipe: Recipe | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    progress: Progress | None = None,
) -> tuple[nn.Module, FitResult]:
    """Train a built-in classifier on the original images, to serve as the teacher.

    Parameters
    ----------
    images : ndarray of shape (N, H, W) or (N, H, W, C)
        Original uint8/uint16 images.
    labels : ndarray of shape (N,)
    model : str
        A name for :func:`mpsd.integrations.torch.models.build_model`.
    recipe : Recipe, optional
        Default: the ``"cpu"`` recipe.  Its ``val_fraction`` is held out for early stopping.
    num_classes : int, optional
        Default: ``labels.max() + 1``.

    Returns
    -------
    model : torch.nn.Module
        In eval mode, with a :class:`~mpsd.integrations.torch.models.Normalize` layer first.
    fit : FitResult
    """
    from mpsd.integrations.torch.train import RECIPES

    recipe = recipe or RECIPES["cpu"]
    arr = nhwc(images)
    lab = np.asarray(labels)
    if lab.shape != (arr.shape[0],):
        raise InputError(f"{arr.shape[0]} images but labels of shape {lab.shape}")
    if lab.size == 0 or lab.min() < 0:
        raise InputError("training a teacher needs a label (>= 0) for every image")
    k = int(num_classes or int(lab.max()) + 1)
    tr, va = split_indices(arr.shape[0], recipe.val_fraction or 0.1, seed=seed, labels=lab)
    mean, std = channel_stats(arr[tr])
    seed_everything(seed)
    net = build_model(model, arr.shape[3], max(2, k), arr.shape[1:3], mean=mean, std=std)
    result = fit(
        net,
        ArrayDataset(arr[tr], lab[tr]),
        ArrayDataset(arr[va], lab[va]),
        recipe,
        device=device,
        seed=seed,
        progress=progress,
    )
    net.mpsd_spec = {  # type: ignore[assignment]
        "model": canonical_model_name(model), "in_channels": int(arr.shape[3]), "num_classes": max(2, k),
        "image_size": [int(arr.shape[1]), int(arr.shape[2])], "mean": mean, "std": std,
    }  # fmt: skip
    return net, result


def save_teacher(model: nn.Module, path: str | Path) -> None:
    """Write a teacher from :func:`train_teacher` to ``path`` (loadable with :func:`load_teacher`)."""
    spec = getattr(model, "mpsd_spec", None)
    if spec is None:
        raise OptionError("only teachers built by mpsd (train_teacher) can be saved with save_teacher; save your own with torch.save(model.state_dict())")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": TEACHER_FORMAT, "version": 1, **spec, "state_dict": state}, Path(path))


def _load_state(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe files
        raise InputError(f"{path}: cannot load as torch weights (weights_only=True): {exc}") from exc


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise OptionError(f"teacher must be 'train', 'module:factory' or a .pt file written by --save-teacher, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise InputError(f"{file}: no such file")
            mod_spec = importlib.util.spec_from_file_location(f"mpsd_user_teacher_{file.stem}", file)
            if mod_spec is None or mod_spec.loader is None:
                raise InputError(f"{file}: cannot import")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot import module {module_name!r} for the teacher: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise InputError(f"{module_name!r} has no callable {attr!r}")
    return factory


def load_teacher(
    spec: str,
    *,
    weights: str | Path | None = None,
    in_channels: int,
    num_classes: int,
    image_size: tuple[int, int],
) -> nn.Module:
    """Build the teacher named by ``spec``.

    Parameters
    ----------
    spec : str
        Either a file written by :func:`save_teacher` (``teacher.pt``), or ``module:factory`` /
        ``path/to/file.py:factory``: a callable returning an ``nn.Module`` that maps
        ``(B, C, H, W)`` float32 in ``[0, 1]`` to logits.  The factory receives whichever of
        ``in_channels``, ``num_classes`` and ``image_size`` its signature names.
    weights : str or Path, optional
        A ``state_dict`` (or a dict with a ``"state_dict"`` or ``"model"`` entry) for
        ``module:factory``; loaded with ``weights_only=True``.
    in_channels, num_classes, image_size
        What the data needs; checked against a saved teacher.

    Returns
    -------
    torch.nn.Module
        In eval mode.
    """
    path = Path(spec)
    if spec.endswith((".pt", ".pth")) and ":" not in path.name:
        blob = _load_state(path)
        if not isinstance(blob, dict) or blob.get("format") != TEACHER_FORMAT:
            raise InputError(f"{path}: not an mpsd teacher file (use module:factory with --weights for your own model)")
        got = (int(blob["in_channels"]), tuple(int(v) for v in blob["image_size"]))
        if got != (in_channels, tuple(image_size)):
            raise InputError(
                f"{path}: teacher expects {got[0]} channel(s) of {got[1][0]}x{got[1][1]}, "
                f"the store has {in_channels} of {image_size[0]}x{image_size[1]}"
            )
        net = build_model(
            str(blob["model"]), int(blob["in_channels"]), int(blob["num_classes"]),
            tuple(blob["image_size"]), mean=blob.get("mean"), std=blob.get("std"),
        )  # fmt: skip
        net.load_state_dict(blob["state_dict"])
        net.mpsd_spec = {k: blob[k] for k in ("model", "in_channels", "num_classes", "image_size", "mean", "std")}  # type: ignore[assignment]
        return net.eval()
    factory = _import_factory(spec)
    offered = {"in_channels": in_channels, "num_classes": num_classes, "image_size": tuple(image_size)}
    try:
        params = inspect.signature(factory).parameters
        accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = offered if accepts_kwargs else {k: v for k, v in offered.items() if k in params}
    except (TypeError, ValueError):
        kwargs = {}
    net = factory(**kwargs)
    if not isinstance(net, nn.Module):
        raise InputError(f"teacher factory {spec!r} returned {type(net).__name__}, not a torch.nn.Module")
    if weights is not None:
        state = _load_state(Path(weights))
        if isinstance(state, dict):
            for key in ("state_dict", "model"):
                if isinstance(state.get(key), dict):
                    state = state[key]
                    break
        try:
            net.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise InputError(f"{weights}: weights do not fit the model from {spec!r}: {exc}") from exc
    else:
        log.warning("teacher %s has no --weights: using its initial parameters", spec)
    return net.eval()


def teacher_outputs_classes(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Number of logits the model gives for one zero image of ``(H, W, C)``."""
    h, w, c = image_shape
    with _Frozen(model) as f, torch.no_grad():
        device = next((p.device for p in f.parameters()), torch.device("cpu"))
        return int(f(torch.zeros(1, c, h, w, device=device)).shape[1])



# --------------------------------------------------------------------------- the whole step
@dataclass
class SupplementReport:
    """Outcome of :func:`supplement_store`.

    Attributes
    ----------
    store : str
    bias : BiasResult
        The dense bias and its loss history (``bias.bias`` is dropped from :meth:`to_dict`).
    loss_at_zero : float
        Mean KD loss over all images at S̃ = 0 (the store as it was).
    loss_dense : float
        With the dense bias learned in torch.
    loss_stored : float or None
        With the bias as stored (its low-bond MPS approximation), read back from the store;
        None with ``dry_run``.
    bytes_before, bytes_after : int
        Store size on disk before and after.
    supplement_bytes : int
        Bytes of the supplement stage (as counted by ``stats``).
    teacher : dict
        How the teacher was obtained (and its validation accuracy when trained here).
    """

    store: str
    bias: BiasResult
    loss_at_zero: float
    loss_dense: float
    loss_stored: float | None
    bytes_before: int
    bytes_after: int
    supplement_bytes: int
    teacher: dict[str, Any]
    bond: list[int]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "loss_at_zero": self.loss_at_zero,
            "loss_dense": self.loss_dense,
            "loss_stored": self.loss_stored,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "supplement_bytes": self.supplement_bytes,
            "bond": self.bond,
            "dtype": self.dtype,
            "teacher": self.teacher,
            "fit": self.bias.summary(),
        }


def _decode_float(archive: Any, batch: int = 4096) -> np.ndarray:
    h, w, c = archive.image_shape
    out = np.empty((len(archive), h, w, c), dtype=np.float32)
    for s in range(0, len(archive), batch):
        out[s : s + batch] = np.asarray(archive.decode(slice(s, min(s + batch, len(archive))), kind="float")).reshape(-1, h, w, c)
    return out


def supplement_store(
    store: str | Path,
    original: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    teacher: str | nn.Module = "train",
    weights: str | Path | None = None,
    teacher_model: str = "small_cnn",
    recipe: Recipe | None = None,
    save_teacher_to: str | Path | None = None,
    bond: int | str | Sequence[int] = 2,
    dtype: str | None = None,
    temperature: float = 4.0,
    alpha: float = 0.0,
    epochs: int = 5,
    lr: float = 1.0,
    batch_size: int = 128,
    holdout: float = 0.1,
    shared: bool = True,
    l2: float = 0.0,
    projected: bool = True,
    device: torch.device | str = "cpu",
    seed: int = 0,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> SupplementReport:
    """Learn the task-specific bias for a store and add it as a supplement stage.

    Parameters
    ----------
    store : str or Path
        A committed mpsd store of the images ``original`` (same order).
    original : ndarray of shape (N, H, W) or (N, H, W, C)
        The original images S.
    labels : ndarray of shape (N,), optional
        Default: the store's labels.  Needed to train a teacher and for ``alpha > 0``.
    teacher : "train", "module:factory", a teacher file, or torch.nn.Module
        ``"train"`` trains ``teacher_model`` on ``original`` with ``recipe``.
    weights : str or Path, optional
        Weights for ``module:factory``.
    save_teacher_to : str or Path, optional
        Write a teacher trained here (``--save-teacher``).
    bond : int, str or sequence of int
        Bond dimensions of the supplement's MPS stage: one number for every bond, or one per bond
        (``"2,4,4,2"``); capped by the exact ranks.  They set its size.
    dtype : str, optional
        Core storage of the supplement stage (must be the store's own, the default).
    projected : bool
        Keep the bias storable while learning it (project it onto the supplement's low-bond MPS
        after every epoch, :func:`storage_projection`); otherwise the dense bias is compressed
        once at the end.
    dry_run : bool
        Learn the bias and report, but leave the store unchanged.
    temperature, alpha, epochs, lr, batch_size, holdout, shared, l2, seed
        See :func:`learn_bias`.

    Returns
    -------
    SupplementReport
    """
    import mpsd

    path = Path(store)
    archive = mpsd.open(path)
    bonds = _supplement_bonds(bond, len(archive.meta.layout.sites))
    if any(getattr(st, "role", None) == "supplement" for st in archive.meta.stages):
        raise OptionError(f"{path}: already has a supplement stage; supplement a store that has none")
    orig = nhwc(np.asarray(original))
    h, w, c = archive.image_shape
    if orig.shape != (len(archive), h, w, c):
        raise InputError(f"{path}: holds {len(archive)} images of {h}x{w}x{c}, the original images are {orig.shape}")
    if labels is None and archive.labels is not None:
        labels = np.asarray(archive.labels)
    max_value = 65535.0 if np.dtype(archive.dtype) == np.uint16 else 255.0
    teacher_info: dict[str, Any]
    if isinstance(teacher, nn.Module):
        net = teacher
        teacher_info = {"kind": "module", "class": type(teacher).__name__}
    elif teacher == "train":
        if labels is None:
            raise OptionError("--teacher train needs labels (the store has none)")
        net, fit_result = train_teacher(orig, labels, model=teacher_model, recipe=recipe, seed=seed, device=device, progress=progress)
        teacher_info = {"kind": "trained", "model": canonical_model_name(teacher_model), "val_acc": fit_result.best_val_acc, "epochs": fit_result.epochs}
        if save_teacher_to is not None:
            save_teacher(net, save_teacher_to)
            teacher_info["saved_to"] = str(save_teacher_to)
    else:
        k = int(labels.max()) + 1 if labels is not None and labels.size else len(archive.classes or ()) or 10
        net = load_teacher(teacher, weights=weights, in_channels=c, num_classes=k, image_size=(h, w))
        teacher_info = {"kind": "loaded", "spec": teacher, "weights": None if weights is None else str(weights)}
    net = net.to(torch.device(device))
    approx = _decode_float(archive)
    bytes_before = int(archive.bytes_on_disk)
    result = learn_bias(
        net, orig, approx, labels=labels, temperature=temperature, alpha=alpha, epochs=epochs, lr=lr,
        batch_size=batch_size, holdout=holdout, shared=shared, l2=l2, max_value=max_value,
        project=storage_projection(archive, bonds) if projected else None,
        device=device, seed=seed, progress=progress,
    )  # fmt: skip
    loss_stored: float | None = None
    supplement_bytes = 0
    bytes_after = bytes_before
    if not dry_run:
        try:
            from mpsd.archive import add_supplement
        except ImportError as exc:  # pragma: no cover - shipped with the archive package
            raise OptionError("this mpsd build cannot store supplements (mpsd.archive.add_supplement is missing)") from exc
        provenance = {"teacher": teacher_info, **{k: v for k, v in result.settings.items() if k != "device"}}
        add_supplement(path, result.bias, bond=bonds, dtype=dtype, settings={"kd": provenance})
        archive = mpsd.open(path)
        stored = _decode_float(archive)
        loss_stored = float(kd_loss(net, orig, stored, temperature=temperature, max_value=max_value, device=device).mean())
        bytes_after = int(archive.bytes_on_disk)
        supplement_bytes = int(getattr(archive.stats(), "supplement_bytes", 0) or 0)
    return SupplementReport(
        store=str(path),
        bias=result,
        loss_at_zero=result.initial_loss,
        loss_dense=result.final_loss,
        loss_stored=loss_stored,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        supplement_bytes=supplement_bytes,
        teacher=teacher_info,
        bond=list(bonds),
        dtype=str(archive.meta.storage_dtype),
    )


def storage_projection(archive: Any, bonds: Sequence[int], *, chunk: int = 1024) -> Callable[[np.ndarray], np.ndarray]:
    """The map from a dense bias to the bias a supplement stage of ``archive`` stores.

    It folds the bias onto the store's sites and truncates it to ``bonds`` by TT-SVD, quantised
    like the store's cores: exactly what ``mpsd.archive.add_supplement`` keeps.

    Parameters
    ----------
    archive : mpsd.Archive
    bonds : sequence of int
        One per bond of the store's MPS.

    Returns
    -------
    callable
        ``project(bias)``: ``(N, H, W, C)`` float32 in pixel units to the same shape.
    """
    from mpsd.core.codec import StageSpec, encode_batch

    meta = archive.meta
    layout = meta.layout
    spec = [StageSpec(bonds=tuple(int(b) for b in bonds))]
    max_value = float(meta.max_value)
    dtype = str(meta.storage_dtype)

    def project(bias: np.ndarray) -> np.ndarray:
        bias = nhwc(np.asarray(bias, dtype=np.float32))
        out = np.empty_like(bias)
        for start in range(0, bias.shape[0], chunk):
            part = bias[start : start + chunk]
            batch = encode_batch(layout.to_sites(part) / max_value, spec, dtype=dtype)
            out[start : start + chunk] = np.asarray(layout.from_sites(batch.reconstruction) * max_value).reshape(part.shape)
        return out

    return project


def _supplement_bonds(bond: int | str | Sequence[int], n_sites: int) -> tuple[int, ...]:
    """One bond per link of an MPS with ``n_sites`` sites, from ``4``, ``"4"`` or ``"2,4,4,2"``."""
    if isinstance(bond, str):
        try:
            values = tuple(int(v) for v in bond.replace(" ", "").split(",") if v)
        except ValueError:
            raise OptionError(f"--bond expects an integer or comma-separated integers, got {bond!r}") from None
    elif isinstance(bond, (int, np.integer)):
        values = (int(bond),)
    else:
        values = tuple(int(v) for v in bond)
    if not values or min(values) < 1:
        raise OptionError(f"supplement bonds must be positive integers, got {bond!r}")
    if len(values) == 1:
        values = values * (n_sites - 1)
    if len(values) != n_sites - 1:
        raise OptionError(f"the store's MPS has {n_sites - 1} bonds, got {len(values)} supplement bonds")
    return values
