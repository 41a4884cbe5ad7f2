"""``mpsd verify``: check every file and chunk of a store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def command(
    store: Annotated[Path, typer.Argument(help="An mpsd store.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Read every chunk, check checksums and the SHA-256 manifest; exit 1 if anything is wrong.

    Example:

        mpsd verify out.zarr
    """
    from mpsd.archive.verify import verify_store

    report = verify_store(store)
    if as_json:
        typer.echo(json.dumps({"path": report.path, "state": report.state, "problems": report.problems, "files_checked": report.files_checked}))
    else:
        for line in report.problems:
            typer.echo(f"{store}: {line}", err=True)
        typer.echo(f"{store}: {report.state} ({report.files_checked} files checked)")
    if not report.ok:
        raise typer.Exit(1)
