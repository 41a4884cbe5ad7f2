"""``mpsd supplement``: learn the task-specific bias of Section 4.2 and store it in the archive."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mpsd.cli._common import RecipeName, Split


def command(
    store: Annotated[Path, typer.Argument(help="The mpsd store to supplement (changed in place).", show_default=False)],
    original: Annotated[str, typer.Option(help="The original images the store was made from (same order): .npz, folder, CIFAR, idx, or sample:NAME.", show_default=False)],
    teacher: Annotated[str, typer.Option(help="'train' (mpsd trains --teacher-model on the originals), module:factory or file.py:factory (with --weights), or a teacher .pt from --save-teacher.")] = "train",
    weights: Annotated[Path | None, typer.Option(help="state_dict for a module:factory teacher (loaded with weights_only=True).")] = None,
    split: Annotated[Split, typer.Option(help="Split of --original to read.")] = Split.train,
    teacher_model: Annotated[str, typer.Option(help="Model for --teacher train: small_cnn, resnet18, vgg16, mobilenetv2.")] = "small_cnn",
    recipe: Annotated[RecipeName, typer.Option(help="Training recipe for --teacher train.")] = RecipeName.cpu,
    max_epochs: Annotated[int | None, typer.Option(help="Epoch limit for --teacher train.")] = None,
    save_teacher: Annotated[Path | None, typer.Option(help="Save the teacher trained here (reuse with --teacher FILE.pt).")] = None,
    temperature: Annotated[float, typer.Option(help="Softmax temperature T of the KD loss.")] = 4.0,
    alpha: Annotated[float, typer.Option(help="Weight of an extra cross-entropy term with the labels (0: KD only).")] = 0.0,
    epochs: Annotated[int, typer.Option(help="Passes of Adam over the images.")] = 5,
    lr: Annotated[float, typer.Option(help="Adam learning rate, in pixel levels per step.")] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 128,
    holdout: Annotated[float, typer.Option(help="Share of images held out of the fit to measure the loss on.")] = 0.1,
    shared: Annotated[bool, typer.Option("--shared/--no-shared", help="Learn a bias shared by all images besides the per-image one.")] = True,
    projected: Annotated[bool, typer.Option("--projected/--no-projected", help="Keep the bias storable while learning it (project onto the low-bond MPS after every epoch).")] = True,
    l2: Annotated[float, typer.Option(help="L2 penalty on the bias.")] = 0.0,
    bond: Annotated[str, typer.Option(help="Bond dimensions of the stored supplement stage (its size): one number for all bonds, or one per bond like 2,4,4,2.")] = "2",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: all available).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the teacher training, the held-out split and the batch order.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Learn and report, but leave the store unchanged.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Learn the task-specific bias S̃ by distillation from a teacher and add it to the store.

    The bias starts at zero and is trained so that the teacher's outputs on the decoded store plus S̃ match its outputs on the original images (KD loss with temperature T, Eq. 6 of the paper).  It is stored as a low-bond MPS stage: decoding then returns MPSTotal(S) + S̃, and mpsd stats counts its bytes.  Needs torch (the torch extra of mpsd); uses a GPU when there is one.

    Examples:

        mpsd supplement fm.zarr --original fashion_mnist.npz --teacher train --bond 4

        mpsd supplement fm.zarr --original fashion_mnist.npz --teacher mynets:resnet --weights resnet.pt

        mpsd supplement fm.zarr --original fashion_mnist.npz --teacher teacher.pt --temperature 2 --alpha 0.1
    """
    from mpsd.errors import MissingExtraError, OptionError

    try:
        from mpsd.evaluate import torch_integration

        torch_integration("mpsd supplement")
    except MissingExtraError:
        raise MissingExtraError("torch", "torch", "mpsd supplement") from None
    from mpsd.integrations.torch.supplement import supplement_store
    from mpsd.integrations.torch.train import configure_threads, get_recipe, select_device
    from mpsd.readers import open_source

    if temperature <= 0:
        raise OptionError(f"--temperature must be > 0, got {temperature}")
    if teacher != "train" and save_teacher is not None:
        raise OptionError("--save-teacher only applies to --teacher train")
    if weights is not None and teacher == "train":
        raise OptionError("--weights only applies to --teacher module:factory")
    configure_threads(threads)
    dev = select_device(device)
    rec = get_recipe(recipe.value, max_epochs=max_epochs)
    source_path: Path
    if original.startswith("sample:"):
        from mpsd.data import sample_path

        source_path = sample_path(original.split(":", 1)[1])
    else:
        source_path = Path(original)
    source = open_source(source_path, split=split.value)
    images = source.read(0, source.n_images)
    if quiet or as_json:
        report = supplement_store(
            store, images, labels=source.labels, teacher=teacher, weights=weights, teacher_model=teacher_model,
            recipe=rec, save_teacher_to=save_teacher, bond=bond, temperature=temperature,
            alpha=alpha, epochs=epochs, lr=lr, batch_size=batch_size, holdout=holdout, shared=shared, l2=l2,
            projected=projected, device=dev, seed=seed, dry_run=dry_run,
        )  # fmt: skip
    else:
        report = _with_progress(
            lambda progress: supplement_store(
                store, images, labels=source.labels, teacher=teacher, weights=weights, teacher_model=teacher_model,
                recipe=rec, save_teacher_to=save_teacher, bond=bond, temperature=temperature,
                alpha=alpha, epochs=epochs, lr=lr, batch_size=batch_size, holdout=holdout, shared=shared, l2=l2,
                projected=projected, device=dev, seed=seed, dry_run=dry_run, progress=progress,
            )
        )  # fmt: skip
    result = report.to_dict()
    if as_json:
        typer.echo(json.dumps(_jsonable(result), indent=2))
        return
    _print_report(result, dry_run=dry_run)


