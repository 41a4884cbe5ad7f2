"""Low-rank baselines per image: truncated SVD per channel, Tucker (HOSVD) and CP.

Every factor is stored the way mpsd stores its MPS cores: quantised with
:func:`mpsd.core.quantize.quantize` (int8 with one float32 scale per tensor of the batch by
default) and measured with :func:`mpsd.archive.codecs.stored_nbytes`.  Reconstructions are
decoded from the quantised factors.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import numpy as np

from mpsd.baselines.base import (
    BaselineMethod,
    Budget,
    Encoded,
    Reconstruction,
    fit_family,
    quantize_all,
    to_uint8,
)
from mpsd.core.quantize import check_storage_dtype
from mpsd.errors import MissingExtraError, OptionError

logger = logging.getLogger(__name__)

#: ALS sweeps of the stand-in fits that locate the rank of a byte budget before the real fits.
_CP_ESTIMATE_SWEEPS = 5
#: Floats one CP-ALS chunk may hold in each of its temporaries (images × W·C × max(rank, H)).
_CP_CHUNK_FLOATS = 1 << 24


def _eigvecs_desc(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs of a batch of symmetric matrices, largest eigenvalue first (clipped at 0)."""
    w, v = np.linalg.eigh(gram)
    return np.maximum(w[..., ::-1], 0.0), v[..., ::-1]


# ====================================================================== SVD
class SVD(BaselineMethod):
    """Truncated SVD of every channel of every image, one uniform rank r.

    Each plane ``X`` (H×W) is stored as ``L = U_r·sqrt(S_r)`` (H×r) and ``R = sqrt(S_r)·V_rᵀ``
    (r×W), both quantised; the reconstruction is ``L·R``.  Parameters: ``r·(H+W)`` per plane.

    Parameters
    ----------
    dtype : {"int8", "float16", "float32"}
        Storage dtype of the factors (as mpsd's ``--dtype``).
    """

    name = "svd"

    def __init__(self, *, dtype: str = "int8") -> None:
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
        n, h, w, c = images.shape
        planes = images.transpose(0, 3, 1, 2).reshape(n * c, h, w).astype(np.float64)
        u, s, vt = np.linalg.svd(planes, full_matrices=False)  # (B,h,m), (B,m), (B,m,w)
        root = np.sqrt(s)
        dtype = self.dtype

        def encode(i: int) -> Encoded:
            r = i + 1
            stored, restored = quantize_all(
                {
                    "left": u[:, :, :r] * root[:, None, :r],
                    "right": root[:, :r, None] * vt[:, :r, :],
                },
                dtype,
            )

            def decode() -> np.ndarray:
                approx = restored["left"] @ restored["right"]  # (B, h, w)
                return to_uint8(approx.reshape(n, c, h, w).transpose(0, 2, 3, 1))

            return Encoded(stored, n * c * r * (h + w), decode, {"rank": r, "dtype": dtype})

        return fit_family(
            self.name,
            min(h, w),
            n_params=lambda i: n * c * (i + 1) * (h + w),
            encode=encode,
            describe=lambda i: f"rank {i + 1}",
            total=n * h * w * c,
            budget=budget,
            labels=labels,
        )


