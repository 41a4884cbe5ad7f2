"""CPU counting and BLAS pinning shared by the encoder and the decoder."""

from __future__ import annotations

import os
from typing import Any


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def blas_single_thread() -> Any:
    """Context manager pinning BLAS/LAPACK to one thread (mpsd parallelises over batches instead).

    threadpoolctl limits the BLAS libraries loaded when it is called.  The compiled kernels call
    BLAS through scipy's OpenBLAS, a library of its own that numba loads the first time a kernel
    needs it, so it is loaded here first: otherwise the first compress of a process ran those
    calls on every CPU, two workers with two BLAS threads each (2026-12-08, 2 vCPUs, 50,000
    CIFAR-10 images: 3.05–3.31 s for the first call against 1.97–2.10 for the next; 3,072
    224×224 images at ``--tol 0.05``: 15.5 against 7.3 s).
    """
    from threadpoolctl import threadpool_limits

    from mpsd.core._kernels import use_numba

    if use_numba():
        import scipy.linalg.cython_blas  # noqa: F401  (numba's BLAS)

    return threadpool_limits(limits=1)
