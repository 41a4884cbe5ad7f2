"""Reader for ``.npz`` and ``.npy`` arrays.

``.npz`` files hold ``x_train``/``y_train`` (and ``x_test``/``y_test``; pick with ``split``) or
``x``/``y``, optionally ``classes``.  ``.npy`` files hold the images alone.  Pickled object arrays
are never loaded (``allow_pickle=False``); members larger than the cap are refused before reading.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from mpsd.errors import InputError
from mpsd.readers.base import ImageSource, source_from_array

#: Largest uncompressed ``.npz`` member we agree to read (bytes).
MAX_MEMBER_BYTES = 16 * 2**30


def _check_npz_members(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.file_size > MAX_MEMBER_BYTES:
                    raise InputError(
                        f"{path}: member {info.filename!r} would inflate to {info.file_size} bytes "
                        f"(cap {MAX_MEMBER_BYTES})"
                    )
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: not a valid .npz (zip) file: {exc}") from exc


def _load(arrays: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return arrays[key]
    except ValueError as exc:  # object arrays need pickle, which we refuse
        raise InputError(f"{path}: array {key!r} needs pickle to load, refused ({exc})") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{path}: array {key!r} cannot be read: {exc}") from exc


def read_array_file(path: str | Path, *, split: str = "train") -> ImageSource:
    """Open a ``.npz`` or ``.npy`` file of images.

    Parameters
    ----------
    path : str or Path
        The file.
    split : {"train", "test"}
        Which split of an ``.npz`` with ``x_train``/``x_test`` to read.

    Returns
    -------
    ImageSource
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if split not in ("train", "test"):
        raise InputError(f"{path}: split must be 'train' or 'test', got {split!r}")
    if path.suffix == ".npy":
        try:
            images = np.load(path, allow_pickle=False, mmap_mode="r")
        except ValueError as exc:
            raise InputError(f"{path}: cannot load without pickle ({exc})") from exc
        return source_from_array(images, path=str(path))
    _check_npz_members(path)
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read as .npz: {exc}") from exc
    with arrays:
        keys = set(arrays.files)
        if f"x_{split}" in keys:
            xkey, ykey = f"x_{split}", f"y_{split}"
        elif "x" in keys:
            xkey, ykey = "x", "y"
        else:
            raise InputError(
                f"{path}: expected arrays 'x_{split}' or 'x', found {sorted(keys) or 'none'}"
            )
        images = _load(arrays, xkey, path)
        labels = _load(arrays, ykey, path) if ykey in keys else None
        classes = None
        if "classes" in keys:
            classes = [str(c) for c in _load(arrays, "classes", path).tolist()]
    if images.shape[0] == 0:
        raise InputError(f"{path}: array {xkey!r} holds no images")
    if labels is not None and labels.dtype.kind not in "iu":
        raise InputError(f"{path}: labels {ykey!r} must be integers, got {labels.dtype}")
    return source_from_array(images, labels=labels, classes=classes, path=str(path))
