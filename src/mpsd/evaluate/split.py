"""Seeded, stratified splits of a dataset (numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["split_indices"]


def split_indices(n: int, val_fraction: float, *, seed: int = 0, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into train and validation indices (stratified when labels are given).

    Returns
    -------
    train_idx, val_idx : ndarray of int64, sorted
        ``val_idx`` has ``round(n * val_fraction)`` entries (at least 1 when the fraction is > 0
        and n >= 2).
    """
    rng = np.random.default_rng(seed)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, n_val), n - 1)
    if n_val == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    if labels is not None and len(labels) == n and (np.asarray(labels) >= 0).all():
        labels = np.asarray(labels)
        val: list[int] = []
        classes, counts = np.unique(labels, return_counts=True)
        quota = np.floor(counts * n_val / n).astype(int)
        remainder = n_val - int(quota.sum())
        extra = rng.permutation(len(classes))[:remainder]
        quota[extra] += 1
        for cls, q in zip(classes, quota, strict=True):
            members = np.nonzero(labels == cls)[0]
            val.extend(rng.permutation(members)[: min(q, len(members))].tolist())
        val_idx = np.sort(np.asarray(val, dtype=np.int64))
    else:
        val_idx = np.sort(rng.permutation(n)[:n_val].astype(np.int64))
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    return np.nonzero(mask)[0].astype(np.int64), val_idx
