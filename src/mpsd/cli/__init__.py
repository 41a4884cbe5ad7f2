"""The ``mpsd`` command line: a thin layer over the library API.

Each command lives in its own module and exposes ``command(...)`` (a function with Typer
``Annotated`` parameters) which parses options, calls library code and prints with rich.  User
errors (:class:`mpsd.errors.MpsdError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from mpsd.errors import MissingExtraError, MpsdError

app = typer.Typer(
    name="mpsd",
    help="Compress image datasets with matrix product states into chunked Zarr v3 stores.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    from mpsd.cli import compress, decompress, stats, verify

    app.command("compress")(compress.command)
    app.command("decompress")(decompress.command)
    app.command("stats")(stats.command)
    app.command("verify")(verify.command)
    try:
        from mpsd.cli import evaluate, supplement
    except ImportError:  # pragma: no cover - modules ship with the package
        return
    app.command("supplement")(supplement.command)
    app.command("evaluate")(evaluate.command)


_register()


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``mpsd: error: message`` on stderr and return the Exit to raise."""
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[bold red]mpsd: error:[/] {message}", markup=True
    )
    return typer.Exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``mpsd`` console script and ``python -m mpsd``."""
    try:
        app(args=argv, prog_name="mpsd", standalone_mode=True)
    except (MpsdError, MissingExtraError) as exc:
        from rich.console import Console

        Console(stderr=True, highlight=False, soft_wrap=True).print(f"mpsd: error: {exc}", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        print("mpsd: interrupted", file=sys.stderr)
        sys.exit(130)