def _jsonable(obj: Any) -> Any:
    import math

    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _with_progress(work: Any) -> Any:
    from mpsd.cli._common import event_progress

    progress = event_progress()
    state: dict[str, Any] = {"task": None, "phase": "teacher"}

    def on_event(event: str, info: dict[str, Any]) -> None:
        if event == "start" and "steps" in info:  # the bias fit
            state["phase"] = "bias"
            if state["task"] is not None:
                progress.update(state["task"], completed=progress.tasks[state["task"]].total or 0)
            initial = info.get("initial", {})
            state["task"] = progress.add_task("learning the bias", total=info["steps"], info=f"held-out KD {initial.get('heldout_loss', float('nan')):.4f}")
        elif event == "start":  # teacher training
            state["task"] = progress.add_task("training the teacher (epochs)", total=info["epochs"], info="")
        elif event == "epoch" and state["phase"] == "teacher":
            progress.update(state["task"], advance=1, info=f"val acc {100 * info['val_acc']:.2f}%")
        elif event == "epoch":
            progress.update(state["task"], info=f"held-out KD {info['heldout_loss']:.4f}, fit KD {info['fit_loss']:.4f}")
        elif event == "step" and state["phase"] == "bias":
            progress.update(state["task"], advance=1)

    with progress:
        return work(on_event)


def _print_report(result: dict[str, Any], *, dry_run: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    fit = result["fit"]
    table = Table(title=f"supplement of {result['store']}" + (" (dry run: store unchanged)" if dry_run else ""), show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    teacher = result["teacher"]
    desc = teacher.get("model") or teacher.get("spec") or teacher.get("class")
    if teacher.get("val_acc") is not None:
        desc = f"{desc} (trained here, val acc {100 * teacher['val_acc']:.2f}%)"
    table.add_row("teacher", str(desc))
    table.add_row("KD loss at S̃ = 0", f"{result['loss_at_zero']:.4f}")
    table.add_row("KD loss, dense bias", f"{result['loss_dense']:.4f}")
    if result["loss_stored"] is not None:
        bonds = ",".join(map(str, result["bond"]))
        table.add_row(f"KD loss, stored bias (bonds {bonds})", f"{result['loss_stored']:.4f}")
    if fit["heldout_images"]:
        table.add_row("held-out KD loss", f"{fit['heldout_initial']:.4f} → {fit['heldout_final']:.4f} ({fit['heldout_images']} images)")
    table.add_row("bias RMS", f"{fit['bias_rms']:.2f} pixel levels")
    if not dry_run:
        table.add_row("supplement bytes", f"{result['supplement_bytes']:,}")
        table.add_row("store bytes", f"{result['bytes_before']:,} → {result['bytes_after']:,}")
    table.add_row("time", f"{fit['seconds']:.1f} s")
    Console().print(table)
