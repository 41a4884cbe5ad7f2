"""Aggregate evaluation runs over seeds, and write them as JSON and as a markdown table."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["format_acc", "markdown_table", "summarise", "write_report"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm (method and budget), with both protocols side by side.

    Returns
    -------
    list of dict
        ``method``, ``budget`` (label), ``budget_bytes``, ``bytes_on_disk`` (mean over seeds),
        ``byte_ratio``, ``param_ratio``, ``n_images``, ``subset``, ``repeats``,
        ``acc_mean``/``acc_std``/``accs`` (equal epochs), ``acc_steps_mean``/``acc_steps_std``/
        ``accs_steps`` (equal steps; None for full-size arms, whose two protocols coincide),
        ``epochs_mean``, ``seconds_mean``, ``all_stopped_early``.  The std is the sample standard
        deviation over seeds (0 for a single seed).
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        label = "—" if run.get("budget") is None else run["budget"]["label"]
        groups.setdefault((run["method"], label), []).append(run)
    rows = []
    for (method, label), members in groups.items():
        epochs_runs = [m for m in members if m["protocol"] == "equal-epochs"]
        steps_runs = [m for m in members if m["protocol"] == "equal-steps"]
        acc_mean, acc_std = _mean_std([m["test_acc"] for m in epochs_runs])
        first = epochs_runs[0] if epochs_runs else members[0]
        row: dict[str, Any] = {
            "method": method,
            "budget": label,
            "budget_bytes": None if first.get("budget") is None else first["budget"].get("budget_bytes"),
            "bytes_on_disk": float(np.mean([m["bytes_on_disk"] for m in epochs_runs or members])),
            "byte_ratio": first.get("byte_ratio"),
            "param_ratio": first.get("param_ratio"),
            "n_images": first.get("n_images"),
            "subset": bool(first.get("subset")),
            "meets_budget": all(m.get("meets_budget", True) for m in members),
            "repeats": len(epochs_runs),
            "accs": [m["test_acc"] for m in epochs_runs],
            "acc_mean": acc_mean,
            "acc_std": acc_std,
            "accs_steps": None,
            "acc_steps_mean": None,
            "acc_steps_std": None,
            "epochs_mean": float(np.mean([m["epochs"] for m in epochs_runs])) if epochs_runs else math.nan,
            "seconds_mean": float(np.mean([m["seconds"] for m in members])),
            "all_stopped_early": all(m.get("stopped_early", False) for m in members),
        }
        if steps_runs:
            row["accs_steps"] = [m["test_acc"] for m in steps_runs]
            row["acc_steps_mean"], row["acc_steps_std"] = _mean_std(row["accs_steps"])
        rows.append(row)
    return rows


def format_acc(mean: float | None, std: float | None, repeats: int) -> str:
    """``"84.12 ± 0.35"`` (percent), ``"84.12"`` for one seed, ``"—"`` for none."""
    if mean is None or math.isnan(mean):
        return "—"
    if repeats > 1 and std is not None:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{100 * mean:.2f}"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The summary as a GitHub-flavoured markdown table, with a header naming the setup.

    Parameters
    ----------
    report : dict
        :meth:`mpsd.evaluate.runner.EvalReport.to_dict`.
    """
    env = report["environment"]
    ds = env["dataset"]
    recipe = env["recipe"]
    repeats = report["config"]["repeats"]
    lines = []
    if report.get("complete") is False:
        lines += [
            f"**Partial results: {len(report['runs'])} run(s) finished so far** (the evaluation was still "
            "running when this was written, or was stopped).",
            "",
        ]
    lines += [
        f"Dataset `{ds['name']}`: {ds['n_train']} training images ({ds['n_val']} more held out for validation), "
        f"{ds['n_test']} test images, {ds['image_shape'][0]}×{ds['image_shape'][1]}×{ds['image_shape'][2]}; "
        f"model `{env['model']}`, recipe `{recipe['name']}` (≤ {recipe['max_epochs']} epochs, patience {recipe['patience']}), "
        f"{repeats} seed(s), device {env['device']}.",
        "",
        "Test accuracy (%) of the best-validation model; mean ± std over seeds. Equal steps: subset arms trained "
        "with epochs as long as the full training set's.",
        "",
        "| Method | Budget | Bytes on disk | Byte ratio | Param ratio | Images | Test acc, equal epochs | Test acc, equal steps | Epochs | Time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        steps = format_acc(row["acc_steps_mean"], row["acc_steps_std"], len(row["accs_steps"] or ())) if row["subset"] else "="
        flag = "" if row["all_stopped_early"] else " *"
        lines.append(
            f"| {row['method']} | {row['budget']} | {row['bytes_on_disk']:,.0f} | {_fmt_ratio(row['byte_ratio'])} | "
            f"{_fmt_ratio(row['param_ratio'])} | {row['n_images']:,} | {format_acc(row['acc_mean'], row['acc_std'], row['repeats'])} | "
            f"{steps} | {row['epochs_mean']:.0f}{flag} | {row['seconds_mean']:.0f} |"
        )
    notes = []
    if any(not row["all_stopped_early"] for row in report["summary"]):
        notes.append("\\* reached the epoch limit before early stopping: the accuracy may still have been improving (raise max epochs).")
    for failure in report.get("failures", []):
        budget = failure.get("budget") or {}
        notes.append(f"{failure['method']} at {budget.get('label', '—')}: not run — {failure['reason']}")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into the folder ``out`` (created if needed).

    Returns
    -------
    (json_path, markdown_path)
    """
    # each file whole or not at all: a temporary file beside it, then a rename
    from mpsd.archive.export import _write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "results.json"
    md_path = out / "results.md"
    text = json.dumps(_jsonable(report), indent=2, allow_nan=False) + "\n"
    _write_atomic(json_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    table = markdown_table(report)
    _write_atomic(md_path, lambda tmp: tmp.write_text(table, encoding="utf-8"))
    return json_path, md_path
