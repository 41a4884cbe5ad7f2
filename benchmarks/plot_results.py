"""Plot test accuracy against bytes per training image from ``mpsd evaluate`` results.

Usage::

    .venv/bin/python benchmarks/plot_results.py docs/results/*.json --out docs/results.png

It also prints, per dataset, a markdown table of accuracy by method and byte budget.

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


def pivot_tables(paths: list[Path], kind: str = "bytes") -> str:
    """Markdown: per dataset, test accuracy of every method (rows) at every budget (columns).

    ``kind`` is ``"bytes"`` (budgets as fractions of the raw bytes) or ``"ratio"`` (the paper's
    parameter ratio ρ).  Cells are ``acc`` (mean over repeats, ``± std`` when there are several)
    with the arm's actual byte ratio (bytes) or parameter and byte ratios (ratio); coresets add
    their equal-steps accuracy; arms that could not meet a budget say so.
    """
    cells: dict[str, dict[str, dict[str, str]]] = defaultdict(lambda: defaultdict(dict))
    budgets: dict[str, dict[str, float]] = defaultdict(dict)
    for path in paths:
        data = json.loads(Path(path).read_text())
        name = Path(data["environment"]["dataset"]["name"]).stem
        for row in data["summary"]:
            budget = str(row["budget"])
            acc = f"{100 * row['acc_mean']:.1f}"
            if row["repeats"] > 1:
                acc += f" ± {100 * row['acc_std']:.1f}"
            if row["method"] == "original":
                cells[name]["original"]["—"] = acc
                continue
            if budget.endswith("bytes") != (kind == "bytes"):
                continue
            budgets[name][budget] = float(budget.split("%")[0]) / 100 if kind == "bytes" else float(budget[2:])
            if kind == "bytes":
                extra = f" ({row['byte_ratio']:.2f})" if row.get("byte_ratio") is not None else ""
            else:
                extra = f" (ρ {row['param_ratio']:.2f}, bytes {row['byte_ratio']:.2f})"
            if row.get("acc_steps_mean") is not None:
                extra += f", steps {100 * row['acc_steps_mean']:.1f}"
            cells[name][row["method"]][budget] = acc + extra
        for fail in data.get("failures", []):
            b = fail.get("budget") or {}
            if b.get("kind") == kind:
                label = f"{round(100 * b['fraction'])}% bytes" if kind == "bytes" else f"ρ={b['fraction']:g}"
                budgets[name][label] = b["fraction"]
                note = "n/a" if "no parameter ratio" in fail.get("reason", "") else "over budget"
                cells[name][fail["method"]].setdefault(label, note)
    out = []
    what = "actual byte ratio" if kind == "bytes" else "actual parameter and byte ratios"
    for name in sorted(cells):
        if not budgets[name]:
            continue
        cols = sorted(budgets[name], key=budgets[name].__getitem__)
        orig = cells[name].get("original", {}).get("—", "not run")
        out.append(f"\n**{name}** — test accuracy (%), {what} in brackets; original training set: {orig}\n")
        out.append("| method | " + " | ".join(cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for method in [m for m in MARKERS if m in cells[name]]:
            out.append(f"| {method} | " + " | ".join(cells[name][method].get(c, "—") for c in cols) + " |")
    return "\n".join(out)


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
    points = load_points(args.results)
    if any(p["methods"] for p in points.values()):
        plot(points, args.out)
    for kind in ("bytes", "ratio"):
        print(pivot_tables(args.results, kind))


if __name__ == "__main__":
    main()
