"""ICE, Latorre's "Image compression and entanglement" (2005): one truncated MPS per channel.

Each channel gets a 2-D DCT (``scipy.fft.dctn``, ``norm="ortho"``), its coefficients are folded
onto MPS sites with the block-structured (quadtree) addressing of
:func:`mpsd.core.layout.choose_layout`, and one MPS with a uniform maximal bond D is computed by
the batched TT-SVD of :mod:`mpsd.core.ttsvd`.  No residual stage: that is what mpsd adds.  The
cores are quantised and stored as mpsd stores a stage (the cores plus one ``(B, n)`` float32 array
of per-core scales, as :func:`mpsd.core.codec.encode_batch` makes); the reconstruction contracts the
quantised cores and inverts the DCT.  To meet a budget D is scanned (bond k is ``min(D, exact
rank)``), as in the paper's Figure 3.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.fft import dctn, idctn

from mpsd.baselines.base import (
    BaselineMethod,
    Budget,
    Encoded,
    Reconstruction,
    fit_family,
    quantize_all,
    to_uint8,
)
from mpsd.core.codec import balance_gauge
from mpsd.core.contract import contract
from mpsd.core.layout import choose_layout
from mpsd.core.quantize import check_storage_dtype
from mpsd.core.ttsvd import exact_ranks, parameter_count, tt_svd
from mpsd.errors import OptionError

logger = logging.getLogger(__name__)

TRANSFORMS = ("dct", "none")


def uniform_bonds(sites: tuple[int, ...], bond: int) -> tuple[int, ...]:
    """Bond dimensions :func:`~mpsd.core.ttsvd.tt_svd` keeps with ``max_bonds = [bond]*(n-1)``.

    ``r_k = min(bond, exact_k, r_{k-1}·d_k)`` with ``r_0 = 1``.
    """
    out: list[int] = []
    prev = 1
    for d, exact in zip(sites[:-1], exact_ranks(sites), strict=True):
        prev = min(bond, exact, prev * d)
        out.append(prev)
    return tuple(out)


class ICE(BaselineMethod):
    """Image Compression with Entanglement (Latorre 2005), the paper's ICE baseline.

    Parameters
    ----------
    transform : {"dct", "none"}
        Pre-transform of each channel: the orthonormal 2-D DCT (Latorre's Fourier variant), or
        none (pixels directly).
    sites : str, int or list, optional
        Site layout, as ``mpsd compress --sites`` (default: the paper's Table 4 for 32×32 and
        28×28, otherwise five balanced sites).
    order : {"quadtree", "row"}
        Pixel addressing; ``quadtree`` is Latorre's block-structured one.
    dtype : {"int8", "float16", "float32"}
        Storage dtype of the cores.
    """

    name = "ice"

    def __init__(
        self,
        *,
        transform: str = "dct",
        sites: str | int | list[int] | None = None,
        order: str = "quadtree",
        dtype: str = "int8",
    ) -> None:
        if transform not in TRANSFORMS:
            raise OptionError(
                f"ice: transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}"
            )
        self.transform = transform
        self.sites = sites
        self.order = order
        self.dtype = check_storage_dtype(dtype)

    def _fit(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        budget: Budget,
        *,
        seed: int,
        features: np.ndarray | None,
    ) -> Reconstruction:
        """Reconstruct ``images`` (N, H, W, C) at the budget; see :class:`~mpsd.baselines.base.Baseline`."""
        _, h, w, c = images.shape
        layout = choose_layout(h, w, c, sites=self.sites, order=self.order, colour="separate")  # type: ignore[arg-type]
        values = images.astype(np.float64)
        if self.transform == "dct":
            values = dctn(values, axes=(1, 2), norm="ortho")
        tensors = layout.to_sites(values)  # (N·C, d_1, ..., d_n)
        sites = layout.sites
        n_mps = tensors.shape[0]
        n_bonds = len(sites) - 1
        max_bond = max(exact_ranks(sites))
        dtype = self.dtype

        def params(i: int) -> int:
            return n_mps * int(parameter_count(sites, np.asarray(uniform_bonds(sites, i + 1))))

        def encode(i: int) -> Encoded:
            bond = i + 1
            tt = tt_svd(tensors, max_bonds=[bond] * n_bonds)
            cores = balance_gauge(tt.cores) if dtype == "int8" else tt.cores  # as an mpsd stage
            stored, restored = quantize_all({f"core_{k}": core for k, core in enumerate(cores)}, dtype)
            if dtype == "int8":  # one (B, n) array of scales, as an mpsd stage stores them
                scales = [stored.pop(f"core_{k}_scale") for k in range(len(sites))]
                stored["scales"] = np.stack(scales, axis=1)

            def decode() -> np.ndarray:
                flat = contract([restored[f"core_{k}"] for k in range(len(sites))])
                out = layout.from_sites(flat)
                if self.transform == "dct":
                    out = idctn(out, axes=(1, 2), norm="ortho")
                return to_uint8(out)

            settings = {
                "bond": bond,
                "bonds": [int(r) for r in tt.ranks.max(axis=0)],
                "sites": list(sites),
                "layout": layout.to_dict(),
                "transform": self.transform,
                "dtype": dtype,
            }
            return Encoded(stored, int(tt.n_params().sum()), decode, settings)

        return fit_family(
            self.name,
            max_bond,
            n_params=params,
            encode=encode,
            describe=lambda i: f"bond {i + 1}",
            total=math.prod(images.shape),
            budget=budget,
            labels=labels,
        )
