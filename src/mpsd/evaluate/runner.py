"""Run an evaluation: train the same classifier, with the same recipe, on every arm.

Protocol (identical for every arm):

1. The training images are split once (seeded, stratified) into a training part and a validation
   part (``val_fraction``).  Every arm is built from the training part only; the validation part
   stays original and is used only for early stopping and model selection.  The test set is never
   touched until the final evaluation.
2. For every repeat (seed ``seed + r``), each arm trains a freshly initialised model with the
   recipe until its validation accuracy has not improved for ``patience`` epochs; the weights of
   the best validation epoch are evaluated on the test set.
3. Arms that keep a subset of the images (coresets) are trained twice: with the recipe's epochs
   (*equal epochs*, fewer steps) and with epochs as long as the full training part's
   (*equal steps*).
4. Normalisation statistics come from the original training part and are the same for all arms.
5. The ``mpsd-kd`` arm (mpsd store + the supplement of Section 4.2) learns its bias from the
   original arm's model of the same seed, within the same budget.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpsd.archive.format import FORMAT_VERSION
from mpsd.errors import InputError, MissingExtraError, OptionError
from mpsd.evaluate.arms import (
    DEFAULT_METHODS,
    SEEDED_METHODS,
    TEACHER_METHODS,
    Arm,
    build_arm,
    build_kd_arm,
    store_arm,
)
from mpsd.evaluate.budget import Budget
from mpsd.evaluate.split import split_indices

__all__ = ["Dataset", "EvalConfig", "EvalReport", "load_dataset", "run_evaluation", "torch_integration"]

log = logging.getLogger(__name__)

Progress = Callable[[str, dict[str, Any]], None]


def torch_integration(feature: str = "mpsd evaluate") -> Any:
    """Import :mod:`mpsd.integrations.torch`, or raise :class:`MissingExtraError` naming ``feature``."""
    try:
        import mpsd.integrations.torch as integration
    except MissingExtraError:
        raise MissingExtraError("torch", "torch", feature) from None
    except ImportError as exc:  # pragma: no cover - a broken torch install
        raise MissingExtraError("torch", "torch", feature) from exc
    return integration


@dataclass
class Dataset:
    """Training and test images for an evaluation.

    Attributes
    ----------
    x_train : ndarray of shape (N, H, W, C), uint8
    y_train : ndarray of shape (N,), int64
    x_test : ndarray of shape (M, H, W, C), uint8
    y_test : ndarray of shape (M,), int64
    classes : list of str or None
    name : str
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str] | None = None
    name: str = "data"

    def __post_init__(self) -> None:
        for what, x, y in (("training", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.ndim == 3:
                x = x[..., None]
            if x.ndim != 4 or x.dtype != np.uint8:
                raise InputError(f"{self.name}: {what} images must be uint8 (N, H, W[, C]), got {x.dtype} {x.shape}")
            if y is None or np.asarray(y).shape != (x.shape[0],):
                raise InputError(f"{self.name}: {what} images need one label each")
            if what == "training":
                self.x_train = x
                self.y_train = np.asarray(y, dtype=np.int64)
            else:
                self.x_test = x
                self.y_test = np.asarray(y, dtype=np.int64)
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise InputError(f"{self.name}: training images {self.x_train.shape[1:]} and test images {self.x_test.shape[1:]} differ in shape")
        if self.x_train.shape[0] < 4:
            raise InputError(f"{self.name}: need at least 4 training images, got {self.x_train.shape[0]}")
        if self.x_test.shape[0] < 1:
            raise InputError(f"{self.name}: the test set is empty")

    @property
    def num_classes(self) -> int:
        k = int(max(self.y_train.max(), self.y_test.max())) + 1
        return max(k, len(self.classes or ()), 2)


def _subsample(x: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n is None or n >= x.shape[0]:
        return x, y
    if n < 1:
        raise OptionError(f"subset size must be >= 1, got {n}")
    _, keep = split_indices(x.shape[0], n / x.shape[0], seed=seed, labels=y)
    return x[keep], y[keep]


def load_dataset(
    path: str | Path,
    *,
    test: str | Path | None = None,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Read training and test images (``sample:fashion-mnist`` and ``sample:cifar10`` work too).

    Parameters
    ----------
    path : str or Path
        Anything :func:`mpsd.readers.open_source` reads with a ``train`` and a ``test`` split (an
        ``.npz`` with ``x_train``/``x_test``, CIFAR batches, idx files).
    test : str or Path, optional
        A separate source for the test set (its ``test`` split if it has one, else all of it).
    n_train, n_test : int, optional
        Stratified random subsets (seeded) of that many images.
    """
    from mpsd.readers import open_source

    def resolve(p: str | Path) -> Path:
        text = str(p)
        if text.startswith("sample:"):
            from mpsd.data import sample_path

            return sample_path(text.split(":", 1)[1])
        return Path(p)

    train_path = resolve(path)
    train_src = open_source(train_path, split="train")
    test_src = open_source(resolve(test) if test is not None else train_path, split="test")
    if train_src.labels is None or test_src.labels is None:
        raise InputError(f"{path}: evaluation needs labelled training and test images")
    if test is None and test_src.n_images == train_src.n_images and np.array_equal(test_src.read(0, 1), train_src.read(0, 1)):
        raise InputError(f"{path}: has no separate test split; give one with --test")
    x_train, y_train = _subsample(train_src.read(0, train_src.n_images), train_src.labels, n_train, seed)
    x_test, y_test = _subsample(test_src.read(0, test_src.n_images), test_src.labels, n_test, seed)
    name = str(path)
    return Dataset(x_train, y_train, x_test, y_test, classes=train_src.classes, name=name)


@dataclass
class EvalConfig:
    """Everything that defines an evaluation (see the module docstring for the protocol).

    Parameters
    ----------
    methods : tuple of str
        Arms, from :data:`mpsd.evaluate.arms.METHODS`.
    budgets : tuple of float
        Byte budgets as fractions of the raw size of the training part.
    param_ratios : tuple of float
        Parameter-ratio budgets (the paper's ρ), in addition to ``budgets``.
    model : str
        Classifier (``small_cnn``, ``resnet18``, ``vgg16``, ``mobilenetv2``).
    recipe : str
        ``"cpu"`` or ``"paper"``.
    recipe_overrides : dict
        Fields of :class:`mpsd.integrations.torch.train.Recipe` to change.
    repeats : int
        Seeds per arm (``seed``, ``seed + 1``, ...).
    seed : int
        Base seed; also seeds the validation split.
    equal_steps : bool
        Also train subset arms with as many steps as the full training part.
    mpsd_options : dict
        For the mpsd arm: ``residual_bonds``, ``dtype``, ``sites``, ``order``, ``colour``.
    baseline_options : dict of str to dict
        Per-baseline keyword options.
    kd_options : dict
        For the ``mpsd-kd`` arm: ``bond`` of the supplement (default ``"2"``) and options of
        :func:`mpsd.integrations.torch.supplement.learn_bias`.  Its teacher is the original arm's
        model of the same seed (trained the same way when ``original`` is not among the methods).
    store : Path, optional
        An existing store to add as an arm (``"store"``), trained as it is.
    device : str
        ``auto``, ``cpu``, ``cuda``, ``mps``.
    threads : int, optional
        torch CPU threads (default: all available).
    workers : int
        DataLoader workers for store arms.
    workdir : Path, optional
        Where mpsd stores are written (default: a temporary folder, removed afterwards).
    keep_stores : bool
        Keep the stores in ``workdir``.
    """

    methods: tuple[str, ...] = DEFAULT_METHODS
    budgets: tuple[float, ...] = (0.2,)
    param_ratios: tuple[float, ...] = ()
    model: str = "small_cnn"
    recipe: str = "cpu"
    recipe_overrides: dict[str, Any] = field(default_factory=dict)
    repeats: int = 1
    seed: int = 0
    equal_steps: bool = True
    mpsd_options: dict[str, Any] = field(default_factory=dict)
    baseline_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    kd_options: dict[str, Any] = field(default_factory=dict)
    store: Path | None = None
    device: str = "auto"
    threads: int | None = None
    workers: int = 0
    workdir: Path | None = None
    keep_stores: bool = False

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise OptionError(f"repeats must be >= 1, got {self.repeats}")
        if not self.methods and self.store is None:
            raise OptionError("nothing to evaluate: give methods or a store")
        budgeted = [m for m in self.methods if m != "original"]
        if budgeted and not (self.budgets or self.param_ratios):
            raise OptionError(f"methods {', '.join(budgeted)} need --budget or --param-ratio")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("store", "workdir"):
            d[key] = None if d[key] is None else str(d[key])
        return d


@dataclass
class EvalReport:
    """Result of :func:`run_evaluation`.

    Attributes
    ----------
    runs : list of dict
        One per trained model: arm description, ``protocol`` (``"equal-epochs"`` or
        ``"equal-steps"``), ``seed``, ``test_acc``, ``val_acc``, ``epochs``, ``best_epoch``,
        ``steps``, ``stopped_early``, ``seconds``.
    failures : list of dict
        Arms that could not be built (e.g. a method that cannot meet the budget), with the reason.
    summary : list of dict
        Runs aggregated over seeds (see :func:`mpsd.evaluate.report.summarise`).
    environment : dict
        Versions, device, threads, dataset sizes, the recipe.
    config : dict
    seconds : float
    complete : bool
        False for the reports handed to ``checkpoint`` while the evaluation is still running.
    """

    runs: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    environment: dict[str, Any]
    config: dict[str, Any]
    seconds: float
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _budgets(config: EvalConfig, raw_bytes: int) -> list[Budget]:
    out = [Budget("bytes", f, raw_bytes) for f in config.budgets]
    out += [Budget("ratio", r, raw_bytes) for r in config.param_ratios]
    return out


def run_evaluation(
    data: Dataset,
    config: EvalConfig,
    *,
    progress: Progress | None = None,
    checkpoint: Callable[[EvalReport], None] | None = None,
    resume_from: EvalReport | dict[str, Any] | None = None,
    teacher_dir: str | Path | None = None,
) -> EvalReport:
    """Train and test a classifier on every arm of ``config``; see the module docstring.

    Parameters
    ----------
    data : Dataset
        Training and test images.
    config : EvalConfig
    progress : callable, optional
        ``progress(event, info)``: ``"plan"`` (``runs``), ``"build"`` (``method``, ``budget``),
        ``"train"`` (``label``, ``epochs``), ``"epoch"`` (an epoch record), ``"run"`` (a finished
        run), ``"failure"``.
    checkpoint : callable, optional
        Called with the report so far (``complete=False``) after every finished run and every arm
        that could not be built, so that a long evaluation that is stopped keeps what it finished.
    resume_from : EvalReport or dict, optional
        A report of an earlier, stopped run of the same evaluation (``results.json``).  Its runs
        are kept and not trained again; arms with missing runs are rebuilt (deterministically,
        from the same seeds) and only those runs are trained.  Raises
        :class:`~mpsd.errors.OptionError` when the earlier report was made with different
        settings or data (see :func:`resume_mismatch`).
    teacher_dir : str or Path, optional
        Where the teacher of the ``mpsd-kd`` arms (the original arm's model) is kept, as
        ``teacher-seed{seed}.pt``, when those arms are planned.  A resumed evaluation whose
        original arm has finished loads it from there instead of training it again (with the
        paper's recipe that is hours), provided it was made with the same model, recipe, data and
        seed.

    Returns
    -------
    EvalReport
    """
    tt = torch_integration("mpsd evaluate")
    from mpsd.evaluate.report import summarise
    from mpsd.integrations.torch.data import ArrayDataset, StoreDataset, channel_stats
    from mpsd.integrations.torch.models import build_model, canonical_model_name
    from mpsd.integrations.torch.train import (
        configure_threads,
        evaluate,
        fit,
        get_recipe,
        seed_everything,
        select_device,
    )

    t_start = time.perf_counter()
    emit = progress or (lambda _e, _i: None)
    recipe = get_recipe(config.recipe, **config.recipe_overrides)
    model_name = canonical_model_name(config.model)
    threads = configure_threads(config.threads)
    device = select_device(config.device)
    val_fraction = recipe.val_fraction if recipe.val_fraction > 0 else 0.1
    train_idx, val_idx = split_indices(data.x_train.shape[0], val_fraction, seed=config.seed, labels=data.y_train)
    x_tr, y_tr = data.x_train[train_idx], data.y_train[train_idx]
    x_val, y_val = data.x_train[val_idx], data.y_train[val_idx]
    n, h, w, c = x_tr.shape
    raw_bytes = int(x_tr.nbytes)
    mean, std = channel_stats(x_tr)
    val_ds = ArrayDataset(x_val, y_val)
    test_ds = ArrayDataset(data.x_test, data.y_test)
    budgets = _budgets(config, raw_bytes)
    num_classes = data.num_classes
    full_steps = max(1, math.ceil(n / min(recipe.batch_size, n)))

    workdir = Path(config.workdir) if config.workdir is not None else Path(tempfile.mkdtemp(prefix="mpsd-evaluate-"))
    workdir.mkdir(parents=True, exist_ok=True)
    own_workdir = config.workdir is None

    # the plan: (method, budget) pairs; original has no budget
    plan: list[tuple[str, Budget | None]] = []
    for method in config.methods:
        if method == "original":
            plan.append((method, None))
        else:
            plan.extend((method, b) for b in budgets)
    emit("plan", {"arms": len(plan) + (config.store is not None), "repeats": config.repeats})

    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    seconds_before = 0.0
    cache: dict[tuple[str, str], Arm] = {}
    environment = {
        "mpsd_version": _mpsd_version(),
        "store_format": FORMAT_VERSION,
        "torch_version": tt.torch_version(),
        "device": str(device),
        "threads": threads,
        "dataset": {
            "name": data.name, "n_train": int(n), "n_val": int(val_idx.size), "n_test": int(data.x_test.shape[0]),
            "image_shape": [int(h), int(w), int(c)], "num_classes": num_classes, "raw_train_bytes": raw_bytes,
        },
        "model": model_name,
        "recipe": recipe.to_dict(),
        "workdir": str(workdir) if config.keep_stores or not own_workdir else None,
    }  # fmt: skip

    if resume_from is not None:
        previous = resume_from.to_dict() if isinstance(resume_from, EvalReport) else resume_from
        problem = resume_mismatch(previous, config, environment)
        if problem is not None:
            raise OptionError(f"cannot resume: {problem}")
        runs.extend(previous.get("runs") or [])
        failures.extend(previous.get("failures") or [])
        seconds_before = float(previous.get("seconds") or 0.0)
    done = {_run_key(run) for run in runs}

    def teacher_key(seed: int) -> str:
        """What a kept teacher must have been trained with to stand in for this run's."""
        import json

        key = {"model": model_name, "recipe": recipe.to_dict(), "dataset": environment["dataset"], "seed": seed,
               "channels_mean": [float(v) for v in np.ravel(mean)], "torch": tt.torch_version()}  # fmt: skip
        return json.dumps(_jsonable_config(key), sort_keys=True)

    def report(complete: bool) -> EvalReport:
        return EvalReport(
            runs=list(runs),
            failures=list(failures),
            summary=summarise(runs),
            environment=environment,
            config=config.to_dict(),
            seconds=seconds_before + time.perf_counter() - t_start,
            complete=complete,
        )

    try:
        def record_failure(method: str, budget: Budget | None, exc: Exception, first: bool) -> None:
            label = None if budget is None else budget.label
            known = any(f["method"] == method and (f.get("budget") or {}).get("label") == label for f in failures)
            if first and not known:
                failures.append({"method": method, "budget": None if budget is None else budget.to_dict(), "reason": str(exc)})
                emit("failure", failures[-1])
                if checkpoint is not None:
                    checkpoint(report(complete=False))
            log.info("%s at %s: %s", method, budget, exc)

        def finished(method: str, budget: Budget | None, seed: int) -> bool:
            """Whether the resumed run trained every protocol of this arm, so it need not be built."""
            label = None if budget is None else budget.label
            first = next((run for run in runs if _run_key(run) == (method, label, seed, "equal-epochs")), None)
            if first is None:
                return False
            return not (first.get("subset") and config.equal_steps) or (method, label, seed, "equal-steps") in done

        def train_arm(arm: Arm, seed: int) -> Any:
            """Train (and test) a fresh model on ``arm`` under each protocol; returns the last model."""
            if arm.store is not None:
                train_ds: Any = StoreDataset(arm.store, indices=arm.store_indices)
                if train_ds.image_shape != (h, w, c):
                    raise InputError(f"{arm.store}: images of {train_ds.image_shape}, the data has {(h, w, c)}")
            else:
                assert arm.images is not None
                train_ds = ArrayDataset(arm.images, arm.labels)
            protocols: list[tuple[str, int | None]] = [("equal-epochs", None)]
            if arm.subset and config.equal_steps:
                protocols.append(("equal-steps", full_steps))
            model = None
            for protocol, spe in protocols:
                if _run_key({**arm.describe(), "seed": seed, "protocol": protocol}) in done:
                    continue  # finished by the run this one resumes
                label = f"{arm.method} {arm.budget_label} seed {seed}" + (f" ({protocol})" if arm.subset else "")
                emit("train", {"label": label, "epochs": recipe.max_epochs})
                seed_everything(seed)
                model = build_model(model_name, c, num_classes, (h, w), mean=mean, std=std)
                result = fit(
                    model, train_ds, val_ds, recipe, device=device, seed=seed, steps_per_epoch=spe,
                    workers=config.workers if arm.store is not None else 0,
                    progress=lambda event, info: emit(event, info) if event == "epoch" else None,
                )  # fmt: skip
                test_acc, test_loss = evaluate(model, test_ds, device=device, batch_size=recipe.eval_batch_size)
                run = {
                    **arm.describe(),
                    "protocol": protocol,
                    "seed": seed,
                    "test_acc": test_acc,
                    "test_loss": test_loss,
                    "val_acc": result.best_val_acc,
                    "epochs": result.epochs,
                    "best_epoch": result.best_epoch,
                    "steps": result.steps,
                    "steps_per_epoch": spe or math.ceil(arm.n_images / min(recipe.batch_size, arm.n_images)),
                    "stopped_early": result.stopped_early,
                    "seconds": result.seconds,
                    "history": [asdict(rec) for rec in result.history],
                }
                runs.append(run)
                emit("run", run)
                if checkpoint is not None:
                    checkpoint(report(complete=False))
            return model

        for r in range(config.repeats):
            seed = config.seed + r
            arms: list[Arm] = []
            deferred: list[tuple[str, Budget]] = []
            for method, budget in plan:
                if finished(method, budget, seed):
                    continue  # every run of this arm was trained by the run this one resumes
                if method in TEACHER_METHODS:
                    assert budget is not None
                    deferred.append((method, budget))
                    continue
                key = (method, "" if budget is None else f"{budget.kind}{budget.fraction}")
                if key in cache and method not in SEEDED_METHODS:
                    arms.append(cache[key])
                    continue
                emit("build", {"method": method, "budget": None if budget is None else budget.label, "seed": seed})
                try:
                    arm = build_arm(
                        method, x_tr, y_tr, budget, seed=seed, workdir=workdir, classes=data.classes,
                        mpsd_options=config.mpsd_options, baseline_options=config.baseline_options.get(method),
                    )  # fmt: skip
                except OptionError as exc:
                    record_failure(method, budget, exc, r == 0)
                    continue
                cache[key] = arm
                arms.append(arm)
            if config.store is not None:
                if ("store", "") not in cache:
                    cache[("store", "")] = store_arm(Path(config.store), raw_bytes=raw_bytes)
                arms.append(cache[("store", "")])
            teacher = None
            for arm in arms:
                model = train_arm(arm, seed)
                if arm.method == "original" and model is not None:
                    teacher = model
                    if deferred and teacher_dir is not None:
                        _save_teacher(teacher, Path(teacher_dir), seed, teacher_key(seed))
            # arms that need a teacher: the original arm's model (or one trained the same way)
            for method, budget in deferred:
                if teacher is None:
                    teacher = build_model(model_name, c, num_classes, (h, w), mean=mean, std=std)
                    if teacher_dir is None or not _load_teacher(teacher, Path(teacher_dir), seed, teacher_key(seed)):
                        emit("train", {"label": f"teacher seed {seed}", "epochs": recipe.max_epochs})
                        seed_everything(seed)
                        teacher = build_model(model_name, c, num_classes, (h, w), mean=mean, std=std)
                        fit(teacher, ArrayDataset(x_tr, y_tr), val_ds, recipe, device=device, seed=seed,
                            progress=lambda event, info: emit(event, info) if event == "epoch" else None)  # fmt: skip
                        if teacher_dir is not None:
                            _save_teacher(teacher, Path(teacher_dir), seed, teacher_key(seed))
                    teacher.to(device)
                emit("build", {"method": method, "budget": budget.label, "seed": seed})
                try:
                    arm = build_kd_arm(
                        x_tr, y_tr, budget, teacher, seed=seed, workdir=workdir, classes=data.classes,
                        mpsd_options=config.mpsd_options, kd_options=config.kd_options, device=device,
                    )  # fmt: skip
                except OptionError as exc:
                    record_failure(method, budget, exc, r == 0)
                    continue
                train_arm(arm, seed)
    finally:
        if own_workdir and not config.keep_stores:
            shutil.rmtree(workdir, ignore_errors=True)

    return report(complete=True)


def _teacher_path(folder: Path, seed: int) -> Path:
    return folder / f"teacher-seed{seed}.pt"


def _save_teacher(model: Any, folder: Path, seed: int, key: str) -> None:
    """Keep the teacher's weights (written to a temporary name, then renamed)."""
    import os

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    path = _teacher_path(folder, seed)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"key": key, "state_dict": state}, tmp)
    os.replace(tmp, path)


def _load_teacher(model: Any, folder: Path, seed: int, key: str) -> bool:
    """Load a kept teacher into ``model`` if one made the same way exists; whether it did."""
    import torch

    path = _teacher_path(folder, seed)
    if not path.is_file():
        return False
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") != key:
            log.info("%s: made with other settings; the teacher is trained again", path)
            return False
        model.load_state_dict(saved["state_dict"])
    except Exception as exc:  # a damaged file: train again
        log.info("%s: cannot be read (%s); the teacher is trained again", path, exc)
        return False
    return True


def _run_key(run: dict[str, Any]) -> tuple[str, str | None, int, str]:
    budget = run.get("budget")
    return (run["method"], None if budget is None else budget.get("label"), int(run["seed"]), run["protocol"])


#: Settings that may change between a stopped evaluation and the run that resumes it.
RESUMABLE_CHANGES = frozenset({"repeats", "device", "threads", "workers", "workdir", "keep_stores"})


def resume_mismatch(previous: dict[str, Any], config: EvalConfig, environment: dict[str, Any]) -> str | None:
    """Why the report ``previous`` cannot be resumed with ``config`` on this data, or None.

    Every setting of :class:`EvalConfig` must be the same except those in
    :data:`RESUMABLE_CHANGES` (more repeats add seeds), and so must the dataset (name, sizes,
    image shape), the model and the recipe.
    """
    old_config = previous.get("config")
    old_env = previous.get("environment")
    if not isinstance(old_config, dict) or not isinstance(old_env, dict) or not isinstance(previous.get("runs"), list):
        return "not an mpsd evaluate report"
    new_config = _jsonable_config(config.to_dict())
    changed = sorted(
        key for key in set(old_config) | set(new_config)
        if key not in RESUMABLE_CHANGES and _jsonable_config(old_config.get(key)) != new_config.get(key)
    )  # fmt: skip
    if changed:
        detail = ", ".join(f"{k} was {old_config.get(k)!r}, now {new_config.get(k)!r}" for k in changed)
        return f"the earlier run had other settings ({detail})"
    for key in ("dataset", "model", "recipe"):
        if _jsonable_config(old_env.get(key)) != _jsonable_config(environment.get(key)):
            return f"the earlier run had another {key} ({old_env.get(key)!r}, now {environment.get(key)!r})"
    # the store format decides how many bytes an mpsd arm takes, hence what it keeps at a budget
    old_format = old_env.get("store_format", 1)
    if old_format != environment.get("store_format"):
        return f"the earlier run wrote mpsd stores in format {old_format!r}, this mpsd writes format {environment.get('store_format')!r}"
    return None


def _jsonable_config(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples as lists), for comparing with a loaded report."""
    import json

    from mpsd.evaluate.report import _jsonable

    return json.loads(json.dumps(_jsonable(value)))


def _mpsd_version() -> str:
    import mpsd

    return str(mpsd.__version__)


def methods_needing_budget(methods: Sequence[str]) -> list[str]:
    """The methods of ``methods`` that need a budget (all but ``original``)."""
    return [m for m in methods if m != "original"]
