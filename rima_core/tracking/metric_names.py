"""One naming scheme for every number the project reports, wherever it is shown.

``history.csv`` columns, MLflow run and logged-model metrics, registry version tags, Kubeflow
Metrics artifacts and the DVC headline files (``dvc metrics show`` columns) all name a number
the same way, so a run can be compared across DVC, MLflow, the model card and Kubeflow:

- ``<split>/<scenario>/<metric>`` for a scored number: ``test/complete/qwk``,
  ``val/oct_missing/ece``, ``test/mixed/sensitivity/dr_mild`` (a per-class metric keeps its
  class as a fourth part). ``<split>`` is ``val`` or ``test``; ``<scenario>`` a missing-modality
  scenario, ``fundus_missing@0.5`` written ``fundus_missing_at_0.5`` (MLflow allows no ``@``),
  or :data:`AGGREGATE` (``mean``): the mean over the main scenarios that model selection and
  tuning compare (``train.selection_scenario: mean``), e.g. ``val/mean/qwk``.
- ``train/<stat>`` for a training statistic: ``train/loss``, ``train/ce``, ``train/aux``,
  ``train/lr``, ``train/best_epoch``, ``train/path_weight/<path>``, ``train/alignment/<name>``.
- ``tune/<stat>`` for the hyperparameter study: ``tune/best_value``, ``tune/n_complete``; a
  trial's run logs its value as ``tune/objective``.
- ``data/<stat>`` for counts of the data steps (Kubeflow's mask statistics).

A distillation's teacher stage logs its epochs under the same names behind ``teacher/``. Everything
is lower case and slash-separated; :data:`NAME_RE` is the scheme as a regular expression
(tests/contracts/test_metric_names.py checks every producer against it). The bare metric names of
the configuration (``train.selection_metric: qwk``, ``promote.metric``) stay bare: they name a
metric, not a reported number.

Files written by older versions used other names (``val_qwk``, ``val_complete_qwk``,
``train_loss`` in ``history.csv``; ``metric.<scenario>.<metric>`` version tags):
:func:`legacy_history_column` and :func:`legacy_version_tag` translate them for the readers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# The scenario name of the mean over the main scenarios (rima_core.core.data.masks.MEAN_SCENARIO).
AGGREGATE = "mean"
SCORED_SPLITS = ("val", "test")
_PART = r"[a-z0-9_.-]+"
NAME_RE = re.compile(
    rf"^(?:teacher/)?(?:(?:{'|'.join(SCORED_SPLITS)})/{_PART}/{_PART}(?:/{_PART})?"
    rf"|(?:train|tune|data)/{_PART}(?:/{_PART})?)$"
)
# What training logs to MLflow per epoch besides the selection metric and the main scenarios'
# numbers below; the rest of an epoch's row stays in history.csv.
EPOCH_TRAIN_STATS = ("loss", "ce", "aux")
EPOCH_SCENARIO_METRICS = ("qwk", "ece")


def part(text: Any) -> str:
    """One part of a name: lower case, ``@`` spelt ``_at_``, anything MLflow refuses -> ``_``."""
    text = str(text).lower().replace("@", "_at_")
    return re.sub(r"[^a-z0-9_.-]+", "_", text).strip("_") or "_"


def _metric(metric: str) -> str:
    return "/".join(part(p) for p in str(metric).split("/"))


def scored(split: str, scenario: str, metric: str) -> str:
    """``test/complete/qwk``: ``metric`` under ``scenario`` of ``split``."""
    return f"{part(split)}/{part(scenario)}/{_metric(metric)}"


def train_stat(name: str) -> str:
    """``train/loss``."""
    return f"train/{_metric(name)}"


def tune_stat(name: str) -> str:
    """``tune/best_value``."""
    return f"tune/{_metric(name)}"


def data_stat(name: str) -> str:
    """``data/<name>`` (counts of the data steps)."""
    return f"data/{_metric(name)}"


def is_name(name: str) -> bool:
    """Whether ``name`` follows the scheme."""
    return NAME_RE.match(name) is not None


def not_names(names: Iterable[str]) -> list[str]:
    """The names in ``names`` that do not follow the scheme (sorted)."""
    return sorted({n for n in names if not is_name(n)})


def flat_scored(split: str, metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``{scenario: {metric: v}}`` of ``split`` -> ``{"split/scenario/metric": v}``."""
    return {
        scored(split, scenario, metric): value
        for scenario, values in metrics.items()
        for metric, value in values.items()
    }


