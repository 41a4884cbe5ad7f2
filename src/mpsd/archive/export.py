"""Write decoded images out: one ``.npz`` or a folder of PNG files under safe names.

File names stored in a store are untrusted: a name is used only if it is a relative POSIX path
whose parts are plain names (no ``..``, no absolute path, no drive letter or backslash, no NUL or
control characters, no Windows device names); otherwise the whole export stops before writing.
The extension becomes ``.png``.  Two names that differ only in case (or become equal after the
extension change) are reported as a collision instead of overwriting each other.  Files are
written to a temporary name and moved into place with :func:`os.replace`, so a symlink planted at
the target is replaced, never followed.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from mpsd.archive.reader import Archive
from mpsd.errors import OptionError, StoreError

_WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_relative_name(name: str) -> PurePosixPath:
    """Validate a stored file name and return it with a ``.png`` suffix.

    Raises
    ------
    StoreError
        If the name could escape the output folder or is not portable.
    """
    if not name or _CONTROL.search(name) or "\\" in name or re.match(r"^[A-Za-z]:", name):
        raise StoreError(f"unsafe file name in store: {name!r}")
    path = PurePosixPath(name)
    if name.startswith("/") or any(part in ("", ".", "..") for part in name.split("/")):
        raise StoreError(f"unsafe file name in store: {name!r}")
    if any(part.split(".")[0].lower() in _WINDOWS_DEVICES for part in path.parts):
        raise StoreError(f"unsafe file name in store (device name): {name!r}")
    return path.with_suffix(".png")


def output_names(archive: Archive, indices: np.ndarray) -> list[PurePosixPath]:
    """Relative PNG names for the selected images: stored names, or ``class/NNNNNN.png``."""
    stored = archive.names
    if stored is not None:
        names = [safe_relative_name(stored[i]) for i in indices]
    else:
        width = max(6, len(str(len(archive))))
        labels, classes = archive.labels, archive.classes
        names = []
        for i in indices:
            stem = f"{i:0{width}d}.png"
            if labels is not None:
                label = int(labels[i])
                folder = classes[label] if classes is not None and 0 <= label < len(classes) else str(label)
                names.append(safe_relative_name(f"{folder}/{stem}"))
            else:
                names.append(PurePosixPath(stem))
    seen: dict[str, PurePosixPath] = {}
    for n in names:
        key = str(n).casefold()
        if key in seen:
            raise StoreError(f"file names collide on export: {str(seen[key])!r} and {str(n)!r}")
        seen[key] = n
    return names


def _write_atomic(target: Path, write: Callable[[Path], None]) -> None:
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_npz(archive: Archive, out: Path, selection: slice | list[int], *, overwrite: bool = False,
               progress: Callable[[int], None] | None = None) -> int:
    """Decode the selection into one ``.npz`` with ``x`` (images), ``y`` (labels) and ``classes``.

    ``x`` is streamed into the archive one chunk of images at a time (an ``.npy`` member written
    incrementally), so memory does not grow with the number of images.
    """
    import zipfile

    if out.exists() and not overwrite:
        raise OptionError(f"{out}: already exists (use --overwrite)")
    indices = np.arange(len(archive))[selection] if isinstance(selection, slice) else np.asarray(selection)
    h, w, c = archive.image_shape
    shape = (len(indices), h, w, c) if archive.meta.channel_axis else (len(indices), h, w)
    step = archive.meta.chunk_images

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("x.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(archive.dtype), "fortran_order": False, "shape": shape}
                np.lib.format.write_array_header_2_0(member, header)
                done = 0
                for s in range(0, len(indices), step):
                    block = np.ascontiguousarray(archive.decode(indices[s : s + step]))
                    member.write(block.tobytes())
                    done += len(block)
                    if progress:
                        progress(done)
            extra = {}
            if archive.labels is not None:
                extra["y"] = archive.labels[indices]
            if archive.classes is not None:
                extra["classes"] = np.asarray(archive.classes)
            for name, value in extra.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value, allow_pickle=False)

    _write_atomic(out, write)
    return len(indices)


def export_pngs(archive: Archive, out: Path, selection: slice | list[int], *, overwrite: bool = False,
                progress: Callable[[int], None] | None = None) -> int:
    """Decode the selection into PNG files under ``out`` (created), keeping class folders."""
    from PIL import Image

    c = archive.image_shape[2]
    if archive.dtype == np.uint16 and c != 1:
        raise OptionError("16-bit colour images cannot be written as PNG by Pillow; decompress to .npz instead")
    indices = np.arange(len(archive))[selection] if isinstance(selection, slice) else np.asarray(selection)
    names = output_names(archive, indices)
    if out.exists() and not out.is_dir():
        raise OptionError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    if not overwrite:
        clash = next((n for n in names if (out / n).exists()), None)
        if clash is not None:
            raise OptionError(f"{out / clash}: already exists (use --overwrite)")
    done = 0
    step = archive.meta.chunk_images
    for s in range(0, len(indices), step):
        block = archive.decode(indices[s : s + step])
        for img, name in zip(block, names[s : s + step], strict=True):
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.parent.resolve().is_relative_to(root):
                raise StoreError(f"{name}: would be written outside {out} (symlinked folder)")
            arr = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
            if arr.dtype == np.uint16:
                pil = Image.fromarray(arr.astype(np.uint16), mode="I;16")
            else:
                pil = Image.fromarray(arr)
            _write_atomic(target, lambda tmp, pil=pil: pil.save(tmp, format="PNG"))
        done += len(block)
        if progress:
            progress(done)
    return len(indices)
