"""Write an mpsd store atomically: temp sibling, manifest last, then rename into place.

A store is *committed* when its manifest (``mpsd-manifest.json``: SHA-256 of every file) exists.
Until then it lives in a hidden temporary sibling of the target, so a crash leaves either no store
or the previous committed one.  ``overwrite`` swaps the new store in only after it is committed.
A lock file next to the target makes a second writer fail fast.

While it writes, the temporary store keeps ``mpsd-progress.json``: how many images are written
and a CRC-32C of each chunk of source images.  ``resume`` takes over the temporary store of an
interrupted run with the same settings, checks what it wrote, and goes on from there.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from mpsd.archive.codecs import ZSTD_LEVEL, array_codecs
from mpsd.archive.format import (
    ATTRS_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    StoreMeta,
    chunk_key,
    chunk_separator,
    stored_cores,
)
from mpsd.core.codec import EncodedBatch
from mpsd.errors import InputError, OptionError, StoreError, StoreLockedError

log = logging.getLogger(__name__)

#: Inside an uncommitted store: how far its writer got (removed when the store is committed).
PROGRESS_NAME = "mpsd-progress.json"


def _fault(point: str) -> None:
    """Crash on purpose at ``point`` when ``MPSD_FAULT`` names it (crash tests only)."""
    if os.environ.get("MPSD_FAULT") == point:
        os._exit(137)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Lock:
    """An ``O_CREAT|O_EXCL`` lock file holding the writer's pid; stale locks (dead pid) are taken over."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and _pid_alive(pid):
                    raise StoreLockedError(
                        f"{self.path.with_suffix('')}: another mpsd process (pid {pid}) is writing this store"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self.held = True
            return
        raise StoreLockedError(f"{self.path}: cannot take the lock")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False


def hash_tree(root: Path, known: dict[str, tuple[str, int]] | None = None) -> dict[str, str]:
    """SHA-256 of every file under ``root`` except the manifest (and a writer's progress record),
    keyed by POSIX relative path.

    ``known`` maps relative paths to ``(sha256 hex, size)`` of files whose bytes were hashed as
    they were written; a file listed there with the same size is not read again.
    """
    digests = {}
    known = known or {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel in (MANIFEST_NAME, PROGRESS_NAME, PROGRESS_NAME + ".tmp"):
                continue
            if rel in known and known[rel][1] == full.stat().st_size:
                digests[rel] = known[rel][0]
                continue
            h = hashlib.sha256()
            with open(full, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digests[rel] = h.hexdigest()
    return dict(sorted(digests.items()))


def write_manifest(
    root: Path, n_images: int, extra: dict[str, Any] | None = None, *, version: int = FORMAT_VERSION,
    known: dict[str, tuple[str, int]] | None = None,
) -> None:
    """Hash every file of ``root``, fsync them, and write the manifest last (committing the store).

    ``version`` is the store's format version (an older store keeps its own when a supplement is
    added); ``known`` as for :func:`hash_tree`.
    """
    files = hash_tree(root, known)
    # fsync every file before the manifest exists.  Many fsyncs in flight at once cost about as
    # much as one (the filesystem commits them together): ~0.1 ms a file instead of ~4 ms.
    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in pool.map(lambda rel: _fsync_path(root / rel), files):
            pass
    # the progress record goes only now: a crash while the files were hashed and synced can still
    # be resumed
    for name in (PROGRESS_NAME, PROGRESS_NAME + ".tmp"):
        (root / name).unlink(missing_ok=True)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": version,
        "n_committed": n_images,
        "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
        **(extra or {}),
    }
    tmp = root / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fault("before_manifest")
    os.replace(tmp, root / MANIFEST_NAME)
    _fsync_path(root)


def _journal_path(path: Path) -> Path:
    return path.parent / f".{path.name}.mpsd-swap.json"


def _is_committed(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()


def recover(path: str | Path, *, keep: Path | None = None) -> str | None:
    """Finish or roll back a swap that a crash interrupted, and remove dead writers' leftovers.

    ``--overwrite`` records ``{"old": ..., "new": ...}`` in ``.NAME.mpsd-swap.json`` before moving
    the old store aside and the new one into place.  If the target is missing afterwards, the
    committed new store is moved into place (roll forward), or else the old one back (roll back).
    Temporary folders of writers that are no longer running (or of this process: with the lock
    held, none of its writers is writing this store) are deleted, except ``keep``.  Call with the
    lock held.

    Returns
    -------
    str or None
        What was done, for logging.
    """
    path = Path(path)
    done = None
    journal = _journal_path(path)
    if journal.exists():
        try:
            entry = json.loads(journal.read_text())
            old, new = path.parent / entry["old"], path.parent / entry["new"]
        except (OSError, ValueError, KeyError, TypeError):
            old = new = None  # type: ignore[assignment]
        if old is not None and not path.exists():
            if new.is_dir() and _is_committed(new):
                os.replace(new, path)
                done = "finished an interrupted replacement"
            elif old.is_dir():
                os.replace(old, path)
                done = "rolled back an interrupted replacement"
        if old is not None and path.exists() and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        journal.unlink(missing_ok=True)
        _fsync_path(path.parent)
    for leftover in path.parent.glob(f".{path.name}.mpsd-tmp-*"):
        if keep is not None and leftover.name == keep.name:
            continue
        if _writer_gone(_writer_pid(leftover)):
            shutil.rmtree(leftover, ignore_errors=True)
            done = done or "removed temporary folders of interrupted runs"
    if done:
        log.info("%s: %s", path, done)
    return done


def _writer_pid(tmp: Path) -> int | None:
    """The pid in a temporary store's name (``.NAME.mpsd-tmp-<pid>-<hex>``), or None."""
    try:
        return int(tmp.name.rsplit("-", 2)[1])
    except (IndexError, ValueError):
        return None


def _writer_gone(pid: int | None) -> bool:
    """Whether the writer ``pid`` of a temporary store has stopped (this process's count as stopped)."""
    return pid is not None and (pid == os.getpid() or not _pid_alive(pid))


def interrupted_runs(path: str | Path) -> list[tuple[Path, int]]:
    """Temporary stores that interrupted runs left beside ``path``, with the images each wrote.

    Only stores whose writer is no longer running (or was this process) and that ``compress
    --resume`` could take over (uncommitted, with readable metadata and progress record) are
    listed, most images first.
    """
    return [(leftover, progress["n_images"]) for leftover, _attrs, progress in _resumable_runs(Path(path))]


def _resumable_runs(path: Path) -> list[tuple[Path, dict[str, Any], dict[str, Any]]]:
    """(folder, metadata attributes, progress record) of each run :func:`interrupted_runs` lists."""
    found = []
    for leftover in path.parent.glob(f".{path.name}.mpsd-tmp-*"):
        if not _writer_gone(_writer_pid(leftover)) or _is_committed(leftover):
            continue
        progress, attrs = _read_progress(leftover), _attrs_of(leftover)
        if progress is not None and attrs is not None:
            found.append((leftover, attrs, progress))
    return sorted(found, key=lambda item: -item[2]["n_images"])


def _read_progress(tmp: Path) -> dict[str, Any] | None:
    """The progress record of a temporary store, checked, or None when it has no usable one."""
    try:
        progress = json.loads((tmp / PROGRESS_NAME).read_text())
        n_done, digests, settings = progress["n_images"], progress["source_crc32c"], progress["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = (
        isinstance(n_done, int) and n_done >= 0 and isinstance(settings, dict) and isinstance(digests, list)
        and all(isinstance(d, int) for d in digests)
    )  # fmt: skip
    return progress if ok else None


def _attrs_of(tmp: Path) -> dict[str, Any] | None:
    try:
        attrs = json.loads((tmp / "zarr.json").read_text())["attributes"][ATTRS_KEY]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return attrs if isinstance(attrs, dict) else None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """``key was X, now Y`` for every top-level key that differs (values shortened)."""

    def short(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text if len(text) <= 80 else text[:77] + "..."

    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} was {short(old.get(k))}, now {short(new.get(k))}" for k in keys)


#: Write every chunk through zarr's codec pipeline instead of :meth:`StoreWriter._write_chunk`
#: (tests compare the two).
_ZARR_WRITES = False


@functools.cache
def _zstd() -> Any:
    """numcodecs' Zstd at :data:`~mpsd.archive.codecs.ZSTD_LEVEL` (the level zarr is given)."""
    from numcodecs import Zstd

    return Zstd(level=ZSTD_LEVEL)


def _write_file(path: Path, *parts: bytes) -> None:
    """Write ``parts`` to a new file at ``path`` (its folders made as needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        for part in parts:
            fh.write(part)


def _set_rows(writes: list[tuple[Any, np.ndarray]], start: int, stop: int) -> None:
    """``array[start:stop] = value`` for every pair, all at once on zarr's event loop.

    One round trip to zarr's I/O loop for the whole batch instead of one per array: the arrays'
    chunks are compressed and written concurrently.  Every write finishes before the first error
    (if any) is raised, so nothing is still writing when the caller cleans up.
    """
    import asyncio

    from zarr.core.sync import sync

    async def run() -> list[BaseException | None]:
        return await asyncio.gather(
            *(arr.async_array.setitem(slice(start, stop), value) for arr, value in writes),
            return_exceptions=True,
        )

    for result in sync(run()):
        if isinstance(result, BaseException):
            raise result


def swap_into_place(tmp: Path, path: Path) -> None:
    """Replace the committed store ``path`` by the committed store ``tmp``, journalled.

    The journal (``.NAME.mpsd-swap.json``) lets :func:`recover` finish or roll back a swap that a
    crash interrupted between the two renames.
    """
    old = path.parent / f".{path.name}.mpsd-old-{secrets.token_hex(4)}"
    journal = _journal_path(path)
    with open(journal, "w") as fh:
        json.dump({"old": old.name, "new": tmp.name}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path, old)
    _fault("between_renames")
    os.replace(tmp, path)
    _fsync_path(path.parent)
    journal.unlink()
    shutil.rmtree(old, ignore_errors=True)


class StoreWriter:
    """Create a store in a temporary sibling and commit it with :meth:`commit`.

    Use as a context manager: leaving the block without :meth:`commit` (an error, Ctrl-C) removes
    the temporary store and leaves the target untouched.

    Parameters
    ----------
    path : str or Path
        Target store.
    meta : StoreMeta
        What is being written.
    overwrite : bool
        Replace an existing store at ``path`` (only once the new one is committed).
    resume : bool
        Take over the temporary store of an interrupted run with the same ``meta`` and
        ``run_settings``: its chunks are checked (a damaged or missing one, and every one after it,
        is written again) and :attr:`resumed_images` says where to go on.  The caller checks the
        source against :attr:`source_crc32c` (:meth:`check_resumed_chunk`).  Without such a store
        the run starts from the beginning.  Refused, naming the difference, when the interrupted
        run had other settings; its store is then left as it is.
    run_settings : dict, optional
        Settings outside ``meta`` that decide the stored bytes (e.g. the worker count, which splits
        a ``ratio`` budget); a run is resumed only with the same ones.

    Attributes
    ----------
    resumed_images : int
        Images the interrupted run wrote and this one keeps (0 when not resuming).
    source_crc32c : list of int
        CRC-32C of the source images of each finished chunk.
    """

    def __init__(
        self,
        path: str | Path,
        meta: StoreMeta,
        *,
        overwrite: bool = False,
        resume: bool = False,
        run_settings: dict[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.meta = meta
        self.overwrite = overwrite
        self.resume = resume
        self.run_settings = json.loads(json.dumps(run_settings or {}))
        self._lock = _Lock(self.path.parent / f".{self.path.name}.lock")
        self.tmp = self.path.parent / f".{self.path.name}.mpsd-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._arrays: dict[str, Any] = {}
        self.committed = False
        self.resumed_images = 0
        self.source_crc32c: list[int] = []
        self.images_written = 0
        # (SHA-256, size) of the chunk files this writer wrote itself, hashed while the bytes were
        # in hand (on the I/O thread), so that the commit does not read them back
        self._digests: dict[str, tuple[str, int]] = {}
        # what an interrupted run wrote is kept if this one fails before writing anything new
        self._keep_on_failure = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> StoreWriter:
        if self.path.exists() or self.path.is_symlink():
            if not self.overwrite:
                raise OptionError(f"{self.path}: already exists (use --overwrite to replace it)")
            if not self.path.is_dir() or self.path.is_symlink():
                raise OptionError(f"{self.path}: exists and is not a store folder; refusing to replace it")
        if not self.path.parent.is_dir():
            raise OptionError(f"{self.path.parent}: output folder does not exist")
        if not os.access(self.path.parent, os.W_OK):
            raise OptionError(f"{self.path.parent}: output folder is not writable")
        self._lock.acquire()
        try:
            adopted = self.resume and self._adopt()
            recover(self.path, keep=self.tmp)  # removes every other stopped writer's temporary store
            if adopted:
                try:
                    self._reopen()
                except StoreError as exc:  # nothing of it can be used: start from the beginning
                    log.info("%s; starting from the beginning", exc)
                    self._cleanup()
                    self._arrays, self.source_crc32c = {}, []
                    self.resumed_images = self.images_written = 0
                    self._keep_on_failure = adopted = False
            if not adopted:
                self._create()
        except BaseException:
            if not self._keep_on_failure:
                self._cleanup()
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.committed:
            interrupted = isinstance(exc, KeyboardInterrupt) and self.images_written > 0
            if interrupted:
                log.info("%s: interrupted after %d images; compress --resume continues", self.path, self.images_written)
            if not (interrupted or self._keep_on_failure):
                self._cleanup()
        self._lock.release()

    def _cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ resume
    def _adopt(self) -> bool:
        """Move the temporary store of an interrupted run with these settings to :attr:`tmp`."""
        candidates = _resumable_runs(self.path)
        if not candidates:
            log.info("%s: no interrupted run to resume; starting from the beginning", self.path)
            return False
        want = json.loads(json.dumps(self.meta.to_attrs()))
        mismatch = None
        for leftover, attrs, progress in candidates:
            if attrs == want and progress["settings"] == self.run_settings:
                os.replace(leftover, self.tmp)
                self._keep_on_failure = True
                n_done = min(progress["n_images"], self.meta.n_images)
                n_chunks = -(-n_done // self.meta.chunk_images)
                if len(progress["source_crc32c"]) < n_chunks:
                    n_chunks = len(progress["source_crc32c"])
                    n_done = n_chunks * self.meta.chunk_images
                self.resumed_images = n_done
                self.source_crc32c = list(progress["source_crc32c"][:n_chunks])
                return True
            if mismatch is None:
                mismatch = _differences(attrs, want) or _differences(progress["settings"], self.run_settings)
        raise OptionError(
            f"{self.path}: cannot resume: the interrupted run had other settings ({mismatch}); "
            "run without --resume to start again"
        )

    def _reopen(self) -> None:
        """Open the adopted store and keep only the chunks that read back whole."""
        import zarr
        from zarr.storage import LocalStore

        try:
            self.group = zarr.open_group(LocalStore(self.tmp), mode="r+", zarr_format=3)
            for name, shape, dtype in self._array_specs():
                arr = self.group[name]
                if arr.shape != shape or arr.dtype != np.dtype(dtype):
                    raise StoreError(f"{name}: {arr.shape} {arr.dtype}, expected {shape} {dtype}")
                self._arrays[name] = arr
        except Exception as exc:
            raise StoreError(f"{self.path}: cannot resume: the interrupted run's store is damaged ({exc})") from exc
        shutil.rmtree(self.tmp / "names", ignore_errors=True)  # written last, made again
        for leftover in self.tmp.rglob("*.partial"):
            leftover.unlink()
        # A crash (power loss) can lose data that was never synced: keep the chunks up to the first
        # one that is missing or does not decode (crc32c, zstd).
        ch = self.meta.chunk_images
        kept = 0
        for index in range(len(self.source_crc32c)):
            start, stop = index * ch, min((index + 1) * ch, self.resumed_images)
            try:
                for name, arr in self._arrays.items():
                    if name == "labels":
                        continue
                    key = chunk_key(name, arr, index)
                    if not (self.tmp / key).is_file():
                        raise StoreError(f"{key}: missing")
                    arr[start:stop]
            except Exception as exc:
                log.info("%s: chunk %d of the interrupted run is written again (%s)", self.path, index, exc)
                break
            kept = stop
        self.resumed_images = kept
        del self.source_crc32c[-(-kept // ch) :]
        self.images_written = kept

    def check_resumed_chunk(self, start: int, crc: int) -> None:
        """Raise :class:`~mpsd.errors.InputError` if the source chunk at ``start`` is not the one written."""
        index = start // self.meta.chunk_images
        if crc != self.source_crc32c[index]:
            stop = min(start + self.meta.chunk_images, self.meta.n_images)
            raise InputError(
                f"{self.path}: cannot resume: images {start}..{stop - 1} of the input are not those the "
                "interrupted run compressed (the input changed); run without --resume to start again"
            )

    def _write_chunk(self, name: str, index: int, rows: np.ndarray) -> None:
        """Write chunk ``index`` of array ``name`` as zarr would: bytes → zstd → CRC-32C.

        The same file, byte for byte, as ``array[rows] = value`` through zarr's codec pipeline
        (``tests/test_format.py`` compares whole stores), for a fifth of the CPU: zarr's
        event loop and indexing cost about 5 µs per CIFAR-10 image, compression 1 µs.  A last chunk
        that is not full is padded with the fill value (0), as zarr stores edge chunks.
        """
        import google_crc32c

        arr = self._arrays[name]
        dtype = np.dtype(arr.dtype).newbyteorder("<")
        chunk_shape = tuple(arr.chunks)
        data = np.ascontiguousarray(rows, dtype=dtype)
        if data.shape != chunk_shape:
            padded = np.zeros(chunk_shape, dtype=dtype)
            padded[: data.shape[0]] = data
            data = padded
        body = bytes(_zstd().encode(data))
        key = chunk_key(name, arr, index)
        checksum = google_crc32c.value(body).to_bytes(4, "little")
        self._digests.pop(key, None)  # a rewrite that fails half way leaves no stale digest
        _write_file(self.tmp / key, body, checksum)
        digest = hashlib.sha256(body)
        digest.update(checksum)
        self._digests[key] = (digest.hexdigest(), len(body) + len(checksum))

    def _source_record(self) -> dict[str, Any]:
        """What the manifest keeps of the source (``verify --inputs``): a CRC-32C per chunk of images."""
        ch = self.meta.chunk_images
        if len(self.source_crc32c) != -(-self.meta.n_images // ch):
            return {}  # written without source checksums (library use of write_batch)
        return {"source_crc32c": self.source_crc32c, "source_chunk_images": ch}

    def _record_progress(self) -> None:
        record = {"n_images": self.images_written, "source_crc32c": self.source_crc32c, "settings": self.run_settings}
        tmp = self.tmp / (PROGRESS_NAME + ".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.tmp / PROGRESS_NAME)

    # ------------------------------------------------------------------ layout
    def _array_specs(self) -> list[tuple[str, tuple[int, ...], str]]:
        """(name, shape, dtype) of every per-image array of the store."""
        meta = self.meta
        n, m = meta.n_images, meta.mps_per_image
        n_sites = len(meta.layout.sites)
        specs: list[tuple[str, tuple[int, ...], str]] = []
        for i in range(len(meta.stages)):
            for k in range(n_sites):
                specs.append((f"stage{i}/core{k}", meta.core_shape(i, k), meta.storage_dtype))
            if meta.storage_dtype == "int8":
                specs.append((f"stage{i}/scales", (n, m, n_sites), "float32"))
            specs.append((f"stage{i}/ranks", (n, m, n_sites - 1), "uint16"))
            if meta.has_metrics:
                specs.append((f"stage{i}/local_error", (n, m, n_sites - 1), "float32"))
        if meta.has_metrics:
            specs.append(("metrics/entropy", (n, m, n_sites - 1), "float32"))
            specs.append(("metrics/norm", (n, m), "float32"))
            specs.append(("metrics/error", (n, m), "float32"))
            specs.append(("metrics/sq_error", (n,), "float64"))
        if meta.has_labels:
            specs.append(("labels", (n,), "int64"))
        return specs

    def _create(self) -> None:
        import zarr
        from zarr.storage import LocalStore

        store = LocalStore(self.tmp)
        self.group = zarr.open_group(store, mode="w-", zarr_format=3, attributes={ATTRS_KEY: self.meta.to_attrs()})
        ch = self.meta.chunk_images
        codecs = array_codecs(chunk_separator(self.meta.format_version))
        for name, shape, dtype in self._array_specs():
            self._arrays[name] = self.group.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=(min(ch, shape[0]), *shape[1:]),
                fill_value=0,
                config={"write_empty_chunks": True},
                **codecs,
            )

    # ------------------------------------------------------------------ data
    def write_batch(self, start: int, batch: EncodedBatch, sq_error: np.ndarray, source_crc32c: int | None = None) -> None:
        """Write the encoded images ``start : start + B``.

        Parameters
        ----------
        start : int
            Index of the first image.  Batches should be aligned to ``chunk_images``.
        batch : EncodedBatch
            Encoded site tensors of B images (B·M tensors, image-major).
        sq_error : ndarray of shape (B,)
            Sum of squared pixel errors of each decoded integer image.
        source_crc32c : int, optional
            CRC-32C of the B source images (:func:`source_crc32c`), recorded so that a resumed run
            can check it is given the same input.  With it, batches must be whole chunks written
            in order.
        """
        m = self.meta.mps_per_image
        n_img = sq_error.shape[0]
        stop = start + n_img
        writes: list[tuple[str, np.ndarray]] = []

        def put(name: str, value: np.ndarray) -> None:
            writes.append((name, value.reshape(n_img, m, *value.shape[1:]) if value.shape[0] == n_img * m else value))

        for i, stage in enumerate(batch.stages):
            for k, rows in enumerate(stored_cores(self.meta, i, stage.cores, stage.ranks)):
                put(f"stage{i}/core{k}", rows)
            if stage.scales is not None:
                put(f"stage{i}/scales", stage.scales.astype(np.float32))
            put(f"stage{i}/ranks", stage.ranks.astype(np.uint16))
            if self.meta.has_metrics:
                put(f"stage{i}/local_error", stage.local_errors.astype(np.float32))
        if self.meta.has_metrics:
            put("metrics/entropy", batch.entropy.astype(np.float32))
            put("metrics/norm", batch.norm.astype(np.float32))
            put("metrics/error", batch.error.astype(np.float32))
            writes.append(("metrics/sq_error", np.asarray(sq_error)))
        ch = self.meta.chunk_images
        if start % ch == 0 and (stop - start == ch or stop == self.meta.n_images) and not _ZARR_WRITES:
            for name, value in writes:
                self._write_chunk(name, start // ch, value)
        else:
            for name, _ in writes:  # zarr rewrites chunks of these arrays: hash them at commit
                for key in [k for k in self._digests if k.startswith(name + "/")]:
                    del self._digests[key]
            _set_rows([(self._arrays[name], value) for name, value in writes], start, stop)
        self._keep_on_failure = False
        if source_crc32c is not None:
            if start != self.images_written or start != len(self.source_crc32c) * self.meta.chunk_images:
                raise ValueError(f"write_batch: chunks must be written in order (got {start}, expected {self.images_written})")
            self.source_crc32c.append(int(source_crc32c))
            self.images_written = stop
            self._record_progress()
        _fault("after_first_batch")

    def write_labels(self, labels: np.ndarray) -> None:
        self._arrays["labels"][...] = labels.astype(np.int64)

    def write_names(self, names: list[str]) -> None:
        """Store relative file names as UTF-8 bytes plus offsets (``names/utf8``, ``names/offsets``)."""
        # one growing buffer, not a list of a million small bytes objects
        joined = bytearray()
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        for i, n in enumerate(names):
            raw = os.fsencode(n) if isinstance(n, str) else bytes(n)
            joined += raw.decode("utf-8", "surrogateescape").encode("utf-8", "surrogateescape")
            offsets[i + 1] = len(joined)
        blob = np.frombuffer(joined, dtype=np.uint8)
        codecs = array_codecs(chunk_separator(self.meta.format_version))
        for name, value in (("names/offsets", offsets), ("names/utf8", blob)):
            arr = self.group.create_array(
                name, shape=value.shape, dtype=value.dtype, chunks=(max(min(1 << 20, value.shape[0]), 1),),
                fill_value=0, config={"write_empty_chunks": True}, **codecs,
            )
            if value.size:
                arr[...] = value

    # ------------------------------------------------------------------ commit
    def commit(self) -> None:
        """Write the manifest and move the store into place (replacing an old one if allowed)."""
        _fault("before_commit")
        try:
            for leftover in self.tmp.rglob("*.partial"):
                leftover.unlink()
            write_manifest(self.tmp, self.meta.n_images, self._source_record(), known=self._digests)
            _fault("after_manifest")
            if self.path.exists():
                swap_into_place(self.tmp, self.path)
            else:
                os.replace(self.tmp, self.path)
            _fsync_path(self.path.parent)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreError(f"{self.path}: no space left while committing the store") from exc
            raise
        self.committed = True


def source_crc32c(images: np.ndarray) -> int:
    """CRC-32C of a chunk of source images (their bytes in C order), as the progress record keeps it."""
    import crc32c

    return int(crc32c.crc32c(np.ascontiguousarray(images)))
