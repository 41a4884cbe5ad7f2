"""Reader for the CIFAR-10 and CIFAR-100 "python version" batches.

Accepted inputs:

- one batch file: ``data_batch_<n>``, ``test_batch`` (CIFAR-10) or ``train``, ``test``
  (CIFAR-100); class names come from ``batches.meta`` / ``meta`` beside it when present, and
  ``split`` is ignored (the file is the split);
- a folder holding the batches (or holding ``cifar-10-batches-py`` / ``cifar-100-python``, as the
  archives extract to);
- the archive ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (any name with ``cifar``
  ending ``.tar.gz``, ``.tgz`` or ``.tar``), read in memory with :mod:`tarfile` and never
  extracted.

``split="train"`` reads ``data_batch_1``, ``data_batch_2``, … in order (they must be numbered
from 1 without gaps) or CIFAR-100's ``train``; ``split="test"`` reads ``test_batch`` or ``test``.

The batches are pickles, and unpickling runs whatever code a pickle names.  They are therefore
loaded with :class:`SafeUnpickler`, which resolves only the few globals that the numpy arrays and
bytes in these files need (each wrapped to accept only the arguments numpy itself writes) and refuses
everything else with :class:`pickle.UnpicklingError`, turned into an
:class:`~mpsd.errors.InputError` naming the file.  The loaded structure is then validated: a
dict with ``data`` (uint8, shape (N, 3072)) and ``labels`` or ``fine_labels`` (N integers within
the class range).

Images come out as (N, 32, 32, 3) uint8: CIFAR stores each row channel-planar (1024 red, 1024
green, 1024 blue values), so rows are reshaped to (3, 32, 32) and transposed.
"""

from __future__ import annotations

import io
import pickle
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from mpsd.errors import InputError
from mpsd.readers.base import ImageSource

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct  # type: ignore[no-redef]

#: Largest batch or meta file (bytes) read, from a folder or an archive (CIFAR-100 ``train`` is
#: about 155 MB).
MAX_MEMBER_BYTES = 256 * 2**20

#: Largest total of the member sizes declared in an archive (bytes); bounds decompression work.
MAX_ARCHIVE_BYTES = 1 * 2**30

#: Most members looked at in an archive (the real ones hold fewer than ten).
MAX_ARCHIVE_MEMBERS = 1000

#: Shape of one CIFAR image, (H, W, C).
IMAGE_SHAPE = (32, 32, 3)

_ROW_BYTES = 32 * 32 * 3
_BATCH = re.compile(r"data_batch_([1-9][0-9]*)")
_CIFAR10_NAMES = ("test_batch", "batches.meta")
_CIFAR100_NAMES = ("train", "test", "meta")
_SUBFOLDERS = ("cifar-10-batches-py", "cifar-100-python")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


# --------------------------------------------------------------------------- safe unpickling


class RefusedPickle(pickle.UnpicklingError):
    """A pickle named a global, or called an allowed one with arguments, that is not allowed."""


