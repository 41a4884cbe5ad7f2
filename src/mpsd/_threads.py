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
    """Context manager pinning BLAS/LAPACK to one thread (mpsd parallelises over batches instead)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)
