"""Reader for a folder of image files (PNG, JPEG, BMP, TIFF, WebP), searched recursively.

The rules (documented for users in ``docs/input-formats.md``):

- **Which files.**  Regular files whose extension is in :data:`IMAGE_EXTENSIONS` (any case), in
  the folder and all its subfolders.  Names starting with ``.`` (hidden files and folders, macOS
  ``._*`` resource forks) are ignored, as are files with other extensions.  Pillow opens each file
  with the :data:`PILLOW_FORMATS` allow-list only, so a FITS, PSD or GD file renamed ``.png`` is
  refused instead of being handed to a less-audited decoder.
- **Links and special files.**  Symbolic links to folders are never followed (so no loops);
  symbolic links to files are followed only when the target lies inside the folder.  FIFOs,
  sockets and devices are never opened.  All of these are listed in ``ImageSource.skipped`` and
  are not errors.  Hard links are ordinary files.
- **Order.**  Files are sorted by the raw bytes of their relative path (``os.fsencode``), so the
  order does not depend on the file system or the locale.
- **Labels.**  When every image lies in a subfolder, the first path component is the class, as
  in torchvision's ``ImageFolder``: ``classes`` are the sorted (by bytes) names of the top-level
  subfolders holding at least one file with an image extension, and labels index them.  When any
  image lies directly in the folder, there are no labels.
- **Pixels.**  EXIF orientation is applied (pixels as a viewer shows them), then the Pillow mode
  is converted by the table in :data:`MODE_TABLE`; when files have different channel counts all
  are promoted to the largest (grey → RGB by replication, RGB → RGBA with an opaque alpha).
  Mixing 8-bit and 16-bit images is an error, as are mixed sizes unless ``resize`` is given.
- **Bad files.**  Images over :data:`MAX_PIXELS` pixels are refused from their header, before
  anything is decoded.  Empty, truncated or undecodable files stop the run with an
  :class:`~mpsd.errors.InputError` naming the file, or, with ``skip_bad=True``, are left out and
  listed in ``ImageSource.skipped``.

The folder is scanned once up front (headers only, or full decodes with ``skip_bad``) so that the
number of images, their shape and the conversions are known before any pixel is written; after
that ``read(start, stop)`` decodes only the files asked for, so memory holds the file list and
one chunk, never the dataset.
"""

from __future__ import annotations

import functools
import os
import re
import stat
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mpsd.errors import InputError
from mpsd.readers.base import ImageSource

#: File extensions (lower case) considered images.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})

#: Pillow plugins allowed to open a file; anything else is refused whatever its extension.
PILLOW_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")

#: Largest image (width × height, from the header) decoded; larger ones are refused undecoded.
MAX_PIXELS = 2**26

#: Pillow filter used when ``resize`` is given.
RESIZE_FILTER = Image.Resampling.LANCZOS

#: How many offending files an error message lists.
MAX_LISTED = 5

#: Pillow mode → (mode it is read as, bits per sample).  ``I;16`` means uint16 greyscale.
#: ``P`` becomes ``RGBA`` instead of ``RGB`` when it has transparency (a ``tRNS`` chunk).
MODE_TABLE: dict[str, tuple[str, int]] = {
    "1": ("L", 8),
    "L": ("L", 8),
    "LA": ("L", 8),  # alpha dropped
    "P": ("RGB", 8),  # or RGBA with transparency
    "PA": ("RGBA", 8),
    "RGB": ("RGB", 8),
    "RGBX": ("RGB", 8),
    "RGBA": ("RGBA", 8),
    "RGBa": ("RGBA", 8),  # premultiplied alpha undone
    "CMYK": ("RGB", 8),
    "YCbCr": ("RGB", 8),
    "LAB": ("RGB", 8),
    "HSV": ("RGB", 8),
    "I;16": ("I;16", 16),
    "I;16L": ("I;16", 16),
    "I;16B": ("I;16", 16),
    "I;16N": ("I;16", 16),
    "I": ("I;16", 16),  # only when every value is in 0..65535
    "F": ("I;16", 16),  # only when every value is an integer in 0..65535
}

_CHANNELS = {"L": 1, "RGB": 3, "RGBA": 4, "I;16": 1}
_TARGET_8BIT = {1: "L", 3: "RGB", 4: "RGBA"}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_RAW16 = re.compile(r";16[BLN]?$")
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_ALLOWED_TEXT = "PNG, JPEG, BMP, TIFF or WebP"