def scored_numbers(
    split: str,
    metrics: Mapping[str, Mapping[str, Any]],
    names: Iterable[str],
    scenarios: Iterable[str],
) -> dict[str, Any]:
    """``names`` under each of ``scenarios`` that ``metrics`` (``{scenario: {metric: v}}``)
    has, as ``split/scenario/metric``."""
    names = tuple(names)
    return {
        scored(split, scenario, k): v
        for scenario in scenarios
        for k, v in (metrics.get(scenario) or {}).items()
        if k in names
    }


def selection_scenario_name(scenarios: Iterable[str]) -> str:
    """The scenario part of the selection numbers of a run validated on ``scenarios``: the one
    scenario, or :data:`AGGREGATE` for the mean over several."""
    scenarios = list(scenarios)
    return scenarios[0] if len(scenarios) == 1 else AGGREGATE


def validation_numbers(val_metrics: Mapping[str, Any], scenarios: Iterable[str]) -> dict[str, Any]:
    """:func:`rima_core.runs.train.validation_metrics`'s dict (plain names: the selection numbers,
    the mean over ``scenarios`` when there are several; ``<scenario>_<metric>``: one scenario's)
    under the scheme's names: ``val/mean/qwk``, ``val/complete/qwk``."""
    scenarios = list(scenarios)
    aggregate = selection_scenario_name(scenarios)
    prefixes = sorted(scenarios, key=len, reverse=True) if len(scenarios) > 1 else []
    out: dict[str, Any] = {}
    for key, value in val_metrics.items():
        scenario = next((s for s in prefixes if key.startswith(f"{s}_")), None)
        if scenario is None:
            out[scored("val", aggregate, key)] = value
        else:
            out[scored("val", scenario, key[len(scenario) + 1 :])] = value
    return out


def epoch_row(
    epoch: int,
    lr: float,
    train_stats: Mapping[str, Any],
    val_metrics: Mapping[str, Any],
    scenarios: Iterable[str],
    best_epoch: int | None,
) -> dict[str, Any]:
    """One ``history.csv`` row: ``epoch``, then ``train/*`` and ``val/<scenario>/*``."""
    row: dict[str, Any] = {"epoch": epoch, train_stat("lr"): lr}
    row.update({train_stat(k): v for k, v in train_stats.items()})
    row.update(validation_numbers(val_metrics, scenarios))
    row[train_stat("best_epoch")] = best_epoch
    return row


def epoch_metrics(
    row: Mapping[str, Any],
    selection_metric: str,
    selection_scenario: str,
    main_scenarios: Iterable[str],
) -> dict[str, Any]:
    """The part of an epoch's ``history.csv`` row that goes to MLflow: ``train/loss``,
    ``train/ce``, ``train/aux``, the selection metric under the selection scenario (e.g.
    ``val/mean/qwk``) and :data:`EPOCH_SCENARIO_METRICS` under each main scenario (e.g.
    ``val/oct_missing/ece``). The rest of the row stays in ``history.csv``."""
    keep = {train_stat(k) for k in EPOCH_TRAIN_STATS}
    keep.add(scored("val", selection_scenario, selection_metric))
    keep |= {scored("val", s, m) for s in main_scenarios for m in EPOCH_SCENARIO_METRICS}
    return {k: v for k, v in row.items() if k in keep}


# --- names written by older versions ------------------------------------------------------------


def legacy_history_column(column: str, scenarios: Iterable[str]) -> str:
    """A ``history.csv`` column of an older version under the scheme's name: ``train_loss`` ->
    ``train/loss``, ``val_qwk`` -> ``val/mean/qwk`` (the selection numbers of a run validated on
    ``scenarios``), ``val_complete_qwk`` -> ``val/complete/qwk``, ``lr`` -> ``train/lr``,
    ``best_epoch`` -> ``train/best_epoch``. Scheme names and ``epoch`` come back unchanged."""
    timing = column.endswith("_seconds") or column == "ot_share"  # timings.csv keeps its names
    if column == "epoch" or timing or ("/" in column and is_name(column)):
        return column
    if column in ("lr", "best_epoch"):
        return train_stat(column)
    if column.startswith("train_"):
        return train_stat(column[len("train_") :])
    if column.startswith("val_"):
        return next(iter(validation_numbers({column[len("val_") :]: None}, scenarios)))
    return column


def legacy_history(
    rows: Iterable[Mapping[str, Any]], scenarios: Iterable[str]
) -> list[dict[str, Any]]:
    """Rows of an older ``history.csv`` (or checkpoint history) under the scheme's names."""
    scenarios = list(scenarios)
    return [{legacy_history_column(k, scenarios): v for k, v in row.items()} for row in rows]


def legacy_version_tag(scenario: str, metric: str) -> str:
    """The version tag older versions wrote for ``metric`` under ``scenario``
    (``metric.fundus_missing_0.5.qwk``)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(scenario)).strip("_") or "class"
    return f"metric.{safe}.{metric}"
