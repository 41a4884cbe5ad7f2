"""``mpsd evaluate``: train a classifier on original, mpsd and baseline training sets; compare."""

from __future__ import annotations

import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from mpsd.cli._common import RecipeName


class Schedule(StrEnum):
    cosine = "cosine"
    step = "step"
    plateau = "plateau"
    constant = "constant"


class Augment(StrEnum):
    none = "none"
    crop = "crop"
    flip = "flip"
    crop_flip = "crop+flip"


class CoreDtype(StrEnum):
    int8 = "int8"
    float16 = "float16"
    float32 = "float32"


def _expected_runs(config: Any) -> int:
    subset = {"random", "kcenter"}
    per_budget = len(config.budgets) + len(config.param_ratios)
    total = 0
    for m in config.methods:
        if m == "original":
            total += 1
        else:
            total += per_budget * (2 if m in subset and config.equal_steps else 1)
    return (total + (config.store is not None)) * config.repeats


def command(
    data: Annotated[str, typer.Argument(help="Training and test images: .npz with x_train/x_test, CIFAR batches, idx files, or sample:fashion-mnist / sample:cifar10.", show_default=False)],
    test: Annotated[Path | None, typer.Option(help="A separate test set (default: the test split of DATA).")] = None,
    methods: Annotated[str, typer.Option(help="Arms: original, mpsd, mpsd-kd (mpsd + supplement), ice, svd, cp, tucker, random, kcenter, jpeg, webp, or 'all'.")] = "original,mpsd,ice,svd,random",
    budget: Annotated[str | None, typer.Option(help="Byte budgets as fractions of the raw training set, e.g. 0.1,0.2,0.4.")] = "0.2",
    param_ratio: Annotated[str | None, typer.Option(help="Parameter-ratio budgets (the paper's ρ), e.g. 0.4,0.7.")] = None,
    store: Annotated[Path | None, typer.Option(help="Also train on this existing store (e.g. one with a supplement), as it is.")] = None,
    model: Annotated[str, typer.Option(help="small_cnn, resnet18, vgg16 or mobilenetv2.")] = "small_cnn",
    recipe: Annotated[RecipeName, typer.Option(help="cpu: short CPU recipe; paper: SGD 0.1, batch 128, 180 epochs, cosine.")] = RecipeName.cpu,
    max_epochs: Annotated[int | None, typer.Option(help="Epoch limit (overrides the recipe).")] = None,
    patience: Annotated[int | None, typer.Option(help="Early-stopping patience in epochs (0: never stop early).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Training batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Initial learning rate.")] = None,
    schedule: Annotated[Schedule | None, typer.Option(help="Learning-rate schedule.")] = None,
    augment: Annotated[Augment | None, typer.Option(help="Batch augmentation.")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="Share of the training images held out for validation.")] = None,
    repeats: Annotated[int, typer.Option(help="Seeds per arm; accuracies are reported as mean ± std.")] = 1,
    seed: Annotated[int, typer.Option(help="Base seed (also seeds the validation split and subsets).")] = 0,
    n_train: Annotated[int | None, typer.Option(help="Use a stratified random subset of this many training images.")] = None,
    n_test: Annotated[int | None, typer.Option(help="Use a stratified random subset of this many test images.")] = None,
    residual_bond: Annotated[list[str] | None, typer.Option("--residual-bond", help="mpsd arm: bonds of a residual stage, e.g. 2,2,2,2; repeat for more.")] = None,
    core_dtype: Annotated[CoreDtype, typer.Option(help="mpsd arm: how cores are stored.")] = CoreDtype.int8,
    kd_bond: Annotated[str, typer.Option(help="mpsd-kd arm: bonds of the supplement stage (one number for all, or one per bond).")] = "2",
    kd_epochs: Annotated[int, typer.Option(help="mpsd-kd arm: passes of Adam over the images to learn the bias.")] = 5,
    kd_temperature: Annotated[float, typer.Option(help="mpsd-kd arm: temperature T of the KD loss.")] = 4.0,
    equal_steps: Annotated[bool, typer.Option("--equal-steps/--no-equal-steps", help="Also train coresets with as many steps as the full set.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: all available).")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes for store arms.")] = 0,
    out: Annotated[Path, typer.Option(help="Folder for results.json and results.md (rewritten after every finished run, marked partial until the end).")] = Path("mpsd-evaluate"),
    keep_stores: Annotated[Path | None, typer.Option(help="Keep the mpsd stores built for the arms in this folder.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the stopped evaluation whose results are in --out: keep its finished runs, train only the missing ones (same settings and data required).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Train the same classifier on each training set and report test accuracy.

    Every arm is built from the same training images at the same budget; a validation split of the training images (kept original) drives early stopping, and the best-validation model is tested on the untouched test set.  Writes results.json and results.md to --out.  Needs torch (the torch extra of mpsd).

    Examples:

        mpsd evaluate sample:fashion-mnist --methods original,mpsd,random --budget 0.2

        mpsd evaluate fashion_mnist.npz --n-train 2000 --budget 0.2,0.4 --repeats 3

        mpsd evaluate cifar10.npz --model resnet18 --recipe paper --param-ratio 0.4,0.7 --methods all
    """
    from mpsd.errors import OptionError
    from mpsd.evaluate import (
        EvalConfig,
        load_dataset,
        parse_fractions,
        parse_methods,
        run_evaluation,
        torch_integration,
        write_report,
    )

    torch_integration("mpsd evaluate")
    from mpsd.integrations.torch.models import canonical_model_name
    from mpsd.integrations.torch.train import get_recipe

    canonical_model_name(model)
    overrides = {
        "max_epochs": max_epochs, "patience": patience, "batch_size": batch_size, "lr": lr,
        "schedule": None if schedule is None else schedule.value,
        "augment": None if augment is None else augment.value, "val_fraction": val_fraction,
    }  # fmt: skip
    overrides = {k: v for k, v in overrides.items() if v is not None}
    get_recipe(recipe.value, **overrides)  # validate before loading anything
    if kd_temperature <= 0:
        raise OptionError(f"--kd-temperature must be > 0, got {kd_temperature}")
    if n_train is not None and n_train < 4:
        raise OptionError(f"--n-train must be at least 4, got {n_train}")
    budgets = parse_fractions(budget, what="--budget")
    ratios = parse_fractions(param_ratio, what="--param-ratio")
    config = EvalConfig(
        methods=parse_methods(methods),
        budgets=budgets,
        param_ratios=ratios,
        model=model,
        recipe=recipe.value,
        recipe_overrides=overrides,
        repeats=repeats,
        seed=seed,
        equal_steps=equal_steps,
        mpsd_options={"residual_bonds": tuple(residual_bond or ()), "dtype": core_dtype.value},
        kd_options={"bond": kd_bond, "epochs": kd_epochs, "temperature": kd_temperature},
        store=store,
        device=device,
        threads=threads,
        workers=workers,
        workdir=keep_stores,
        keep_stores=keep_stores is not None,
    )
    _check_output_folder(out)  # before hours of training, not after
    previous = _previous_results(out) if resume else None
    dataset = load_dataset(data, test=test, n_train=n_train, n_test=n_test, seed=seed)
    finished = len(previous.get("runs") or []) if previous is not None else 0

    def checkpoint(partial: Any) -> None:
        # every finished run is on disk at once: a long evaluation that is stopped keeps them
        nonlocal finished
        write_report(partial.to_dict(), out)
        finished = len(partial.runs)

    try:
        if quiet:
            report = run_evaluation(dataset, config, checkpoint=checkpoint, resume_from=previous, teacher_dir=out)
        else:
            report = _run_with_progress(dataset, config, run_evaluation, checkpoint, previous, teacher_dir=out)
    except KeyboardInterrupt:
        if finished:
            print(f"mpsd: the {finished} finished run(s) are in {out / 'results.json'} (marked partial)", file=sys.stderr)
        raise
    result = report.to_dict()
    json_path, md_path = write_report(result, out)
    _print_table(result)
    from rich.console import Console

    Console(stderr=True, highlight=False).print(f"results: {json_path}, {md_path} ({report.seconds:.0f} s)")


def _check_output_folder(out: Path) -> None:
    """Create ``out`` if needed and make sure files can be written there (a one-line error if not)."""
    import os
    import tempfile

    from mpsd.errors import OptionError

    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mpsd-write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OptionError(f"--out {out}: cannot write the results there ({exc.strerror or exc})") from None


def _previous_results(out: Path) -> dict[str, Any] | None:
    """The report in ``out/results.json`` to resume, or None when there is none yet."""
    import json

    from mpsd.errors import InputError

    path = out / "results.json"
    if not path.exists():
        return None
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot resume from it: {exc}") from None
    if not isinstance(previous, dict):
        raise InputError(f"{path}: cannot resume from it: not an mpsd evaluate report")
    return previous


def _run_with_progress(dataset: Any, config: Any, run: Any, checkpoint: Any, previous: Any = None, teacher_dir: Any = None) -> Any:
    from mpsd.cli._common import event_progress

    progress = event_progress()
    overall = progress.add_task("models trained", total=_expected_runs(config), info="")
    current = progress.add_task("building arms", total=None, info="")

    def drop_failed(method: str) -> None:
        total = progress.tasks[overall].total or 0
        drop = config.repeats * (2 if method in ("random", "kcenter") and config.equal_steps else 1)
        progress.update(overall, total=max(0, total - drop))

    if previous is not None:  # resuming: what the earlier run finished or could not build
        progress.update(overall, completed=len(previous.get("runs") or []))
        for failure in previous.get("failures") or []:
            drop_failed(failure.get("method", ""))

    def on_event(event: str, info: dict[str, Any]) -> None:
        if event == "build":
            progress.update(current, description=f"building {info['method']} {info['budget'] or ''}".rstrip(), total=None, completed=0, info="")
        elif event == "train":
            progress.update(current, description=info["label"], total=info["epochs"], completed=0, info="")
        elif event == "epoch":
            progress.update(current, advance=1, info=f"val acc {100 * info['val_acc']:.2f}%")
        elif event == "run":
            progress.update(overall, advance=1, info=f"last: {info['method']} {100 * info['test_acc']:.2f}%")
            progress.update(current, completed=progress.tasks[current].total or 0)
        elif event == "failure":
            drop_failed(info["method"])
            progress.console.print(f"[yellow]{info['method']} at {(info.get('budget') or {}).get('label', '')}: {info['reason']}[/]")

    with progress:
        return run(dataset, config, progress=on_event, checkpoint=checkpoint, resume_from=previous, teacher_dir=teacher_dir)


def _print_table(result: dict[str, Any]) -> None:
    """Print the summary as a markdown table on stdout (readable in a terminal, pasteable anywhere)."""
    from mpsd.evaluate.report import markdown_table

    typer.echo(markdown_table(result), nl=False)
