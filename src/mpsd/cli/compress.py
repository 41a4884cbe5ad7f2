"""``mpsd compress``: images in, committed store out."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from mpsd.cli._common import Split, console, parse_hw, progress_bar


class Order(StrEnum):
    quadtree = "quadtree"
    row = "row"


class ColourMode(StrEnum):
    separate = "separate"
    site = "site"


class CoreDtype(StrEnum):
    int8 = "int8"
    float16 = "float16"
    float32 = "float32"


def command(
    source: Annotated[Path, typer.Argument(help="Image folder, .npz/.npy, CIFAR batches or idx files.", show_default=False)],
    store: Annotated[Path, typer.Argument(help="Store to create (a folder, e.g. out.zarr).", show_default=False)],
    bond: Annotated[str | None, typer.Option(help="Largest bond dimensions of the first stage, e.g. 4,6,6,4 (capped by the exact ranks).")] = None,
    tol: Annotated[float | None, typer.Option(help="Relative Frobenius error allowed per image (ranks differ per image).")] = None,
    ratio: Annotated[float | None, typer.Option(help="Target parameter ratio for the dataset, all stages together.")] = None,
    residual_bond: Annotated[list[str] | None, typer.Option("--residual-bond", help="Bonds of a residual stage; repeat for more stages.")] = None,
    sites: Annotated[str, typer.Option(help="'auto', a number of sites, site dimensions 4,4,4,4,4, or pairs 2x2,2x2,...")] = "auto",
    order: Annotated[Order, typer.Option(help="Pixel addressing: quadtree (coarse to fine) or row (C-order reshape).")] = Order.quadtree,
    colour: Annotated[ColourMode, typer.Option("--colour", "--color", help="One MPS per channel, or channels as a last site.")] = ColourMode.separate,
    dtype: Annotated[CoreDtype, typer.Option(help="How cores are stored.")] = CoreDtype.int8,
    split: Annotated[Split, typer.Option(help="Split of datasets that have train and test.")] = Split.train,
    resize: Annotated[str | None, typer.Option(help="Resize every image of a folder to HxW.")] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Leave out unreadable images (recorded in the store) instead of stopping.")] = False,
    chunk_images: Annotated[int, typer.Option(help="Images per chunk.")] = 1024,
    workers: Annotated[int | None, typer.Option(help="Encoding threads (default: all CPUs).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store once the new one is committed.")] = False,
    metrics: Annotated[bool, typer.Option("--metrics/--no-metrics", help="Keep per-image entropy, errors and PSNR for stats (--no-metrics: only what decoding needs).")] = True,
    resume: Annotated[bool, typer.Option("--resume", help="Continue a killed or interrupted run of the same command: its chunks are checked and kept, the rest is encoded.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Compress a dataset of images into an MPS store.

    Examples:

        mpsd compress ./images out.zarr --bond 4,6,6,4

        mpsd compress fashion_mnist.npz fm.zarr --bond 2,6,5,2 --residual-bond 2,2,2,2

        mpsd compress big.npz big.zarr --tol 0.05 --resume   # after a crash or Ctrl-C
    """
    import sys

    from mpsd.api import compress
    from mpsd.archive.writer import interrupted_runs
    from mpsd.core._kernels import tune_allocator
    from mpsd.readers import open_source

    tune_allocator()  # the CLI owns its process: keep freed batch memory for reuse (glibc)

    images = open_source(source, split=split.value, resize=parse_hw(resize), skip_bad=skip_bad)
    if not quiet and (overwrite or not store.exists()):
        runs = interrupted_runs(store)
        if resume:
            what = f"an interrupted run wrote {runs[0][1]:,} images; checking them" if runs else "no interrupted run to resume; starting from the beginning"
            console.print(f"{store}: {what}")
        elif runs:
            console.print(f"{store}: discarding what an interrupted run wrote ({runs[0][1]:,} images); --resume would have continued it")
    try:
        with progress_bar("compress", images.n_images, quiet=quiet) as update:
            archive = compress(
                images,
                store,
                bond=bond,
                tol=tol,
                ratio=ratio,
                residual_bonds=residual_bond or (),
                sites=sites,
                order=order.value,
                colour=colour.value,
                dtype=dtype.value,
                chunk_images=chunk_images,
                workers=workers,
                overwrite=overwrite,
                metrics=metrics,
                resume=resume,
                progress=update,
            )
    except KeyboardInterrupt:
        runs = interrupted_runs(store)
        if not runs:
            raise
        print(f"mpsd: interrupted; {runs[0][1]:,} images are written. The same command with --resume continues.", file=sys.stderr)
        sys.exit(130)
    if not quiet:
        s = archive.stats()
        psnr = "not recorded" if not s.metrics_recorded else "lossless" if s.psnr is None else f"{s.psnr:.2f} dB"
        console.print(
            f"{store}: {s.images} images, {s.bytes_on_disk:,} bytes on disk "
            f"({s.byte_ratio:.1%} of raw), parameter ratio {s.param_ratio:.3f}, PSNR {psnr}"
        )
        if images.skipped:
            console.print(f"[yellow]skipped {len(images.skipped)} unreadable files (listed in the store metadata)[/]")
