"""The library API the CLI is a thin layer over: :func:`compress`, :func:`open`, :func:`decompress`."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from mpsd._threads import available_cpus, blas_single_thread
from mpsd.archive.format import IMAGE_DTYPES, StageMeta, StoreMeta
from mpsd.archive.reader import Archive
from mpsd.archive.writer import StoreWriter, source_crc32c
from mpsd.core import _kernels
from mpsd.core.codec import EncodedBatch, Pixels, StageSpec, encode_batch
from mpsd.core.layout import SiteLayout, choose_layout
from mpsd.core.quantize import check_storage_dtype
from mpsd.core.ttsvd import check_bonds
from mpsd.errors import OptionError, StoreError
from mpsd.readers import ImageSource, open_source, source_from_array

log = logging.getLogger(__name__)

#: Truncation used when no ``bond``, ``tol`` or ``ratio`` is given.
DEFAULT_TOL = 0.05
#: Images per chunk along the image axis (one chunk per core array holds this many images).
DEFAULT_CHUNK_IMAGES = 1024
#: Images per encoding task at most: pieces small enough for the working set to stay in cache.
TASK_IMAGES = 128
#: Bytes of float64 tensors per encoding task at most (fewer images than TASK_IMAGES for large
#: images): a task's temporaries stay in the allocator's heap instead of fresh memory-mapped pages
#: (see :func:`task_images`).
TASK_BYTES = 8 * 2**20


def parse_bonds(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """Parse ``"4,6,6,4"`` (or a sequence) into a tuple of ints."""
    if text is None:
        return None
    if isinstance(text, str):
        try:
            values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
        except ValueError:
            raise OptionError(f"bonds must be comma-separated integers like 4,6,6,4, got {text!r}") from None
    else:
        values = tuple(int(v) for v in text)
    if not values:
        raise OptionError("bonds must not be empty")
    return values


def plan_stages(
    layout: SiteLayout,
    *,
    bond: str | Sequence[int] | None,
    tol: float | None,
    ratio: float | None,
    residual_bonds: Sequence[str | Sequence[int]] = (),
) -> list[StageSpec]:
    """Turn the truncation options into one :class:`StageSpec` per stage, validated against the sites."""
    sites = layout.sites
    bonds = parse_bonds(bond)
    if bonds is not None:
        bonds = check_bonds(bonds, sites)
    if tol is not None and not (0 <= tol < 1):
        raise OptionError(f"--tol must be in [0, 1), got {tol}")
    if ratio is not None and not (0 < ratio <= 1):
        raise OptionError(f"--ratio must be in (0, 1], got {ratio}")
    if tol is not None and ratio is not None:
        raise OptionError("--tol and --ratio cannot be combined (each chooses the ranks)")
    if bonds is None and tol is None and ratio is None:
        tol = DEFAULT_TOL
    residual = [check_bonds(parse_bonds(rb) or (), sites) for rb in residual_bonds]
    if ratio is not None and residual:
        from mpsd.core.ttsvd import parameter_count

        used = sum(int(parameter_count(sites, np.asarray(rb))) for rb in residual)
        total = int(np.prod(sites))
        ratio = ratio - used / total
        if ratio <= 0:
            raise OptionError(f"--ratio leaves nothing for the first stage: the residual stages already use {used / total:.3f}")
    stages = [StageSpec(bonds=bonds, tol=tol, ratio=ratio)]
    stages += [StageSpec(bonds=rb) for rb in residual]
    return stages


def _as_source(
    images: np.ndarray | ImageSource | str | Path,
    labels: np.ndarray | None,
    classes: Sequence[str] | None,
    names: Sequence[str] | None,
) -> ImageSource:
    if isinstance(images, ImageSource):
        return images
    if isinstance(images, (str, Path)):
        return open_source(images)
    return source_from_array(
        np.asarray(images),
        labels=labels,
        classes=list(classes) if classes is not None else None,
        names=list(names) if names is not None else None,
    )


def _encode_images(
    images: np.ndarray, layout: SiteLayout, stages: Sequence[StageSpec], dtype: str, max_value: int,
    metrics: bool = True,
) -> tuple[EncodedBatch, np.ndarray]:
    """Encode (B, H, W, C) integer images; returns the batch and each image's squared pixel error.

    The batch comes back without its ``reconstruction`` (an empty (B·M, 0) array): only the
    squared pixel error is needed from it, computed while each tensor is in cache, and a chunk's
    memory stays small.  Without ``metrics`` none of the numbers are computed and the squared
    errors are NaN.
    """
    tensors = _kernels.fold_scaled(images, layout, max_value)  # layout.to_sites(images) / max_value
    batch = encode_batch(tensors, stages, dtype=dtype, metrics=metrics, pixels=Pixels(layout, max_value))
    if not metrics:
        return batch, np.full(images.shape[0], np.nan)
    assert batch.pixel_squared_error is not None
    return batch, batch.pixel_squared_error


def task_images(values_per_image: int) -> int:
    """Images per encoding task: :data:`TASK_IMAGES`, fewer when their tensors pass :data:`TASK_BYTES`.

    A task's float64 tensors and the temporaries of its size stay in glibc's heap while they are
    under its ``mmap`` threshold (8 MiB once :func:`mpsd.core._kernels.tune_allocator` ran, as the
    CLI does); larger ones are mapped afresh for every task, and the first write to them costs
    page faults (and, with numpy's transparent-huge-page advice, memory compaction).  At least 16
    images, though: fewer leave the eigensolver's blocks of 16 matrices partly empty (tasks of 6
    colour images took 6–13 % more user time than tasks of 16).  CIFAR-10 and Fashion-MNIST tasks
    keep their 128 images (3 MiB and 0.8 MiB); 224×224 colour images get 16.  Measured
    2026-12-08 on 2 vCPUs, 224×224 colour images at ``--tol 0.05``: ``mpsd.compress`` of an
    array 229 → 449 img/s (system time 4.7 → 0.2 ms per image), ``mpsd compress`` of 1,024
    images 5.0–6.3 → 4.1–4.4 s with peak RSS 1.14–1.20 → 0.60–0.63 GB.
    """
    return int(min(TASK_IMAGES, max(16, TASK_BYTES // (8 * max(int(values_per_image), 1)))))


def _split_chunk(block: np.ndarray, specs: Sequence[StageSpec], n_workers: int) -> list[np.ndarray]:
    """Pieces of a chunk to encode in parallel.

    ``ratio`` spends its budget across the batch it is given, so its pieces stay one per worker
    (as they always were); every other mode encodes each image on its own and is split into
    cache-sized pieces of :func:`task_images` images (the store is the same whatever the split).
    """
    b = block.shape[0]
    if any(s.ratio is not None for s in specs):
        return np.array_split(block, min(n_workers, b))
    per_task = task_images(math.prod(block.shape[1:]))
    n_pieces = max(min(n_workers, b), -(-b // per_task))
    return np.array_split(block, n_pieces)


def _concat_batches(parts: list[EncodedBatch]) -> EncodedBatch:
    """Join batches encoded in parallel (cores padded to the largest rank)."""
    if len(parts) == 1:
        return parts[0]
    from mpsd.core.codec import EncodedStage

    stages = []
    for i in range(len(parts[0].stages)):
        ss = [p.stages[i] for p in parts]
        cores = []
        for k in range(len(ss[0].cores)):
            r0 = max(s.cores[k].shape[1] for s in ss)
            r1 = max(s.cores[k].shape[3] for s in ss)
            padded = []
            for s in ss:
                c = s.cores[k]
                z = np.zeros((c.shape[0], r0, c.shape[2], r1), dtype=c.dtype)
                z[:, : c.shape[1], :, : c.shape[3]] = c
                padded.append(z)
            cores.append(np.concatenate(padded))
        stages.append(
            EncodedStage(
                cores=cores,
                scales=None if ss[0].scales is None else np.concatenate([s.scales for s in ss]),  # type: ignore[misc]
                ranks=np.concatenate([s.ranks for s in ss]),
                local_errors=np.concatenate([s.local_errors for s in ss]),
                bound=np.concatenate([s.bound for s in ss]),
            )
        )
    return EncodedBatch(
        stages=stages,
        entropy=np.concatenate([p.entropy for p in parts]),
        norm=np.concatenate([p.norm for p in parts]),
        error=np.concatenate([p.error for p in parts]),
        reconstruction=np.concatenate([p.reconstruction for p in parts]),
        pixel_squared_error=None if any(p.pixel_squared_error is None for p in parts)
        else np.concatenate([p.pixel_squared_error for p in parts]),  # type: ignore[misc]
    )


def compress(
    images: np.ndarray | ImageSource | str | Path,
    path: str | Path,
    *,
    bond: str | Sequence[int] | None = None,
    tol: float | None = None,
    ratio: float | None = None,
    residual_bonds: Sequence[str | Sequence[int]] = (),
    sites: str | int | Sequence[int] | None = None,
    order: str = "quadtree",
    colour: str = "separate",
    dtype: str = "int8",
    labels: np.ndarray | None = None,
    classes: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
    workers: int | None = None,
    overwrite: bool = False,
    metrics: bool = True,
    resume: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Archive:
    """Compress images into an mpsd store.

    Parameters
    ----------
    images : ndarray of shape (N, H, W) or (N, H, W, C), ImageSource, or path
        uint8/uint16 images, an opened reader, or a file/folder for :func:`mpsd.readers.open_source`.
    path : str or Path
        Store to create (a folder).
    bond : str or sequence of int, optional
        Largest bond dimension of each of the n−1 bonds of the first stage, e.g. ``"4,6,6,4"``;
        each is capped by the exact rank.  May cap ``tol`` or ``ratio``.
    tol : float, optional
        Relative Frobenius error allowed per image for the first stage (ranks differ per image).
    ratio : float, optional
        Target parameter ratio ρ for the whole dataset (all stages): parameters kept / pixels.
    residual_bonds : sequence of bonds
        One entry per residual stage (Algorithm 2), each decomposing what the earlier stages left.
    sites : "auto", int, or site dimensions, optional
        See :func:`mpsd.core.layout.choose_layout`.
    order : {"quadtree", "row"}
    colour : {"separate", "site"}
    dtype : {"int8", "float16", "float32"}
        How cores are stored.
    labels, classes, names : optional
        Stored with the images (for array input; readers provide their own).
    chunk_images : int
        Images per chunk.
    workers : int, optional
        Encoding threads (default: the CPUs available).  BLAS is pinned to one thread.
    overwrite : bool
        Replace an existing store (only after the new one is committed).
    metrics : bool
        Keep the per-image numbers (entropy, local truncation errors, stored error, pixel error)
        that ``stats`` reports.  ``False`` keeps only what decoding needs: smaller stores, and
        ``stats`` then reports sizes and ratios but no quality numbers.
    resume : bool
        Continue a run that was killed or interrupted (Ctrl-C) with the same input and settings:
        the chunks it wrote are checked and kept, the source images behind them must have the
        same CRC-32C (they are read again, not encoded), and encoding goes on from the first
        chunk it did not finish.  The store is the same, file for file, as an uninterrupted
        run's.  Without such a run it starts from the beginning.  An interrupted run with other
        settings is refused (:class:`~mpsd.errors.OptionError`), and so is a changed input
        (:class:`~mpsd.errors.InputError`); its temporary store is then left for a later resume.
    progress : callable, optional
        Called with the number of images finished after every chunk.

    Returns
    -------
    Archive
        The committed store, opened.

    With no ``bond``, ``tol`` or ``ratio``, ``tol = 0.05`` (:data:`DEFAULT_TOL`) is used.
    """
    source = _as_source(images, labels, classes, names)
    check_storage_dtype(dtype)
    if chunk_images < 1:
        raise OptionError(f"--chunk-images must be >= 1, got {chunk_images}")
    h, w, c = source.image_shape
    layout = choose_layout(h, w, c, sites=sites, order=order, colour=colour)  # type: ignore[arg-type]
    specs = plan_stages(layout, bond=bond, tol=tol, ratio=ratio, residual_bonds=residual_bonds)
    image_dtype = np.dtype(source.dtype).name
    if image_dtype not in IMAGE_DTYPES:
        raise OptionError(f"{source.path}: images must be uint8 or uint16, got {image_dtype}")
    max_value = IMAGE_DTYPES[image_dtype]
    meta = StoreMeta(
        layout=layout,
        image_dtype=image_dtype,
        channel_axis=source.channel_axis,
        n_images=source.n_images,
        stages=[
            StageMeta(role="image" if i == 0 else "residual", bonds=s.max_bonds(layout.sites), spec=s.to_dict())
            for i, s in enumerate(specs)
        ],
        storage_dtype=dtype,
        chunk_images=chunk_images,
        classes=source.classes,
        has_labels=source.labels is not None,
        has_names=source.names is not None,
        has_metrics=metrics,
        source={
            "path": os.path.basename(str(source.path)),
            "conversions": source.conversions,
            "skipped": [list(s) for s in source.skipped],
        },
    )
    n_workers = max(1, workers or available_cpus())
    try:
        _write_store(source, path, meta, layout, specs, dtype, max_value, chunk_images, n_workers, overwrite, resume, progress)
    except OSError as exc:
        # ENOSPC, EIO, EACCES while writing: the temporary store is gone, an old store is intact
        raise StoreError(f"{path}: writing the store failed: {exc.strerror or exc}") from exc
    return Archive(path)


def _write_store(
    source: ImageSource,
    path: str | Path,
    meta: StoreMeta,
    layout: SiteLayout,
    specs: Sequence[StageSpec],
    dtype: str,
    max_value: int,
    chunk_images: int,
    n_workers: int,
    overwrite: bool,
    resume: bool,
    progress: Callable[[int], None] | None,
) -> None:
    # Pipeline: the workers encode chunk k+1 while one I/O thread writes chunk k (zstd and the
    # file writes release the GIL).  At most two chunks are in flight, so memory
    # does not grow with the number of images.
    def encode(part: np.ndarray) -> tuple[EncodedBatch, np.ndarray]:
        return _encode_images(part, layout, specs, dtype, max_value, meta.has_metrics)

    # a ratio budget is spent across each worker's piece of a chunk: the worker count decides the
    # stored bytes, so a resumed run must use the same
    run_settings = {"workers": n_workers} if any(s.ratio is not None for s in specs) else {}
    with (
        StoreWriter(path, meta, overwrite=overwrite, resume=resume, run_settings=run_settings) as writer,
        blas_single_thread(),
        ThreadPoolExecutor(n_workers) as pool,
        ThreadPoolExecutor(1) as io,
    ):
        done = skip = writer.resumed_images
        if skip and progress is not None:
            progress(done)
        writing: tuple[Future[None], int] | None = None
        queued: tuple[int, int, list[Future[tuple[EncodedBatch, np.ndarray]]]] | None = None

        def finish_write() -> None:
            nonlocal writing, done
            if writing is not None:
                future, n_done = writing
                writing = None
                future.result()
                done += n_done
                if progress is not None:
                    progress(done)

        def flush(item: tuple[int, int, list[Future[tuple[EncodedBatch, np.ndarray]]]]) -> None:
            nonlocal writing
            start, crc, futures = item
            results = [f.result() for f in futures]
            batch = _concat_batches([r[0] for r in results])
            sq_error = np.concatenate([r[1] for r in results])
            finish_write()
            writing = (io.submit(writer.write_batch, start, batch, sq_error, crc), sq_error.shape[0])

        try:
            for start, block in source.iter_chunks(chunk_images):
                crc = source_crc32c(block)
                if start < skip:  # written by the interrupted run this one resumes
                    writer.check_resumed_chunk(start, crc)
                    continue
                futures = [pool.submit(encode, piece) for piece in _split_chunk(block, specs, n_workers)]
                if queued is not None:
                    flush(queued)
                queued = (start, crc, futures)
            if queued is not None:
                flush(queued)
                queued = None
            finish_write()
        finally:
            if queued is not None:
                for f in queued[2]:
                    f.cancel()
        if source.labels is not None:
            writer.write_labels(source.labels)
        if source.names is not None:
            writer.write_names(source.names)
        writer.commit()


def open(path: str | Path) -> Archive:
    """Open a committed store for reading; ``mpsd.open(path)[i]`` decodes image i."""
    return Archive(path)
