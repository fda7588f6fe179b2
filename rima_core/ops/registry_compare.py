"""The promotion gate: validation metrics, comparability and significance of two versions.

Promotion decides on the *validation* split (evaluate's ``val/metrics.json``), never on the test
split: choosing the version that scores best on test would make test a selection set and its
numbers optimistic. ``register`` stores the validation metrics as one JSON tag (every scenario,
a few metrics: within the version-tag budget however many scenarios there are) and, for the
optional significance rule, the validation predictions of the primary scenario as an artifact.

Apart from :mod:`rima_core.ops.registry` because deciding is separate from acting: everything here
reads version tags (and, for :func:`significance`, their prediction artifacts) and returns a
verdict with its reason; moving the alias and recording the decision stay in the registry.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np

from rima_core.config import Config
from rima_core.core.metrics import (
    BOOT_METRICS,
    LOWER_IS_BETTER,
    metric_range,
    paired_bootstrap_difference,
)
from rima_core.ops.registry_tags import RegistryError, read_metrics

# the registry's logger: these lines are the registry's, as before this module was split from it
log = logging.getLogger("rima_core.ops.registry")

SELECTION_SPLIT = "val"  # the only split promotion compares on


def _improvement(metric: str, challenger: float, champion: float) -> float:
    """How much better the challenger is (positive = better), whatever the metric's direction."""
    diff = challenger - champion
    return -diff if metric in LOWER_IS_BETTER else diff


TAG_SELECTION = "selection.metrics"


TAG_SELECTION_PREDICTIONS = "selection.predictions"


SELECTION_TAG_METRICS = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece", "nll")


SELECTION_DIR = "val"  # evaluate's sub-folder for the selection split (rima_core.runs.evaluate)


def selection_metrics_path(metrics_json: str | Path) -> Path:
    """Where evaluate wrote the validation metrics beside the test ``metrics.json``."""
    return Path(metrics_json).parent / SELECTION_DIR / "metrics.json"


def selection_tags(
    selection: dict[str, dict[str, float]], cfg: Config, split: str = "val"
) -> dict[str, str]:
    """The ``selection.metrics`` tag: ``{"split", "metrics": {scenario: {metric: value}}}`` for
    :data:`SELECTION_TAG_METRICS` and the promotion metric; undefined values as JSON null."""
    keep = {*SELECTION_TAG_METRICS, cfg.promote.metric}
    record = {
        "split": split,
        "metrics": {
            scenario: {
                m: (float(v) if math.isfinite(v) else None) for m, v in values.items() if m in keep
            }
            for scenario, values in selection.items()
        },
    }
    return {TAG_SELECTION: json.dumps(record, allow_nan=False, separators=(",", ":"))}


def log_selection(metrics_json: str | Path, cfg: Config) -> dict[str, str]:
    """Version tags of the validation evaluation beside ``metrics_json`` (empty, with a warning,
    when there is none: such a version can be registered but never wins a comparison).

    Inside an active run it also logs evaluate's tables (scores, subgroups, equity, calibration)
    and the primary scenario's validation predictions, which the paired significance test of
    :func:`significance` reads back (``selection.predictions``).
    """
    import mlflow

    path = selection_metrics_path(metrics_json)
    if not path.is_file():
        log.warning(
            "%s: no validation metrics (run `rima evaluate` with evaluate.selection_split): "
            "this version cannot be compared with a champion",
            path,
        )
        return {}
    split = evaluated_selection_split(metrics_json)
    if split is None:
        log.warning(
            "%s: no %s beside it saying which split evaluate scored: this version cannot be "
            "compared with a champion",
            path,
            EVAL_SUMMARY,
        )
        return {}
    tags = selection_tags(read_metrics(path), cfg, split=split)
    preds = path.parent / "predictions" / f"{cfg.promote.scenario}.parquet"
    run = mlflow.active_run()
    for table in ("scores.csv", "subgroups.csv", "equity.csv", "calibration.csv"):
        if run is not None and (path.parent.parent / table).is_file():
            mlflow.log_artifact(str(path.parent.parent / table), artifact_path="evaluation")
    if run is not None and preds.is_file():
        mlflow.log_artifact(str(preds), artifact_path="evaluation/selection")
        # runs:/ resolves against the store's artifact root wherever the workspace lives now
        tags[TAG_SELECTION_PREDICTIONS] = (
            f"runs:/{run.info.run_id}/evaluation/selection/{preds.name}"
        )
    return tags


EVAL_SUMMARY = "eval_summary.json"


