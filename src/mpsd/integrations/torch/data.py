"""Datasets that feed classifiers: from arrays, and straight from an mpsd store.

Every dataset here yields ``(x, y)`` with ``x`` a float32 tensor of shape ``(C, H, W)`` holding
pixel values scaled to ``[0, 1]`` and ``y`` an int64 scalar tensor (``-1`` when there are no
labels).  Normalisation belongs to the model (:class:`mpsd.integrations.torch.models.Normalize`);
:func:`channel_stats` computes the statistics.

Both datasets implement ``__getitems__``, which :class:`torch.utils.data.DataLoader` calls with
the whole list of a batch's indices, so a store is decoded one batch at a time rather than image
by image.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mpsd.errors import InputError, OptionError

__all__ = [
    "ArrayDataset",
    "StoreDataset",
    "channel_stats",
    "images_to_tensor",
    "nhwc",
]

log = logging.getLogger(__name__)

Transform = Callable[[torch.Tensor], torch.Tensor]


def nhwc(images: np.ndarray) -> np.ndarray:
    """View images ``(N, H, W)`` or ``(N, H, W, C)`` as ``(N, H, W, C)``.

    Raises
    ------
    InputError
        For any other number of dimensions.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4:
        raise InputError(f"expected images of shape (N, H, W) or (N, H, W, C), got {images.shape}")
    return images


def _max_value(dtype: np.dtype) -> float:
    return 65535.0 if np.dtype(dtype) == np.uint16 else 255.0


def images_to_tensor(images: np.ndarray, *, max_value: float | None = None) -> torch.Tensor:
    """Convert images to a float32 tensor ``(N, C, H, W)`` in ``[0, 1]``.

    Parameters
    ----------
    images : ndarray of shape (N, H, W) or (N, H, W, C)
        uint8, uint16, or float in pixel units.
    max_value : float, optional
        The pixel value that maps to 1 (default: 65535 for uint16, else 255).
    """
    arr = nhwc(images)
    scale = max_value if max_value is not None else _max_value(arr.dtype)
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)
    return t.to(torch.float32).div_(scale)


