"""Coreset baselines: keep a subset of the training images as they are.

``random``
    Uniform sampling without replacement, class-stratified when labels are given.
``kcenter``
    Greedy K-center (farthest-first traversal, Gonzalez 1985; Sener & Savarese 2018) on the
    flattened pixels or on given features.  The greedy choice is exact; it is made fast by
    pruning with distances in a PCA projection (lower bounds of the true distances), so only
    the points that may move to a new centre are measured exactly.

Both build one ordering of the images whose prefixes are the coresets, so a larger budget always
keeps a superset.  Stratified prefixes hold, for every class c, a count within one of
``k·n_c/N`` (classes are interleaved by the keys ``(j + ½)/n_c``).  The selected images are
returned in their original order; what is stored and measured is those images and their labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from mpsd.baselines.base import (
    BaselineMethod,
    Budget,
    Reconstruction,
    budget_error,
    measure,
    search_largest,
)
from mpsd.errors import OptionError

logger = logging.getLogger(__name__)

#: Rows per block when measuring exact distances (bounds the temporary memory).
_CHUNK_ROWS = 8192
#: Slack on the projected squared distances, relative to the squared norms: far above the
#: float32 rounding of the projection, so pruning never drops a point that may move.
_SLACK = 1e-5


# ====================================================================== orderings
def _interleave(groups: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The group of every slot when position j of group c gets the key ``(j + ½)/n_c``.

    Returns an array of shape (sum n_c,); ties between groups are broken by a random priority.
    """
    priority = rng.permutation(len(groups))
    key = np.concatenate([(np.arange(len(m)) + 0.5) / len(m) for m in groups])
    group = np.concatenate([np.full(len(m), g) for g, m in enumerate(groups)])
    return group[np.lexsort((priority[group], key))]


class _Ordering:
    """Prefixes of an image ordering; groups are interleaved when stratified.

    Parameters
    ----------
    groups : list of ndarray
        Indices of the images of each group (one group: no stratification).
    prefix : callable
        ``prefix(g, m)``: the first m positions (into ``groups[g]``) of group g's own order.
    """

    def __init__(
        self,
        groups: list[np.ndarray],
        prefix: Callable[[int, int], np.ndarray],
        rng: np.random.Generator,
    ) -> None:
        self.groups = groups
        self._prefix = prefix
        self.slot_group = _interleave(groups, rng)

    def __call__(self, k: int) -> np.ndarray:
        """The first k images of the ordering, as ascending indices into the dataset."""
        counts = np.bincount(self.slot_group[:k], minlength=len(self.groups))
        parts = [self.groups[g][self._prefix(g, int(m))] for g, m in enumerate(counts) if m]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _groups(labels: np.ndarray | None, n: int, stratify: bool) -> list[np.ndarray]:
    if labels is None or not stratify:
        return [np.arange(n)]
    return [np.flatnonzero(labels == c) for c in np.unique(labels)]


