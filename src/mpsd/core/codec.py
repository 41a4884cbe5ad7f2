"""Encode a batch of site tensors into MPS stages (Algorithm 2) and decode them again.

Stage 1 decomposes the tensors S; every further stage decomposes what the earlier stages,
*as stored* (after quantisation), left over: ``R = S − Σ earlier``.  Decoding sums the stages.
Tensors are expected in normalised units (pixels divided by the dtype's maximum).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpsd.core import _kernels
from mpsd.core.contract import contract_stored
from mpsd.core.quantize import quantize
from mpsd.core.spectra import (
    entanglement_entropy,
    local_truncation_errors,
    spectra_and_left_basis,
    theorem1_bound,
)
from mpsd.core.ttsvd import check_bonds, exact_ranks, parameter_count, tt_svd
from mpsd.errors import OptionError


@dataclass(frozen=True)
class StageSpec:
    """How one stage is truncated.

    Parameters
    ----------
    bonds : tuple of int, optional
        Largest bond dimension of every bond (capped by the exact rank).
    tol : float, optional
        Relative Frobenius error allowed per tensor for this stage's input (may be capped by
        ``bonds``).
    ratio : float, optional
        Parameter budget of this stage as a fraction of the tensor size (``prod d_k``), spent
        across the batch where it removes the most error (see :func:`ranks_for_budget`).
    """

    bonds: tuple[int, ...] | None = None
    tol: float | None = None
    ratio: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {"bonds": list(self.bonds) if self.bonds else None, "tol": self.tol, "ratio": self.ratio}

    def max_bonds(self, sites: Sequence[int]) -> tuple[int, ...]:
        """Largest possible bond dimensions of this stage: the storage shape of its cores."""
        return check_bonds(self.bonds, sites) if self.bonds else exact_ranks(sites)


@dataclass
class EncodedStage:
    """One stage of a batch, as stored.

    Attributes
    ----------
    cores : list of ndarray
        Stored cores (int8/float16/float32), core k of shape (B, R_{k-1}, d_k, R_k).
    scales : ndarray of shape (B, n) float32, or None
        Per-tensor scale of every core (int8 storage only).
    ranks : ndarray of shape (B, n−1)
        Bond dimensions used.
    local_errors : ndarray of shape (B, n−1)
        Local truncation errors ε_k (Definition 1) of this stage's input.
    bound : ndarray of shape (B,)
        Theorem 1 bound ``sqrt(Σ ε_k²)`` on this stage's (unquantised) error.
    """

    cores: list[np.ndarray]
    scales: np.ndarray | None
    ranks: np.ndarray
    local_errors: np.ndarray
    bound: np.ndarray


@dataclass(frozen=True)
class Pixels:
    """How a batch's tensors were made from integer images, for the squared pixel error.

    The tensors are ``layout.to_sites(images) / max_value``; every pixel is then
    ``rint(tensor entry · max_value)`` exactly, so the images themselves are not needed.

    Parameters
    ----------
    layout : SiteLayout
        The batch holds ``N · layout.mps_per_image`` tensors of N images.
    max_value : int
        The pixel value that became 1.0.
    """

    layout: Any
    max_value: int


@dataclass
class EncodedBatch:
    """Every stage of a batch plus the per-tensor numbers the paper defines.

    Attributes
    ----------
    stages : list of EncodedStage
    entropy : ndarray of shape (B, n−1)
        Entanglement entropy (Eq. 3) of the unfoldings of the original tensors.
    norm : ndarray of shape (B,)
        ``‖S‖_F``.
    error : ndarray of shape (B,)
        ``‖S − Σ stages‖_F`` of the stored (dequantised) stages.
    reconstruction : ndarray of shape (B, prod d)
        ``Σ stages`` as decoded from what is stored; shape (B, 0) when ``pixels`` were given.
    pixel_squared_error : ndarray of shape (N,), or None
        With ``pixels``: per image ``Σ (clip(rint(Σ stages · max), 0, max) − image)²`` over its pixels.
    """

    stages: list[EncodedStage]
    entropy: np.ndarray
    norm: np.ndarray
    error: np.ndarray
    reconstruction: np.ndarray
    pixel_squared_error: np.ndarray | None = None


def _consistent(ranks: np.ndarray, sites: Sequence[int]) -> np.ndarray:
    """Clip ranks so that r_k <= r_{k-1}·d_k and r_k <= d_{k+1}·r_{k+1} (both sweeps)."""
    r = ranks.copy()
    n1 = r.shape[1]
    for k in range(n1):
        left = sites[k] * (r[:, k - 1] if k > 0 else 1)
        r[:, k] = np.minimum(r[:, k], left)
    for k in range(n1 - 1, -1, -1):
        right = sites[k + 1] * (r[:, k + 1] if k + 1 < n1 else 1)
        r[:, k] = np.minimum(r[:, k], right)
    return np.maximum(r, 1)


def ranks_for_budget(
    spectra: list[np.ndarray], sites: Sequence[int], budget: float, caps: Sequence[int]
) -> np.ndarray:
    """Per-tensor ranks that fit a parameter budget for the whole batch.

    One threshold τ on the squared singular values of the unfoldings is shared by the whole
    batch: bond k of tensor b keeps the singular values above τ (at least 1, at most ``caps[k]``,
    made consistent between neighbouring bonds).  The smallest τ whose total parameter count
    fits ``budget`` is found by bisection over the observed singular values.  A shared threshold
    keeps the singular values that remove the most squared error, wherever they are, so the budget
    goes to the images and bonds that need it.

    Parameters
    ----------
    spectra : list of ndarray of shape (B, m_k)
        Squared singular values of the unfoldings, largest first.
    sites : sequence of int
    budget : float
        Total number of parameters allowed for the batch.
    caps : sequence of int
        Largest rank of each bond.

    Returns
    -------
    ndarray of shape (B, n−1)
    """
    b = spectra[0].shape[0]
    caps_arr = np.asarray(caps, dtype=np.int64)

    def ranks_at(tau: float) -> np.ndarray:
        r = np.stack([(sq > tau).sum(axis=1) for sq in spectra], axis=1)
        return _consistent(np.clip(r, 1, caps_arr), sites)

    minimum = parameter_count(sites, _consistent(np.ones((b, len(caps)), dtype=np.int64), sites)).sum()
    if budget < minimum:
        raise OptionError(
            f"--ratio is too small: even bond dimension 1 needs {minimum / (b * math.prod(sites)):.4f} "
            "of the parameters"
        )
    values = np.unique(np.concatenate([sq.ravel() for sq in spectra]))
    values = np.concatenate([[0.0], values])
    lo, hi = 0, len(values) - 1  # params(values[hi]) is minimal (all ranks 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if parameter_count(sites, ranks_at(values[mid])).sum() <= budget:
            hi = mid
        else:
            lo = mid + 1
    return ranks_at(values[lo])


def balance_gauge(cores: list[np.ndarray]) -> list[np.ndarray]:
    """Rescale cores so that every core but the last has ``max|x| = 1`` per tensor.

    The MPS is unchanged (``s·A_k`` and ``A_{k+1}/s`` multiply to the same tensor); the int8
    scales of all cores but the last then equal ``1/127`` and compress to almost nothing.
    """
    out = [c.copy() for c in cores]
    for k in range(len(out) - 1):
        b = out[k].shape[0]
        peak = np.abs(out[k].reshape(b, -1)).max(axis=1)
        s = np.where(peak > 0, peak, 1.0)
        out[k] *= (1.0 / s)[:, None, None, None]  # a reciprocal per tensor: cheaper than dividing
        out[k + 1] *= s[:, None, None, None]
    return out


def _store_cores(cores: list[np.ndarray], dtype: str) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Cores as stored: int8 with a balanced gauge and per-core scales ((B, n) float32), or cast.

    ``cores`` may be overwritten (they are the sweep's scratch).
    """
    if dtype != "int8":
        return [quantize(c, dtype)[0] for c in cores], None
    fast = _kernels.gauge_quantize_int8(cores, overwrite=True)
    if fast is not None:
        return fast
    pairs = [quantize(c, dtype) for c in balance_gauge(cores)]
    return [q for q, _ in pairs], np.stack([sc for _, sc in pairs], axis=1)  # type: ignore[misc]


