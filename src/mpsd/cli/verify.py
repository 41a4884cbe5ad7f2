"""``mpsd verify``: check every file and chunk of a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from mpsd.cli._common import Split, parse_hw


def command(
    store: Annotated[Path, typer.Argument(help="An mpsd store.", show_default=False)],
    inputs: Annotated[Path | None, typer.Option("--inputs", help="Also check that these are the images the store was made from (CRC-32C of each chunk).")] = None,
    split: Annotated[Split, typer.Option(help="With --inputs: the split given to compress.")] = Split.train,
    resize: Annotated[str | None, typer.Option(help="With --inputs: the --resize given to compress.")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="With --inputs: as given to compress.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Read every chunk, check checksums and the SHA-256 manifest; exit 1 if anything is wrong.

    Examples:

        mpsd verify out.zarr

        mpsd verify out.zarr --inputs ./images      # and that ./images still holds what was compressed
    """
    from mpsd.archive.verify import verify_inputs, verify_store

    report = verify_store(store)
    if inputs is not None and report.ok:
        from mpsd.readers import open_source

        source = open_source(inputs, split=split.value, resize=parse_hw(resize), skip_bad=skip_bad)
        report = verify_inputs(store, source, report)
    if as_json:
        typer.echo(json.dumps({"path": report.path, "state": report.state, "problems": report.problems, "files_checked": report.files_checked}))
    else:
        for line in report.problems:
            typer.echo(f"{store}: {line}", err=True)
        typer.echo(f"{store}: {report.state} ({report.files_checked} files checked)")
    if not report.ok:
        raise typer.Exit(1)
