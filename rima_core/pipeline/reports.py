"""Step results as the Kubeflow UI shows them: artifact metadata, flat metrics, Markdown and
HTML reports, the confusion matrix, and the promotion metric the pipeline gates on.

The components ship only their own source to the pod, so what they render lives here, in the
installed package, where it is unit-tested. Imports neither kfp nor mlflow.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rima_core.tracking.headline import eval_headline, train_headline
from rima_core.tracking.metric_names import (
    data_stat,
    part,
    scored_numbers,
    train_stat,
    tune_stat,
    validation_numbers,
)

log = logging.getLogger(__name__)


def artifact_metadata(summary: Mapping[str, Any]) -> dict[str, Any]:
    """A step's summary as artifact metadata: JSON values (lists and mappings stay structured in
    the KFP UI); anything else (paths) as its string."""
    return json.loads(json.dumps(dict(summary), default=str))


def flat_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{scenario: {metric: v}}`` -> ``{"scenario/metric": v}``, numeric finite values only.

    KFP's Metrics artifact is a flat name -> number map; a NaN (e.g. AUC of a one-class split)
    would make the UI drop the whole artifact, so it is left out (and logged).
    """
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, name))
        elif isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, int | float):
            if math.isfinite(float(value)):
                out[name] = float(value)
            else:
                log.info("metric %s=%r is not finite; left out of the KFP metrics", name, value)
    return out


def finite_numbers(named: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a flat name -> value map, as floats (NaN and null left out, and
    logged: KFP's UI drops a Metrics artifact holding a NaN)."""
    out: dict[str, float] = {}
    for name, value in named.items():
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and math.isfinite(float(value)):
            out[name] = float(value)
            continue
        log.info("metric %s=%r is not a finite number; left out of the KFP metrics", name, value)
    return out


# What each step's Kubeflow Metrics artifact holds, named as in DVC and MLflow
# (rima_core.tracking.metric_names): the step's headline and the numbers MLflow gets, not every
# number.


def train_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Training: ``train/best_epoch``, ``train/epochs_run`` and the selected epoch's
    validation numbers (``val/mean/qwk``, ``val/complete/qwk`` ...)."""
    from rima_core.core.data.masks import selection_scenarios

    scenarios = selection_scenarios(summary.get("selection_scenario") or "mean")
    best = summary.get("best_val_metrics") or {}
    return finite_numbers(
        {
            **train_headline(summary),
            train_stat("epochs_run"): summary.get("epochs_run"),
            **validation_numbers(best, scenarios),
        }
    )


def eval_metrics(
    metrics: Mapping[str, Mapping[str, Any]], split: str, promotion_scenario: str
) -> dict[str, float]:
    """Evaluation (``metrics.json`` of ``split``): the MLflow numbers of each main scenario
    (``test/complete/qwk`` ...) and the headline's equity number."""
    from rima_core.core.data.masks import MAIN_SCENARIOS

    names = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece", "nll")
    return finite_numbers(
        {
            **scored_numbers(split, metrics, names, MAIN_SCENARIOS),
            **eval_headline(metrics, promotion_scenario, split),
        }
    )


def tune_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Tuning: the study's counts and best value (``tune/n_complete``, ``tune/best_value``)."""

    keys = ("best_value", "n_complete", "n_pruned", "n_failed", "n_trials", "budget_trials")
    return finite_numbers({tune_stat(k): result.get(k) for k in keys if k in result})


def mask_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The masks: ``data/n_rows`` and, per scenario, ``data/<scenario>/<stat>`` (realised
    missing rates over the eyes with both modalities)."""

    out: dict[str, Any] = {data_stat("n_rows"): summary.get("n_rows")}
    for scenario, stats in (summary.get("rates") or {}).items():
        for key, value in stats.items():
            out[data_stat(f"{part(scenario)}/{key}")] = value
    return finite_numbers(out)


def primary_metric(metrics: Mapping[str, Mapping[str, Any]], scenario: str, metric: str) -> float:
    """The promotion policy's metric from ``metrics.json`` — the pipeline's registration gate."""
    if scenario not in metrics:
        raise KeyError(f"metrics.json has no scenario {scenario!r}; it has {sorted(metrics)}")
    row = metrics[scenario]
    if metric not in row:
        raise KeyError(f"metrics.json[{scenario!r}] has no metric {metric!r}; it has {sorted(row)}")
    value = row[metric]
    if value is None or not math.isfinite(float(value)):
        raise ValueError(f"metrics.json[{scenario!r}][{metric!r}] is {value}: cannot gate on it")
    return float(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def summary_markdown(title: str, summary: Mapping[str, Any]) -> str:
    """A step's JSON summary as Markdown: a status line, list-valued keys as bullet lists,
    everything else as a key/value table. Shown by the KFP UI's Markdown visualisation."""
    lines = [f"# {title}", ""]
    if "success" in summary:
        lines += [f"**{'PASSED' if summary['success'] else 'FAILED'}**", ""]
    scalars = {k: v for k, v in summary.items() if k != "success" and not isinstance(v, list)}
    if scalars:
        lines += ["| key | value |", "| --- | --- |"]
        pipe = "\\|"  # a literal | would end the Markdown cell
        lines += [f"| {k} | {_cell(v).replace('|', pipe)} |" for k, v in scalars.items()]
        lines.append("")
    for key, value in summary.items():
        if isinstance(value, list):
            lines += [f"## {key} ({len(value)})", ""]
            lines += [f"- {_cell(v)}" for v in value] or ["- (none)"]
            lines.append("")
    return "\n".join(lines)


def _md_cell(value: Any) -> str:
    return "-" if value is None else _cell(value).replace("|", "\\|")


def promotion_markdown(result: Mapping[str, Any]) -> str:
    """The promote step's result (:func:`rima_core.ops.registry.promote`) for the KFP UI: the
    decision and its reason, then challenger vs champion per scenario as a Markdown table (the
    primary scenario in bold), then the policy — never raw JSON lines."""
    decision = "PROMOTED" if result.get("promoted") else "KEPT the champion"
    if result.get("dry_run"):
        decision = f"dry run: would {result.get('decision')}"
    before = result.get("champion_before")
    lines = [
        f"# Promotion of {result.get('model_name')} version {result.get('challenger')}",
        "",
        f"**{decision}** — {result.get('reason', '')}",
        "",
        f"Champion before: {('v' + str(before)) if before else '(none)'}; "
        f"after: v{result.get('champion_after') or '-'}",
        "",
    ]
    rows = result.get("table") or []
    if rows:
        lines += [
            f"| scenario | champion | challenger | change ({result.get('metric')}) | status |",
            "| --- | ---: | ---: | ---: | --- |",
        ]
        for row in rows:
            name = _md_cell(row.get("scenario"))
            if row.get("primary"):
                name = f"**{name}** (primary)"
            change = row.get("improvement")
            lines.append(
                f"| {name} | {_md_cell(row.get('champion'))} | {_md_cell(row.get('challenger'))} "
                f"| {'-' if change is None else f'{change:+.4f}'} | {_md_cell(row.get('status'))} |"
            )
        lines.append("")
    shown = {"model_name", "challenger", "champion_before", "champion_after", "table", "reason"}
    policy = {k: v for k, v in result.items() if k not in shown and not isinstance(v, list | dict)}
    lines += ["| policy | value |", "| --- | --- |"]
    lines += [f"| {k} | {_md_cell(v)} |" for k, v in policy.items()]
    return "\n".join(lines) + "\n"


def _html_table(data: Mapping[str, Any], corner: str) -> str:
    """A mapping of mappings as a row x column table; a flat mapping as key/value rows."""
    if data and all(isinstance(v, Mapping) for v in data.values()):
        names: list[str] = []
        for row in data.values():
            names += [n for n in row if n not in names]
        head = "".join(f"<th>{html.escape(str(n))}</th>" for n in names)
        rows = [
            f"<tr><th>{html.escape(str(key))}</th>"
            + "".join(f"<td>{html.escape(_cell(row.get(n, '')))}</td>" for n in names)
            + "</tr>"
            for key, row in data.items()
        ]
        return f"<table><tr><th>{html.escape(corner)}</th>{head}</tr>{''.join(rows)}</table>"
    rows = [
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_cell(v))}</td></tr>"
        for k, v in data.items()
    ]
    return f"<table>{''.join(rows)}</table>"