def encode_batch(
    tensors: np.ndarray,
    stages: Sequence[StageSpec],
    *,
    dtype: str = "int8",
    metrics: bool = True,
    pixels: Pixels | None = None,
) -> EncodedBatch:
    """Encode a batch with one or more stages.

    Parameters
    ----------
    tensors : ndarray of shape (B, d_1, ..., d_n)
        Site tensors (normalised units).
    stages : sequence of StageSpec
        Truncation of stage 1 (the image) and of each residual stage.
    dtype : {"int8", "float16", "float32"}
        Storage dtype of the cores.
    metrics : bool
        Also compute the paper's numbers and the reconstruction.  ``False`` computes only what is
        stored for decoding: no spectra of the unfoldings beyond what the truncation needs and no
        contraction of the last stage; ``entropy``, ``local_errors``, ``bound``, ``norm`` and
        ``error`` are then NaN and ``reconstruction`` is empty, shape (B, 0).
    pixels : Pixels, optional
        How the tensors were folded from integer images: with ``metrics``, also the squared
        pixel error of every image (``pixel_squared_error``), and no ``reconstruction`` (the last
        stage is contracted and compared one tensor at a time, in cache, where numba is
        available).

    Returns
    -------
    EncodedBatch
    """
    s = np.asarray(tensors, dtype=np.float64)
    b, sites = s.shape[0], s.shape[1:]
    n1 = len(sites) - 1
    flat = s.reshape(b, -1)
    total: np.ndarray | None = None  # Σ of the stages so far, as stored (None before the first)
    encoded: list[EncodedStage] = []
    entropy = np.full((b, n1), np.nan)
    fused: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # the last stage's numbers
    for i, spec in enumerate(stages):
        target = s if total is None else (flat - total).reshape(s.shape)
        caps: np.ndarray | tuple[int, ...] = spec.max_bonds(sites)
        need_spectra = metrics or spec.ratio is not None
        spectra, basis = spectra_and_left_basis(target, caps) if need_spectra else (None, None)
        if i == 0 and metrics:
            assert spectra is not None
            entropy = entanglement_entropy(spectra)
        if spec.ratio is not None:
            assert spectra is not None
            caps = ranks_for_budget(spectra, sites, spec.ratio * b * math.prod(sites), caps)
        tt = tt_svd(target, max_bonds=caps, tol=spec.tol, left_basis=basis)
        local = local_truncation_errors(spectra, tt.ranks) if metrics and spectra is not None else np.full((b, n1), np.nan)
        stored, scales = _store_cores(tt.cores, dtype)
        last = i + 1 == len(stages)
        if metrics and last and pixels is not None:
            fused = _kernels.stage_errors(stored, scales, total, flat, pixels.layout, pixels.max_value)
        if fused is None and (metrics or not last):  # the last stage's sum is only needed for the numbers
            part = contract_stored(stored, scales)
            total = part if total is None else total + part
        encoded.append(
            EncodedStage(
                cores=stored,
                scales=scales,
                ranks=tt.ranks,
                local_errors=local,
                bound=theorem1_bound(local),
            )
        )
    if not metrics:
        nan = np.full(b, np.nan)
        return EncodedBatch(stages=encoded, entropy=entropy, norm=nan, error=nan, reconstruction=np.empty((b, 0)))
    if fused is not None:
        norm, error, sq_error = fused
        return EncodedBatch(stages=encoded, entropy=entropy, norm=norm, error=error,
                            reconstruction=np.empty((b, 0)), pixel_squared_error=sq_error)
    if total is None:  # no stages at all: nothing is stored, the error is the whole tensor
        total = np.zeros_like(flat)
    if pixels is None:
        norm, error = _kernels.norms_and_distances(flat, total)
        return EncodedBatch(stages=encoded, entropy=entropy, norm=norm, error=error, reconstruction=total)
    norm, error, sq_error = _kernels.errors_against_pixels(flat, total, pixels.layout, pixels.max_value)
    return EncodedBatch(stages=encoded, entropy=entropy, norm=norm, error=error,
                        reconstruction=np.empty((b, 0)), pixel_squared_error=sq_error)


def decode_stages(
    stages: Sequence[tuple[Sequence[np.ndarray], np.ndarray | None]],
) -> np.ndarray:
    """Sum the contracted stages.

    Parameters
    ----------
    stages : sequence of (cores, scales)
        Stored cores (each (B, R_{k-1}, d_k, R_k)) and their scales ((B, n) or None).

    Returns
    -------
    ndarray of shape (B, prod d), float64
    """
    total = None
    for cores, scales in stages:
        part = contract_stored(cores, scales)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no stages to decode")
    return total
