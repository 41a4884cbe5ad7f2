"""``mpsd stats``: what a store holds and how well."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table


def command(
    store: Annotated[Path, typer.Argument(help="An mpsd store.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")] = False,
) -> None:
    """Report compression ratio, bytes on disk, entanglement entropy and errors of a store.

    Examples:

        mpsd stats out.zarr

        mpsd stats out.zarr --json
    """
    from mpsd.api import open as open_store

    s = open_store(store).stats()
    if as_json:
        typer.echo(json.dumps(s.to_dict(), indent=2))
        return
    table = Table(title=f"mpsd store {store}", show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    h, w, c = s.image_shape
    table.add_row("images", f"{s.images:,}")
    table.add_row("image shape", f"{h}x{w}x{c} {s.image_dtype}")
    table.add_row("sites", f"{','.join(map(str, s.sites))} ({s.order}, colour {s.colour})")
    for i, st in enumerate(s.stages):
        ranks = ",".join(f"{r:g}" for r in st.mean_ranks)
        table.add_row(f"stage {i + 1} ({st.role})", f"bonds {','.join(map(str, st.bonds))}; mean ranks {ranks}; ρ {st.param_ratio:.4f}; {st.bytes_on_disk:,} B")
    table.add_row("core dtype", f"{s.core_dtype} (store format {s.format_version})")
    table.add_row("parameter ratio ρ", f"{s.param_ratio:.4f}")
    table.add_row("bytes on disk", f"{s.bytes_on_disk:,} ({s.bytes_per_image:,.1f} per image)")
    table.add_row("raw bytes", f"{s.raw_bytes:,}")
    table.add_row("byte ratio", f"{s.byte_ratio:.4f} ({1 / s.byte_ratio:.2f}x smaller)" if s.byte_ratio else "-")
    if s.supplement_bytes:
        table.add_row("supplement bytes", f"{s.supplement_bytes:,}")
    if not s.metrics_recorded:
        table.add_row("quality", "not recorded (compressed with --no-metrics)")
    else:
        table.add_row("entropy per bond", ", ".join(f"{e:.4f}" for e in s.entropy))
        table.add_row("PSNR", "lossless" if s.psnr is None else f"{s.psnr:.2f} dB (mean per image {s.psnr_mean:.2f} dB)")
        table.add_row("relative error", f"{s.rel_error:.5f}")
        table.add_row("Theorem 1 bound", f"{s.error_bound:.5f}")
    Console().print(table)
