"""Does the paper's residual stage pay for its parameters?  Quality at equal parameter ratio ρ.

The paper's Algorithm 2 stores MPS(S) + MPS(R) with R = S − MPS(S), both with fixed bonds
(Table 4).  mpsd can also spend a dataset's parameters where they help most (``--ratio``,
one stage, ranks chosen per image and bond).  This script compresses the same real images
every way at the same ρ and prints PSNR (computed here from the decoded uint8 images, not
taken from mpsd's own numbers) and bytes on disk::

    .venv/bin/python benchmarks/residual.py [--n 2000] [--datasets cifar10 fashion_mnist]

Rows, for each target ρ:

* ``ratio``: one stage, ``compress(ratio=ρ)`` (what ``mpsd evaluate`` uses for its mpsd arm);
* ``ratio + residual t``: ``compress(ratio=ρ, residual_bonds=[t])``, t the largest uniform bond
  (capped by the exact ranks) whose stage takes at most ρ/2: Algorithm 2 with its first stage
  allocated by ``--ratio``;
* ``bond t + residual t``: Algorithm 2 as in the paper, both stages with the same fixed bonds,
  t the largest uniform bond whose two stages fit ρ;
* ``bond t``: one stage with the largest uniform bond that fits ρ (plain TT-SVD).

Then the paper's own Table 4 structures, next to ``ratio`` at the ρ they reach.  Stores are int8
and written with ``metrics=False`` (only what decoding needs, as in ``mpsd evaluate``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import DATA, DATASETS, psnr

import mpsd
from mpsd.core.layout import choose_layout
from mpsd.core.ttsvd import exact_ranks, parameter_count

RHOS = (0.1, 0.2, 0.4, 0.7)
#: The paper's Table 4 structures (both stages), and the README's Fashion-MNIST example.
PAPER = {
    "cifar10": [("4,6,6,4", "4,6,6,4")],
    "fashion_mnist": [("2,6,5,2", "2,6,5,2"), ("2,6,5,2", "2,2,2,2")],
}


def uniform(sites: tuple[int, ...], t: int) -> tuple[int, ...]:
    return tuple(min(t, e) for e in exact_ranks(sites))


def stage_ratio(sites: tuple[int, ...], bonds: tuple[int, ...]) -> float:
    return float(parameter_count(sites, np.asarray(bonds))) / math.prod(sites)


def largest_uniform(sites: tuple[int, ...], budget: float) -> tuple[int, ...] | None:
    """The largest uniform bond t (capped by the exact ranks) whose stage takes <= budget."""
    best = None
    for t in range(1, max(exact_ranks(sites)) + 1):
        bonds = uniform(sites, t)
        if stage_ratio(sites, bonds) <= budget + 1e-12:
            best = bonds
    return best


def measure(x: np.ndarray, tmp: Path, **options) -> tuple[float, float, float]:
    """(actual ρ, bytes per image, PSNR) of one int8 store of ``x``."""
    store = mpsd.compress(x, tmp / "s.zarr", overwrite=True, metrics=False, workers=1, **options)
    decoded = store.decode(slice(None))
    return float(store.stats().param_ratio), store.bytes_on_disk / len(x), psnr(decoded, x)


def rows_for(dataset: str, n: int, tmp: Path) -> list[tuple]:
    with np.load(DATA / DATASETS[dataset]) as f:
        x = np.ascontiguousarray(f["x_train"][:n])
    h, w = x.shape[1:3]
    sites = choose_layout(h, w, x.shape[3] if x.ndim == 4 else 1).sites
    fmt = lambda b: ",".join(map(str, b))  # noqa: E731
    out = []
    for rho in RHOS:
        out.append((rho, "ratio", *measure(x, tmp, ratio=rho)))
        half = largest_uniform(sites, rho / 2)
        if half is not None and stage_ratio(sites, half) < rho:
            out.append((rho, f"ratio + residual {fmt(half)}", *measure(x, tmp, ratio=rho, residual_bonds=[half])))
        both = largest_uniform(sites, rho / 2)
        if both is not None:
            out.append((rho, f"bond {fmt(both)} + residual {fmt(both)}", *measure(x, tmp, bond=both, residual_bonds=[both])))
        one = largest_uniform(sites, rho)
        if one is not None:
            out.append((rho, f"bond {fmt(one)}", *measure(x, tmp, bond=one)))
    for first, second in PAPER[dataset]:
        label = f"paper: bond {first} + residual {second}"
        rho_p, nbytes, quality = measure(x, tmp, bond=first, residual_bonds=[second])
        out.append((round(rho_p, 3), label, rho_p, nbytes, quality))
        out.append((round(rho_p, 3), "ratio", *measure(x, tmp, ratio=rho_p)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="training images per dataset (the first n)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mpsd-residual-", dir=os.environ.get("MPSD_BENCH_TMP")))
    for dataset in args.datasets:
        print(f"\n**{dataset}**, first {args.n:,} training images, int8 cores\n")
        print("| target ρ | stages | actual ρ | bytes / image | PSNR (dB) |")
        print("|---:|---|---:|---:|---:|")
        for target, label, rho, nbytes, quality in rows_for(dataset, args.n, tmp):
            print(f"| {target:g} | {label} | {rho:.3f} | {nbytes:,.0f} | {quality:.2f} |", flush=True)


if __name__ == "__main__":
    main()
