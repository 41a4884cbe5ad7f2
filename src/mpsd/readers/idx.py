"""Reader for MNIST-style idx files (MNIST, Fashion-MNIST, KMNIST, EMNIST), raw or ``.gz``.

An idx file is a 4-byte magic ``00 00 <type> <ndim>``, ``ndim`` big-endian uint32 sizes, then the
values in row-major order.  mpsd reads unsigned bytes (type ``0x08``): images of shape (N, H, W)
or (N, H, W, C) with C <= 4, and labels of shape (N,).

Accepted inputs:

- an images file (``*-images-idx3-ubyte`` or ``*-images.idx3-ubyte``, optionally ``.gz``); the
  labels file beside it (``images`` → ``labels``, ``idx3``/``idx4`` → ``idx1``, raw or ``.gz``)
  is read when present;
- a folder holding ``train-images-idx3-ubyte[.gz]`` and ``t10k-images-idx3-ubyte[.gz]`` (or
  ``test-…``, also with a prefix such as ``emnist-digits-``): ``split`` picks one.

The header is validated before anything large is allocated: the magic, the type code, ``ndim``
in 1..4, and that the sizes multiply to exactly the number of bytes present (at most
:data:`MAX_DATA_BYTES`).  Raw files are read lazily, one slice per ``read`` call.  ``.gz`` files
are decompressed into memory, stream-wise with a cap of the declared size plus one byte (and at
most :data:`MAX_GZ_DATA_BYTES`), so a gzip bomb or a header claiming terabytes is refused without
allocating it.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mpsd.errors import InputError
from mpsd.readers.base import ImageSource

#: Largest data section (bytes) of a raw idx file; raw files are read lazily, a slice at a time.
MAX_DATA_BYTES = 16 * 2**30

#: Largest data section (bytes) of a ``.gz`` idx file, which is decompressed into memory.
MAX_GZ_DATA_BYTES = 2 * 2**30

#: idx type codes: name of the type, and whether mpsd reads it.
TYPE_CODES: dict[int, str] = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "short (int16)",
    0x0C: "int (int32)",
    0x0D: "float (float32)",
    0x0E: "double (float64)",
}

_ITEMSIZE = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
_IMAGES = re.compile(
    r"(?P<pre>.*?)(?P<split>train|t10k|test)(?P<sep>[-_.])images(?P<sep2>[-_.])idx[34](?P<sep3>[-_.])ubyte(?P<gz>\.gz)?"
)
_NAME = re.compile(r".*idx[0-9][-_.]ubyte(\.gz)?")
_GZ_CHUNK = 1 << 20


@dataclass(frozen=True)
class IdxHeader:
    """A parsed idx header.

    Attributes
    ----------
    type_code : int
        The third magic byte (``0x08`` = unsigned byte).
    dims : tuple of int
        The sizes, outermost first (N first).
    """

    type_code: int
    dims: tuple[int, ...]

    @property
    def header_bytes(self) -> int:
        """Length of the header: 4 + 4 × ndim."""
        return 4 + 4 * len(self.dims)

    @property
    def data_bytes(self) -> int:
        """Bytes the values take: product of the sizes × item size."""
        n = _ITEMSIZE[self.type_code]
        for d in self.dims:
            n *= d
        return n


def parse_header(head: bytes, *, where: str) -> IdxHeader:
    """Parse and validate the idx header at the start of ``head``.

    Parameters
    ----------
    head : bytes
        At least the first 4 + 4 × ndim bytes of the file (fewer is an error).
    where : str
        File name for messages.

    Raises
    ------
    InputError
        Bad magic, unknown or unsupported type code, ndim outside 1..4, truncated header.
    """
    if len(head) < 4:
        raise InputError(f"{where}: too short for an idx header ({len(head)} bytes)")
    if head[0] != 0 or head[1] != 0:
        raise InputError(f"{where}: not an idx file (magic starts {head[:2].hex()}, expected 0000)")
    code, ndim = head[2], head[3]
    if code not in TYPE_CODES:
        raise InputError(f"{where}: unknown idx type code 0x{code:02x}")
    if code != 0x08:
        raise InputError(
            f"{where}: idx type 0x{code:02x} ({TYPE_CODES[code]}) is not supported; "
            "mpsd reads unsigned-byte (0x08) idx files"
        )
    if not 1 <= ndim <= 4:
        raise InputError(f"{where}: idx ndim {ndim} is outside 1..4")
    need = 4 + 4 * ndim
    if len(head) < need:
        raise InputError(f"{where}: truncated idx header ({len(head)} of {need} bytes)")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return IdxHeader(type_code=code, dims=dims)


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _read_head(path: Path) -> bytes:
    """The first 20 bytes (enough for any header), decompressed for ``.gz``."""
    try:
        if _is_gz(path):
            with gzip.open(path, "rb") as f:
                return f.read(20)
        with open(path, "rb") as f:
            return f.read(20)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{path}: cannot read: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def is_idx(path: str | Path) -> bool:
    """Whether ``path`` is an idx file (by name or magic) or a folder of idx image files."""
    path = Path(path)
    try:
        if path.is_dir():
            return any(_IMAGES.fullmatch(p.name) for p in path.iterdir() if p.is_file())
        if not path.is_file():
            return False
    except OSError:
        return False
    if _NAME.fullmatch(path.name.lower()):
        return True
    try:
        head = _read_head(path)
    except InputError:
        return False
    return len(head) >= 8 and head[:2] == b"\0\0" and head[2] in TYPE_CODES and 1 <= head[3] <= 4


def _load(path: Path, *, lazy: bool) -> tuple[IdxHeader, np.ndarray | None]:
    """Header and, for ``.gz`` files or when not ``lazy``, all values as a flat uint8 array.

    The size check comes before any allocation: a raw file must hold exactly header + data
    bytes; a ``.gz`` file is decompressed into a buffer of the declared size, and one byte more
    is an error.
    """
    where = str(path)
    header = parse_header(_read_head(path), where=where)
    expected = header.data_bytes
    if _is_gz(path):
        if expected > MAX_GZ_DATA_BYTES:
            raise InputError(
                f"{where}: header declares {header.dims} = {expected} bytes, over the cap of "
                f"{MAX_GZ_DATA_BYTES} for .gz files (decompress it first)"
            )
        return header, _gunzip_exact(path, header)
    try:
        present = os.stat(path).st_size - header.header_bytes
    except OSError as exc:
        raise InputError(f"{where}: cannot read: {_one_line(exc)}") from None
    if present != expected:
        raise InputError(
            f"{where}: header declares {header.dims} = {expected} bytes of data but the file "
            f"holds {present}"
        )
    if expected > MAX_DATA_BYTES:
        raise InputError(f"{where}: {expected} bytes of data is over the cap of {MAX_DATA_BYTES}")
    if lazy:
        return header, None
    return header, _read_range(path, header.header_bytes, expected)


def _gunzip_exact(path: Path, header: IdxHeader) -> np.ndarray:
    """The data section of a ``.gz`` idx file, decompressed chunk by chunk.

    The buffer grows with the data actually decompressed (never past the declared size), so a
    header that lies about a short stream allocates nothing large, and one byte past the declared
    size stops the decompression.
    """
    where = str(path)
    expected = header.data_bytes
    buf = bytearray()
    try:
        with gzip.open(path, "rb") as f:
            f.read(header.header_bytes)
            while len(buf) < expected:
                chunk = f.read(min(_GZ_CHUNK, expected - len(buf)))
                if not chunk:
                    break
                buf += chunk
            extra = f.read(1)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{where}: corrupt or truncated gzip data: {_one_line(exc)}") from None
    if len(buf) != expected or extra:
        holds = "more" if extra else f"only {len(buf)}"
        raise InputError(
            f"{where}: header declares {header.dims} = {expected} bytes of data but the file "
            f"holds {holds}"
        )
    return np.frombuffer(buf, dtype=np.uint8)


def _read_range(path: Path, offset: int, length: int) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {_one_line(exc)}") from None
    if len(data) != length:
        raise InputError(f"{path}: file shrank while reading ({len(data)} of {length} bytes)")
    return np.frombuffer(data, dtype=np.uint8)


def _labels_for(images: Path) -> Path | None:
    """The labels file beside ``images``, raw or ``.gz``, or None."""
    name = images.name
    base = name[:-3] if _is_gz(images) else name
    swapped = re.sub(r"idx[34]", "idx1", base.replace("images", "labels"))
    if swapped == base:
        return None
    for candidate in (swapped, swapped + ".gz"):
        path = images.with_name(candidate)
        if path.is_file():
            return path
    return None


def _images_in(folder: Path, split: str) -> Path:
    """The images file of ``split`` in ``folder`` (raw preferred over ``.gz``)."""
    wanted = ("train",) if split == "train" else ("t10k", "test")
    try:
        matches = [
            p
            for p in folder.iterdir()
            if p.is_file() and (m := _IMAGES.fullmatch(p.name)) and m["split"] in wanted
        ]
    except OSError as exc:
        raise InputError(f"{folder}: cannot list the folder: {_one_line(exc)}") from None
    if not matches:
        raise InputError(
            f"{folder}: no {split} images file (like {wanted[0]}-images-idx3-ubyte[.gz])"
        )
    stems = {p.name[:-3] if _is_gz(p) else p.name for p in matches}
    if len(stems) > 1:
        raise InputError(
            f"{folder}: several {split} images files ({', '.join(sorted(stems))}); pass one"
        )
    return min(matches, key=lambda p: (_is_gz(p), p.name))


def read_idx(path: str | Path, *, split: str = "train") -> ImageSource:
    """Open an idx images file (with its labels) or a folder of idx files.

    Parameters
    ----------
    path : str or Path
        Images file (raw or ``.gz``) or folder.
    split : {"train", "test"}
        Which images file of a folder to read; ignored for a file.

    Returns
    -------
    ImageSource
        Images (H, W, 1) with ``channel_axis=False`` for 3-D files, (H, W, C) for 4-D; uint8;
        labels (int64) when a labels file was found.

    Raises
    ------
    InputError
        Bad header, sizes that do not match the data, a labels file given as images, counts of
        images and labels that differ, a ``.gz`` that inflates past its declared size.
    """
    path = Path(path)
    where = str(path)
    if split not in ("train", "test"):
        raise InputError(f"{where}: split must be 'train' or 'test', got {split!r}")
    if path.is_dir():
        path = _images_in(path, split)
        where = str(path)
    elif not path.is_file():
        raise InputError(f"{where}: no such file")
    header, values = _load(path, lazy=True)
    dims = header.dims
    if len(dims) == 1:
        raise InputError(f"{where}: a 1-D idx file holds labels, not images; pass the images file")
    if len(dims) == 2:
        raise InputError(
            f"{where}: a 2-D idx file (N, {dims[1]}) is not images; expected (N, H, W)"
        )
    if len(dims) == 4 and not 1 <= dims[3] <= 4:
        raise InputError(f"{where}: 4-D idx images need 1..4 channels, found {dims[3]}")
    if any(d == 0 for d in dims):
        raise InputError(f"{where}: holds no images (sizes {dims})")
    n = dims[0]
    shape = (dims[1], dims[2], dims[3] if len(dims) == 4 else 1)
    per_image = shape[0] * shape[1] * shape[2]

    labels = None
    labels_path = _labels_for(path)
    if labels_path is not None:
        lab_header, lab_values = _load(labels_path, lazy=False)
        if len(lab_header.dims) != 1:
            raise InputError(f"{labels_path}: labels must be 1-D, found sizes {lab_header.dims}")
        if lab_header.dims[0] != n:
            raise InputError(
                f"{where}: {n} images but {labels_path.name} holds {lab_header.dims[0]} labels"
            )
        assert lab_values is not None
        labels = lab_values.astype(np.int64)

    def read(start: int, stop: int) -> np.ndarray:
        start, stop = max(start, 0), min(stop, n)
        count = max(stop - start, 0)
        if values is not None:
            flat = values[start * per_image : stop * per_image]
        else:
            flat = _read_range(path, header.header_bytes + start * per_image, count * per_image)
        return flat.reshape(count, *shape).copy()

    return ImageSource(
        path=where,
        n_images=n,
        image_shape=shape,
        dtype=np.dtype(np.uint8),
        read=read,
        labels=labels,
        channel_axis=len(dims) == 4,
    )
