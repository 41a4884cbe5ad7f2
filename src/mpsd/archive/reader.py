"""Open a committed mpsd store and decode any selection of images."""

from __future__ import annotations

import json
import math
import mmap
import os
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mpsd._threads import available_cpus, blas_single_thread
from mpsd.archive.codecs import ALLOWED_CODECS
from mpsd.archive.format import (
    ATTRS_KEY,
    MANIFEST_NAME,
    MAX_CHUNK_ELEMENTS,
    StoreMeta,
    checked_ranks,
    chunk_key,
    cores_from_storage,
    parse_metadata,
)
from mpsd.core import _kernels
from mpsd.core.codec import decode_stages
from mpsd.errors import ChunkNotFoundError, CorruptChunkError, StoreError

IndexLike = int | slice | Sequence[int] | np.ndarray


#: Images rebuilt at a time inside a chunk while decoding (keeps the float temporaries small) ...
DECODE_BLOCK_IMAGES = 256
#: ... and fewer for large images: at most this many bytes of float64 values per block.
DECODE_BLOCK_BYTES = 8 * 2**20


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise StoreError(f"{path.parent}: {what} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path}: {what} is not valid JSON ({exc})") from exc


def _recover_interrupted_swap(path: Path) -> None:
    """Finish a replacement a crash interrupted (see :func:`mpsd.archive.writer.recover`)."""
    from mpsd.archive.writer import _Lock, recover

    lock = _Lock(path.parent / f".{path.name}.lock")
    lock.acquire()
    try:
        recover(path)
    finally:
        lock.release()


def _zstd_content_size(header: bytes) -> int | None:
    """Frame_Content_Size of a zstd frame from its header (RFC 8878, 3.1.1.1), None if absent."""
    if len(header) < 6 or header[:4] != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = header[4]
    single_segment = (descriptor >> 5) & 1
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    if width == 0 or len(header) < pos + width:
        return None
    value = int.from_bytes(header[pos : pos + width], "little")
    return value + 256 if width == 2 else value


#: Outputs from this size on get pages of the base size (:func:`_output_array`); numpy asks for
#: transparent huge pages from 4 MiB on.
BASE_PAGES_FROM_BYTES = 4 * 2**20


def _output_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array for decoded images, in pages of the base size on Linux.

    numpy advises the kernel to back every array of 4 MiB or more with transparent huge pages,
    and under the common setting ``/sys/kernel/mm/transparent_hugepage/defrag = madvise`` the
    first write to such memory may stall while the kernel compacts memory to find 2 MiB pages.
    A decoded dataset is written once, page after page, so huge pages save little there: fresh
    processes compressing then decoding 50,000 CIFAR-10 images (2026-12-08, 2 vCPUs, four runs
    each) decoded 85–117k img/s with 2.3–9.2 µs of system time per image with numpy's array,
    110–116k with 2.6–3.6 with this one.  Anonymous ``mmap`` memory gets no such advice; the
    array owns the map, which is unmapped with it.  Elsewhere, and for small outputs,
    ``numpy.empty``.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if not sys.platform.startswith("linux") or nbytes < BASE_PAGES_FROM_BYTES:
        return np.empty(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).reshape(shape)