# ====================================================================== farthest-first traversal
class FarthestFirst:
    """Greedy K-center (farthest-first traversal) that can be extended one centre at a time.

    Each new centre is the point farthest from all centres so far (ties: the lowest index), as in
    the textbook algorithm.  After a centre p is added only the points that may have moved to it
    are measured: ``‖P(x − p)‖ <= ‖x − p‖`` for the orthonormal PCA basis P (the top
    ``proj_dim`` directions of a sample of the points), so a point whose projected distance is
    at least its current distance cannot move.  The projected distances of all points are one
    matrix–vector product per step; exact distances (float64 sums of float32 differences, exact
    for pixel values) are computed for the few points left.  The selection is the same as the
    unpruned algorithm's.

    Parameters
    ----------
    points : ndarray of shape (N, F)
        Points (converted to float32).
    first : int
        Index of the first centre.
    rng : numpy.random.Generator
        Picks the sample the PCA basis is computed from.
    proj_dim : int
        Dimension of the projection used for the lower bounds (speed only).
    """

    def __init__(
        self, points: np.ndarray, first: int, rng: np.random.Generator, *, proj_dim: int = 64
    ) -> None:
        self.x = np.ascontiguousarray(points, dtype=np.float32)
        n, f = self.x.shape
        basis = self._pca_basis(rng, min(proj_dim, f))
        self.z = np.concatenate(
            [
                (self.x[s : s + _CHUNK_ROWS] @ basis).astype(np.float32)
                for s in range(0, n, _CHUNK_ROWS)
            ]
        )
        self.z_sq = np.einsum("ij,ij->i", self.z, self.z, dtype=np.float64)
        self.order: list[int] = []
        self.chosen = np.zeros(n, dtype=bool)
        self.dist_sq = np.full(n, np.inf)  # squared distance to the nearest centre
        self.gaps: list[float] = []  # gaps[k-1]: covering radius of the first k centres
        self.n_exact = 0  # exact distances measured (diagnostics)
        self._add(int(first))

    def _pca_basis(self, rng: np.random.Generator, m: int) -> np.ndarray:
        n, f = self.x.shape
        if m >= f:
            return np.eye(f)
        sample = self.x[np.sort(rng.choice(n, size=min(n, 1024), replace=False))].astype(np.float64)
        sample -= sample.mean(axis=0)
        w, v = np.linalg.eigh(sample @ sample.T)
        top = v[:, ::-1][:, :m] * np.sqrt(np.maximum(w[::-1][:m], 0.0))
        # fewer sampled points than m: random directions fill the rest (any orthonormal basis works)
        top = sample.T @ top
        top = np.concatenate([top, rng.standard_normal((f, m - top.shape[1]))], axis=1)
        q, _ = np.linalg.qr(top)
        return q  # (F, m), orthonormal columns

    def _exact_sq(self, idx: np.ndarray, p: int) -> np.ndarray:
        out = np.empty(idx.size)
        centre = self.x[p]
        for s in range(0, idx.size, _CHUNK_ROWS):
            diff = self.x[idx[s : s + _CHUNK_ROWS]] - centre
            out[s : s + _CHUNK_ROWS] = np.einsum("ij,ij->i", diff, diff, dtype=np.float64)
        self.n_exact += idx.size
        return out

    def _add(self, p: int) -> None:
        zc = self.z[p]
        zc_sq = float(self.z_sq[p])
        # ‖z − z_p‖² by expansion in float32, lowered by far more than its rounding error
        lower = self.z_sq + zc_sq - 2.0 * (self.z @ zc) - _SLACK * (self.z_sq + zc_sq)
        cand = np.flatnonzero(lower < self.dist_sq)
        d_sq = self._exact_sq(cand, p)
        closer = d_sq < self.dist_sq[cand]
        self.dist_sq[cand[closer]] = d_sq[closer]
        self.dist_sq[p] = 0.0
        self.chosen[p] = True
        self.order.append(p)

    def extend(self, k: int) -> list[int]:
        """Choose centres until there are ``k`` (at most N); returns the order so far."""
        k = min(int(k), self.x.shape[0])
        while len(self.order) < k:
            p = int(np.argmax(self.dist_sq))
            self.gaps.append(float(np.sqrt(self.dist_sq[p])))
            if self.dist_sq[p] <= 0.0:  # every point left coincides with a centre
                p = int(np.flatnonzero(~self.chosen)[0])
            self._add(p)
        return self.order[:k]

    def covering_radius(self, k: int) -> float:
        """Largest distance from a point to its nearest centre among the first ``k`` (k >= 1).

        In farthest-first order this is the distance the (k+1)-th centre had when it was chosen.
        """
        if k < 1:
            raise ValueError("covering_radius needs k >= 1")
        self.extend(k)
        return self.gaps[k - 1] if k <= len(self.gaps) else float(np.sqrt(self.dist_sq.max()))


