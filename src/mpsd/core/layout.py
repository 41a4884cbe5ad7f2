"""Fold images onto the sites of an MPS and back.

An image of size H×W is folded into an order-n tensor.  H and W are each factorised into n
factors, ``H = h_1···h_n`` and ``W = w_1···w_n``, and site k carries the pair (k-th row factor,
k-th column factor), so its dimension is ``d_k = h_k·w_k``.

Two orders are supported:

``quadtree`` (default)
    Site 1 is the coarsest scale, as in Latorre's ICE: the row index is written in the mixed
    radix ``(h_1, ..., h_n)``, the column index in ``(w_1, ..., w_n)`` and site k gets digit k of
    both.  For 32×32 with factors 2,2,2,2,2 site 1 picks a quadrant, site 2 a quadrant of it, ...
``row``
    A plain C-order reshape of the (padded) image into ``(d_1, ..., d_n)`` (Algorithm 1).

Colour is handled in one of two ways: ``separate`` (one MPS per channel) or ``site`` (the channels
become one more site, of dimension C, after the spatial ones).

Sizes whose factors would leave a site of dimension 1 or a prime larger than
:data:`MAX_PRIME` are zero-padded at the bottom/right to the next size that factors; the padding
is recorded and cropped on decode.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np

from mpsd.errors import OptionError

Order = Literal["quadtree", "row"]
Colour = Literal["separate", "site"]

#: Largest prime factor allowed in a padded height or width.
MAX_PRIME = 7
#: Number of spatial sites chosen when none is given (the paper uses five throughout).
DEFAULT_N_SITES = 5

#: Layouts of the paper's Table 4, for square images: size -> (row factors, column factors).
TABLE4_FACTORS: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    32: ((2, 2, 2, 2, 2), (2, 2, 2, 2, 2)),  # sites 4,4,4,4,4 (CIFAR)
    28: ((2, 2, 7, 1, 1), (1, 2, 1, 7, 2)),  # sites 2,4,7,7,2 (Fashion-MNIST)
    224: ((7, 2, 4, 4, 1), (1, 4, 4, 2, 7)),  # sites 7,8,16,8,7 (ImageNet)
}


@dataclass(frozen=True)
class SiteLayout:
    """How images of one shape map onto MPS sites.

    Parameters
    ----------
    height, width : int
        Image size before padding.
    channels : int
        Number of channels C (1 for greyscale).
    row_factors, col_factors : tuple of int
        ``h_k`` and ``w_k``; their products are the padded height and width.
    order : {"quadtree", "row"}
        How pixels are addressed (see module docstring).
    colour : {"separate", "site"}
        One MPS per channel, or the channel as an extra last site.
    """

    height: int
    width: int
    channels: int
    row_factors: tuple[int, ...]
    col_factors: tuple[int, ...]
    order: Order = "quadtree"
    colour: Colour = "separate"

    def __post_init__(self) -> None:
        if len(self.row_factors) != len(self.col_factors):
            raise OptionError("row and column factors must have the same length")
        if self.padded_height < self.height or self.padded_width < self.width:
            raise OptionError(
                f"sites {self.spatial_sites} cover {self.padded_height}x{self.padded_width}, "
                f"smaller than the images ({self.height}x{self.width})"
            )
        if self.order not in ("quadtree", "row"):
            raise OptionError(f"order must be 'quadtree' or 'row', got {self.order!r}")
        if self.colour not in ("separate", "site"):
            raise OptionError(f"colour must be 'separate' or 'site', got {self.colour!r}")

    @property
    def padded_height(self) -> int:
        return math.prod(self.row_factors)

    @property
    def padded_width(self) -> int:
        return math.prod(self.col_factors)

    @property
    def spatial_sites(self) -> tuple[int, ...]:
        """Dimensions ``d_k = h_k·w_k`` of the spatial sites."""
        return tuple(h * w for h, w in zip(self.row_factors, self.col_factors, strict=True))

    @property
    def sites(self) -> tuple[int, ...]:
        """Dimensions of all sites of one MPS (the colour site last when ``colour='site'``)."""
        if self.colour == "site":
            return (*self.spatial_sites, self.channels)
        return self.spatial_sites

    @property
    def mps_per_image(self) -> int:
        """How many MPS describe one image (C for ``separate``, 1 for ``site``)."""
        return self.channels if self.colour == "separate" else 1

    @property
    def pixels_per_mps(self) -> int:
        """Entries of the (padded) tensor one MPS describes: ``prod(sites)``."""
        return math.prod(self.sites)

    def to_dict(self) -> dict[str, object]:
        return {
            "height": self.height,
            "width": self.width,
            "channels": self.channels,
            "row_factors": list(self.row_factors),
            "col_factors": list(self.col_factors),
            "order": self.order,
            "colour": self.colour,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SiteLayout:
        return cls(
            height=int(data["height"]),  # type: ignore[call-overload]
            width=int(data["width"]),  # type: ignore[call-overload]
            channels=int(data["channels"]),  # type: ignore[call-overload]
            row_factors=tuple(int(v) for v in data["row_factors"]),  # type: ignore[attr-defined]
            col_factors=tuple(int(v) for v in data["col_factors"]),  # type: ignore[attr-defined]
            order=str(data["order"]),  # type: ignore[arg-type]
            colour=str(data["colour"]),  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------------ folding
    def _spatial_permutation(self) -> tuple[int, ...]:
        n = len(self.row_factors)
        # axes after reshape (N, h_1..h_n, w_1..w_n, C): interleave h_k, w_k
        perm = [0]
        for k in range(n):
            perm += [1 + k, 1 + n + k]
        return tuple(perm)

    def to_sites(self, images: np.ndarray, *, dtype: type = np.float64) -> np.ndarray:
        """Fold images into site tensors.

        Parameters
        ----------
        images : ndarray of shape (N, H, W, C)
            Images of this layout's size.
        dtype : numpy dtype
            Dtype of the result.

        Returns
        -------
        ndarray of shape (N·C, d_1, ..., d_n) for ``separate``, (N, d_1, ..., d_n, C) for ``site``
        """
        n_img = images.shape[0]
        expected = (self.height, self.width, self.channels)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise OptionError(f"expected images of shape (N, {expected[0]}, {expected[1]}, {expected[2]}), got {images.shape}")
        c = self.channels
        hp, wp = self.padded_height, self.padded_width
        if (hp, wp) != (self.height, self.width):
            padded = np.zeros((n_img, hp, wp, c), dtype=dtype)
            padded[:, : self.height, : self.width] = images
        else:
            padded = images.astype(dtype, copy=False)
        # channel-first per image: (N, C, Hp, Wp) for separate, keep channel last for site
        if self.colour == "separate":
            planes = padded.transpose(0, 3, 1, 2).reshape(n_img * c, hp, wp)
            if self.order == "row":
                return np.ascontiguousarray(planes).reshape(n_img * c, *self.spatial_sites)
            t = planes.reshape(n_img * c, *self.row_factors, *self.col_factors)
            t = t.transpose(self._spatial_permutation())
            return np.ascontiguousarray(t).reshape(n_img * c, *self.spatial_sites)
        if self.order == "row":
            # C-order over (H, W) first, channel as the last site
            return np.ascontiguousarray(padded).reshape(n_img, *self.spatial_sites, c)
        n = len(self.row_factors)
        t = padded.reshape(n_img, *self.row_factors, *self.col_factors, c)
        t = t.transpose((*self._spatial_permutation(), 1 + 2 * n))
        return np.ascontiguousarray(t).reshape(n_img, *self.spatial_sites, c)

    def from_sites(self, tensors: np.ndarray) -> np.ndarray:
        """Unfold site tensors back into images (inverse of :meth:`to_sites`).

        Parameters
        ----------
        tensors : ndarray of shape (N·C, d_1, ..., d_n) or (N, d_1, ..., d_n, C)
            Also accepted flattened: (N·C, prod d) or (N, prod d · C).

        Returns
        -------
        ndarray of shape (N, H, W, C), cropped to the original size.
        """
        c = self.channels
        hp, wp = self.padded_height, self.padded_width
        n = len(self.row_factors)
        if self.colour == "separate":
            n_img = tensors.shape[0] // c
            if self.order == "row":
                planes = tensors.reshape(n_img * c, hp, wp)
            else:
                t = tensors.reshape(n_img * c, *(f for hw in zip(self.row_factors, self.col_factors, strict=True) for f in hw))
                inv = np.argsort(self._spatial_permutation())
                planes = t.transpose(inv).reshape(n_img * c, hp, wp)
            images = planes.reshape(n_img, c, hp, wp).transpose(0, 2, 3, 1)
        else:
            n_img = tensors.shape[0]
            if self.order == "row":
                images = tensors.reshape(n_img, hp, wp, c)
            else:
                t = tensors.reshape(n_img, *(f for hw in zip(self.row_factors, self.col_factors, strict=True) for f in hw), c)
                perm = (*self._spatial_permutation(), 1 + 2 * n)
                images = t.transpose(np.argsort(perm)).reshape(n_img, hp, wp, c)
        return images[:, : self.height, : self.width, :]


# ---------------------------------------------------------------------- choosing a layout
def _is_smooth(x: int) -> bool:
    for p in (2, 3, 5, 7):
        while x % p == 0:
            x //= p
    return x == 1


def _omega(x: int) -> int:
    """Number of prime factors of x, with multiplicity."""
    count, p = 0, 2
    while p * p <= x:
        while x % p == 0:
            x //= p
            count += 1
        p += 1
    return count + (1 if x > 1 else 0)


def padded_size(size: int) -> int:
    """Smallest size >= ``size`` whose prime factors are all <= :data:`MAX_PRIME`."""
    if size < 1:
        raise OptionError(f"image size must be positive, got {size}")
    while not _is_smooth(size):
        size += 1
    return size


@lru_cache(maxsize=256)
def _ordered_factorisations(x: int, n: int) -> np.ndarray:
    """All ordered n-tuples of positive integers with product x, shape (F, n)."""
    out: list[tuple[int, ...]] = []

    def rec(rem: int, k: int, cur: tuple[int, ...]) -> None:
        if k == n - 1:
            out.append((*cur, rem))
            return
        for f in range(1, rem + 1):
            if rem % f == 0:
                rec(rem // f, k + 1, (*cur, f))

    rec(x, 0, ())
    return np.array(out, dtype=np.int64).reshape(-1, n)


def _best_pair(
    height: int, width: int, n: int, target: tuple[int, ...] | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Pick row/column factors (h, w) of length n; None if none fits.

    Without ``target``: every site >= 2, smallest largest site (then smallest sum of sites: the
    most balanced), then the large sites in the middle, then lexicographically smallest, then
    row and column factors as equal as possible.  With ``target``: ``h_k·w_k == target_k``,
    row and column factors as equal as possible.
    """
    fh = _ordered_factorisations(height, n)
    fw = _ordered_factorisations(width, n)
    sites = fh[:, None, :] * fw[None, :, :]  # (Fh, Fw, n)
    if target is not None:
        ok = (sites == np.asarray(target)).all(axis=-1)
    else:
        ok = (sites >= 2).all(axis=-1)
    ih, iw = np.nonzero(ok)
    if ih.size == 0:
        return None
    cand = sites[ih, iw]
    # square-ish sites: row and column factor of each site as equal as possible
    imbalance = np.abs(np.log(fh[ih]) - np.log(fw[iw])).sum(axis=1)
    keys: list[np.ndarray] = [fh[ih, k] for k in reversed(range(n))]  # last resort: deterministic
    keys.append(imbalance)
    if target is None:
        centre = (n - 1) / 2
        spread = (cand * np.abs(np.arange(n) - centre)).sum(axis=1)
        keys += [cand[:, k] for k in reversed(range(n))]
        keys += [spread, cand.sum(axis=1), cand.max(axis=1)]
    best = np.lexsort(keys)[0]
    return tuple(int(v) for v in fh[ih[best]]), tuple(int(v) for v in fw[iw[best]])


