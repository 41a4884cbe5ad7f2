"""Plot test accuracy against bytes per training image from ``mpsd evaluate`` results.

Usage::

    .venv/bin/python benchmarks/plot_results.py a.json b.json --out docs/results.png
    .venv/bin/python benchmarks/plot_results.py old.json rerun.json:mpsd,mpsd-kd   # only those methods of rerun.json
    .venv/bin/python benchmarks/plot_results.py --pool seed0.json seed1.json       # two --seed runs as one experiment

It also prints, per panel, markdown tables of accuracy by method and budget (bytes, then ρ).

Every ``results.json`` given is read; runs are grouped by dataset and training-set size (one
panel each) and by method (one line each); where files overlap, the row with more repeats wins
(on a tie, the later file).  ``--pool`` instead takes the files as seeds of one experiment and
makes every row from all their runs (see :func:`collect`).  Only byte budgets are plotted
(parameter-ratio budgets have no common x axis with the codecs).  x is the whole arm's bytes on
disk divided by the number of training images of the full set, so coresets (fewer images, same
total bytes) sit at their real budget.  Error bars are the standard deviation over repeats where
there are several.  The original training set is a dashed horizontal line at its raw size.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

MARKERS = {"mpsd": "o", "mpsd-kd": "D", "ice": "s", "svd": "^", "cp": "v", "tucker": "<", "random": "x",
           "kcenter": "+", "jpeg": "P", "webp": "*"}  # fmt: skip
#: One colour per method (matplotlib's tab10, in the order of MARKERS), the same in every panel.
COLOURS = {method: f"C{i}" for i, method in enumerate(MARKERS)}


def panel_name(data: dict) -> str:
    """``"cifar10, 3,600 training images"``: results of one dataset at one training-set size."""
    env = data["environment"]["dataset"]
    return f"{Path(env['name']).stem}, {int(env['n_train']):,} training images"


def split_source(source: Path | str) -> tuple[Path, set[str] | None]:
    """``"a.json:mpsd,mpsd-kd"`` → (``a.json``, {"mpsd", "mpsd-kd"}); a plain path → (path, None)."""
    text = str(source)
    head, sep, tail = text.rpartition(":")
    if sep and tail and "/" not in tail and not Path(text).exists():
        return Path(head), {m.strip() for m in tail.split(",") if m.strip()}
    return Path(text), None


def collect(paths: list[Path], pool: bool = False) -> dict[str, dict]:
    """Summary rows of every file, one per panel, method and budget.

    Returns ``{panel: {"n_train": int, "rows": {(method, budget_label): row}, "failures":
    {(method, label, kind, fraction): reason}}}``.  A panel is one dataset at one training-set
    size (see :func:`panel_name`): a 2,000-image subset and the full set of the same dataset are
    not one curve.  Where several files measured the same method at the same budget (a
    parameter-ratio run that also ran one byte budget, say), the row with the most repeats is
    kept, and on a tie the file given last (a re-run listed after the run it replaces): rows are
    never averaged across files.  A path written ``file.json:m1,m2`` contributes only the rows
    (and failures) of those methods (see :func:`split_source`).

    With ``pool``, files are instead taken as seeds of one experiment (another ``--seed`` of the
    same command): the runs of every file are pooled, one per method, budget, seed and protocol
    (the file given last wins where two ran the same seed), and each row is made from all of
    them by :func:`mpsd.evaluate.report.summarise`, as ``mpsd evaluate --repeats`` would make it.
    """
    out: dict[str, dict] = defaultdict(lambda: {"n_train": None, "rows": {}, "failures": {}})
    for source in paths:
        path, only = split_source(source)
        data = json.loads(path.read_text())
        panel = out[panel_name(data)]
        panel["n_train"] = int(data["environment"]["dataset"]["n_train"])
        for run in data["runs"] if pool else ():
            if only is None or run["method"] in only:
                budget = run.get("budget")
                label = None if budget is None else budget.get("label")
                panel.setdefault("runs", {})[(run["method"], label, int(run["seed"]), run["protocol"])] = run
        for row in () if pool else data["summary"]:
            if only is not None and row["method"] not in only:
                continue
            key = (row["method"], str(row["budget"]))
            kept = panel["rows"].get(key)
            if kept is None or row["repeats"] >= kept["repeats"]:
                panel["rows"][key] = row
        for fail in data.get("failures", []):
            if only is not None and fail["method"] not in only:
                continue
            b = fail.get("budget") or {}
            if b.get("kind") in ("bytes", "ratio"):
                label = f"{round(100 * b['fraction'])}% bytes" if b["kind"] == "bytes" else f"ρ={b['fraction']:g}"
                panel["failures"].setdefault((fail["method"], label, b["kind"], b["fraction"]), fail.get("reason", ""))
    if pool:
        from mpsd.evaluate.report import summarise

        for panel in out.values():
            for row in summarise(list(panel.pop("runs", {}).values())):
                panel["rows"][(row["method"], str(row["budget"]))] = row
    return out


def load_points(paths: list[Path], pool: bool = False) -> dict[str, dict]:
    """``{panel: {"original": (bytes/img, acc), "methods": {method: [(bytes/img, acc, std)]}}}``."""
    out: dict[str, dict] = {}
    for name, panel in collect(paths, pool).items():
        n_train = panel["n_train"]
        points: dict = {"original": None, "methods": defaultdict(list)}
        for (method, budget), row in panel["rows"].items():
            if method == "original":
                points["original"] = (row["bytes_on_disk"] / row["n_images"], 100 * row["acc_mean"])
            elif budget.endswith("bytes"):
                acc, std = 100 * row["acc_mean"], 100 * (row["acc_std"] or 0.0)
                points["methods"][method].append((row["bytes_on_disk"] / n_train, acc, std))
        out[name] = points
    return out


def pivot_tables(paths: list[Path], kind: str = "bytes", pool: bool = False) -> str:
    """Markdown: per panel, test accuracy of every method (rows) at every budget (columns).

    ``kind`` is ``"bytes"`` (budgets as fractions of the raw bytes) or ``"ratio"`` (the paper's
    parameter ratio ρ).  Cells are ``acc`` (mean over repeats, ``± std`` when there are several)
    with the arm's actual byte ratio (bytes) or parameter and byte ratios (ratio); coresets add
    their equal-steps accuracy; arms that could not meet a budget say so.
    """
    out = []
    what = "actual byte ratio" if kind == "bytes" else "actual parameter and byte ratios"
    for name, panel in sorted(collect(paths, pool).items()):
        cells: dict[str, dict[str, str]] = defaultdict(dict)
        budgets: dict[str, float] = {}
        orig = "not run"
        for (method, budget), row in panel["rows"].items():
            acc = f"{100 * row['acc_mean']:.1f}"
            if row["repeats"] > 1:
                acc += f" ± {100 * row['acc_std']:.1f}"
            if method == "original":
                orig = acc
                continue
            if budget.endswith("bytes") != (kind == "bytes"):
                continue
            budgets[budget] = float(budget.split("%")[0]) / 100 if kind == "bytes" else float(budget[2:])
            if kind == "bytes":
                extra = f" ({row['byte_ratio']:.2f})" if row.get("byte_ratio") is not None else ""
            else:
                extra = f" (ρ {row['param_ratio']:.2f}, bytes {row['byte_ratio']:.2f})"
            if row.get("acc_steps_mean") is not None:
                extra += f", steps {100 * row['acc_steps_mean']:.1f}"
            cells[method][budget] = acc + extra
        for (method, label, fkind, fraction), reason in panel["failures"].items():
            if fkind == kind:
                budgets[label] = fraction
                cells[method].setdefault(label, "n/a" if "no parameter ratio" in reason else "over budget")
        if not budgets:
            continue
        cols = sorted(budgets, key=budgets.__getitem__)
        out.append(f"\n**{name}** — test accuracy (%), {what} in brackets; original training set: {orig}\n")
        out.append("| method | " + " | ".join(cols) + " |")
        out.append("|---|" + "---:|" * len(cols))
        for method in [m for m in MARKERS if m in cells]:
            out.append(f"| {method} | " + " | ".join(cells[method].get(c, "—") for c in cols) + " |")
    return "\n".join(out)


def plot(points: dict[str, dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(points)
    cols = min(2, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names, strict=False):
        panel = points[name]
        for method in sorted(panel["methods"], key=lambda m: (m != "mpsd", m != "mpsd-kd", m)):
            pts = sorted(set(panel["methods"][method]))
            xs, ys, es = zip(*pts, strict=True)
            bold = method in ("mpsd", "mpsd-kd")
            ax.errorbar(xs, ys, yerr=es if any(es) else None, marker=MARKERS.get(method, "."), label=method,
                        color=COLOURS.get(method),
                        linewidth=2.2 if bold else 1.0, markersize=7 if bold else 5, capsize=2)  # fmt: skip
        if panel["original"] is not None:
            raw, acc = panel["original"]
            ax.axhline(acc, color="k", linestyle="--", linewidth=0.8, label=f"original ({raw:,.0f} B/img)")
        ax.set_xscale("log")
        ax.set_xlabel("bytes on disk per training image (whole arm / full training set size)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}, small CNN")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="results.json files from mpsd evaluate (file.json:m1,m2 for only those methods)")
    parser.add_argument("--out", type=Path, default=Path("docs/results.png"))
    parser.add_argument("--pool", action="store_true",
                        help="the files are seeds of one experiment: pool their runs (see collect)")
    args = parser.parse_args()
    points = load_points(args.results, args.pool)
    if any(p["methods"] for p in points.values()):
        plot(points, args.out)
    for kind in ("bytes", "ratio"):
        print(pivot_tables(args.results, kind, args.pool))


if __name__ == "__main__":
    main()
