"""Plot test accuracy against bytes per training image from ``mpsd evaluate`` results.

Usage::

    .venv/bin/python benchmarks/plot_results.py docs/results/*.json --out docs/results.png

Every ``results.json`` given is read; runs are grouped by dataset (one panel each) and by method
(one line each).  Only byte budgets are plotted (parameter-ratio budgets have no common x axis
with the codecs).  x is the whole arm's bytes on disk divided by the number of training images of
the full set, so coresets (fewer images, same total bytes) sit at their real budget.  Error bars
are the standard deviation over repeats where there are several.  The original training set is a
dashed horizontal line at its raw size.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

MARKERS = {"mpsd": "o", "mpsd-kd": "D", "ice": "s", "svd": "^", "cp": "v", "tucker": "<", "random": "x",
           "kcenter": "+", "jpeg": "P", "webp": "*"}  # fmt: skip


def load_points(paths: list[Path]) -> dict[str, dict]:
    """``{dataset: {"original": (bytes/img, acc), "methods": {method: [(bytes/img, acc, std)]}}}``."""
    out: dict[str, dict] = defaultdict(lambda: {"original": None, "methods": defaultdict(list), "n_train": None})
    for path in paths:
        data = json.loads(Path(path).read_text())
        env = data["environment"]["dataset"]
        name = Path(env["name"]).stem
        n_train = int(env["n_train"])
        panel = out[name]
        panel["n_train"] = n_train
        for row in data["summary"]:
            if row["method"] == "original":
                panel["original"] = (row["bytes_on_disk"] / row["n_images"], 100 * row["acc_mean"])
                continue
            if not str(row["budget"]).endswith("bytes"):
                continue
            point = (row["bytes_on_disk"] / n_train, 100 * row["acc_mean"], 100 * (row["acc_std"] or 0.0))
            panel["methods"][row["method"]].append(point)
    return out


def plot(points: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(points)
    fig, axes = plt.subplots(1, len(names), figsize=(6.2 * len(names), 4.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        panel = points[name]
        for method in sorted(panel["methods"], key=lambda m: (m != "mpsd", m != "mpsd-kd", m)):
            pts = sorted(set(panel["methods"][method]))
            xs, ys, es = zip(*pts, strict=True)
            bold = method in ("mpsd", "mpsd-kd")
            ax.errorbar(xs, ys, yerr=es if any(es) else None, marker=MARKERS.get(method, "."), label=method,
                        linewidth=2.2 if bold else 1.0, markersize=7 if bold else 5, capsize=2)  # fmt: skip
        if panel["original"] is not None:
            raw, acc = panel["original"]
            ax.axhline(acc, color="k", linestyle="--", linewidth=0.8, label=f"original ({raw:,.0f} B/img)")
        ax.set_xscale("log")
        ax.set_xlabel("bytes on disk per training image (whole arm / full training set size)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: {panel['n_train']:,} training images, small CNN")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json files from mpsd evaluate")
    parser.add_argument("--out", type=Path, default=Path("docs/results.png"))
    args = parser.parse_args()
    plot(load_points(args.results), args.out)


if __name__ == "__main__":
    main()