# ====================================================================== the baselines
def _fit_coreset(
    method: str,
    images: np.ndarray,
    labels: np.ndarray | None,
    ordering: _Ordering,
    budget: Budget,
    settings: dict[str, object],
) -> Reconstruction:
    n = images.shape[0]

    def arrays(idx: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        return {"images": images[idx]}, None if labels is None else labels[idx]

    if budget.kind == "ratio":
        k = min(n, int(np.floor(budget.value * n * (1 + 1e-12))))
        if k < 1:
            raise budget_error(method, "1 image", 1 / n, budget)
    else:
        whole = measure(*arrays(np.arange(n)))
        guess = int(budget.value / max(whole / n, 1.0))
        chosen = search_largest(
            n, lambda i: measure(*arrays(ordering(i + 1))), budget.value, start=guess - 1
        )
        if chosen is None:
            raise budget_error(method, "1 image", measure(*arrays(ordering(1))), budget)
        k = chosen + 1
    idx = ordering(k)
    stored, kept_labels = arrays(idx)
    size = measure(stored, kept_labels)
    logger.info("%s: kept %d of %d images (%d bytes)", method, k, n, size)
    return Reconstruction(
        method=method,
        images=stored["images"],
        labels=kept_labels,
        indices=idx.astype(np.int64),
        bytes_on_disk=int(size),
        param_ratio=k / n,
        settings={"k": int(k), **settings},
    )


class RandomCoreset(BaselineMethod):
    """Uniform random subset, class-stratified when labels are given.

    Parameters
    ----------
    stratify : bool
        Keep class proportions (within one image per class) when labels are given.
    """

    name = "random"

    def __init__(self, *, stratify: bool = True) -> None:
        self.stratify = bool(stratify)

    def _fit(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        budget: Budget,
        *,
        seed: int,
        features: np.ndarray | None,
    ) -> Reconstruction:
        """Select images (N, H, W, C) at the budget; see :class:`~mpsd.baselines.base.Baseline`."""
        rng = np.random.default_rng(seed)
        groups = _groups(labels, images.shape[0], self.stratify)
        perms = [rng.permutation(len(g)) for g in groups]
        ordering = _Ordering(groups, lambda g, m: perms[g][:m], rng)
        stratified = labels is not None and self.stratify
        return _fit_coreset(
            self.name, images, labels, ordering, budget, {"seed": seed, "stratified": stratified}
        )


class KCenter(BaselineMethod):
    """Greedy K-center coreset on flattened pixels (float32) or on ``features``.

    Parameters
    ----------
    stratify : bool
        Run the greedy selection within each class and interleave the classes (class
        proportions kept); default False: one global selection, as in the paper.
    proj_dim : int
        Dimension of the PCA projection used only to prune distance computations (the selection
        does not depend on it).
    """

    name = "kcenter"

    def __init__(self, *, stratify: bool = False, proj_dim: int = 64) -> None:
        if int(proj_dim) != proj_dim or proj_dim < 1:
            raise OptionError(f"kcenter: proj_dim must be a positive integer, got {proj_dim!r}")
        self.stratify = bool(stratify)
        self.proj_dim = int(proj_dim)

    def _fit(
        self,
        images: np.ndarray,
        labels: np.ndarray | None,
        budget: Budget,
        *,
        seed: int,
        features: np.ndarray | None,
    ) -> Reconstruction:
        """Select images (N, H, W, C) at the budget; see :class:`~mpsd.baselines.base.Baseline`."""
        n = images.shape[0]
        if features is None:
            points = images.reshape(n, -1)
        else:
            points = np.asarray(features)
            if points.ndim != 2 or points.shape[0] != n:
                raise OptionError(
                    f"kcenter: expected features of shape ({n}, F), got {points.shape}"
                )
            if not np.isfinite(points).all():
                raise OptionError("kcenter: features contain NaN or infinity")
        rng = np.random.default_rng(seed)
        groups = _groups(labels, n, self.stratify)
        firsts = [int(rng.integers(len(g))) for g in groups]  # drawn up front: nested budgets
        ordering_rng, pca_rng = rng.spawn(2)
        traversals: dict[int, FarthestFirst] = {}

        def prefix(g: int, m: int) -> np.ndarray:
            if g not in traversals:
                traversals[g] = FarthestFirst(
                    points[groups[g]], firsts[g], pca_rng, proj_dim=self.proj_dim
                )
            return np.asarray(traversals[g].extend(m), dtype=np.int64)

        ordering = _Ordering(groups, prefix, ordering_rng)
        settings = {
            "seed": seed,
            "stratified": len(groups) > 1,
            "space": "pixels" if features is None else f"features ({points.shape[1]})",
        }
        result = _fit_coreset(self.name, images, labels, ordering, budget, settings)
        counts = np.bincount(ordering.slot_group[: result.images.shape[0]], minlength=len(groups))
        radii = [traversals[g].covering_radius(int(m)) for g, m in enumerate(counts) if m]
        # within each class when stratified; None when a class got no centre (not covered)
        result.settings["covering_radius"] = max(radii) if counts.all() else None
        return result