def channel_stats(images: np.ndarray, *, max_value: float | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation in ``[0, 1]`` units.

    Parameters
    ----------
    images : ndarray of shape (N, H, W) or (N, H, W, C)

    Returns
    -------
    mean, std : list of float, length C
        ``std`` is floored at 1e-3 so that constant channels do not divide by zero.
    """
    arr = nhwc(images)
    scale = max_value if max_value is not None else _max_value(arr.dtype)
    flat = arr.reshape(-1, arr.shape[-1]).astype(np.float64) / scale
    mean = flat.mean(axis=0)
    std = np.maximum(flat.std(axis=0), 1e-3)
    return [float(v) for v in mean], [float(v) for v in std]


def _labels_tensor(labels: np.ndarray | None, n: int, where: str) -> torch.Tensor:
    if labels is None:
        return torch.full((n,), -1, dtype=torch.int64)
    arr = np.asarray(labels)
    if arr.shape != (n,):
        raise InputError(f"{where}: {n} images but labels of shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputError(f"{where}: labels must be integers, got {arr.dtype}")
    return torch.from_numpy(arr.astype(np.int64))



def _pairs(x: torch.Tensor, y: torch.Tensor, transform: Any, target_transform: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image, label) pairs of a batch with the transform hooks applied to each."""
    out = []
    for xi, yi in zip(x, y, strict=True):
        if transform is not None:
            xi = transform(xi)
        if target_transform is not None:
            yi = target_transform(yi)
        out.append((xi, yi))
    return out

class ArrayDataset(Dataset):
    """Images held in memory.

    Parameters
    ----------
    images : ndarray of shape (N, H, W) or (N, H, W, C)
        uint8/uint16 images, or float in pixel units (give ``max_value``).
    labels : ndarray of shape (N,), optional
        Integer labels.
    transform : callable, optional
        Applied to each ``x`` (``(C, H, W)`` float tensor in ``[0, 1]``).
    target_transform : callable, optional
        Applied to each ``y``.
    max_value : float, optional
        Pixel value that maps to 1.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        transform: Transform | None = None,
        target_transform: Transform | None = None,
        max_value: float | None = None,
    ) -> None:
        self.x = images_to_tensor(images, max_value=max_value)
        self.y = _labels_tensor(labels, self.x.shape[0], "ArrayDataset")
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)``."""
        _, c, h, w = self.x.shape
        return (int(h), int(w), int(c))

    @property
    def targets(self) -> np.ndarray:
        """All labels, ``(N,)`` int64 (``-1`` where unknown)."""
        return self.y.numpy()

    def _finish(self, x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return _pairs(x, y, self.transform, self.target_transform)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._finish(self.x[index : index + 1] if index >= 0 else self.x[[index]], self.y[[index]])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.as_tensor(list(indices), dtype=torch.int64)
        return self._finish(self.x[idx], self.y[idx])


def _default_opener(path: Path) -> Any:
    import mpsd

    opener = getattr(mpsd, "open", None)
    if opener is None:  # pragma: no cover - before the public API existed
        from mpsd.archive.reader import open_store as opener
    return opener(path)


class StoreDataset(Dataset):
    """Images decoded on the fly from an mpsd store, with its labels.

    The store is opened lazily, once per process: the dataset pickles without its open handle, so
    it is safe with ``DataLoader(num_workers > 0)`` (each worker opens its own).  Decoding works a
    batch at a time (``__getitems__``); decoded chunks of the store are kept in a small LRU cache
    (``cache_bytes``) so that shuffled batches do not decode the same chunk again and again; each
    DataLoader worker keeps its own cache.

    Parameters
    ----------
    path : str or Path
        The store.
    indices : sequence of int, optional
        Which images of the store make up the dataset (default: all), e.g. a training split.
    transform : callable, optional
        Applied to each ``x``: a float32 tensor ``(C, H, W)`` in ``[0, 1]``.
    target_transform : callable, optional
        Applied to each ``y`` (an int64 scalar tensor).
    kind : {"image", "float"}
        ``"image"``: the rounded images, exactly what ``mpsd decompress`` writes; ``"float"``: the
        reconstruction before rounding (clipped to the pixel range).
    cache_bytes : int
        Memory for decoded chunks kept per process (least recently used dropped first); the default
        512 MiB holds all of Fashion-MNIST or CIFAR-10 decoded, so after the first epoch nothing is
        decoded again.  0 decodes only the images asked for, every time.
    labels : ndarray of shape (len(store),), optional
        Labels to use instead of the store's own.
    opener : callable, optional
        ``opener(path)`` returns an archive-like object (default :func:`mpsd.open`); it must be
        picklable (a module-level function) for worker processes.

    Examples
    --------
    >>> ds = StoreDataset("fmnist.mpsd")                      # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=128, shuffle=True, num_workers=2)  # doctest: +SKIP
    """

    def __init__(
        self,
        path: str | Path,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        transform: Transform | None = None,
        target_transform: Transform | None = None,
        kind: str = "image",
        cache_bytes: int = 512 * 2**20,
        labels: np.ndarray | None = None,
        opener: Callable[[Path], Any] | None = None,
    ) -> None:
        if kind not in ("image", "float"):
            raise OptionError(f"kind must be 'image' or 'float', got {kind!r}")
        if cache_bytes < 0:
            raise OptionError(f"cache_bytes must be >= 0, got {cache_bytes}")
        self.path = Path(path)
        self.kind = kind
        self.transform = transform
        self.target_transform = target_transform
        self.cache_bytes = int(cache_bytes)
        self._opener = opener or _default_opener
        archive = self._opener(self.path)
        self._n_store = len(archive)
        self.image_shape: tuple[int, int, int] = tuple(int(v) for v in archive.image_shape)  # type: ignore[assignment]
        self.classes: list[str] | None = list(archive.classes) if getattr(archive, "classes", None) is not None else None
        dtype = np.dtype(getattr(archive, "dtype", np.uint8))
        self.max_value = _max_value(dtype)
        meta = getattr(archive, "meta", None)
        self.chunk_images = int(getattr(meta, "chunk_images", 0) or 0) or max(1, self._n_store)
        store_labels = getattr(archive, "labels", None) if labels is None else labels
        if indices is None:
            self.indices = np.arange(self._n_store, dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= self._n_store):
                raise OptionError(f"{self.path}: indices out of range for a store of {self._n_store} images")
        all_labels = _labels_tensor(
            None if store_labels is None else np.asarray(store_labels), self._n_store, str(self.path)
        )
        self.y = all_labels[torch.from_numpy(self.indices)]
        self.has_labels = store_labels is not None
        # handle of this process, reopened after fork/spawn
        self._archive: Any = archive
        self._pid = os.getpid()
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()

    # pickling (DataLoader workers): never ship the open store or the cache
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_archive"] = None
        state["_pid"] = None
        state["_cache"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _store(self) -> Any:
        if self._archive is None or self._pid != os.getpid():
            self._archive = self._opener(self.path)
            self._pid = os.getpid()
            self._cache = OrderedDict()
        return self._archive

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def targets(self) -> np.ndarray:
        """All labels of the dataset, ``(len(self),)`` int64 (``-1`` where unknown)."""
        return self.y.numpy()

    def _decode(self, store_idx: np.ndarray) -> np.ndarray:
        """Decode store images ``store_idx`` as ``(B, H, W, C)`` (uint or float32 pixel units)."""
        archive = self._store()
        if self.cache_bytes == 0:
            return self._decode_raw(archive, store_idx)
        h, w, c = self.image_shape
        out: np.ndarray | None = None
        chunk_of = store_idx // self.chunk_images
        for chunk in np.unique(chunk_of):
            block = self._cache.get(int(chunk))
            if block is None:
                start = int(chunk) * self.chunk_images
                stop = min(start + self.chunk_images, self._n_store)
                block = self._decode_raw(archive, slice(start, stop))
                self._cache[int(chunk)] = block
                while len(self._cache) > 1 and sum(b.nbytes for b in self._cache.values()) > self.cache_bytes:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(int(chunk))
            if out is None:
                out = np.empty((store_idx.size, h, w, c), dtype=block.dtype)
            sel = chunk_of == chunk
            out[sel] = block[store_idx[sel] - int(chunk) * self.chunk_images]
        assert out is not None
        return out

    def _decode_raw(self, archive: Any, key: Any) -> np.ndarray:
        if self.kind == "float":
            block = np.asarray(archive.decode(key, kind="float"), dtype=np.float32)
            np.clip(block, 0.0, self.max_value, out=block)
        else:
            block = np.asarray(archive[key])
        h, w, c = self.image_shape
        return block.reshape(-1, h, w, c)

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pos = np.asarray(list(positions), dtype=np.int64)
        if pos.size == 0:
            return []
        if pos.min() < -len(self) or pos.max() >= len(self):
            raise IndexError(f"index out of range for a dataset of {len(self)} images")
        pos = pos % len(self)
        images = self._decode(self.indices[pos])
        x = images_to_tensor(images, max_value=self.max_value)
        y = self.y[torch.from_numpy(pos)]
        return _pairs(x, y, self.transform, self.target_transform)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([int(index)])[0]