class Archive:
    """A committed mpsd store, opened for reading.

    Indexing decodes images: ``archive[i]`` gives one image (H, W) or (H, W, C), ``archive[a:b]``
    and ``archive[[i, j, ...]]`` a batch (B, H, W[, C]), in the dtype of the source.  Only the
    chunks holding the selected images are read.

    Parameters
    ----------
    path : str or Path
        The store folder.

    Attributes
    ----------
    meta : StoreMeta
        The validated metadata.
    labels : ndarray of shape (N,) or None
    classes : list of str or None
    """

    def __init__(self, path: str | Path) -> None:
        import zarr
        from zarr.storage import LocalStore

        self.path = Path(path)
        if not self.path.is_dir() and (self.path.parent / f".{self.path.name}.mpsd-swap.json").exists():
            _recover_interrupted_swap(self.path)
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: no such store")
        manifest_path = self.path / MANIFEST_NAME
        if not manifest_path.exists():
            raise StoreError(f"{self.path}: incomplete store (no {MANIFEST_NAME}: it was never committed)")
        if not (self.path / "zarr.json").exists() and (self.path / ".zgroup").exists():
            raise StoreError(f"{self.path}: a Zarr v2 store; mpsd reads only Zarr v3 stores")
        self.manifest = _read_json(manifest_path, "manifest")
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("files"), dict):
            raise StoreError(f"{manifest_path}: not an mpsd manifest")
        root_meta = _read_json(self.path / "zarr.json", "zarr.json")
        if not isinstance(root_meta, dict) or root_meta.get("zarr_format") != 3:
            raise StoreError(f"{self.path}: not a Zarr v3 store")
        self.meta: StoreMeta = parse_metadata(
            (root_meta.get("attributes") or {}).get(ATTRS_KEY), str(self.path)
        )
        committed = self.manifest.get("n_committed")
        if committed != self.meta.n_images:
            raise StoreError(
                f"{self.path}: manifest commits {committed!r} images but the metadata says {self.meta.n_images}"
            )
        try:
            self._group = zarr.open_group(LocalStore(self.path, read_only=True), mode="r", zarr_format=3)
        except Exception as exc:  # zarr raises many types for broken metadata
            raise StoreError(f"{self.path}: cannot open as a Zarr v3 group: {exc}") from exc
        self._arrays: dict[str, Any] = {}
        self._direct: dict[str, np.dtype | None] = {}  # arrays whose chunks are read without zarr
        self._expected_shapes = self._shapes()
        self.labels = self._read_whole("labels") if self.meta.has_labels else None
        self.classes = self.meta.classes

    # ------------------------------------------------------------------ validation
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        meta = self.meta
        n, m = meta.n_images, meta.mps_per_image
        sites = meta.layout.sites
        shapes: dict[str, tuple[int, ...]] = {}
        for i in range(len(meta.stages)):
            for k in range(len(sites)):
                shapes[f"stage{i}/core{k}"] = meta.core_shape(i, k)
            if meta.storage_dtype == "int8":
                shapes[f"stage{i}/scales"] = (n, m, len(sites))
            shapes[f"stage{i}/ranks"] = (n, m, len(sites) - 1)
        if meta.has_labels:
            shapes["labels"] = (n,)
        return shapes

    def _array(self, name: str) -> Any:
        if name in self._arrays:
            return self._arrays[name]
        try:
            arr = self._group[name]
        except KeyError:
            raise StoreError(f"{self.path}: array {name!r} is missing") from None
        except Exception as exc:
            raise StoreError(f"{self.path}: array {name!r} has invalid metadata: {exc}") from exc
        md = arr.metadata
        names = {c.to_dict()["name"] for c in md.codecs} | {
            c.to_dict()["name"] for c in getattr(md, "codecs", []) for c in getattr(c, "codecs", [])
        }
        bad = names - ALLOWED_CODECS
        if bad:
            raise StoreError(f"{self.path}: array {name!r} uses codecs outside the allow-list: {sorted(bad)}")
        expected = self._expected_shapes.get(name)
        if expected is not None and tuple(arr.shape) != expected:
            raise StoreError(f"{self.path}: array {name!r} has shape {tuple(arr.shape)}, expected {expected}")
        chunk_elems = math.prod(arr.chunks)
        if chunk_elems > MAX_CHUNK_ELEMENTS:
            raise StoreError(f"{self.path}: array {name!r} has chunks of {chunk_elems} elements (cap {MAX_CHUNK_ELEMENTS})")
        self._arrays[name] = arr
        return arr

    def _read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of an array, all inside one chunk along axis 0."""
        arr = self._array(name)
        chunk = start // arr.chunks[0]
        key = chunk_key(name, arr, chunk)
        if key not in self.manifest["files"] or not (self.path / key).is_file():
            raise ChunkNotFoundError(name, key)
        try:
            return np.asarray(arr[start:stop])
        except Exception as exc:
            raise CorruptChunkError(name, key, str(exc) or type(exc).__name__) from exc

    def _direct_dtype(self, name: str, arr: Any) -> np.dtype | None:
        """The array's dtype when its chunks are exactly what mpsd writes, else None.

        That is bytes (little-endian or single-byte) → zstd → crc32c, with no transformers:
        such chunks can be read without zarr's codec pipeline (see :meth:`_read_chunk_direct`).
        """
        if name in self._direct:
            return self._direct[name]
        dtype = None
        try:
            md = arr.metadata.to_dict()
            codecs = [c.get("name") for c in md.get("codecs", [])]
            endian = (md["codecs"][0].get("configuration") or {}).get("endian", "little")
            dt = np.dtype(str(arr.dtype))
            if (
                codecs == ["bytes", "zstd", "crc32c"]
                and not md.get("storage_transformers")
                and (endian == "little" or dt.itemsize == 1)
                and dt.kind in "iuf"
                and md.get("chunk_key_encoding", {}).get("name") == "default"
            ):
                dtype = dt.newbyteorder("<")
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            dtype = None
        self._direct[name] = dtype
        return dtype

    def _read_chunk_direct(self, name: str, key: str, arr: Any, dtype: np.dtype) -> np.ndarray:
        """One whole chunk: file → CRC-32C check → zstd into a buffer of the chunk's exact size.

        The decompressed size is fixed by the chunk shape before anything is decompressed, so a
        frame that claims more (a decompression bomb) or less is a corrupt chunk, not an allocation.
        """
        import google_crc32c
        from numcodecs import Zstd

        raw = (self.path / key).read_bytes()
        if len(raw) < 5:
            raise CorruptChunkError(name, key, f"{len(raw)} bytes is too short for a chunk")
        body = np.frombuffer(raw, dtype=np.uint8)[:-4]
        stored = int.from_bytes(raw[-4:], "little")
        if google_crc32c.value(body) != stored:
            raise CorruptChunkError(name, key, "checksum (CRC-32C) does not match the chunk")
        out = np.empty(tuple(arr.chunks), dtype=dtype)
        size = _zstd_content_size(bytes(body[:18]))
        if size != out.nbytes:
            raise CorruptChunkError(name, key, f"zstd frame holds {size} bytes, the chunk has {out.nbytes}")
        try:  # zstd itself checks that the frame decodes to exactly the size its header gives
            Zstd().decode(body, out=out.reshape(-1).view(np.uint8))
        except Exception as exc:
            raise CorruptChunkError(name, key, f"zstd: {exc}") from exc
        return out

    def _read_rows_many(self, names: list[str], start: int, stop: int) -> list[np.ndarray]:
        """:meth:`_read_rows` of several arrays, read concurrently in one trip to zarr's I/O loop.

        Same checks and errors as reading them one by one (the first failing array, in order,
        is reported).  Arrays written the way mpsd writes them are read directly (file, CRC-32C,
        zstd: no event loop, half the time per chunk, and the threads of a parallel decode do not
        queue on zarr's loop); anything else goes through zarr.
        """
        import asyncio

        from zarr.core.sync import sync

        arrays = [self._array(name) for name in names]
        keys = []
        for name, arr in zip(names, arrays, strict=True):
            key = chunk_key(name, arr, start // arr.chunks[0])
            if key not in self.manifest["files"] or not (self.path / key).is_file():
                raise ChunkNotFoundError(name, key)
            keys.append(key)
        dtypes = [self._direct_dtype(name, arr) for name, arr in zip(names, arrays, strict=True)]
        if all(dt is not None for dt in dtypes):
            out = []
            for name, key, arr, dt in zip(names, keys, arrays, dtypes, strict=True):
                c0 = (start // arr.chunks[0]) * arr.chunks[0]
                out.append(self._read_chunk_direct(name, key, arr, dt)[start - c0 : stop - c0])  # type: ignore[arg-type]
            return out

        async def run() -> list[Any]:
            return await asyncio.gather(
                *(arr.async_array.getitem(slice(start, stop)) for arr in arrays), return_exceptions=True
            )

        try:
            results = sync(run())
        except Exception as exc:  # pragma: no cover - the gather itself does not raise
            raise CorruptChunkError(names[0], keys[0], str(exc) or type(exc).__name__) from exc
        out = []
        for name, key, res in zip(names, keys, results, strict=True):
            if isinstance(res, BaseException):
                if not isinstance(res, Exception):
                    raise res
                raise CorruptChunkError(name, key, str(res) or type(res).__name__) from res
            out.append(np.asarray(res))
        return out

    def _read_whole(self, name: str) -> np.ndarray:
        arr = self._array(name)
        step = arr.chunks[0] if arr.ndim else 1
        parts = [self._read_rows(name, s, min(s + step, arr.shape[0])) for s in range(0, arr.shape[0], step)]
        return np.concatenate(parts) if parts else np.zeros(arr.shape, arr.dtype)

    # ------------------------------------------------------------------ properties
    def __len__(self) -> int:
        return self.meta.n_images

    def __repr__(self) -> str:
        h, w, c = self.image_shape
        return f"<mpsd.Archive {str(self.path)!r}: {len(self)} images {h}x{w}x{c}, sites {list(self.meta.layout.sites)}>"

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        lay = self.meta.layout
        return (lay.height, lay.width, lay.channels)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta.image_dtype)

    @property
    def bytes_on_disk(self) -> int:
        """Sum of the sizes of every file of the store (metadata and manifest included)."""
        total = 0
        for dirpath, _dirs, files in os.walk(self.path):
            for name in files:
                total += os.lstat(os.path.join(dirpath, name)).st_size
        return total

    @property
    def names(self) -> list[str] | None:
        """Relative file names of the source images, when the source had them."""
        if not self.meta.has_names:
            return None
        offsets = self._read_whole("names/offsets")
        blob = self._read_whole("names/utf8").tobytes()
        if offsets.shape != (self.meta.n_images + 1,) or offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != len(blob):
            raise StoreError(f"{self.path}: names/offsets do not match names/utf8")
        return [blob[offsets[i] : offsets[i + 1]].decode("utf-8", "surrogateescape") for i in range(len(offsets) - 1)]

    def metric(self, name: str) -> np.ndarray:
        """A whole per-image metric array (``metrics/...`` or ``stage{i}/...``)."""
        return self._read_whole(name)

    def metric_rows(self, names: list[str], start: int, stop: int) -> list[np.ndarray]:
        """Rows ``start:stop`` of several per-image arrays; the rows must lie in one chunk."""
        if stop > start and start // self.meta.chunk_images != (stop - 1) // self.meta.chunk_images:
            raise ValueError(f"rows {start}:{stop} span more than one chunk of {self.meta.chunk_images} images")
        return self._read_rows_many(names, start, stop)

    # ------------------------------------------------------------------ decoding
    def _indices(self, key: IndexLike) -> tuple[np.ndarray, bool]:
        n = len(self)
        if isinstance(key, (int, np.integer)):
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"image index {i} out of range for {n} images")
            return np.array([i % n]), True
        if isinstance(key, slice):
            return np.arange(*key.indices(n)), False  # O(selection), not O(N)
        idx = np.asarray(key)
        if idx.dtype == bool:
            if idx.shape != (n,):
                raise IndexError(f"boolean mask must have shape ({n},)")
            return np.nonzero(idx)[0], False
        if idx.dtype.kind not in "iu":
            raise IndexError(f"cannot index images with {idx.dtype}")
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"image index out of range for {n} images")
        return idx.reshape(-1) % n, False

    def _read_stages(self, start: int, stop: int, *, unpack: bool = True) -> list[tuple[Any, ...]]:
        """Stored cores and scales of images start:stop inside one chunk, checked, per stage.

        Per stage ``(cores, scales)``: core k of shape (B·M, R_{k-1}, d_k, R_k) (stored dtype,
        zero-padded: to the storage bonds for format 1, to the largest ranks of these images for
        formats 2 and 3), scales (B·M, n) or None.  With ``unpack=False`` a store of format 2 or 3
        gives ``(rows, scales, ranks)`` instead: core k as its packed rows (B·M, P_k) and the
        ranks (B·M, n−1), validated.
        """
        meta = self.meta
        stages = []
        n_rows = stop - start
        m = meta.mps_per_image
        n_sites = len(meta.layout.sites)
        names = []
        for i in range(len(meta.stages)):
            names += [f"stage{i}/core{k}" for k in range(n_sites)]
            if meta.storage_dtype == "int8":
                names.append(f"stage{i}/scales")
            if meta.packed:
                names.append(f"stage{i}/ranks")
        values = iter(self._read_rows_many(names, start, stop))
        for i in range(len(meta.stages)):
            stored = [next(values).reshape(n_rows * m, -1) for _k in range(n_sites)]
            scales = next(values) if meta.storage_dtype == "int8" else None
            where = f"{self.path}: images {start}..{stop - 1}"
            ranks = next(values) if meta.packed else None
            if unpack or ranks is None:
                cores = cores_from_storage(meta, i, stored, ranks, where)  # checks the ranks
            else:  # the compiled decoder reads the rows by these ranks
                cores, ranks = stored, checked_ranks(meta, i, ranks, where)
            if scales is not None:
                scales = scales.reshape(n_rows * m, -1)
                if not np.isfinite(scales).all():
                    raise StoreError(f"{self.path}: stage {i} has non-finite scales for images {start}..{stop - 1}")
            else:
                for k, c in enumerate(cores):
                    if not np.isfinite(c).all():
                        raise StoreError(f"{self.path}: stage {i} core {k} has NaN/Inf values for images {start}..{stop - 1}")
            stages.append((cores, scales) if unpack or ranks is None else (cores, scales, ranks))
        return stages

    def _round_images(self, stages: list[tuple[Any, ...]], out: np.ndarray | None = None) -> np.ndarray:
        """Stored stages of whole images to rounded images ((B, H, W, C) of the source dtype).

        ``stages`` as :meth:`_read_stages` gives them, packed rows included.
        """
        layout, max_value = self.meta.layout, self.meta.max_value
        if stages and len(stages[0]) == 3:  # packed rows: contract each tensor at its own ranks
            done = _kernels.decode_rounded_rows(stages, layout, max_value, self.dtype, out=out)
            if done is not None:
                return done
            stages = [
                (cores_from_storage(self.meta, i, rows, ranks, str(self.path)), scales)
                for i, (rows, scales, ranks) in enumerate(stages)
            ]
        done = _kernels.decode_rounded(stages, layout, max_value, self.dtype, out=out)
        if done is not None:
            return done
        return _kernels.unfold_rounded(decode_stages(stages), layout, max_value, self.dtype, out=out)

    def _iter_runs(self, idx: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """Group sorted unique indices by chunk: yields (start, stop, positions-in-run)."""
        ch = self.meta.chunk_images
        uniq = np.unique(idx)
        chunks = uniq // ch
        for c in np.unique(chunks):
            members = uniq[chunks == c]
            yield int(members[0]), int(members[-1]) + 1, members

    def decode(self, key: IndexLike, *, kind: str = "image") -> np.ndarray:
        """Decode a selection of images.

        Parameters
        ----------
        key : int, slice, sequence of int or bool mask
            Which images.
        kind : {"image", "float"}
            ``"image"``: rounded and clipped to the source dtype, shaped like the source
            ((B, H, W) for greyscale sources without a channel axis, else (B, H, W, C)).
            ``"float"``: float32 (B, H, W, C) in pixel units before rounding.

        Returns
        -------
        ndarray
            One image (without the batch axis) for an int key.
        """
        idx, single = self._indices(key)
        h, w, c = self.image_shape
        out = _output_array((idx.size, h, w, c), np.float32 if kind == "float" else self.dtype)
        if idx.size:
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            runs = list(self._iter_runs(sorted_idx))
            max_value = self.meta.max_value
            block_images = min(DECODE_BLOCK_IMAGES, max(1, DECODE_BLOCK_BYTES // (8 * max(h * w * c, 1))))

            def place(members: np.ndarray, values: np.ndarray) -> None:
                lo = np.searchsorted(sorted_idx, members[0], side="left")
                hi = np.searchsorted(sorted_idx, members[-1], side="right")
                # expand duplicates: positions in sorted order whose value is in members
                pos = np.searchsorted(members, sorted_idx[lo:hi])
                out[order[lo:hi]] = values[pos]

            def one_run(run: tuple[int, int, np.ndarray]) -> None:
                start, stop, members = run
                # read the chunk once and rebuild it in cache-sized blocks of rows (bounded
                # temporaries): images rounded straight into the output, clip(rint(from_sites·max)),
                # floats (kind="float") placed as they are
                stages = self._read_stages(start, stop, unpack=kind == "float")
                m = self.meta.mps_per_image
                for lo in range(start, stop, block_images):
                    hi = min(lo + block_images, stop)
                    sel = members[(members >= lo) & (members < hi)]
                    if sel.size == 0:
                        continue
                    a, b = (lo - start) * m, (hi - start) * m
                    part = [
                        ([c[a:b] for c in st[0]], *(None if x is None else x[a:b] for x in st[1:]))
                        for st in stages
                    ]
                    if kind == "float":  # pixel units, before rounding
                        block = self.meta.layout.from_sites(decode_stages(part)) * max_value
                        place(sel, block[sel - lo].astype(np.float32))
                        continue
                    p0 = np.searchsorted(sorted_idx, sel[0], side="left")
                    p1 = np.searchsorted(sorted_idx, sel[-1], side="right")
                    if sel.size == hi - lo == p1 - p0 and order[p0] + (p1 - p0) - 1 == order[p1 - 1] and (
                        p1 - p0 == 1 or bool((np.diff(order[p0:p1]) == 1).all())
                    ):
                        # every row of the block, wanted once, in output order: write in place
                        o0 = int(order[p0])
                        self._round_images(part, out[o0 : o0 + sel.size])
                    else:
                        place(sel, self._round_images(part)[sel - lo])

            workers = min(len(runs), available_cpus())
            if workers <= 1:
                for run in runs:
                    one_run(run)
            else:
                # chunks decode in parallel (the compiled kernels and zarr's codecs release the
                # GIL); BLAS is pinned to one thread so the threads do not oversubscribe the CPUs
                for name in self._expected_shapes:
                    if name.startswith("stage"):
                        self._array(name)  # open every array before the threads share the cache
                with blas_single_thread(), ThreadPoolExecutor(workers) as pool:
                    for _ in pool.map(one_run, runs):
                        pass
        if kind != "float" and not self.meta.channel_axis:
            out = out[..., 0]
        return out[0] if single else out

    def __getitem__(self, key: IndexLike) -> np.ndarray:
        return self.decode(key)

    def iter_batches(self, batch_images: int | None = None, *, kind: str = "image") -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, images)`` over the whole store, one chunk-aligned batch at a time."""
        step = batch_images or self.meta.chunk_images
        for start in range(0, len(self), step):
            yield start, self.decode(slice(start, min(start + step, len(self))), kind=kind)

    def stats(self) -> Any:
        """Numbers about this store: see :class:`mpsd.stats.StoreStats`."""
        from mpsd.stats import compute_stats

        return compute_stats(self)


def open_store(path: str | Path) -> Archive:
    """Open a committed store for reading (see :class:`Archive`)."""
    return Archive(path)
