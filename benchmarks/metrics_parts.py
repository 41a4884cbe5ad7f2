"""What the metrics cost: one thread, the parts of the spectra and of the pixel-error pass.

``mpsd compress`` with metrics (the default) computes, besides the TT-SVD sweep, the spectra of
every unfolding (for the entanglement entropy and the local truncation errors) and contracts
every stored MPS to measure its error.  This times each call those two steps make, on one
128-image task of real CIFAR-10 images (``TASK_IMAGES``, what a worker gets), with BLAS pinned to
one thread, best of seven, and prints µs of thread CPU per colour image next to the whole step::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/metrics_parts.py

The gap between a step and the sum of its parts is the Python and numpy between the calls.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from cpu_breakdown import DATA  # noqa: E402

from mpsd.api import TASK_IMAGES, plan_stages  # noqa: E402
from mpsd.core import _kernels, codec, spectra  # noqa: E402
from mpsd.core.layout import choose_layout  # noqa: E402


def per_image(fn: Callable[[], object], n_images: int, reps: int = 100) -> float:
    """Thread CPU µs per image of ``fn()``, best of seven rounds of ``reps`` calls."""
    best = float("inf")
    for _ in range(7):
        start = time.thread_time()
        for _ in range(reps):
            fn()
        best = min(best, (time.thread_time() - start) / reps)
    return best / n_images * 1e6


def main() -> None:
    with np.load(DATA / "cifar10.npz") as data:
        images = data["x_train"][:TASK_IMAGES]
    n = len(images)
    layout = choose_layout(32, 32, 3)
    caps = (4, 6, 6, 4)
    (spec,) = plan_stages(layout, bond=caps, tol=None, ratio=None)
    tensors = _kernels.fold_scaled(images, layout, 255)  # (3n, 4, 4, 4, 4, 4)
    b = tensors.shape[0]
    m2, m3 = tensors.reshape(b, 16, 64), tensors.reshape(b, 64, 16)
    g, h = _kernels.gram_rows(m2), _kernels.gram_cols(m3)
    g4 = np.einsum("zaibi->zab", g.reshape(b, 4, 4, 4, 4)).copy()
    h4 = np.einsum("zaiaj->zij", h.reshape(b, 4, 4, 4, 4)).copy()

    captured: dict[str, tuple] = {}
    stage_errors = _kernels.stage_errors

    def capture(*args: object) -> object:
        captured["args"] = args
        return stage_errors(*args)

    codec._kernels.stage_errors = capture  # type: ignore[attr-defined]
    try:
        codec.encode_batch(tensors, [spec], dtype="int8", metrics=True, pixels=codec.Pixels(layout, 255))
    finally:
        codec._kernels.stage_errors = stage_errors  # type: ignore[attr-defined]
    cores, scales = captured["args"][:2]
    ready = _kernels._packed_for_contraction(cores, scales)
    if ready is None:
        sys.exit("metrics_parts.py times the compiled kernels: install numba (pip install 'mpsd[fast]')")
    packed, offsets, dims, ranks, split = ready
    out = np.empty((b, int(dims.prod())))
    kernels = _kernels._kernels()

    rows = [
        ("spectra_and_left_basis (whole)", lambda: spectra.spectra_and_left_basis(tensors, caps)),
        ("  Gram 16×16, rows (gram_rows)", lambda: _kernels.gram_rows(m2)),
        ("  eigenpairs 16×16, six vectors", lambda: _kernels.eigh_desc(g, vectors=True, k=6)),
        ("  partial trace to 4×4 (einsum)", lambda: np.einsum("zaibi->zab", g.reshape(b, 4, 4, 4, 4))),
        ("  eigenvalues 4×4", lambda: _kernels.eigh_desc(g4, vectors=False)),
        ("  Gram 16×16, columns (gram_cols)", lambda: _kernels.gram_cols(m3)),
        ("  eigenvalues 16×16", lambda: _kernels.eigh_desc(h, vectors=False)),
        ("  partial trace to 4×4 (einsum)", lambda: np.einsum("zaiaj->zij", h.reshape(b, 4, 4, 4, 4))),
        ("  eigenvalues 4×4", lambda: _kernels.eigh_desc(h4, vectors=False)),
        ("stage_errors (whole)", lambda: stage_errors(*captured["args"])),
        ("  dequantise and pack the cores", lambda: _kernels._packed_for_contraction(cores, scales)),
        ("  contraction alone (contract_packed)", lambda: kernels["contract_packed"](packed, offsets, dims, ranks, split, out)),
    ]
    with threadpool_limits(1):
        print(f"{n} CIFAR-10 images ({b} tensors of 4,4,4,4,4), --bond 4,6,6,4, one thread, µs per image")
        for label, fn in rows:
            print(f"  {per_image(fn, n):7.2f}  {label}")


if __name__ == "__main__":
    main()
