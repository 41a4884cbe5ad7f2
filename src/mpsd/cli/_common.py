"""Shared CLI helpers: progress bars and option parsing."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from enum import StrEnum

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from mpsd.errors import OptionError

console = Console(stderr=True, highlight=False)


class Split(StrEnum):
    """Split of datasets that have train and test."""

    train = "train"
    test = "test"


class RecipeName(StrEnum):
    """Training recipe of the torch commands."""

    cpu = "cpu"
    paper = "paper"


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} images/s", style="cyan")


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A rich progress bar shown from the first update on; yields ``update(n_done)``.

    Starting lazily keeps option errors (raised before any work) on one clean line.
    """
    if quiet:
        yield lambda _done: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = progress.add_task(description, total=total)

    def update(done: int) -> None:
        if not progress.live.is_started:
            progress.start()
        progress.update(task, completed=done)

    try:
        yield update
    finally:
        if progress.live.is_started:
            progress.stop()


def event_progress() -> Progress:
    """A progress display whose tasks carry an ``info`` field (for multi-phase torch commands)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def parse_hw(text: str | None) -> tuple[int, int] | None:
    """Parse ``HxW`` (e.g. ``32x32``)."""
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise OptionError(f"--resize expects HxW like 32x32, got {text!r}") from None
    if h < 1 or w < 1:
        raise OptionError(f"--resize: sizes must be positive, got {text!r}")
    return h, w


def parse_select(text: str | None, n: int) -> slice | list[int]:
    """Parse ``--select``: ``start:stop[:step]`` or ``i,j,k``."""
    if text is None:
        return slice(None)
    text = text.strip()
    try:
        if ":" in text:
            parts = [int(p) if p else None for p in text.split(":")]
            if len(parts) > 3:
                raise ValueError
            return slice(*parts)
        picks = [int(p) for p in text.split(",") if p]
    except ValueError:
        raise OptionError(f"--select expects start:stop or i,j,k, got {text!r}") from None
    bad = [i for i in picks if not -n <= i < n]
    if bad:
        raise OptionError(f"--select: index {bad[0]} out of range for {n} images")
    return picks