def parse_sites(text: str) -> list[int] | list[tuple[int, int]] | int | None:
    """Parse a ``--sites`` value.

    ``"auto"`` → None; ``"5"`` → 5 (number of sites); ``"4,4,4,4,4"`` → site dimensions;
    ``"2x2,2x2,..."`` → explicit (row, column) factor pairs.
    """
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    if re.fullmatch(r"\d+", text):
        return int(text)
    parts = [p.strip() for p in text.split(",")]
    if all(re.fullmatch(r"\d+x\d+", p) for p in parts):
        return [tuple(int(v) for v in p.split("x")) for p in parts]  # type: ignore[misc]
    if all(re.fullmatch(r"\d+", p) for p in parts):
        return [int(p) for p in parts]
    raise OptionError(f"--sites: expected 'auto', a number of sites, '4,4,4,4,4' or '2x2,2x2,...', got {text!r}")


def choose_layout(
    height: int,
    width: int,
    channels: int,
    *,
    sites: str | int | list[int] | list[tuple[int, int]] | None = None,
    order: Order = "quadtree",
    colour: Colour = "separate",
) -> SiteLayout:
    """Choose how images of size ``height``×``width`` map onto sites.

    Parameters
    ----------
    height, width, channels : int
        Image size.
    sites : None, int, str or list
        ``None``/``"auto"``: the automatic choice — Table 4 of the paper for 32×32 (4,4,4,4,4),
        28×28 (2,4,7,7,2) and 224×224 (7,8,16,8,7); otherwise five sites (fewer if the size has
        too few prime factors), every site of dimension >= 2, the largest site as small as possible
        and large sites towards the middle.  An int: that many sites, chosen the same way.  A list
        of site dimensions ``d_k``: row/column factors with ``h_k·w_k = d_k`` are found (the image is
        padded if ``prod d_k`` exceeds ``H·W`` and the dimensions still factor).  A list of
        ``(h_k, w_k)`` pairs: used as given.
    order : {"quadtree", "row"}
    colour : {"separate", "site"}

    Returns
    -------
    SiteLayout
    """
    if isinstance(sites, str):
        sites = parse_sites(sites)
    if height < 1 or width < 1 or channels < 1:
        raise OptionError(f"invalid image shape {height}x{width}x{channels}")
    if isinstance(sites, list) and sites and isinstance(sites[0], tuple):
        pairs = [tuple(p) for p in sites]  # type: ignore[misc]
        if any(h < 1 or w < 1 for h, w in pairs):
            raise OptionError(f"--sites: factors must be positive, got {sites}")
        return SiteLayout(height, width, channels, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs), order, colour)
    hp, wp = padded_size(height), padded_size(width)
    if isinstance(sites, list):
        dims = tuple(int(d) for d in sites)
        if len(dims) < 2 or any(d < 2 for d in dims):
            raise OptionError(f"--sites: need at least two sites of dimension >= 2, got {list(dims)}")
        total = math.prod(dims)
        if total < height * width:
            raise OptionError(
                f"--sites {','.join(map(str, dims))}: product {total} is smaller than the image "
                f"({height}x{width} = {height * width} pixels)"
            )
        for ph in range(height, 4 * height + 1):
            if total % ph:
                continue
            pw = total // ph
            if pw < width:
                continue
            pair = _best_pair(ph, pw, len(dims), dims)
            if pair is not None:
                return SiteLayout(height, width, channels, pair[0], pair[1], order, colour)
        raise OptionError(
            f"--sites {','.join(map(str, dims))} cannot be split into row and column factors "
            f"covering {height}x{width}; give them as pairs, e.g. 2x2,2x2,..."
        )
    if sites is None and height == width and height in TABLE4_FACTORS:
        h, w = TABLE4_FACTORS[height]
        return SiteLayout(height, width, channels, h, w, order, colour)
    n = DEFAULT_N_SITES if sites is None else int(sites)
    if n < 2:
        raise OptionError(f"--sites: need at least 2 sites, got {n}")
    n = min(n, _omega(hp) + _omega(wp)) if sites is None else n
    pair = _best_pair(hp, wp, n)
    if pair is None:
        raise OptionError(
            f"{height}x{width} images cannot be split into {n} sites of dimension >= 2 "
            f"(padded size {hp}x{wp}); choose fewer sites"
        )
    return SiteLayout(height, width, channels, pair[0], pair[1], order, colour)
