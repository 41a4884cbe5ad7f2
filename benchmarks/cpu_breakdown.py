"""Where the encoder's CPU goes: thread CPU time of its parts inside a real ``mpsd.compress``.

Wraps the functions of the encode pipeline (the compiled kernels' wrappers, the spectra, the
sweep, quantisation, the metrics' contraction, the writer and zstd) with a thread-CPU-time
counter, compresses real CIFAR-10 images (tiled) with two workers, and prints µs of CPU per
image for each part next to the process's own CPU time::

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/cpu_breakdown.py \\
        [--mode bond|residual|tol] [--no-metrics] [--n 40000]

Parts nest (the sweep's row includes its eigendecompositions, which are also in their own row),
so the rows do not add up to the total.  Thread CPU time leaves out the time a thread waits for
the GIL.  Stores go to ``MPSD_BENCH_TMP`` (default: the system temp folder).
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import mpsd  # noqa: E402
import mpsd.api as api  # noqa: E402
from mpsd.archive import writer  # noqa: E402
from mpsd.core import _kernels, codec, spectra, ttsvd  # noqa: E402

DATA = Path(os.environ.get("MPSD_BENCH_DATA", ROOT.parent / "shared" / "data"))
MODES = {
    "bond": {"bond": "4,6,6,4"},
    "residual": {"bond": "4,6,6,4", "residual_bonds": ["4,6,6,4"]},
    "tol": {"tol": 0.05},
}

_cpu: dict[str, float] = collections.defaultdict(float)
_lock = threading.Lock()


def _timed(owner: Any, name: str, label: str) -> Any:
    fn = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent = time.thread_time() - start
            with _lock:
                _cpu[label] += spent

    setattr(owner, name, wrapper)
    return wrapper


def _instrument() -> None:
    for name in ("eigh_desc", "gram_rows", "fold_scaled", "errors_against_pixels", "norms_and_distances",
                 "contract_cores", "gauge_quantize_int8", "stage_errors"):
        _timed(_kernels, name, f"kernel {name}")
    codec.spectra_and_left_basis = _timed(spectra, "spectra_and_left_basis", "spectra of the unfoldings")
    codec.tt_svd = _timed(ttsvd, "tt_svd", "TT-SVD sweep")
    api.encode_batch = _timed(codec, "encode_batch", "encode_batch")
    _timed(api, "_encode_images", "encode (fold, stages, pixel error)")
    _timed(codec, "_store_cores", "gauge + quantisation")
    _timed(codec, "contract_stored", "contraction of the stored stage")
    _timed(codec, "entanglement_entropy", "entropy")
    _timed(codec, "local_truncation_errors", "local truncation errors")
    _timed(writer.StoreWriter, "write_batch", "writer (whole)")
    _timed(writer, "stored_cores", "writer: packing the cores")
    zstd = writer._zstd()

    class TimedZstd:
        def encode(self, data: Any) -> Any:
            start = time.thread_time()
            out = zstd.encode(data)
            with _lock:
                _cpu["writer: zstd"] += time.thread_time() - start
            return out

    writer._zstd = lambda: TimedZstd()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=sorted(MODES), default="bond")
    ap.add_argument("--no-metrics", action="store_true")
    ap.add_argument("--n", type=int, default=40_000)
    args = ap.parse_args(argv)
    with np.load(DATA / "cifar10.npz") as data:
        real = np.concatenate([data["x_train"], data["x_test"]])
    images = np.concatenate([real] * (-(-args.n // len(real))))[: args.n]
    options = dict(MODES[args.mode], metrics=not args.no_metrics, overwrite=True)
    _kernels.tune_allocator()  # as the mpsd CLI does for its process
    _instrument()
    with tempfile.TemporaryDirectory(dir=os.environ.get("MPSD_BENCH_TMP")) as tmp:
        path = Path(tmp) / "store.zarr"
        mpsd.compress(images[:256], path, **options)  # warm-up: imports, compiled kernels
        _cpu.clear()
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        store = mpsd.compress(images, path, **options)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_SELF)
        size = store.bytes_on_disk
    n = len(images)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / n * 1e6
    print(f"mode {args.mode}, metrics {not args.no_metrics}: {n / wall:,.0f} img/s, "
          f"{size / n:,.1f} bytes/img, process CPU {cpu:.1f} µs/img")
    for label, seconds in sorted(_cpu.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds / n * 1e6:7.2f} µs/img  {label}")


if __name__ == "__main__":
    main()
