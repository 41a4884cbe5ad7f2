"""Readers turn files on disk into an :class:`~mpsd.readers.base.ImageSource`.

:func:`open_source` picks the reader from the path:

- a folder: images in it (recursively), class subfolders as labels (:mod:`mpsd.readers.folder`);
- ``.npz`` / ``.npy``: arrays (:mod:`mpsd.readers.arrays`);
- CIFAR-10/100 python batches, a folder of them, or ``cifar-*-python.tar.gz`` (:mod:`mpsd.readers.cifar`);
- MNIST-style idx files, raw or ``.gz`` (:mod:`mpsd.readers.idx`);
- ``sample:cifar10`` / ``sample:fashion-mnist``: the small real datasets shipped in :mod:`mpsd.data`.
"""

from __future__ import annotations

from pathlib import Path

from mpsd.errors import InputError
from mpsd.readers.base import ImageSource, source_from_array

__all__ = ["ImageSource", "open_source", "source_from_array"]


def open_source(
    path: str | Path,
    *,
    split: str = "train",
    resize: tuple[int, int] | None = None,
    skip_bad: bool = False,
) -> ImageSource:
    """Open images at ``path`` with the reader its name and content call for.

    Parameters
    ----------
    path : str or Path
        File or folder.
    split : {"train", "test"}
        Split to read from datasets that have both.
    resize : (int, int), optional
        ``(H, W)`` to resize every image of a folder to (otherwise mixed sizes are an error).
    skip_bad : bool
        Leave out undecodable files of a folder (recorded in ``ImageSource.skipped``) instead of
        stopping.
    """
    if str(path).startswith("sample:"):
        from mpsd.data import sample_path

        path = sample_path(str(path).removeprefix("sample:"))
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: no such file or folder")
    if split not in ("train", "test"):
        raise InputError(f"{path}: --split must be 'train' or 'test', got {split!r}")
    if path.is_file() and path.suffix.lower() in (".npz", ".npy"):
        from mpsd.readers.arrays import read_array_file

        return read_array_file(path, split=split)
    try:
        from mpsd.readers import cifar, idx
    except ImportError:  # pragma: no cover - modules ship with the package
        cifar = idx = None  # type: ignore[assignment]
    if cifar is not None and cifar.is_cifar(path):
        return cifar.read_cifar(path, split=split)
    if idx is not None and idx.is_idx(path):
        return idx.read_idx(path, split=split)
    if path.is_dir():
        from mpsd.readers.folder import read_folder

        return read_folder(path, resize=resize, skip_bad=skip_bad)
    raise InputError(
        f"{path}: not a folder, .npz/.npy, CIFAR batch or idx file (cannot tell how to read it)"
    )
