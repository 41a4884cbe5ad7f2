"""``mpsd decompress``: store in, PNG files or one .npz out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mpsd.cli._common import console, parse_select, progress_bar


def command(
    store: Annotated[Path, typer.Argument(help="An mpsd store.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="A folder for PNG files, or a file ending in .npz.", show_default=False)],
    select: Annotated[str | None, typer.Option(help="Images to decode: start:stop[:step] or i,j,k.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Rebuild the images of a store.

    PNG files keep the original relative names (with a .png extension) and class folders; a
    .npz holds x (images), y (labels) and classes.

    Examples:

        mpsd decompress out.zarr ./recon

        mpsd decompress out.zarr recon.npz --select 0:100
    """
    from mpsd.api import open as open_store
    from mpsd.archive.export import export_npz, export_pngs
    from mpsd.core._kernels import tune_allocator

    tune_allocator()  # the CLI owns its process: keep freed batch memory for reuse (glibc)

    archive = open_store(store)
    selection = parse_select(select, len(archive))
    total = len(range(len(archive))[selection]) if isinstance(selection, slice) else len(selection)
    writer = export_npz if out.suffix.lower() == ".npz" else export_pngs
    with progress_bar("decompress", total, quiet=quiet) as update:
        n = writer(archive, out, selection, overwrite=overwrite, progress=update)
    if not quiet:
        console.print(f"{out}: {n} images")