# ====================================================================== Tucker
class Tucker(BaselineMethod):
    """Tucker decomposition of every image ``(H, W, C)`` by truncated HOSVD, batched in numpy.

    The factor of mode m holds the leading eigenvectors of the Gram matrix of the mode-m
    unfolding; the core is the image projected on them.  Before quantising, column j of each
    mode's factor is multiplied by ``sqrt(σ_j/σ_1)`` (σ: singular values of that unfolding) and
    the core divided accordingly, like SVD's ``U·sqrt(S)``, ``sqrt(S)·Vᵀ`` split: the raw core spans
    orders of magnitude, and one int8 scale for it caps the PSNR near 32 dB on CIFAR-10.
    Ranks are ``(min(r, H), min(r, W), C')``
    for one scanned r, with ``C'`` the channel rank (all channels by default).  Parameters per
    image: ``r_1·r_2·r_3 + H·r_1 + W·r_2 + C·r_3``.  The core and the three factors are quantised
    per image.  HOSVD is within a factor ``sqrt(3)`` of the best Tucker approximation of these
    ranks; no HOOI sweeps are run.

    Parameters
    ----------
    channel_rank : int, optional
        Rank of the channel mode (default: C, i.e. colour is kept whole).
    balance : bool
        Balance core and factors before quantising (default).  Without it the core keeps its
        magnitudes; its near-zero int8 entries compress well, so at small budgets one more rank
        may fit (about +0.7 dB at 20 % on CIFAR-10), but the PSNR stalls near 32 dB (38.7 dB
        balanced at 60 %).
    dtype : {"int8", "float16", "float32"}
        Storage dtype of core and factors.
    """

    name = "tucker"

    def __init__(
        self, *, channel_rank: int | None = None, balance: bool = True, dtype: str = "int8"
    ) -> None:
        if channel_rank is not None and (int(channel_rank) != channel_rank or channel_rank < 1):
            raise OptionError(
                f"tucker: channel_rank must be a positive integer, got {channel_rank!r}"
            )
        self.channel_rank = None if channel_rank is None else int(channel_rank)
        self.balance = bool(balance)
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
        n, h, w, c = images.shape
        x = images.astype(np.float64)
        unfold = [
            x.reshape(n, h, w * c),
            x.transpose(0, 2, 1, 3).reshape(n, w, h * c),
            x.transpose(0, 3, 1, 2).reshape(n, c, h * w),
        ]
        eigen = [_eigvecs_desc(m @ m.transpose(0, 2, 1)) for m in unfold]
        factors = [v for _, v in eigen]
        # column weights sqrt(σ_j/σ_1) of every mode (σ: singular values of the unfolding)
        weights = [
            np.maximum(np.divide(w, w[:, :1], out=np.ones_like(w), where=w[:, :1] > 0), 1e-12)
            ** (0.25 if self.balance else 0.0)
            for w, _ in eigen
        ]
        caps = (min(h, w * c), min(w, h * c))
        r3 = min(self.channel_rank or c, c, h * w)
        dtype = self.dtype

        def ranks(i: int) -> tuple[int, int, int]:
            return min(i + 1, caps[0]), min(i + 1, caps[1]), r3

        def params(i: int) -> int:
            r1, r2, r3_ = ranks(i)
            return n * (r1 * r2 * r3_ + h * r1 + w * r2 + c * r3_)

        def encode(i: int) -> Encoded:
            r1, r2, r3_ = ranks(i)
            f1, f2, f3 = factors[0][:, :, :r1], factors[1][:, :, :r2], factors[2][:, :, :r3_]
            core = np.einsum("nhwc,nha,nwb,ncd->nabd", x, f1, f2, f3, optimize=True)
            # balanced before quantising, as SVD's U·sqrt(S), sqrt(S)·Vᵀ: the core alone would
            # span orders of magnitude and int8 would zero its small entries
            w1, w2, w3 = weights[0][:, :r1], weights[1][:, :r2], weights[2][:, :r3_]
            core = core / (w1[:, :, None, None] * w2[:, None, :, None] * w3[:, None, None, :])
            stored, restored = quantize_all(
                {
                    "core": core,
                    "rows": f1 * w1[:, None, :],
                    "cols": f2 * w2[:, None, :],
                    "channels": f3 * w3[:, None, :],
                },
                dtype,
            )

            def decode() -> np.ndarray:
                approx = np.einsum(
                    "nabd,nha,nwb,ncd->nhwc",
                    restored["core"],
                    restored["rows"],
                    restored["cols"],
                    restored["channels"],
                    optimize=True,
                )
                return to_uint8(approx)

            settings = {"ranks": [r1, r2, r3_], "balance": self.balance, "dtype": dtype}
            return Encoded(stored, params(i), decode, settings)

        return fit_family(
            self.name,
            max(caps),
            n_params=params,
            encode=encode,
            describe=lambda i: f"ranks {ranks(i)}",
            total=n * h * w * c,
            budget=budget,
            labels=labels,
        )


# ====================================================================== CP
def _svd_init(unfolded: np.ndarray, rank: int, rng: np.random.Generator) -> np.ndarray:
    """Leading left singular vectors of each unfolding, padded with uniform noise to ``rank``."""
    b, dim, _ = unfolded.shape
    _, vecs = _eigvecs_desc(unfolded @ unfolded.transpose(0, 2, 1))
    factor = vecs[:, :, : min(rank, dim)]
    if dim < rank:
        factor = np.concatenate([factor, rng.random((b, dim, rank - dim))], axis=2)
    return factor