def html_report(
    title: str, tables: Mapping[str, Mapping[str, Any]], images: Iterable[str | Path] = ()
) -> str:
    """A report for the KFP UI's HTML viewer: titled tables, then the plots inline.

    The UI renders an HTML artifact in a sandboxed iframe without access to sibling files, so
    the PNGs are embedded as data URIs.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for name, data in tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2>")
        parts.append(_html_table(data, corner=name))
    for image in images:
        path = Path(image)
        data_uri = base64.b64encode(path.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(path.stem)}</h2>")
        parts.append(f"<img alt='{html.escape(path.name)}' src='data:image/png;base64,{data_uri}'>")
    parts.append("</body></html>")
    return "\n".join(parts)


def confusion_matrix(path: str | Path, class_names: list[str]) -> list[list[int]]:
    """Counts of (actual, predicted) from the evaluation's ``confusion.csv`` (one row per eye,
    class names as values), as the matrix ``ClassificationMetrics.log_confusion_matrix`` takes:
    row = actual class, column = predicted class, in ``class_names`` order."""
    path = Path(path)
    index = {name: i for i, name in enumerate(class_names)}
    matrix = [[0] * len(class_names) for _ in class_names]
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"actual", "predicted"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns actual,predicted; got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                matrix[index[row["actual"]]][index[row["predicted"]]] += 1
            except KeyError as exc:
                raise ValueError(
                    f"{path}:{line}: class {exc.args[0]!r} is not one of {class_names}"
                ) from exc
    return matrix
