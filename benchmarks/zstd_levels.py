"""Bytes and CPU time of zstd levels on the chunks of real mpsd stores.

Compresses the CIFAR-10 training images of ``../shared/data`` (4,000) in the three modes of
``cpu_breakdown.py``, then re-encodes every chunk of every array of each store with numcodecs'
Zstd at several levels and prints bytes per image and encode/decode µs per image (one thread)::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/zstd_levels.py

The level mpsd writes with is :data:`mpsd.archive.codecs.ZSTD_LEVEL`.  Stores go to
``MPSD_BENCH_TMP`` (default: the system temp folder); data from ``MPSD_BENCH_DATA``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu_breakdown import DATA, MODES  # it puts ../src on the path too

import mpsd

LEVELS = (-1, 1, 3, 9, 19)


def _chunks(path: Path) -> list[np.ndarray]:
    """Every chunk of every array of the store, decoded, as bytes."""
    import zarr

    out: list[np.ndarray] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the manifest is not a zarr node
        group = zarr.open_group(path, mode="r")
        arrays = [a for _, a in group.arrays()]
        arrays += [a for _, sub in group.groups() for _, a in sub.arrays()]
    for array in arrays:
        rows = array.chunks[0] if array.ndim else 1
        for start in range(0, max(array.shape[0] if array.ndim else 1, 1), rows):
            block = array[start : start + rows] if array.ndim else array[...]
            out.append(np.ascontiguousarray(block).reshape(-1).view(np.uint8))
    return out


def main() -> None:
    from numcodecs import Zstd

    images = np.load(DATA / "cifar10.npz")["x_train"]
    n = len(images)
    print(f"{n} CIFAR-10 images; bytes and µs per image (zstd over the decoded chunks, one thread)")
    print(f"{'mode':16} {'level':>5} {'bytes':>9} {'encode µs':>10} {'decode µs':>10}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("MPSD_BENCH_TMP")) as tmp:
        for label, options in MODES.items():
            path = Path(tmp) / "store.mpsd"
            mpsd.compress(images, path, overwrite=True, **options)
            chunks = _chunks(path)
            for level in LEVELS:
                codec = Zstd(level=level)
                start = time.perf_counter()
                encoded = [codec.encode(c) for c in chunks]
                encode = time.perf_counter() - start
                start = time.perf_counter()
                for e in encoded:
                    codec.decode(e)
                decode = time.perf_counter() - start
                size = sum(len(e) for e in encoded)
                print(f"{label:16} {level:>5} {size / n:>9.1f} {encode / n * 1e6:>10.2f} {decode / n * 1e6:>10.2f}")


if __name__ == "__main__":
    main()