def _eval_summary_field(metrics_json: str | Path, key: str) -> str | None:
    """``key`` of the ``eval_summary.json`` evaluate wrote beside ``metrics_json`` (what that
    evaluation did, not this process's config), or None when there is no such record."""
    try:
        summary = json.loads((Path(metrics_json).parent / EVAL_SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    value = summary.get(key) if isinstance(summary, dict) else None
    return value if isinstance(value, str) else None


def evaluated_split(metrics_json: str | Path) -> str | None:
    """The split evaluate scored into ``metrics_json``."""
    return _eval_summary_field(metrics_json, "split")


def evaluated_selection_split(metrics_json: str | Path) -> str | None:
    """The split evaluate actually scored into ``val/metrics.json``."""
    return _eval_summary_field(metrics_json, "selection_split")


def _selection_from_tags(tags: dict[str, str], who: str) -> tuple[dict[str, Any] | None, str]:
    """The validation metrics a version carries, or ``(None, why not)``."""
    raw = tags.get(TAG_SELECTION)
    if raw is None:
        return None, f"{who} has no validation metrics (tag {TAG_SELECTION}; register it again)"
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None, f"{who}'s {TAG_SELECTION} tag is not valid JSON"
    metrics = record.get("metrics") if isinstance(record, dict) else None
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        return None, f"{who}'s {TAG_SELECTION} tag is not {{scenario: {{metric: value}}}}"
    split = record.get("split")
    if split != SELECTION_SPLIT:
        return None, (
            f"{who}'s metrics were evaluated on the {split!r} split, not {SELECTION_SPLIT!r}: "
            "promotion compares validation with validation only"
        )
    return metrics, ""


def _check_value(metric: str, value: Any) -> str | None:
    """Why ``value`` is not a usable ``metric`` value (None when it is)."""

    if value is None:
        return "null"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} (not a number)"
    if not math.isfinite(value):
        return f"{value} (not finite)"
    low, high = metric_range(metric)
    if not low <= value <= high:
        return f"{value:g} (outside [{low:g}, {high:g}])"
    return None


def comparability_problems(
    challenger: dict[str, Any], champion: dict[str, Any], metric: str, primary: str
) -> list[str]:
    """Every reason the two validation records cannot be compared on ``metric``: a scenario the
    champion has (or the primary one) that the challenger lacks, and any value that is missing,
    null, not a number, not finite or outside the metric's range, on either side."""
    problems: list[str] = []
    needed = list(dict.fromkeys([primary, *champion]))
    for scenario in needed:
        for who, record in (("challenger", challenger), ("champion", champion)):
            values = record.get(scenario)
            if values is None or metric not in values:
                problems.append(f"{who} lacks {metric} under {scenario}")
                continue
            bad = _check_value(metric, values[metric])
            if bad is not None:
                problems.append(f"{who}'s {metric} under {scenario} is {bad}")
    return problems


def compare(
    challenger_tags: dict[str, str], champion_tags: dict[str, str], cfg: Config
) -> tuple[bool, str, list[dict[str, Any]]]:
    """Decide challenger vs champion on their *validation* metrics: (promote?, reason, rows).

    Not comparable means refused: a challenger that lacks a scenario the champion has, or holds
    an unusable value for the promotion metric (:func:`comparability_problems`), is never
    promoted. The reason starts with ``not comparable:`` (tagged as ``promotion.reason``).
    """
    p = cfg.promote
    metric = p.metric
    new_rec, new_err = _selection_from_tags(challenger_tags, "challenger")
    old_rec, old_err = _selection_from_tags(champion_tags, "champion")
    if new_rec is None or old_rec is None:
        return False, "not comparable: " + "; ".join(e for e in (new_err, old_err) if e), []
    order = list(dict.fromkeys([p.scenario, *old_rec, *new_rec]))
    problems = comparability_problems(new_rec, old_rec, metric, p.scenario)
    rows: list[dict[str, Any]] = []
    regressions: list[str] = []
    for scenario in order:
        new = new_rec.get(scenario, {}).get(metric)
        old = old_rec.get(scenario, {}).get(metric)
        usable = _check_value(metric, new) is None and _check_value(metric, old) is None
        row: dict[str, Any] = {
            "scenario": scenario,
            "champion": old if _check_value(metric, old) is None else None,
            "challenger": new if _check_value(metric, new) is None else None,
            "improvement": None,
            "primary": scenario == p.scenario,
        }
        if not usable:
            row["status"] = "new" if scenario not in old_rec else "not comparable"
        else:
            gain = _improvement(metric, float(new), float(old))
            row["improvement"] = gain
            if gain < -p.tolerance:
                row["status"] = "regressed"
                if scenario != p.scenario:
                    regressions.append(f"{scenario} ({_signed(gain)})")
            else:
                row["status"] = "ok"
        rows.append(row)
    if problems:
        return False, "not comparable: " + "; ".join(problems), rows
    head = next(r for r in rows if r["primary"])
    where = f"validation {metric} under {p.scenario}"
    gain = head["improvement"]
    if gain <= 0 or gain < p.margin:
        need = f"at least {p.margin:g}" if p.margin > 0 else "a positive improvement"
        return False, f"{where} changes by {_signed(gain)}; promotion needs {need}", rows
    if head["status"] == "regressed" or regressions:
        return (
            False,
            f"{where} improves by {_signed(gain)} but scenario(s) regress beyond the tolerance "
            f"{p.tolerance:g}: {', '.join(regressions)}",
            rows,
        )
    return (
        True,
        f"{where} improves by {_signed(gain)} (margin {p.margin:g}) and no scenario regresses by "
        f"more than {p.tolerance:g}",
        rows,
    )


def _read_selection_predictions(tags: dict[str, str], who: str, dst: Path) -> Any:
    import mlflow
    import pandas as pd

    uri = tags.get(TAG_SELECTION_PREDICTIONS)
    if not uri:
        raise RegistryError(f"{who} has no validation predictions ({TAG_SELECTION_PREDICTIONS})")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=portable_artifact_uri(uri), dst_path=str(dst / who)
    )
    return pd.read_parquet(local)


