"""The few numbers DVC shows: one small ``headline.json`` per stage that has results.

``dvc metrics show`` and ``dvc exp show`` print every number of every metrics file as a column, so
the metrics files DVC reads hold numbers only and only the headline, at most :data:`MAX_NUMBERS` in
all (tests/contracts/test_dvc_pipeline.py counts them on the pipeline's output):

- evaluation: QWK and ECE under each main scenario, AUC and the lowest equity-scaled AUC over
  the attributes under the promotion scenario (``promote.scenario``): 10 numbers, however many
  scenarios, attributes or classes the evaluation has;
- training: the selected epoch and its selection metric (``train/best_epoch``,
  ``val/mean/qwk``);
- tuning: the best objective value and the completed trials (``tune/best_value``,
  ``tune/n_complete``).

Each file is a flat object whose keys are :mod:`rima_core.tracking.metric_names` names, so the
columns of ``dvc metrics show`` read ``test/complete/qwk`` as in MLflow, the registry and Kubeflow.
The full tables stay in their own (non-metric) files: ``metrics.json`` and ``scores.csv`` of the
evaluation, ``train_summary.json``, ``history.csv``, ``study.json``, ``trials.csv``.

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
from rima_core.tracking.metric_names import scored, train_stat, tune_stat

HEADLINE_FILE = "headline.json"
# Per main scenario: the ordinal agreement the method is selected on, and calibration.
HEADLINE_METRICS = ("qwk", "ece")
# Under the promotion scenario only: discrimination.
PROMOTION_METRICS = ("auc",)
# The metric-name prefix of the equity-scaled AUC per attribute that the evaluation adds to the
# promotion scenario (metrics.json); the headline holds their minimum, ES_AUC_MIN.
ES_AUC_PREFIX = "es_auc/"
ES_AUC_MIN = "es_auc_min"
# What `dvc metrics show` may print across all headline files
# (tests/contracts/test_dvc_pipeline.py).
MAX_NUMBERS = 15


def number(value: Any) -> float | int | None:
    """A JSON number: ints stay ints, NaN/inf become null (JSON has no NaN)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    value = float(value)
    return value if math.isfinite(value) else None


def eval_headline(
    metrics: Mapping[str, Mapping[str, float]],
    promotion_scenario: str,
    split: str = "test",
    scenarios: tuple[str, ...] | None = None,
) -> dict[str, float | int | None]:
    """``{"test/complete/qwk": v, ...}``: :data:`HEADLINE_METRICS` under the main scenarios
    (default :data:`rima_core.core.data.masks.MAIN_SCENARIOS`) that ``metrics`` has, then
    :data:`PROMOTION_METRICS` and the lowest ``es_auc/<attribute>`` (``.../es_auc_min``) under
    ``promotion_scenario``."""
    if scenarios is None:
        from rima_core.core.data.masks import MAIN_SCENARIOS

        scenarios = MAIN_SCENARIOS
    out: dict[str, float | int | None] = {}
    for scenario in scenarios:
        values = metrics.get(scenario) or {}
        out.update(
            {scored(split, scenario, k): number(values[k]) for k in HEADLINE_METRICS if k in values}
        )
    values = metrics.get(promotion_scenario) or {}
    out.update(
        {
            scored(split, promotion_scenario, k): number(values[k])
            for k in PROMOTION_METRICS
            if k in values
        }
    )
    # (read back from metrics.json, an undefined ES-AUC is null)
    equity = [number(v) for k, v in values.items() if k.startswith(ES_AUC_PREFIX)]
    equity = [v for v in equity if v is not None]
    if any(k.startswith(ES_AUC_PREFIX) for k in values):
        out[scored(split, promotion_scenario, ES_AUC_MIN)] = min(equity) if equity else None
    return out


def train_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The selected epoch and its selection metric under the selection scenario (the mean over
    the main scenarios by default: ``val/mean/qwk``)."""
    best = summary.get("best_val_metrics") or {}
    metric = summary.get("selection_metric") or "qwk"
    scenario = summary.get("selection_scenario") or "mean"
    return {
        train_stat("best_epoch"): number(summary.get("best_epoch")),
        scored("val", scenario, metric): number(best.get(metric)),
    }


def tune_headline(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The best objective value and the completed trials; the tuned values are in
    ``best_params.json`` and ``study.json``."""
    return {
        tune_stat("best_value"): number(summary.get("best_value")),
        tune_stat("n_complete"): number(summary.get("n_complete")),
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
