"""The few numbers DVC shows: one small ``headline.json`` per stage that has results.

``dvc metrics show`` and ``dvc exp show`` print every number of every metrics file as a column.
With the full evaluation table (every scenario x every metric) and the training and tuning
summaries as metrics files they printed over 300 columns, strings included, and nobody could
compare two experiments at a glance. So the metrics files DVC reads hold numbers only and only
the headline: the main missing-modality scenarios x :data:`HEADLINE_METRICS` for the evaluation,
the selected epoch and its validation scores for training, the best value and parameters for
tuning. The full tables stay in their own (non-metric) files: ``metrics.json`` and
``scores.csv`` of the evaluation, ``train_summary.json``, ``history.csv``, ``study.json``,
``trials.csv``.

These files are committed to git (``cache: false`` outputs, un-ignored in ``.gitignore``), so
``dvc metrics diff`` and ``dvc exp show`` compare commits and experiments. They must therefore be
identical for identical inputs: no wall-clock times, run ids or other per-run values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rima_core.atomic import write_text

HEADLINE_FILE = "headline.json"
# Per main scenario: the ordinal agreement the method is selected on, discrimination, plain and
# class-balanced accuracy, calibration. The registry's version tags use the same names.
HEADLINE_METRICS = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece")
# Metric-name prefixes that the evaluation adds to a scenario as headline numbers of their own
# (equity-scaled AUC per attribute, under the promotion scenario).
HEADLINE_PREFIXES = ("es_auc/",)
# What `dvc metrics show` may print across all headline files (tests/test_dvc_pipeline.py).
MAX_NUMBERS = 60


def number(value: Any) -> float | int | None:
    """A JSON number: ints stay ints, NaN/inf become null (JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def eval_headline(
    metrics: Mapping[str, Mapping[str, float]], scenarios: tuple[str, ...] | None = None
) -> dict[str, dict[str, float | int | None]]:
    """``{scenario: {metric: value}}`` for the main scenarios (default
    :data:`rima_core.data.masks.MAIN_SCENARIOS`) that ``metrics`` has."""
    if scenarios is None:
        from rima_core.data.masks import MAIN_SCENARIOS

        scenarios = MAIN_SCENARIOS
    out: dict[str, dict[str, float | int | None]] = {}
    for scenario in scenarios:
        values = metrics.get(scenario)
        if values is None:
            continue
        row = {k: number(values[k]) for k in HEADLINE_METRICS if k in values}
        row.update({k: number(v) for k, v in values.items() if k.startswith(HEADLINE_PREFIXES)})
        out[scenario] = row
    return out


def train_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The selected epoch and its validation scores (the selection rule's, e.g. the mean over
    the main scenarios)."""
    best = summary.get("best_val_metrics") or {}
    return {
        "best_epoch": number(summary.get("best_epoch")),
        "epochs_run": number(summary.get("epochs_run")),
        "val": {k: number(best[k]) for k in HEADLINE_METRICS if k in best},
    }


def tune_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The best objective value, the trial counts and the tuned values train then uses."""
    return {
        "best_value": number(summary.get("best_value")),
        "n_complete": number(summary.get("n_complete")),
        "n_pruned": number(summary.get("n_pruned")),
        "n_failed": number(summary.get("n_failed")),
        "best_params": {k: number(v) for k, v in (summary.get("best_params") or {}).items()},
    }


def count_numbers(doc: Any) -> int:
    """How many numbers (columns in ``dvc metrics show``) a metrics document holds."""
    if isinstance(doc, Mapping):
        return sum(count_numbers(v) for v in doc.values())
    if isinstance(doc, list):
        return sum(count_numbers(v) for v in doc)
    return 1 if isinstance(doc, int | float) and not isinstance(doc, bool) else 0


def write_headline(path: str | Path, doc: Mapping[str, Any]) -> None:
    """Write a headline file atomically; refuses anything but numbers (and null) in it."""

    def check(node: Any, where: str) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                check(v, f"{where}.{k}" if where else str(k))
        elif node is not None and (isinstance(node, bool) or not isinstance(node, int | float)):
            raise TypeError(f"{path}: {where} is {node!r}; a headline file holds numbers only")

    check(doc, "")
    write_text(path, json.dumps(doc, indent=2, allow_nan=False) + "\n")
