"""The common shape of every reader: an :class:`ImageSource` streams images in chunks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from mpsd.errors import InputError

#: Image dtypes a source may yield.  Everything else is converted by the reader (documented there).
SUPPORTED_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))


@dataclass
class ImageSource:
    """A dataset of equally sized images that can be read in slices.

    Parameters
    ----------
    path : str
        Where the images come from (shown in messages).
    n_images : int
        Number of images N.
    image_shape : tuple of int
        ``(H, W, C)``; ``C`` is 1 for greyscale.
    dtype : numpy.dtype
        ``uint8`` or ``uint16``.
    read : callable
        ``read(start, stop)`` returns the images ``start:stop`` as an array of shape
        ``(stop - start, H, W, C)`` and dtype ``dtype``.
    labels : ndarray of shape (N,), optional
        Integer class labels (int64).
    classes : list of str, optional
        Class names, indexed by label.
    names : list of str, optional
        Relative POSIX file names (class folders included) for folder inputs.
    channel_axis : bool
        Whether the source images had an explicit channel axis (decoders give back the same form).
    skipped : list of (str, str)
        Files left out with ``--skip-bad``: ``(relative name, reason)``.
    conversions : dict of str to int
        Lossy or notable conversions applied while reading (e.g. ``{"P->RGB": 3}``), recorded in
        the store's metadata.
    """

    path: str
    n_images: int
    image_shape: tuple[int, int, int]
    dtype: np.dtype
    read: Callable[[int, int], np.ndarray]
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    names: list[str] | None = None
    channel_axis: bool = True
    skipped: list[tuple[str, str]] = field(default_factory=list)
    conversions: dict[str, int] = field(default_factory=dict)

    def iter_chunks(self, chunk_images: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, images)`` with ``images`` of shape ``(B, H, W, C)``, B <= chunk_images."""
        for start in range(0, self.n_images, chunk_images):
            stop = min(start + chunk_images, self.n_images)
            block = self.read(start, stop)
            expected = (stop - start, *self.image_shape)
            if block.shape != expected or block.dtype != self.dtype:
                raise InputError(
                    f"{self.path}: reader returned {block.shape} {block.dtype}, "
                    f"expected {expected} {self.dtype}"
                )
            yield start, block


def as_nhwc(images: np.ndarray, *, where: str = "array") -> tuple[np.ndarray, bool]:
    """Return ``images`` as (N, H, W, C) and whether it had a channel axis.

    Parameters
    ----------
    images : ndarray of shape (N, H, W) or (N, H, W, C)
        Integer images, C in 1..4.
    where : str
        Name used in error messages.
    """
    if images.ndim == 3:
        return images[..., np.newaxis], False
    if images.ndim == 4 and 1 <= images.shape[-1] <= 4:
        return images, True
    raise InputError(
        f"{where}: expected images of shape (N, H, W) or (N, H, W, C) with C <= 4, got {images.shape}"
    )


def source_from_array(
    images: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    classes: list[str] | None = None,
    names: list[str] | None = None,
    path: str = "<array>",
) -> ImageSource:
    """Wrap an in-memory array (N, H, W) or (N, H, W, C) of uint8/uint16 images as a source."""
    images = np.asarray(images)
    nhwc, channel_axis = as_nhwc(images, where=path)
    if nhwc.dtype not in SUPPORTED_DTYPES:
        if nhwc.dtype.kind in "iub" and nhwc.size and nhwc.min() >= 0 and nhwc.max() <= 255:
            nhwc = nhwc.astype(np.uint8)
        else:
            raise InputError(
                f"{path}: images must be uint8 or uint16 (or integers in 0..255), got {nhwc.dtype}"
            )
    n = nhwc.shape[0]
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (n,) or labels.dtype.kind not in "iu":
            raise InputError(f"{path}: labels must be integers of shape ({n},), got {labels.shape} {labels.dtype}")
        labels = labels.astype(np.int64)
    if names is not None and len(names) != n:
        raise InputError(f"{path}: {len(names)} names for {n} images")

    def read(start: int, stop: int) -> np.ndarray:
        return np.ascontiguousarray(nhwc[start:stop])

    return ImageSource(
        path=path,
        n_images=n,
        image_shape=tuple(nhwc.shape[1:]),  # type: ignore[arg-type]
        dtype=nhwc.dtype,
        read=read,
        labels=labels,
        classes=list(classes) if classes is not None else None,
        names=names,
        channel_axis=channel_axis,
    )