class _BadFile(Exception):
    """One file cannot be used; ``reason`` is a one-line explanation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(slots=True)
class _Entry:
    """One image file found by the scan."""

    rel: str  # relative POSIX path under the root, as listed
    root: str  # the folder (one string shared by every entry)
    link: str | None  # what a symbolic link resolves to; None for a regular file
    label: int
    ident: tuple[int, int]  # (st_dev, st_ino) seen by the walk
    stamp: tuple[int, int] = (0, 0)  # (st_size, st_mtime_ns) seen by the header scan
    mode: str = ""  # Pillow mode
    source: str = ""  # mode as recorded in conversions (e.g. "RGB;16" for 16-bit colour)
    native: str = ""  # mode it is read as: L, RGB, RGBA or I;16
    size: tuple[int, int] = (0, 0)  # (W, H) in the file
    orientation: int = 1

    @property
    def path(self) -> str:
        """What is opened: the file itself, or the target of a symbolic link."""
        return self.link if self.link is not None else os.path.join(self.root, self.rel)

    @property
    def hw(self) -> tuple[int, int]:
        """(H, W) after the EXIF orientation is applied."""
        w, h = self.size
        return (w, h) if self.orientation >= 5 else (h, w)


def _show(text: str) -> str:
    """``text`` fit for a one-line message: control and undecodable characters escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _walk(
    root: str, skip_bad: bool, skipped: list[tuple[str, str]], where: str
) -> list[tuple[str, str | None, tuple[int, int]]]:
    """List ``(rel, link target or None, (st_dev, st_ino))`` of the image files under ``root`` (a real path)."""
    found: list[tuple[str, str | None, tuple[int, int]]] = []
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino)}  # folders visited: a bind mount cannot make a loop
    stack = [""]
    while stack:
        reldir = stack.pop()
        absdir = os.path.join(root, reldir) if reldir else root
        try:
            with os.scandir(absdir) as it:
                entries = list(it)
        except OSError as exc:
            if not reldir:
                raise InputError(f"{where}: cannot list the folder: {_one_line(exc)}") from None
            reason = f"cannot list the folder: {exc.strerror or _one_line(exc)}"
            if not skip_bad:
                raise InputError(f"{_show(os.path.join(where, reldir))}: {reason}") from None
            skipped.append((reldir + "/", reason))
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            rel = f"{reldir}/{name}" if reldir else name
            try:
                st = os.lstat(entry.path)
            except OSError as exc:  # vanished or unreadable entry
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    reason = f"cannot stat: {exc.strerror or _one_line(exc)}"
                    if not skip_bad:
                        raise InputError(f"{_show(os.path.join(where, rel))}: {reason}") from None
                    skipped.append((rel, reason))
                continue
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    skipped.append((rel, "folder already visited (mount loop), not followed"))
                else:
                    seen.add((st.st_dev, st.st_ino))
                    stack.append(rel)
                continue
            is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            if stat.S_ISLNK(st.st_mode):
                _follow_link(root, rel, entry.path, is_image, found, skipped)
            elif not is_image:
                continue
            elif stat.S_ISREG(st.st_mode):
                found.append((rel, None, (st.st_dev, st.st_ino)))
            else:
                skipped.append((rel, f"not a regular file ({_kind(st.st_mode)}), not opened"))
    return found


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special file"