def _reconstruct(subtype: Any, shape: Any, code: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` restricted to the empty ndarray numpy pickles."""
    if subtype is not np.ndarray or code not in (b"b", "b"):
        raise RefusedPickle("_reconstruct called with arguments numpy never writes")
    if not (isinstance(shape, tuple) and all(type(d) is int and d >= 0 for d in shape)):
        raise RefusedPickle("_reconstruct called with an invalid shape")
    if int(np.prod(shape, dtype=object)) > MAX_MEMBER_BYTES:
        raise RefusedPickle(f"_reconstruct asked for {shape} elements, refused")
    return cast(np.ndarray, _np_reconstruct(np.ndarray, shape, b"b"))


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype`` restricted to plain numeric types (``u1``, ``i8``, ``f4``, …)."""
    if isinstance(spec, bytes):
        spec = spec.decode("ascii", "replace")
    if not (isinstance(spec, str) and re.fullmatch(r"[biuf][1248]", spec)):
        raise RefusedPickle(f"numpy dtype {spec!r} is not allowed")
    return np.dtype(spec, align=bool(align), copy=bool(copy))


def _bytes(*args: Any) -> bytes:
    """``bytes()`` with no argument: how protocol-2 pickles from Python 3 write ``b""``."""
    if args:
        raise RefusedPickle("bytes() is only allowed without arguments")
    return b""


def _latin1(text: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` restricted to what Python 3 pickles of bytes use: ``(str, "latin1")``."""
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict"):
        raise RefusedPickle("_codecs.encode is only allowed as encode(str, 'latin1')")
    return text.encode("latin1")


#: The only globals a CIFAR batch may name, each mapped to a guarded stand-in.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`; nothing else can be called.

    Any other global raises :class:`RefusedPickle` (a :class:`pickle.UnpicklingError`) before
    anything is called; so do the allowed ones when given arguments numpy never writes.

    Python 2 strings load as bytes (``encoding="bytes"``), as the CIFAR site recommends.
    """

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__(file, encoding="bytes")

    def find_class(self, module: str, name: str) -> Any:
        """Return the guarded stand-in for ``module.name``; refuse every other global."""
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except (KeyError, TypeError):
            raise RefusedPickle(
                f"global '{module}.{name}' is not allowed (a CIFAR batch holds only numpy arrays, "
                "lists, numbers and strings)"
            ) from None


def safe_loads(data: bytes, *, where: str) -> Any:
    """Unpickle ``data`` with :class:`SafeUnpickler`.

    Raises
    ------
    InputError
        For any failure, including a refused global; ``where`` names the file in the message.
    """
    try:
        return SafeUnpickler(io.BytesIO(data)).load()
    except RefusedPickle as exc:
        raise InputError(f"{where}: refused to unpickle: {_one_line(exc)}") from None
    except Exception as exc:  # any failure on hostile bytes is bad input, never a crash
        raise InputError(
            f"{where}: not a valid CIFAR batch (unpickling failed: {type(exc).__name__}: "
            f"{_one_line(exc)})"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- validation


def _keys(obj: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise InputError(f"{where}: a CIFAR {what} must be a dict, found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if isinstance(key, bytes):
            key = key.decode("latin1")
        if isinstance(key, str):
            out[key] = value
    return out


def _class_names(obj: Any, where: str) -> list[str]:
    """Class names from ``batches.meta`` (``label_names``) or ``meta`` (``fine_label_names``)."""
    meta = _keys(obj, where, "meta file")
    names = meta.get("fine_label_names", meta.get("label_names"))
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, (bytes, str)) for n in names)
    ):
        raise InputError(
            f"{where}: expected 'label_names' or 'fine_label_names' as a list of strings, "
            f"found keys {sorted(meta)}"
        )
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _batch(obj: Any, where: str, n_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(data (N, 3072) uint8, labels (N,) int64)`` of one unpickled batch."""
    batch = _keys(obj, where, "batch")
    if "data" not in batch:
        raise InputError(f"{where}: no 'data' in the batch (keys: {sorted(batch)})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise InputError(f"{where}: 'data' must be a uint8 array, found {kind}")
    if data.ndim != 2 or data.shape[1] != _ROW_BYTES or data.shape[0] == 0:
        raise InputError(
            f"{where}: 'data' must have shape (N, {_ROW_BYTES}) with N >= 1, found {data.shape}"
        )
    key = "fine_labels" if "fine_labels" in batch else "labels"
    if key not in batch:
        raise InputError(
            f"{where}: no 'labels' or 'fine_labels' in the batch (keys: {sorted(batch)})"
        )
    raw = batch[key]
    if isinstance(raw, np.ndarray):
        ok = raw.ndim == 1 and raw.dtype.kind in "iu"
        labels = raw.astype(np.int64) if ok else None
    else:
        ok = isinstance(raw, list) and all(type(v) is int for v in raw)
        labels = (
            np.array(raw, dtype=np.int64)
            if ok and all(-(2**63) <= v < 2**63 for v in raw)
            else None
        )
    if labels is None:
        raise InputError(f"{where}: '{key}' must be a list of integers")
    if labels.shape[0] != data.shape[0]:
        raise InputError(f"{where}: {data.shape[0]} images but {labels.shape[0]} {key}")
    limit = n_classes if n_classes is not None else (100 if key == "fine_labels" else 10)
    if labels.size and (labels.min() < 0 or labels.max() >= limit):
        raise InputError(
            f"{where}: {key} range {labels.min()}..{labels.max()} is outside 0..{limit - 1}"
            + (" (the number of class names)" if n_classes is not None else "")
        )
    return data, labels


# --------------------------------------------------------------------------- locating files


def _is_archive_name(name: str) -> bool:
    name = name.lower()
    return "cifar" in name and name.endswith(_ARCHIVE_SUFFIXES)


def _has_pickle_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _batch_folder(path: Path) -> Path | None:
    """The folder holding the batches: ``path`` itself or its ``cifar-*`` subfolder."""
    for folder in (path, *(path / sub for sub in _SUBFOLDERS)):
        try:
            if not folder.is_dir():
                continue
            if (folder / "data_batch_1").is_file() or any(
                (folder / n).is_file() for n in _CIFAR10_NAMES
            ):
                return folder
            if (folder / "meta").is_file() and any(
                (folder / n).is_file() for n in ("train", "test")
            ):
                return folder
        except OSError:
            continue
    return None


def is_cifar(path: str | Path) -> bool:
    """Whether ``path`` looks like CIFAR python data: a batch, a folder of them, or the archive."""
    path = Path(path)
    try:
        if path.is_dir():
            return _batch_folder(path) is not None
        if not path.is_file():
            return False
    except OSError:
        return False
    name = path.name
    if _is_archive_name(name) or _BATCH.fullmatch(name) or name in _CIFAR10_NAMES:
        return True
    return name in _CIFAR100_NAMES and _has_pickle_magic(path)


def _read_file(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_MEMBER_BYTES:
            raise InputError(
                f"{path}: {size} bytes is larger than any CIFAR batch (cap {MAX_MEMBER_BYTES})"
            )
        with open(path, "rb") as f:
            return f.read(MAX_MEMBER_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {_one_line(exc)}") from None


def _member_problem(info: tarfile.TarInfo) -> str | None:
    """Why an archive member must not be used, or None."""
    name = info.name
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in parts:
        return "has a '..' path"
    if not info.isreg():
        return "is a link or special file"
    return None


def _read_archive(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Contents of the members of the tar archive ``path`` whose base name is ``wanted``.

    Nothing is written to disk.  Members over :data:`MAX_MEMBER_BYTES`, a declared total over
    :data:`MAX_ARCHIVE_BYTES` or more than :data:`MAX_ARCHIVE_MEMBERS` members refuse the whole
    archive; a wanted name on an unsafe member (absolute or ``..`` path, link, device) too.
    Other unsafe members are ignored.
    """
    plain = path.name.lower().endswith(".tar")
    found: dict[str, bytes] = {}
    total = 0
    try:
        archive = tarfile.open(path, mode="r:") if plain else tarfile.open(path, mode="r:gz")
        with archive:
            for count, info in enumerate(archive, start=1):
                if count > MAX_ARCHIVE_MEMBERS:
                    raise InputError(
                        f"{path}: more than {MAX_ARCHIVE_MEMBERS} archive members, refused"
                    )
                total += max(info.size, 0)
                if info.size > MAX_MEMBER_BYTES or total > MAX_ARCHIVE_BYTES:
                    raise InputError(
                        f"{path}: archive member {info.name!r} declares {info.size} bytes "
                        f"(caps: {MAX_MEMBER_BYTES} per member, {MAX_ARCHIVE_BYTES} in all), refused"
                    )
                base = posixpath.basename(info.name.replace("\\", "/").rstrip("/"))
                if not wanted(base):
                    continue
                problem = _member_problem(info)
                if problem is not None:
                    raise InputError(f"{path}: archive member {info.name!r} {problem}, refused")
                if base in found:
                    raise InputError(f"{path}: the archive holds more than one {base!r}")
                member = archive.extractfile(info)
                data = member.read(info.size + 1) if member is not None else b""
                if len(data) != info.size:
                    raise InputError(f"{path}: archive member {info.name!r} is truncated")
                found[base] = data
    except InputError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError) as exc:
        raise InputError(f"{path}: not a readable tar archive: {_one_line(exc)}") from None
    return found


def _choose(names: set[str], split: str, where: str) -> tuple[list[str], str]:
    """Batch names to read for ``split``, in order, and the meta file name."""
    tens = sorted((int(m.group(1)), n) for n in names if (m := _BATCH.fullmatch(n)))
    is10 = bool(tens) or "test_batch" in names
    is100 = "train" in names or "test" in names
    if is10 and is100:
        raise InputError(f"{where}: holds both CIFAR-10 and CIFAR-100 batches; pass one batch file")
    if is100:
        if split not in names:
            raise InputError(f"{where}: no CIFAR-100 '{split}' file")
        return [split], "meta"
    if split == "test":
        if "test_batch" not in names:
            raise InputError(f"{where}: no 'test_batch' for split 'test'")
        return ["test_batch"], "batches.meta"
    if not tens:
        raise InputError(f"{where}: no 'data_batch_<n>' files for split 'train'")
    numbers = [k for k, _ in tens]
    if numbers != list(range(1, len(numbers) + 1)):
        missing = min(set(range(1, numbers[-1] + 1)) - set(numbers))
        raise InputError(
            f"{where}: data_batch_{missing} is missing (found {', '.join(n for _, n in tens)})"
        )
    return [n for _, n in tens], "batches.meta"


def _is_cifar_member(name: str) -> bool:
    return bool(_BATCH.fullmatch(name)) or name in _CIFAR10_NAMES or name in _CIFAR100_NAMES


def read_cifar(path: str | Path, *, split: str = "train") -> ImageSource:
    """Open CIFAR-10/100 python batches (a batch file, a folder of them, or the ``.tar.gz``).

    Parameters
    ----------
    path : str or Path
        Batch file, folder or archive.
    split : {"train", "test"}
        Which batches of a folder or archive to read; ignored for a single batch file.

    Returns
    -------
    ImageSource
        Images of shape (32, 32, 3), uint8; ``labels`` (``labels`` or CIFAR-100
        ``fine_labels``) and ``classes`` (from ``batches.meta``/``meta`` when present).

    Raises
    ------
    InputError
        Missing batches, a pickle naming a global other than the numpy ones (nothing is run),
        wrong keys, dtype, shape or label range, or an unsafe archive member.
    """
    path = Path(path)
    where = str(path)
    if split not in ("train", "test"):
        raise InputError(f"{where}: split must be 'train' or 'test', got {split!r}")
    blobs: dict[str, bytes]
    if path.is_dir():
        folder = _batch_folder(path)
        if folder is None:
            raise InputError(f"{where}: no CIFAR batches in this folder")
        names = {n for n in _listing(folder) if _is_cifar_member(n)}
        batches, meta_name = _choose(names, split, where)
        blobs = {n: _read_file(folder / n) for n in batches}
        if meta_name in names:
            blobs[meta_name] = _read_file(folder / meta_name)
        label = lambda n: str(folder / n)  # noqa: E731
    elif _is_archive_name(path.name):
        archive_names: set[str] = set()

        def wanted(name: str) -> bool:
            if not _is_cifar_member(name):
                return False
            archive_names.add(name)
            return (
                name in ("batches.meta", "meta")
                or name in (split, f"{split}_batch")
                or (split == "train" and bool(_BATCH.fullmatch(name)))
            )

        blobs = _read_archive(path, wanted)
        batches, meta_name = _choose(archive_names, split, where)
        label = lambda n: f"{where}:{n}"  # noqa: E731
    else:
        name = path.name
        if name in ("batches.meta", "meta"):
            raise InputError(
                f"{where}: holds class names, not images; pass the batch or its folder"
            )
        if not path.is_file():
            raise InputError(f"{where}: no such file")
        batches = [name]
        meta_name = "meta" if name in _CIFAR100_NAMES else "batches.meta"
        blobs = {name: _read_file(path)}
        sibling = path.with_name(meta_name)
        if sibling.is_file():
            blobs[meta_name] = _read_file(sibling)
        label = lambda n: str(path.with_name(n))  # noqa: E731

    classes = None
    if meta_name in blobs:
        classes = _class_names(
            safe_loads(blobs.pop(meta_name), where=label(meta_name)), label(meta_name)
        )
    parts = []
    labels = []
    for n in batches:
        if n not in blobs:
            raise InputError(f"{where}: {n!r} is missing")
        data, lab = _batch(
            safe_loads(blobs.pop(n), where=label(n)),
            label(n),
            len(classes) if classes is not None else None,
        )
        parts.append(data)
        labels.append(lab)
    images = parts[0] if len(parts) == 1 else np.concatenate(parts)
    del parts

    def read(start: int, stop: int) -> np.ndarray:
        rows = images[start:stop].reshape(-1, 3, 32, 32)
        return np.ascontiguousarray(rows.transpose(0, 2, 3, 1))

    return ImageSource(
        path=where,
        n_images=images.shape[0],
        image_shape=IMAGE_SHAPE,
        dtype=np.dtype(np.uint8),
        read=read,
        labels=np.concatenate(labels),
        classes=classes,
        channel_axis=True,
    )


def _listing(folder: Path) -> list[str]:
    try:
        return [p.name for p in folder.iterdir() if p.is_file()]
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder: {_one_line(exc)}") from None
