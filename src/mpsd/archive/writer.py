"""Write an mpsd store atomically: temp sibling, manifest last, then rename into place.

A store is *committed* when its manifest (``mpsd-manifest.json``: SHA-256 of every file) exists.
Until then it lives in a hidden temporary sibling of the target, so a crash leaves either no store
or the previous committed one.  ``overwrite`` swaps the new store in only after it is committed.
A lock file next to the target makes a second writer fail fast.
"""

from __future__ import annotations

import contextlib
import errno
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

from mpsd.archive.codecs import array_codecs
from mpsd.archive.format import (
    ATTRS_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    StoreMeta,
    stored_cores,
)
from mpsd.core.codec import EncodedBatch
from mpsd.errors import OptionError, StoreError, StoreLockedError

log = logging.getLogger(__name__)


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


def hash_tree(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` except the manifest, keyed by POSIX relative path."""
    digests = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            h = hashlib.sha256()
            with open(full, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            digests[rel] = h.hexdigest()
    return dict(sorted(digests.items()))


def write_manifest(root: Path, n_images: int, extra: dict[str, Any] | None = None, *, version: int = FORMAT_VERSION) -> None:
    """Hash every file of ``root``, fsync them, and write the manifest last (committing the store).

    ``version`` is the store's format version (an older store keeps its own when a supplement is added).
    """
    files = hash_tree(root)
    # fsync every file before the manifest exists.  Many fsyncs in flight at once cost about as
    # much as one (the filesystem commits them together): ~0.1 ms a file instead of ~4 ms.
    with ThreadPoolExecutor(max_workers=16) as pool:
        for _ in pool.map(lambda rel: _fsync_path(root / rel), files):
            pass
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


def recover(path: str | Path) -> str | None:
    """Finish or roll back a swap that a crash interrupted, and remove dead writers' leftovers.

    ``--overwrite`` records ``{"old": ..., "new": ...}`` in ``.NAME.mpsd-swap.json`` before moving
    the old store aside and the new one into place.  If the target is missing afterwards, the
    committed new store is moved into place (roll forward), or else the old one back (roll back).
    Temporary folders of writers that are no longer running are deleted.  Call with the lock held.

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
        try:
            pid = int(leftover.name.rsplit("-", 2)[1])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(leftover, ignore_errors=True)
            done = done or "removed temporary folders of interrupted runs"
    if done:
        log.info("%s: %s", path, done)
    return done


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
    """

    def __init__(self, path: str | Path, meta: StoreMeta, *, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.meta = meta
        self.overwrite = overwrite
        self._lock = _Lock(self.path.parent / f".{self.path.name}.lock")
        self.tmp = self.path.parent / f".{self.path.name}.mpsd-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self._arrays: dict[str, Any] = {}
        self.committed = False

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
            recover(self.path)
            self._create()
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.committed:
            self._cleanup()
        self._lock.release()

    def _cleanup(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ layout
    def _create(self) -> None:
        import zarr
        from zarr.storage import LocalStore

        meta = self.meta
        n, m = meta.n_images, meta.mps_per_image
        sites = meta.layout.sites
        n_sites = len(sites)
        store = LocalStore(self.tmp)
        self.group = zarr.open_group(store, mode="w-", zarr_format=3, attributes={ATTRS_KEY: meta.to_attrs()})
        ch = meta.chunk_images
        codecs = array_codecs()

        def make(name: str, shape: tuple[int, ...], dtype: str) -> None:
            chunks = (min(ch, shape[0]), *shape[1:])
            self._arrays[name] = self.group.create_array(
                name,
                shape=shape,
                dtype=dtype,
                chunks=chunks,
                fill_value=0,
                config={"write_empty_chunks": True},
                **codecs,
            )

        for i in range(len(meta.stages)):
            for k in range(n_sites):
                make(f"stage{i}/core{k}", meta.core_shape(i, k), meta.storage_dtype)
            if meta.storage_dtype == "int8":
                make(f"stage{i}/scales", (n, m, n_sites), "float32")
            make(f"stage{i}/ranks", (n, m, n_sites - 1), "uint16")
            if meta.has_metrics:
                make(f"stage{i}/local_error", (n, m, n_sites - 1), "float32")
        if meta.has_metrics:
            make("metrics/entropy", (n, m, n_sites - 1), "float32")
            make("metrics/norm", (n, m), "float32")
            make("metrics/error", (n, m), "float32")
            make("metrics/sq_error", (n,), "float64")
        if meta.has_labels:
            make("labels", (n,), "int64")

    # ------------------------------------------------------------------ data
    def write_batch(self, start: int, batch: EncodedBatch, sq_error: np.ndarray) -> None:
        """Write the encoded images ``start : start + B``.

        Parameters
        ----------
        start : int
            Index of the first image.  Batches should be aligned to ``chunk_images``.
        batch : EncodedBatch
            Encoded site tensors of B images (B·M tensors, image-major).
        sq_error : ndarray of shape (B,)
            Sum of squared pixel errors of each decoded integer image.
        """
        m = self.meta.mps_per_image
        n_img = sq_error.shape[0]
        stop = start + n_img
        a = self._arrays
        writes: list[tuple[Any, np.ndarray]] = []

        def put(name: str, value: np.ndarray) -> None:
            writes.append((a[name], value.reshape(n_img, m, *value.shape[1:]) if value.shape[0] == n_img * m else value))

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
            writes.append((a["metrics/sq_error"], np.asarray(sq_error)))
        _set_rows(writes, start, stop)
        _fault("after_first_batch")

    def write_labels(self, labels: np.ndarray) -> None:
        self._arrays["labels"][...] = labels.astype(np.int64)

    def write_names(self, names: list[str]) -> None:
        """Store relative file names as UTF-8 bytes plus offsets (``names/utf8``, ``names/offsets``)."""
        encoded = [os.fsencode(n) if isinstance(n, str) else bytes(n) for n in names]
        encoded = [n.decode("utf-8", "surrogateescape").encode("utf-8", "surrogateescape") for n in encoded]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(e) for e in encoded])
        blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        codecs = array_codecs()
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
            write_manifest(self.tmp, self.meta.n_images)
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