def _follow_link(
    root: str,
    rel: str,
    link: str,
    is_image: bool,
    found: list[tuple[str, str | None, tuple[int, int]]],
    skipped: list[tuple[str, str]],
) -> None:
    """Follow the symbolic link ``link`` when it is a file inside ``root``; else record why not."""
    target = os.path.realpath(link)
    try:
        st = os.stat(target)
    except OSError as exc:
        if is_image:
            skipped.append((rel, f"broken symbolic link ({exc.strerror or _one_line(exc)})"))
        return
    if stat.S_ISDIR(st.st_mode):
        skipped.append((rel, "symbolic link to a folder, not followed"))
    elif not is_image:
        return
    elif not _inside(target, root):
        skipped.append((rel, "symbolic link to a file outside the folder, not followed"))
    elif not stat.S_ISREG(st.st_mode):
        skipped.append((rel, f"symbolic link to a {_kind(st.st_mode)}, not opened"))
    else:
        found.append((rel, target, (st.st_dev, st.st_ino)))


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1..8 from the header (1 when absent or invalid); decodes nothing.

    ``Image.Image.getexif`` (not the subclass method) is used because the PNG plugin's version
    decodes the whole image to look for an ``eXIf`` chunk after the pixel data.
    """
    try:
        value = Image.Image.getexif(im).get(0x0112, 1)
    except Exception:  # malformed EXIF is ignored, as viewers do
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _rawmode(im: Image.Image) -> str:
    try:
        args = getattr(im, "tile", None)[0][3]  # type: ignore[index]
    except (IndexError, TypeError):
        return ""
    if isinstance(args, tuple) and args:
        args = args[0]
    return args if isinstance(args, str) else ""


@functools.lru_cache(maxsize=1024)
def _size(w: int, h: int) -> tuple[int, int]:
    """``(w, h)``, one tuple per size: a million files of one size share it."""
    return (w, h)


def _header(im: Image.Image, entry: _Entry) -> None:
    """Fill the header fields of ``entry`` from the opened (not decoded) image ``im``."""
    w, h = im.size
    if w < 1 or h < 1:
        raise _BadFile(f"image has no pixels ({w}x{h})")
    if w * h > MAX_PIXELS:
        raise _BadFile(
            f"image of {w}x{h} = {w * h} pixels exceeds the cap of {MAX_PIXELS} "
            "(possible decompression bomb), not decoded"
        )
    mode = im.mode
    if mode not in MODE_TABLE:
        raise _BadFile(f"unsupported image mode {mode!r}")
    native = MODE_TABLE[mode][0]
    if mode == "P" and im.has_transparency_data:
        native = "RGBA"
    source = mode
    if (
        im.format in ("PNG", "TIFF")
        and mode in ("LA", "RGB", "RGBA")
        and _RAW16.search(_rawmode(im))
    ):
        source = f"{mode};16"  # Pillow decodes 16-bit colour as 8-bit: recorded as lossy
    entry.mode, entry.native, entry.source = mode, native, source
    entry.size = _size(w, h)
    entry.orientation = _orientation(im)


def _to_uint16(image: Image.Image) -> np.ndarray:
    """Pixels of a 16-bit-family image (I;16*, I, F) as a uint16 array of shape (H, W)."""
    arr = np.asarray(image)
    if image.mode == "F":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise _BadFile(
                "float (mode F) image holds non-integer values; only integers 0..65535 are accepted"
            )
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise _BadFile(
            f"mode {image.mode} image holds values {arr.min()}..{arr.max()}, outside uint16 0..65535"
        )
    return arr.astype(np.uint16)


def _decode(entry: _Entry, *, scanning: bool, pixels: bool) -> Image.Image | np.ndarray | None:
    """Open the file of ``entry``: read its header, and its pixels when ``pixels`` is true.

    Parameters
    ----------
    entry : _Entry
        The file.  While ``scanning`` its header fields are filled in; afterwards they are
        checked against the file (which must not have changed).
    scanning : bool
        Whether this is the scan pass.
    pixels : bool
        Whether to decode the pixels.

    Returns
    -------
    PIL.Image.Image (mode L, RGB or RGBA) or ndarray of shape (H, W) and dtype uint16, or None
        The oriented image in mode ``entry.native``; None when ``pixels`` is false.

    Raises
    ------
    _BadFile
        Whatever is wrong with the file, in one line.
    """
    try:
        fd = os.open(entry.path, _OPEN_FLAGS)
    except OSError as exc:
        raise _BadFile(f"cannot open: {exc.strerror or _one_line(exc)}") from None
    with os.fdopen(fd, "rb") as fp:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != entry.ident:
            raise _BadFile("file was replaced while reading the folder")
        if scanning:
            entry.stamp = (st.st_size, st.st_mtime_ns)
        elif (st.st_size, st.st_mtime_ns) != entry.stamp:
            raise _BadFile("file changed since the folder was scanned")
        if st.st_size == 0:
            raise _BadFile("empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                # Ignored: e.g. "Corrupt EXIF data" (the pixels still decode), and Pillow's
                # DecompressionBombWarning, since MAX_PIXELS is checked right after opening.
                warnings.simplefilter("ignore")
                im = Image.open(fp, formats=PILLOW_FORMATS)
                if scanning:
                    _header(im, entry)
                elif (im.mode, im.size) != (entry.mode, entry.size):
                    raise _BadFile("file changed since the folder was scanned")
                if not pixels:
                    return None
                im.load()
                return _native(im, entry)
        except _BadFile:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _BadFile(f"refused as a possible decompression bomb: {_one_line(exc)}") from None
        except UnidentifiedImageError:
            raise _BadFile(f"not a {_ALLOWED_TEXT} image (unknown or disallowed format)") from None
        except Exception as exc:  # any failure of a decoder on hostile input is a bad file
            detail = f": {_one_line(exc)}" if str(exc).strip() else ""
            raise _BadFile(f"cannot decode: {type(exc).__name__}{detail}") from None


def _native(im: Image.Image, entry: _Entry) -> Image.Image | np.ndarray:
    """Decoded ``im`` oriented, in mode L, LA, RGB or RGBA, or a uint16 (H, W) array when 16-bit.

    ``LA`` is kept so that the alpha survives when the folder is promoted to RGBA; every other
    8-bit mode is converted to ``entry.native``.
    """
    method = _TRANSPOSE.get(entry.orientation)
    if method is not None:
        im = im.transpose(method)
    if entry.native == "I;16":
        return _to_uint16(im)
    if im.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        return im.convert("RGB")
    if im.mode != entry.native and im.mode != "LA":
        return im.convert(entry.native)
    return im


def read_folder(
    path: str | Path, *, resize: tuple[int, int] | None = None, skip_bad: bool = False
) -> ImageSource:
    """Open a folder of images (recursively), class subfolders giving labels.

    Parameters
    ----------
    path : str or Path
        The folder.
    resize : (int, int), optional
        ``(H, W)``: resize every image whose size differs to this size with
        :data:`RESIZE_FILTER` (aspect ratio not kept).  Without it, images of different sizes
        are an error that lists the odd ones out.
    skip_bad : bool
        Decode every file during the scan and leave out those that fail (listed with the reason
        in ``ImageSource.skipped``), instead of stopping at the first.

    Returns
    -------
    ImageSource
        Images of shape ``(H, W, C)`` with C = 1 (grey), 3 (RGB) or 4 (RGBA), dtype uint8, or
        uint16 for 16-bit greyscale; ``names`` are relative POSIX paths; ``labels``/``classes``
        when every image is in a class subfolder; ``conversions`` counts mode conversions, EXIF
        rotations and resizes.

    Raises
    ------
    InputError
        The folder holds no usable image, sizes or bit depths differ, or (without ``skip_bad``)
        a file is not a readable image.  During ``read``, a file that fails to decode or changed
        since the scan.
    """
    where = str(path)
    if resize is not None:
        if len(resize) != 2 or any(int(v) != v or v < 1 for v in resize):
            raise InputError(
                f"{where}: resize must be two positive integers (H, W), got {resize!r}"
            )
        resize = (int(resize[0]), int(resize[1]))
    try:
        root = os.path.realpath(path)
        if not os.path.isdir(root):
            raise InputError(f"{where}: not a folder")
    except OSError as exc:
        raise InputError(f"{where}: cannot open the folder: {_one_line(exc)}") from None
    skipped: list[tuple[str, str]] = []
    found = _walk(root, skip_bad, skipped, where)
    found.sort(key=lambda item: os.fsencode(item[0]))

    labelled = bool(found) and all("/" in rel for rel, _, _ in found)
    classes: list[str] | None = None
    class_index: dict[str, int] = {}
    if labelled:
        classes = sorted({rel.split("/", 1)[0] for rel, _, _ in found}, key=os.fsencode)
        class_index = {c: i for i, c in enumerate(classes)}

    def fail(entry: _Entry, reason: str) -> InputError:
        return InputError(f"{_show(os.path.join(where, entry.rel))}: {reason}")

    entries: list[_Entry] = []
    found.reverse()  # popped from the end, in sorted order: the listing is let go as it is read
    while found:
        rel, target, ident = found.pop()
        entry = _Entry(
            rel=rel,
            root=root,
            link=target,
            label=class_index[rel.split("/", 1)[0]] if labelled else -1,
            ident=ident,
        )
        try:
            _decode(entry, scanning=True, pixels=skip_bad)
        except _BadFile as bad:
            if not skip_bad:
                raise fail(entry, bad.reason) from None
            skipped.append((rel, bad.reason))
            continue
        entries.append(entry)

    if not entries:
        detail = (
            f"; {len(skipped)} left out, e.g. {_show(skipped[0][0])}: {skipped[0][1]}"
            if skipped
            else ""
        )
        raise InputError(
            f"{where}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}){detail}"
        )

    bits = {MODE_TABLE[e.mode][1] for e in entries}
    if len(bits) > 1:
        examples = []
        for depth in sorted(bits):
            first = next(e for e in entries if MODE_TABLE[e.mode][1] == depth)
            examples.append(f"{_show(first.rel)} is {depth}-bit ({first.mode})")
        raise InputError(
            f"{where}: the folder mixes 8-bit and 16-bit images ({', '.join(examples)}); "
            "convert them to one bit depth first"
        )
    sixteen = bits == {16}
    channels = max(_CHANNELS[e.native] for e in entries)
    target = "I;16" if sixteen else _TARGET_8BIT[channels]

    sizes = Counter(e.hw for e in entries)
    if resize is None and len(sizes) > 1:
        (common, n_common), *_ = sizes.most_common(1)
        odd = [e for e in entries if e.hw != common]
        listed = ", ".join(f"{_show(e.rel)} is {e.hw[0]}x{e.hw[1]}" for e in odd[:MAX_LISTED])
        more = f" and {len(odd) - MAX_LISTED} more" if len(odd) > MAX_LISTED else ""
        raise InputError(
            f"{where}: images differ in size (H x W): {n_common} are {common[0]}x{common[1]} but "
            f"{listed}{more}; pass --resize HxW (resize=(H, W)) to resize them all"
        )
    hw = resize if resize is not None else entries[0].hw

    conversions: Counter[str] = Counter()
    for e in entries:
        if e.source != target and not (e.native == "I;16" and e.mode.startswith("I;16")):
            conversions[f"{e.source}->{target}"] += 1
        if e.orientation != 1:
            conversions["EXIF orientation applied"] += 1
        if e.hw != hw:
            conversions[f"resize to {hw[0]}x{hw[1]} ({RESIZE_FILTER.name})"] += 1

    def finish(native: Image.Image | np.ndarray) -> np.ndarray:
        if isinstance(native, np.ndarray):  # uint16 grey
            if native.shape != hw:
                native = np.asarray(
                    Image.fromarray(native).resize((hw[1], hw[0]), RESIZE_FILTER)
                ).astype(np.uint16)
            return native[..., np.newaxis]
        if native.mode != target:
            native = native.convert(target)
        if native.size != (hw[1], hw[0]):
            native = native.resize((hw[1], hw[0]), RESIZE_FILTER)
        arr = np.asarray(native, dtype=np.uint8)
        return arr[..., np.newaxis] if arr.ndim == 2 else arr

    dtype = np.dtype(np.uint16 if sixteen else np.uint8)
    shape = (hw[0], hw[1], channels)

    def read(start: int, stop: int) -> np.ndarray:
        start, stop = max(start, 0), min(stop, len(entries))
        out = np.empty((max(stop - start, 0), *shape), dtype=dtype)
        for k, entry in enumerate(entries[start:stop]):
            try:
                native = _decode(entry, scanning=False, pixels=True)
            except _BadFile as bad:
                raise fail(entry, bad.reason) from None
            assert native is not None
            pixels = finish(native)
            if pixels.shape != shape:
                raise fail(entry, f"decoded to {pixels.shape}, expected {shape}")
            out[k] = pixels
        return out

    labels = np.array([e.label for e in entries], dtype=np.int64) if labelled else None
    return ImageSource(
        path=where,
        n_images=len(entries),
        image_shape=shape,
        dtype=dtype,
        read=read,
        labels=labels,
        classes=classes,
        names=[e.rel for e in entries],
        channel_axis=channels > 1,
        skipped=sorted(skipped, key=lambda item: os.fsencode(item[0])),
        conversions=dict(sorted(conversions.items())),
    )
