"""Independent references for the tests: a plain per-image TT-SVD with numpy.linalg.svd.

Deliberately simple and slow (one image at a time, full SVDs), sharing no code with mpsd.
"""

from __future__ import annotations

import numpy as np


def fold_quadtree(image: np.ndarray, row_factors, col_factors) -> np.ndarray:
    """(H, W) -> tensor with site k = (k-th row digit, k-th column digit), by explicit indexing."""
    n = len(row_factors)
    h, w = image.shape
    sites = [a * b for a, b in zip(row_factors, col_factors, strict=True)]
    out = np.zeros(sites)
    for i in range(h):
        # mixed-radix digits of i and j, most significant first
        di, rem = [], i
        for k in range(n):
            block = int(np.prod(row_factors[k + 1 :]))
            di.append(rem // block)
            rem %= block
        for j in range(w):
            dj, remj = [], j
            for k in range(n):
                block = int(np.prod(col_factors[k + 1 :]))
                dj.append(remj // block)
                remj %= block
            idx = tuple(di[k] * col_factors[k] + dj[k] for k in range(n))
            out[idx] = image[i, j]
    return out


def tt_svd_reference(tensor: np.ndarray, bonds=None, tol=None):
    """Algorithm 1 with numpy.linalg.svd on one tensor; returns (cores, sweep singular values)."""
    dims = tensor.shape
    n = len(dims)
    cores, spectra = [], []
    delta = None if tol is None else tol / np.sqrt(n - 1) * np.linalg.norm(tensor)
    m = tensor.reshape(1, -1)
    r_prev = 1
    for k in range(n - 1):
        m = m.reshape(r_prev * dims[k], -1)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        spectra.append(s)
        r = len(s)
        if bonds is not None:
            r = min(r, bonds[k])
        if delta is not None:
            tail = np.concatenate([np.cumsum((s**2)[::-1])[::-1], [0.0]])
            r_tol = int(np.argmax(tail <= delta**2 * (1 + 1e-12)))
            r = min(r, max(r_tol, 1))
        cores.append(u[:, :r].reshape(r_prev, dims[k], r))
        m = s[:r, None] * vt[:r]
        r_prev = r
    cores.append(m.reshape(r_prev, dims[-1], 1))
    return cores, spectra


def contract_reference(cores) -> np.ndarray:
    out = cores[0].reshape(-1, cores[0].shape[-1])
    for c in cores[1:]:
        out = (out @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[-1])
    return out.reshape([c.shape[1] for c in cores])


def unfolding_singular_values(tensor: np.ndarray) -> list[np.ndarray]:
    dims = tensor.shape
    return [
        np.linalg.svd(tensor.reshape(int(np.prod(dims[: k + 1])), -1), compute_uv=False)
        for k in range(len(dims) - 1)
    ]


def entropy_reference(tensor: np.ndarray) -> np.ndarray:
    out = []
    for s in unfolding_singular_values(tensor):
        p = s**2 / np.sum(s**2)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum()))
    return np.array(out)
