"""The one interface every baseline follows, and the machinery they share.

A baseline turns a training set ``(N, H, W, C)`` into the training set a user would keep at a
budget: reconstructed images (ICE, SVD, CP, Tucker, JPEG, WebP) or a selected subset (random and
K-center coresets).  The budget is either

``budget_bytes``
    bytes on disk, measured the way mpsd measures its own stores
    (:func:`mpsd.archive.codecs.stored_nbytes`: Zarr v3, zstd + crc32c, labels included), or
``param_ratio``
    the paper's parameter ratio, stored parameters / ``N·H·W·C`` (per-tensor quantisation scales
    are not parameters).

Every method has a one-parameter family of settings ordered by size (a rank, a bond dimension, a
quality, a number of images) and picks the largest setting that fits (:func:`search_largest`).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mpsd.archive.codecs import stored_nbytes
from mpsd.core.quantize import check_storage_dtype, dequantize, quantize
from mpsd.errors import OptionError

logger = logging.getLogger(__name__)

#: Names accepted by :func:`get_baseline`, in the order the paper's tables use.
BASELINES: tuple[str, ...] = ("ice", "svd", "cp", "tucker", "random", "kcenter", "jpeg", "webp")


@dataclass
class Reconstruction:
    """A training set produced by a baseline at a budget.

    Attributes
    ----------
    method : str
        One of :data:`BASELINES`.
    images : ndarray of shape (M, H, W, C), uint8
        The training images: reconstructed (M = N) or the selected subset (coresets).
    labels : ndarray of shape (M,), int64, or None
        Their labels, when labels were given.
    indices : ndarray of shape (M,), int64, or None
        For coresets, the indices of the selected images in the input (ascending); else None.
    bytes_on_disk : int
        Measured size of what a user would keep for the whole training set, labels included.
    param_ratio : float or None
        Stored parameters / ``N·H·W·C``; None for the image codecs.
    settings : dict
        What was chosen (rank, bond, quality, k, ...), JSON-serialisable.
    """

    method: str
    images: np.ndarray
    labels: np.ndarray | None
    indices: np.ndarray | None
    bytes_on_disk: int
    param_ratio: float | None
    settings: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Baseline(Protocol):
    """What :func:`get_baseline` returns."""

    name: str

    def fit(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        budget_bytes: int | None = None,
        param_ratio: float | None = None,
        seed: int = 0,
        features: np.ndarray | None = None,
    ) -> Reconstruction:
        """Produce the training set at the budget.

        Parameters
        ----------
        images : ndarray of shape (N, H, W, C), uint8
            The training set (C = 1 or 3).
        labels : ndarray of shape (N,), optional
            Integer class labels.
        budget_bytes : int, optional
            Largest size on disk allowed.  Exactly one of ``budget_bytes`` and ``param_ratio``.
        param_ratio : float, optional
            Largest parameter ratio allowed.
        seed : int
            Seed of every random choice (coresets, CP initialisation).
        features : ndarray of shape (N, F), optional
            Features to select on (K-center only; e.g. a teacher's penultimate layer).

        Raises
        ------
        OptionError
            If even the smallest setting exceeds the budget, or the arguments are invalid.
        """
        ...


def get_baseline(name: str, **options: Any) -> Baseline:
    """Build a baseline by name.

    Parameters
    ----------
    name : str
        One of :data:`BASELINES` (case-insensitive).
    **options
        Keyword options of that baseline's class (see ``docs/baselines.md``).

    Raises
    ------
    OptionError
        For an unknown name or option.

    Examples
    --------
    >>> get_baseline("svd").name
    'svd'
    """
    from mpsd.baselines.codecs import JPEG, WebP
    from mpsd.baselines.coreset import KCenter, RandomCoreset
    from mpsd.baselines.ice import ICE
    from mpsd.baselines.lowrank import CP, SVD, Tucker

    classes: dict[str, type] = {
        "ice": ICE,
        "svd": SVD,
        "cp": CP,
        "tucker": Tucker,
        "random": RandomCoreset,
        "kcenter": KCenter,
        "jpeg": JPEG,
        "webp": WebP,
    }
    key = str(name).strip().lower()
    if key not in classes:
        raise OptionError(f"unknown baseline {name!r}; expected one of {', '.join(BASELINES)}")
    cls = classes[key]
    accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(
            f"unknown option(s) {', '.join(unknown)} for baseline {key!r}; "
            f"expected {', '.join(accepted) if accepted else 'none'}"
        )
    return cls(**options)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------- validation
class BaselineMethod:
    """Shared ``fit`` of the built-in baselines: validate, then call ``_fit``.

    Subclasses set ``name`` (and ``channels`` to restrict the channel counts they accept) and
    implement ``_fit(images, labels, budget, *, seed, features)`` with validated arguments.
    """

    name: str = ""
    channels: tuple[int, ...] | None = None

    def fit(
        self,
        images: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        budget_bytes: int | None = None,
        param_ratio: float | None = None,
        seed: int = 0,
        features: np.ndarray | None = None,
    ) -> Reconstruction:
        """Produce the training set (N, H, W, C) at the budget; see :class:`Baseline`."""
        images = check_images(images, channels=self.channels)
        labels = check_labels(labels, images.shape[0])
        budget = check_budget(budget_bytes, param_ratio)
        return self._fit(images, labels, budget, seed=seed, features=features)

    def _fit(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        budget: Budget,
        *,
        seed: int,
        features: np.ndarray | None,
    ) -> Reconstruction:
        raise NotImplementedError


def check_images(images: np.ndarray, *, channels: tuple[int, ...] | None = None) -> np.ndarray:
    """Validate a training set: 4-d uint8 ``(N, H, W, C)`` with N >= 1."""
    images = np.asarray(images)
    if images.ndim != 4 or min(images.shape) < 1:
        raise OptionError(f"expected images of shape (N, H, W, C), got {images.shape}")
    if images.dtype != np.uint8:
        raise OptionError(f"expected uint8 images, got {images.dtype}")
    if channels is not None and images.shape[3] not in channels:
        raise OptionError(
            f"expected {' or '.join(map(str, channels))} channels, got {images.shape[3]}"
        )
    return images


def check_labels(labels: np.ndarray | None, n: int) -> np.ndarray | None:
    """Validate labels: None, or ``n`` integers (returned as int64)."""
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise OptionError(f"expected {n} labels of shape ({n},), got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise OptionError(f"expected integer labels, got {labels.dtype}")
    return labels.astype(np.int64, copy=False)


@dataclass(frozen=True)
class Budget:
    """A validated budget: ``kind`` is ``"bytes"`` or ``"ratio"``."""

    kind: str
    value: float

    def describe(self) -> str:
        return (
            f"{int(self.value):,} bytes"
            if self.kind == "bytes"
            else f"parameter ratio {self.value:g}"
        )


def check_budget(budget_bytes: int | None, param_ratio: float | None) -> Budget:
    """Exactly one of the two budgets, positive and finite."""
    if (budget_bytes is None) == (param_ratio is None):
        raise OptionError("give exactly one of budget_bytes and param_ratio")
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or int(budget_bytes) != budget_bytes or budget_bytes < 1:
            raise OptionError(f"budget_bytes must be a positive integer, got {budget_bytes!r}")
        return Budget("bytes", int(budget_bytes))
    ratio = float(param_ratio)  # type: ignore[arg-type]
    if not (ratio > 0 and math.isfinite(ratio)):
        raise OptionError(f"param_ratio must be a positive finite number, got {param_ratio!r}")
    return Budget("ratio", ratio)


def fits_ratio(n_params: int, total: int, ratio: float) -> bool:
    """Whether ``n_params / total <= ratio``, tolerant to the rounding of ``ratio`` itself."""
    return n_params <= ratio * total * (1 + 1e-12)


# ---------------------------------------------------------------------- bytes and quantisation
def measure(arrays: dict[str, np.ndarray], labels: np.ndarray | None) -> int:
    """Bytes on disk of ``arrays`` (and ``labels`` when given), as mpsd stores them."""
    payload = dict(arrays)
    if labels is not None:
        payload["labels"] = labels
    return stored_nbytes(payload)


def quantize_all(
    factors: dict[str, np.ndarray], dtype: str
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Quantise factors as mpsd quantises MPS cores (one scale per tensor of the batch).

    Parameters
    ----------
    factors : dict of str to ndarray of shape (B, ...)
        Float factors, batch axis first.
    dtype : {"int8", "float16", "float32"}
        Storage dtype (see :mod:`mpsd.core.quantize`).

    Returns
    -------
    stored : dict of str to ndarray
        What is written: each factor, plus ``<name>_scale`` of shape (B,) float32 for int8.
    restored : dict of str to ndarray
        The float64 factors a reader gets back (the decode must use these).
    """
    check_storage_dtype(dtype)
    stored: dict[str, np.ndarray] = {}
    restored: dict[str, np.ndarray] = {}
    for name, value in factors.items():
        q, scale = quantize(np.asarray(value, dtype=np.float64), dtype)
        stored[name] = q
        if scale is not None:
            stored[f"{name}_scale"] = scale
        restored[name] = dequantize(q, scale)
    return stored, restored


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round to the nearest integer and clip to [0, 255]."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- choosing a setting
def search_largest(
    n: int, cost: Callable[[int], float], budget: float, *, start: int | None = None
) -> int | None:
    """Largest index ``i`` in ``range(n)`` with ``cost(i) <= budget``, for a roughly increasing cost.

    Gallops from ``start`` (default the middle) in steps 1, 2, 4, ... to bracket the boundary,
    then bisects it.  The answer ``i`` is always feasible and ``i + 1`` was evaluated and found
    infeasible (or ``i = n − 1``), so where the cost is not monotone the answer is still a largest
    feasible setting in its neighbourhood.  Each index is evaluated at most once.

    Returns
    -------
    int or None
        None when no feasible index was found (``cost(0) > budget`` and nothing above it fitted).
    """
    cache: dict[int, float] = {}

    def ok(i: int) -> bool:
        if i not in cache:
            cache[i] = cost(i)
        return cache[i] <= budget

    if n < 1:
        return None
    s = (n - 1) // 2 if start is None else min(max(int(start), 0), n - 1)
    # invariant: lo is feasible (or -1), hi is infeasible (or n)
    if ok(s):
        lo, step = s, 1
        while lo + step < n and ok(lo + step):
            lo += step
            step *= 2
        hi = lo + step
        if hi >= n:  # ran past the end without meeting an infeasible index
            hi = n
            if lo < n - 1:
                if ok(n - 1):
                    lo = n - 1
                else:
                    hi = n - 1
    else:
        hi, step = s, 1
        while hi - step >= 0 and not ok(hi - step):
            hi -= step
            step *= 2
        lo = hi - step
        if lo < 0:  # ran past the start without meeting a feasible index
            if hi == 0 or not ok(0):
                return None
            lo = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def budget_error(method: str, smallest: str, size: float, budget: Budget) -> OptionError:
    """The error raised when even the smallest setting exceeds the budget."""
    if budget.kind == "bytes":
        got = f"{int(size):,} bytes"
    else:
        got = f"parameter ratio {size:.6g}"
    return OptionError(
        f"{method}: even the smallest setting ({smallest}) takes {got}, "
        f"more than the budget of {budget.describe()}"
    )


@dataclass
class Encoded:
    """One setting of a factor model, encoded.

    Attributes
    ----------
    arrays : dict of str to ndarray
        What would be stored (quantised factors and their scales).
    n_params : int
        Stored parameters of the whole training set (scales not counted).
    decode : callable
        ``decode()`` returns the reconstructed images ``(N, H, W, C)`` uint8, from ``arrays``.
    settings : dict
        JSON-serialisable description of the setting.
    """

    arrays: dict[str, np.ndarray]
    n_params: int
    decode: Callable[[], np.ndarray]
    settings: dict[str, Any]


def fit_family(
    method: str,
    n_settings: int,
    *,
    n_params: Callable[[int], int],
    encode: Callable[[int], Encoded],
    describe: Callable[[int], str],
    total: int,
    budget: Budget,
    labels: np.ndarray | None,
    estimate: Callable[[int], Encoded] | None = None,
) -> Reconstruction:
    """Pick the largest setting of a factor model that fits, and build its reconstruction.

    Parameters
    ----------
    method : str
        Name used in the result and in errors.
    n_settings : int
        Settings are ``0..n_settings-1``, smallest first.
    n_params : callable
        ``n_params(i)``: stored parameters of setting i (cheap, no encoding).
    encode : callable
        ``encode(i)``: quantise setting i (see :class:`Encoded`).
    describe : callable
        ``describe(i)``: a short name of setting i for messages.
    total : int
        ``N·H·W·C``.
    budget : Budget
    labels : ndarray of shape (N,) or None
        Stored beside the factors (counted in the bytes).
    estimate : callable, optional
        A cheap stand-in for ``encode`` (e.g. fewer iterations) whose bytes are close: a byte
        budget is first searched with it, and the real search starts where it ended (usually
        two real encodings).  The answer does not depend on it.
    """
    sizes: dict[int, int] = {}
    best: dict[int, Encoded] = {}  # the largest feasible setting evaluated so far, encoded

    if budget.kind == "ratio":
        chosen = search_largest(
            n_settings, lambda i: 0.0 if fits_ratio(n_params(i), total, budget.value) else 1.0, 0.0
        )
        if chosen is None:
            raise budget_error(method, describe(0), n_params(0) / total, budget)
    else:

        def cost(i: int) -> float:
            enc = encode(i)
            sizes[i] = measure(enc.arrays, labels)
            logger.debug(
                "%s: %s takes %d bytes (budget %d)", method, describe(i), sizes[i], budget.value
            )
            if sizes[i] <= budget.value and all(i > j for j in best):
                best.clear()
                best[i] = enc
            return sizes[i]

        # int8 factors take about one byte per parameter: start near that
        guess = search_largest(n_settings, lambda i: n_params(i), budget.value, start=0) or 0
        if estimate is not None:
            rough = search_largest(
                n_settings, lambda i: measure(estimate(i).arrays, labels), budget.value, start=guess
            )
            guess = rough or 0
        chosen = search_largest(n_settings, cost, budget.value, start=guess)
        if chosen is None:
            raise budget_error(method, describe(0), sizes[0], budget)
    enc = best[chosen] if chosen in best else encode(chosen)
    size = sizes[chosen] if chosen in sizes else measure(enc.arrays, labels)
    logger.info(
        "%s: chose %s (%d bytes, ratio %.4f)", method, describe(chosen), size, enc.n_params / total
    )
    return Reconstruction(
        method=method,
        images=enc.decode(),
        labels=None if labels is None else labels.copy(),
        indices=None,
        bytes_on_disk=int(size),
        param_ratio=enc.n_params / total,
        settings=enc.settings,
    )
