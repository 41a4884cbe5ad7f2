"""Train classifiers on compressed training sets and compare them on the untouched test set.

>>> from mpsd.evaluate import EvalConfig, load_dataset, run_evaluation, write_report  # doctest: +SKIP
>>> data = load_dataset("sample:fashion-mnist")                                     # doctest: +SKIP
>>> report = run_evaluation(data, EvalConfig(methods=("original", "mpsd", "random"), budgets=(0.2,)))  # doctest: +SKIP
>>> write_report(report.to_dict(), "results/")                                       # doctest: +SKIP

Nothing here imports torch at import time; :func:`run_evaluation` needs the ``mpsd[torch]`` extra.
See ``docs/evaluate.md`` for the protocol.
"""

from __future__ import annotations

from mpsd.evaluate.arms import DEFAULT_METHODS, METHODS, Arm, build_arm, parse_methods
from mpsd.evaluate.budget import Budget, compress_to_budget, parse_fractions
from mpsd.evaluate.report import markdown_table, summarise, write_report
from mpsd.evaluate.runner import (
    Dataset,
    EvalConfig,
    EvalReport,
    load_dataset,
    resume_mismatch,
    run_evaluation,
    torch_integration,
)
from mpsd.evaluate.split import split_indices

__all__ = [
    "DEFAULT_METHODS",
    "METHODS",
    "Arm",
    "Budget",
    "Dataset",
    "EvalConfig",
    "EvalReport",
    "build_arm",
    "compress_to_budget",
    "load_dataset",
    "markdown_table",
    "parse_fractions",
    "parse_methods",
    "resume_mismatch",
    "run_evaluation",
    "split_indices",
    "summarise",
    "torch_integration",
    "write_report",
]