_RUN_ARTIFACT = re.compile(r"/(?P<run>[0-9a-f]{32})/artifacts/(?P<path>.+)$")


def portable_artifact_uri(uri: str) -> str:
    """``runs:/RUN/PATH`` for an absolute ``file://.../RUN/artifacts/PATH`` that no longer exists
    (a tag written before the workspace moved); any other URI as it is."""
    if not uri.startswith("file://"):
        return uri

    if Path(unquote(urlsplit(uri).path)).exists():
        return uri
    m = _RUN_ARTIFACT.search(uri)
    return f"runs:/{m.group('run')}/{m.group('path')}" if m else uri


def significance(
    challenger_tags: dict[str, str], champion_tags: dict[str, str], cfg: Config
) -> tuple[bool, str, dict[str, Any]]:
    """Paired bootstrap of the primary improvement over the same validation eyes.

    Both versions' predictions of the primary scenario are scored on the same resamples
    (``evaluate.bootstrap``, ``evaluate.bootstrap_seed``, ``evaluate.ci_level``); the gain counts
    only when its whole interval is above 0. Different eyes or labels: not comparable.
    """

    p, ev = cfg.promote, cfg.evaluate
    if p.metric not in BOOT_METRICS:
        return False, f"no bootstrap for {p.metric}; choose one of {list(BOOT_METRICS)}", {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            new = _read_selection_predictions(challenger_tags, "challenger", Path(tmp))
            old = _read_selection_predictions(champion_tags, "champion", Path(tmp))
        except Exception as exc:  # a missing tag or an artifact that cannot be fetched
            return False, f"not comparable: significance needs predictions: {exc}", {}
    cols = sorted(c for c in new.columns if c.startswith("proba_"))
    if (
        set(new["case_id"]) != set(old["case_id"])
        or not new["case_id"].is_unique
        or cols != sorted(c for c in old.columns if c.startswith("proba_"))
    ):
        return False, "not comparable: the two versions were validated on different eyes", {}
    old = old.set_index("case_id").loc[new["case_id"]].reset_index()
    if not np.array_equal(new["label"].to_numpy(), old["label"].to_numpy()):
        return False, "not comparable: the validation labels differ between the versions", {}
    diff = paired_bootstrap_difference(
        new["label"].to_numpy(),
        new[cols].to_numpy(dtype=float),
        old[cols].to_numpy(dtype=float),
        p.metric,
        ev.bootstrap,
        ev.bootstrap_seed,
        ev.ci_level,
    )
    lower = p.metric in LOWER_IS_BETTER
    if lower:  # a drop in a lower-is-better metric is the gain: the interval flips
        gain = {"value": -diff["value"], "ci_low": -diff["ci_high"], "ci_high": -diff["ci_low"]}
    else:
        gain = {k: diff[k] for k in ("value", "ci_low", "ci_high")}
    text = (
        f"paired bootstrap over {len(new)} validation eyes: gain {_signed(gain['value'])} "
        f"[{_signed(gain['ci_low'])}, {_signed(gain['ci_high'])}] ({ev.ci_level:.0%} interval)"
    )
    ok = math.isfinite(gain["ci_low"]) and gain["ci_low"] > 0
    return ok, text, {**gain, "n_eyes": len(new), "n_boot": diff["n_boot"]}


def _signed(v: float) -> str:
    """``+0.1234``; a change that rounds to zero prints as ``+0.0000``, never ``-0.0000``."""
    text = f"{v:+.4f}"
    return "+0.0000" if text == "-0.0000" else text