def cp_als(
    tensors: np.ndarray,
    rank: int,
    *,
    n_iter_max: int = 100,
    tol: float = 1e-6,
    rng: np.random.Generator | None = None,
) -> tuple[list[np.ndarray], np.ndarray, int]:
    """CP decomposition of a batch of order-3 tensors by alternating least squares.

    Initialised as tensorly's ``parafac(init="svd")`` (leading singular vectors of the unfoldings,
    padded with uniform noise where a mode is smaller than the rank).  The whole batch is updated
    at once; it stops when no tensor's relative error changed by more than ``tol`` in the last
    sweep, or after ``n_iter_max`` sweeps.

    Parameters
    ----------
    tensors : ndarray of shape (B, I, J, K)
    rank : int
    n_iter_max : int
    tol : float
        Threshold on the change of the relative error ``‖X − [[A,B,C]]‖_F / ‖X‖_F``.
    rng : numpy.random.Generator, optional
        For the padding noise.

    Returns
    -------
    factors : list of 3 ndarray
        Of shapes (B, I, R), (B, J, R), (B, K, R); column norms balanced across the three modes.
    rel_error : ndarray of shape (B,)
        Relative error of each tensor after the last sweep.
    n_iter : int
        Sweeps run.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    x = np.asarray(tensors, dtype=np.float64)
    b, i_dim, j_dim, k_dim = x.shape
    unf0 = x.reshape(b, i_dim, j_dim * k_dim)
    norm_sq = np.einsum("bi,bi->b", x.reshape(b, -1), x.reshape(b, -1))
    a = np.zeros((b, i_dim, rank))  # recomputed first, from the initial B and C
    bf = _svd_init(x.transpose(0, 2, 1, 3).reshape(b, j_dim, -1), rank, rng)
    cf = _svd_init(x.transpose(0, 3, 1, 2).reshape(b, k_dim, -1), rank, rng)
    eye = np.eye(rank)

    def solve(gram: np.ndarray, mttkrp: np.ndarray) -> np.ndarray:
        ridge = 1e-12 * np.trace(gram, axis1=1, axis2=2) / rank + 1e-300
        return np.linalg.solve(
            gram + ridge[:, None, None] * eye, mttkrp.transpose(0, 2, 1)
        ).transpose(0, 2, 1)

    def gram_of(f: np.ndarray) -> np.ndarray:
        return f.transpose(0, 2, 1) @ f

    prev: np.ndarray | None = None
    rel = np.zeros(b)
    it = 0
    for it in range(1, n_iter_max + 1):  # noqa: B007 - `it` is returned
        # mode 1: MTTKRP with the Khatri-Rao product of B and C (columns ordered (j, k))
        kr = (bf[:, :, None, :] * cf[:, None, :, :]).reshape(b, -1, rank)
        a = solve(gram_of(bf) * gram_of(cf), unf0 @ kr)
        # modes 2 and 3 share X contracted with A over i: t[b, j, k, r]
        t = (unf0.transpose(0, 2, 1) @ a).reshape(b, j_dim, k_dim, rank)
        gram_a = gram_of(a)
        bf = solve(gram_a * gram_of(cf), np.einsum("bjkr,bkr->bjr", t, cf))
        mttkrp = np.einsum("bjkr,bjr->bkr", t, bf)
        gram = gram_a * gram_of(bf)
        cf = solve(gram, mttkrp)
        # ‖X − model‖² = ‖X‖² − 2⟨X, model⟩ + ‖model‖², from the last update's quantities
        inner = np.einsum("bkr,bkr->b", cf, mttkrp)
        model_sq = np.einsum("brs,brs->b", gram, gram_of(cf))
        err = np.sqrt(np.maximum(norm_sq - 2 * inner + model_sq, 0.0))
        rel = np.divide(err, np.sqrt(norm_sq), out=np.zeros(b), where=norm_sq > 0)
        if prev is not None and np.max(np.abs(prev - rel)) < tol:
            break
        prev = rel
    factors = [a, bf, cf]
    return _balance(factors), rel, it


def _balance(factors: list[np.ndarray]) -> list[np.ndarray]:
    """Give the three columns of every rank-one term the same norm (for even quantisation)."""
    norms = [np.linalg.norm(f, axis=1, keepdims=True) for f in factors]  # (B, 1, R) each
    target = np.cbrt(norms[0] * norms[1] * norms[2])
    out = []
    for f, nrm in zip(factors, norms, strict=True):
        scale = np.divide(target, nrm, out=np.zeros_like(nrm), where=nrm > 0)
        out.append(f * scale)
    return out


def _cp_tensorly(
    x: np.ndarray, rank: int, *, n_iter_max: int, tol: float, seed: int
) -> list[np.ndarray]:
    """Per-image ``tensorly.decomposition.parafac`` (the reference implementation; slow)."""
    try:
        from tensorly.decomposition import parafac
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(
            "tensorly", "bench", "the CP baseline with backend='tensorly'"
        ) from exc
    out = [np.empty((x.shape[0], d, rank)) for d in x.shape[1:]]
    with warnings.catch_warnings():
        # parafac(init="svd") warns when the rank exceeds a mode's size (it pads with noise)
        warnings.filterwarnings("ignore", message="Trying to compute SVD", category=UserWarning)
        for k, image in enumerate(x):
            weights, factors = parafac(
                image, rank, n_iter_max=n_iter_max, tol=tol, init="svd", random_state=seed + k
            )
            factors[0] = factors[0] * np.asarray(weights)[None, :]
            for m in range(3):
                out[m][k] = factors[m]
    return _balance(out)


class CP(BaselineMethod):
    """CP (CANDECOMP/PARAFAC) decomposition of every image ``(H, W, C)``, one rank R.

    Stored: the three factor matrices (H×R, W×R, C×R) per image, quantised per image; parameters
    ``R·(H+W+C)``.  R ranges over ``1..floor(H·W·C/(H+W+C))`` (ratio at most 1).

    Parameters
    ----------
    n_iter_max : int
        ALS sweeps at most (bounds the run time).
    tol : float
        Stop when no image's relative error changes by more than this in a sweep.
    backend : {"numpy", "tensorly"}
        ``numpy`` (default): :func:`cp_als`, all images of a chunk updated at once (fast).
        ``tensorly``: ``tensorly.decomposition.parafac`` image by image (reference; about
        15 ms per 32×32×3 image at rank 10, so minutes for tens of thousands of images).
    dtype : {"int8", "float16", "float32"}
        Storage dtype of the factors.
    """

    name = "cp"

    def __init__(
        self,
        *,
        n_iter_max: int = 100,
        tol: float = 1e-6,
        backend: str = "numpy",
        dtype: str = "int8",
    ) -> None:
        if int(n_iter_max) != n_iter_max or n_iter_max < 1:
            raise OptionError(f"cp: n_iter_max must be a positive integer, got {n_iter_max!r}")
        if not (tol >= 0 and math.isfinite(tol)):
            raise OptionError(f"cp: tol must be a finite number >= 0, got {tol!r}")
        if backend not in ("numpy", "tensorly"):
            raise OptionError(f"cp: backend must be 'numpy' or 'tensorly', got {backend!r}")
        self.n_iter_max = int(n_iter_max)
        self.tol = float(tol)
        self.backend = backend
        self.dtype = check_storage_dtype(dtype)

    def decompose(
        self, x: np.ndarray, rank: int, *, seed: int = 0, n_iter_max: int | None = None
    ) -> list[np.ndarray]:
        """Float CP factors of images ``x`` (N, H, W, C) at ``rank``: (N,H,R), (N,W,R), (N,C,R)."""
        n_iter_max = self.n_iter_max if n_iter_max is None else n_iter_max
        if self.backend == "tensorly":
            return _cp_tensorly(x, rank, n_iter_max=n_iter_max, tol=self.tol, seed=seed)
        n, h, w, c = x.shape
        chunk = max(1, _CP_CHUNK_FLOATS // (w * c * max(rank, h)))
        rng = np.random.default_rng(seed)
        parts: list[list[np.ndarray]] = [[], [], []]
        for start in range(0, n, chunk):
            factors, rel, n_iter = cp_als(
                x[start : start + chunk], rank, n_iter_max=n_iter_max, tol=self.tol, rng=rng
            )
            logger.debug(
                "cp: rank %d, images %d+: %d sweeps, mean rel. error %.4f",
                rank,
                start,
                n_iter,
                rel.mean(),
            )
            for m in range(3):
                parts[m].append(factors[m])
        return [np.concatenate(p, axis=0) for p in parts]

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
        n, h, w, c = images.shape
        x = images.astype(np.float64)
        max_rank = max(1, (h * w * c) // (h + w + c))
        dtype = self.dtype

        def encode(i: int, n_iter_max: int | None = None) -> Encoded:
            r = i + 1
            fa, fb, fc = self.decompose(x, r, seed=seed, n_iter_max=n_iter_max)
            stored, restored = quantize_all({"rows": fa, "cols": fb, "channels": fc}, dtype)

            def decode() -> np.ndarray:
                approx = np.einsum(
                    "nhr,nwr,ncr->nhwc",
                    restored["rows"],
                    restored["cols"],
                    restored["channels"],
                    optimize=True,
                )
                return to_uint8(approx)

            settings: dict[str, Any] = {
                "rank": r,
                "dtype": dtype,
                "backend": self.backend,
                "n_iter_max": self.n_iter_max,
                "tol": self.tol,
            }
            return Encoded(stored, n * r * (h + w + c), decode, settings)

        return fit_family(
            self.name,
            max_rank,
            n_params=lambda i: n * (i + 1) * (h + w + c),
            encode=encode,
            describe=lambda i: f"rank {i + 1}",
            total=n * h * w * c,
            budget=budget,
            labels=labels,
            # a few sweeps give factors of nearly the same stored size: search with those first
            estimate=lambda i: encode(i, _CP_ESTIMATE_SWEEPS),
        )
