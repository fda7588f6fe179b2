"""Evaluate a trained model under every missing-modality scenario of one split.

The point of the method is robustness to a missing modality, so one number on complete data says
little: every scenario in the masks is scored, and the ``*@R`` sweeps become a metric-vs-missing-
rate curve. Outputs are shaped for DVC (``metrics.json`` numbers only, ``rate_curve.csv`` and
``confusion.csv`` for ``dvc plots``, ``headline.json`` for ``dvc metrics``) and logged to MLflow
when a run is active: the headline numbers of both scored splits as metrics, named as in
:mod:`rima_core.tracking.metric_names` (``test/complete/qwk``), and every scenario x every metric as
one table (``eval/scenarios.json``) beside the output files. The output directory is written
atomically as a whole: a failed evaluation never leaves a mix of old and new files.

What a clinical team needs beyond point estimates (docs/evaluation.md):

- ``scores.csv``: every headline metric of both scored splits with a seeded percentile
  bootstrap interval over eyes (:func:`rima_core.core.metrics.bootstrap_scores`).
- ``subgroups.csv`` / ``equity.csv`` / ``equity.png``: metrics per group of every ``source_*``
  attribute of the store, and the equity-scaled AUC per attribute (FairVision's ES-AUC).
- ``calibration.csv`` / ``reliability/<scenario>.png``: ECE and NLL before and after the
  temperature fitted at the end of training.
- ``val/``: the validation split scored the same way. Promotion decides on it (``register``
  reads ``val/metrics.json``); the test split is reported, never selected on.

The subgroup and equity tables are :mod:`rima_core.runs.equity` and the PNGs
:mod:`rima_core.runs.figures`; this module scores the splits and writes the evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.atomic import atomic_dir
from rima_core.config import Config, ConfigError, Scenario
from rima_core.core.data import open_store
from rima_core.core.data.dataset import EyeDataset, make_loader
from rima_core.core.data.masks import MAIN_SCENARIOS, load_masks
from rima_core.core.metrics import bootstrap_scores, classification_metrics, metric_key
from rima_core.core.models import load_model
from rima_core.runs.calibration import calibration_report
from rima_core.runs.engine import (
    EngineError,
    Predictions,
    amp_dtype,
    eye_temperatures,
    predict,
    resolve_device,
)

# the subgroup tables and the figures have modules of their own; their names stay importable
# from here (re-exported: hence the noqa)
from rima_core.runs.equity import (  # noqa: F401
    MISSING_GROUP,
    SUBGROUP_METRICS,
    add_equity_headline,
    attribute_groups,
    subgroup_tables,
    subgroups_and_equity,
)
from rima_core.runs.figures import PLOT_METRICS, write_eval_figures  # noqa: F401
from rima_core.runs.plots import PLOTS_DIR, write_eval_plots
from rima_core.runs.train import check_scenario
from rima_core.tracking import mlflow_runs as tracking
from rima_core.tracking.headline import HEADLINE_FILE, eval_headline, write_headline
from rima_core.tracking.metric_names import scored_numbers

log = logging.getLogger(__name__)

CURVE_METRICS = ("qwk", "accuracy", "balanced_accuracy", "f1_macro", "auc", "kappa", "ece")
CONFUSION_SCENARIO = "mixed"
SELECTION_DIR = "val"  # evaluate's sub-folder for the selection split (register reads it)


def parse_sweep(scenario: str) -> tuple[str, float] | None:
    """``fundus_missing@0.25`` -> ``("fundus_missing", 0.25)``; None for a non-sweep scenario."""
    try:
        parsed = Scenario.parse(scenario)
    except ConfigError:
        return None
    return (parsed.family, parsed.rate) if parsed.rate is not None else None


def _clean(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _availability(preds: Predictions) -> dict[str, float]:
    """Observed missing rates of the scored eyes: what the scenario actually did to them."""
    return {
        "fundus_missing_rate": float(1.0 - preds.has_fundus.mean()),
        "oct_missing_rate": float(1.0 - preds.has_oct.mean()),
    }


def rate_curve(metrics: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per sweep point (``kind@R``), plus ``complete`` as kind ``complete``, rate 0."""
    rows = []
    for scenario, m in metrics.items():
        parsed = parse_sweep(scenario)
        if parsed is None and scenario != "complete":
            continue
        kind, rate = parsed if parsed else ("complete", 0.0)
        rows.append(
            {
                "scenario_kind": kind,
                "missing_rate": rate,
                **{k: m.get(k, float("nan")) for k in CURVE_METRICS},
            }
        )
    columns = ["scenario_kind", "missing_rate", *CURVE_METRICS]
    if not rows:
        return pd.DataFrame(columns=columns)
    return pd.DataFrame(rows, columns=columns).sort_values(
        ["scenario_kind", "missing_rate"], kind="stable", ignore_index=True
    )


def check_compatible(spec: Any, st: Any, model_path: Path, store: Path) -> None:
    if list(spec.class_names) != list(st.class_names):
        raise EngineError(
            f"{model_path}: trained for classes {spec.class_names}, but {store} has "
            f"{st.class_names}"
        )
    for key in ("fundus_shape", "oct_shape"):
        if list(getattr(spec, key)) != list(st.meta[key]):
            raise EngineError(
                f"{model_path}: trained on {key} {getattr(spec, key)}, but {store} has "
                f"{st.meta[key]} (prepare the store with the model's sizes)"
            )


# --- scoring one split ---------------------------------------------------------------------------


def _prediction_frame(
    preds: Predictions, case_ids: np.ndarray, class_names: list[str]
) -> pd.DataFrame:
    """One row per scored eye (``predictions/<scenario>.parquet``): its case id, label,
    prediction, which modalities it had and each class's probability; promotion's significance
    test and the model card read these back."""
    frame = pd.DataFrame(
        {
            "case_id": case_ids[preds.index],
            "label": preds.y_true.astype(np.int64),
            "pred": preds.y_pred.astype(np.int64),
            "has_fundus": preds.has_fundus,
            "has_oct": preds.has_oct,
        }
    )
    for c, name in enumerate(class_names):
        frame[f"proba_{metric_key(name)}"] = preds.proba[:, c]
    return frame


def _predict_scenario(
    model: Any,
    store: Path,
    mask_df: pd.DataFrame,
    split: str,
    scenario: str,
    cfg: Config,
    device: Any,
    dtype: Any,
) -> Predictions:
    """Predict every eye of ``split`` under ``scenario``, in a fixed order (no shuffling), so
    that the predictions line up with the store's rows."""

    ds = EyeDataset(store, mask_df, split, scenario)
    loader = make_loader(
        ds,
        batch_size=cfg.runtime.eval_batch_size,
        shuffle=False,
        num_workers=cfg.runtime.num_workers,
        seed=cfg.runtime.seed,
        pin_memory=device.type == "cuda",
    )
    return predict(model, loader, device, dtype, desc=f"{split}/{scenario}")


def _record_scenario(
    out: dict[str, Any],
    model: Any,
    scenario: str,
    preds: Predictions,
    case_ids: np.ndarray,
    cfg: Config,
) -> None:
    """Add one scenario's metrics, prediction table, per-eye temperatures, bootstrap scores and
    calibration report to ``out`` (the record :func:`_score_split` builds), and log its line."""
    split, class_names, ev = out["split"], out["class_names"], cfg.evaluate
    m = classification_metrics(preds.y_true, preds.proba, class_names)
    m.update(_availability(preds))
    out["metrics"][scenario] = m
    frame = _prediction_frame(preds, case_ids, class_names)
    out["predictions"][scenario] = frame
    out["raw"][scenario] = preds
    out["temperatures"][scenario] = eye_temperatures(model, preds.has_fundus, preds.has_oct)
    for row in bootstrap_scores(
        preds.y_true, preds.proba, ev.bootstrap, ev.bootstrap_seed, ev.ci_level
    ):
        out["scores"].append({"split": split, "scenario": scenario, **row, "n": len(frame)})
    out["calibration"].append(
        {
            "split": split,
            "scenario": scenario,
            "n": len(frame),
            **calibration_report(
                preds.logits,
                preds.y_true,
                out["temperatures"][scenario],
            ),
        }
    )
    # the main scenarios at INFO; the sweep's rates are in the tables (and with -v)
    log.log(
        logging.INFO if scenario in MAIN_SCENARIOS else logging.DEBUG,
        "%s/%s: n=%d qwk %.4f acc %.4f auc %.4f",
        split,
        scenario,
        len(frame),
        m["qwk"],
        m["accuracy"],
        m["auc"],
    )


def _score_split(
    model: Any,
    st: Any,
    store: Path,
    mask_df: pd.DataFrame,
    split: str,
    class_names: list[str],
    cfg: Config,
    device: Any,
    dtype: Any,
) -> dict[str, Any]:
    """Predictions, metrics, bootstrap scores and calibration of every scenario of ``split``."""
    scenarios = list(pd.unique(mask_df.loc[mask_df["split"] == split, "scenario"]))
    if not scenarios:
        raise EngineError(f"masks have no rows for split {split!r} (evaluate.split)")
    case_ids = st.manifest["case_id"].to_numpy()
    out: dict[str, Any] = {
        "split": split,
        "class_names": class_names,
        "scenarios": scenarios,
        "metrics": {},
        "predictions": {},
        "scores": [],
        "calibration": [],
        "raw": {},
        "temperatures": {},  # each scenario's per-eye temperatures (their patterns')
    }
    for scenario in scenarios:
        preds = _predict_scenario(model, store, mask_df, split, scenario, cfg, device, dtype)
        _record_scenario(out, model, scenario, preds, case_ids, cfg)
    return out


def _load_inputs(
    model_path: Path, store: Path, masks: str | Path | pd.DataFrame, cfg: Config
) -> tuple[Any, Any, Any, pd.DataFrame, Any, Any]:
    """Check the settings and inputs, then load them: ``(model, spec, store, masks, device,
    dtype)``. Every refusal comes before a prediction is made."""

    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: no model (run `rima train` first)")
    ev = cfg.evaluate
    if ev.bootstrap < 1 or not 0.0 < ev.ci_level < 1.0:
        raise EngineError(
            f"evaluate.bootstrap must be >= 1 and evaluate.ci_level in (0, 1); got "
            f"{ev.bootstrap} and {ev.ci_level}"
        )
    device = resolve_device(cfg.runtime.device)
    dtype = amp_dtype(device, cfg.runtime.amp)
    st = open_store(store)
    mask_df = load_masks(masks)
    for name, what in (
        (ev.split, "evaluate.split"),
        (ev.selection_split, "evaluate.selection_split"),
    ):
        if not (mask_df["split"] == name).any():
            raise EngineError(f"masks have no rows for split {name!r} ({what})")
    # the promotion scenario carries the equity headline: the masks must have it (before any
    # prediction, not after a whole evaluation)
    check_scenario(mask_df, ev.split, cfg.promote.scenario, "evaluation (promote.scenario)")
    try:
        model, spec = load_model(model_path, map_location=device)
    except ValueError as exc:  # not a model file, or weights that do not fit their spec
        raise EngineError(str(exc)) from exc
    model.to(device)
    check_compatible(spec, st, model_path, store)
    return model, spec, st, mask_df, device, dtype


def _confusion(
    predictions: dict[str, pd.DataFrame], class_names: list[str]
) -> tuple[str, pd.DataFrame, np.ndarray]:
    """The confusion scenario (``mixed`` if evaluated, else the first), its (actual, predicted)
    pairs by class name, and its count matrix."""
    scenario = CONFUSION_SCENARIO if CONFUSION_SCENARIO in predictions else next(iter(predictions))
    frame = predictions[scenario]
    pairs = pd.DataFrame(
        {
            "actual": [class_names[i] for i in frame["label"]],
            "predicted": [class_names[i] for i in frame["pred"]],
        }
    )
    matrix = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    np.add.at(matrix, (frame["label"].to_numpy(), frame["pred"].to_numpy()), 1)
    return scenario, pairs, matrix


def _dump_metrics(obj: dict[str, dict[str, float]]) -> str:
    clean = {s: {k: _clean(v) for k, v in m.items()} for s, m in obj.items()}
    return json.dumps(clean, indent=2, allow_nan=False) + "\n"


# What evaluation logs to MLflow per main scenario of both scored splits (the full evaluation is
# the run's eval/ artifacts and its eval/scenarios.json table).
MLFLOW_METRICS = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece", "nll")


def mlflow_numbers(split: str, metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"test/complete/qwk": v, ...}``: :data:`MLFLOW_METRICS` under each main scenario."""
    numbers = scored_numbers(split, metrics, MLFLOW_METRICS, MAIN_SCENARIOS)
    return {k: v for k, v in numbers.items() if v is not None and math.isfinite(v)}


def scenario_table(by_split: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """One row per (split, scenario) of every evaluated scenario, one column per metric."""
    rows = [
        {"split": split, "scenario": scenario, **{k: _clean(v) for k, v in values.items()}}
        for split, metrics in by_split.items()
        for scenario, values in metrics.items()
    ]
    return pd.DataFrame(rows)


def _head_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    return {s: {k: _clean(m[k]) for k in ("qwk", "accuracy", "auc")} for s, m in metrics.items()}


# --- the evaluation: its tables, its files and its MLflow record ---------------------------------


@dataclasses.dataclass
class _Evaluation:
    """What one evaluation computed, before anything is written: both scored splits (``val`` is
    ``test`` when they are the same split) and the tables built from the evaluated one."""

    test: dict[str, Any]
    val: dict[str, Any]
    subgroups: pd.DataFrame
    equity: pd.DataFrame
    attributes: list[str]
    headline: str
    scores: pd.DataFrame
    calibration: pd.DataFrame
    conf_scenario: str
    confusion: pd.DataFrame
    conf_matrix: np.ndarray
    curve: pd.DataFrame


def _tabulate(
    test: dict[str, Any], val: dict[str, Any], manifest: pd.DataFrame, cfg: Config
) -> _Evaluation:
    """Build every table of the evaluation from the scored splits; the equity headline is added
    to the evaluated split's metrics here, before the tables that read them."""
    class_names = test["class_names"]
    subgroups, equity, attributes = subgroups_and_equity(
        test, manifest, cfg.evaluate.max_groups, class_names
    )
    headline = add_equity_headline(test["metrics"], equity, cfg)
    scores = pd.DataFrame(
        val["scores"] + (test["scores"] if val is not test else []),
        columns=["split", "scenario", "metric", "value", "ci_low", "ci_high", "n_boot", "n"],
    )
    calibration = pd.DataFrame(
        val["calibration"] + (test["calibration"] if val is not test else [])
    )
    conf_scenario, confusion, conf_matrix = _confusion(test["predictions"], class_names)
    return _Evaluation(
        test=test,
        val=val,
        subgroups=subgroups,
        equity=equity,
        attributes=attributes,
        headline=headline,
        scores=scores,
        calibration=calibration,
        conf_scenario=conf_scenario,
        confusion=confusion,
        conf_matrix=conf_matrix,
        curve=rate_curve(test["metrics"]),
    )


def _write_tables(tmp: Path, result: _Evaluation) -> None:
    """The evaluated split's numbers and tables (what DVC shows and compares: a few numbers,
    and plot tables shaped for its templates), then its per-scenario predictions."""
    test, split = result.test, result.test["split"]
    metrics, class_names = test["metrics"], test["class_names"]
    conf_frame = test["predictions"][result.conf_scenario]
    (tmp / "metrics.json").write_text(_dump_metrics(metrics))
    write_headline(tmp / HEADLINE_FILE, eval_headline(metrics, result.headline, split))
    write_eval_plots(
        tmp / PLOTS_DIR, result.curve, conf_frame["label"], conf_frame["pred"], class_names, split
    )
    result.curve.to_csv(tmp / "rate_curve.csv", index=False)
    result.confusion.to_csv(tmp / "confusion.csv", index=False)
    result.scores.to_csv(tmp / "scores.csv", index=False)
    result.subgroups.to_csv(tmp / "subgroups.csv", index=False)
    result.equity.to_csv(tmp / "equity.csv", index=False)
    result.calibration.to_csv(tmp / "calibration.csv", index=False)
    (tmp / "predictions").mkdir()
    for scenario, frame in test["predictions"].items():
        frame.to_parquet(tmp / "predictions" / f"{scenario}.parquet", index=False)


def _write_selection(tmp: Path, val: dict[str, Any]) -> None:
    """``val/``: the selection split's metrics and predictions, which promotion reads (it
    decides on this split, never on the reported one)."""
    (tmp / SELECTION_DIR / "predictions").mkdir(parents=True)
    (tmp / SELECTION_DIR / "metrics.json").write_text(_dump_metrics(val["metrics"]))
    for scenario, frame in val["predictions"].items():
        frame.to_parquet(tmp / SELECTION_DIR / "predictions" / f"{scenario}.parquet")


def _eval_summary(
    model_path: Path, spec: Any, st: Any, result: _Evaluation, cfg: Config
) -> dict[str, Any]:
    """``eval_summary.json``: what this evaluation did (splits, scenarios, eye counts, the
    temperatures, the data and the bootstrap settings), so that the model card and register read
    the evaluation's record rather than a later process's config."""
    ev = cfg.evaluate
    test, val = result.test, result.val
    return {
        "model": str(model_path),
        "model_name": spec.name,
        "split": ev.split,
        "selection_split": ev.selection_split,
        "scenarios": test["scenarios"],
        "confusion_scenario": result.conf_scenario,
        "n_eyes": {s: len(f) for s, f in test["predictions"].items()},
        "n_eyes_selection": {s: len(f) for s, f in val["predictions"].items()},
        "temperature": spec.temperature,
        "temperatures": spec.temperatures,
        "data": {k: st.meta.get(k) for k in ("source", "disease", "content_hash")},
        "bootstrap": {
            "resamples": ev.bootstrap,
            "seed": ev.bootstrap_seed,
            "level": ev.ci_level,
        },
        "attributes": result.attributes,
        "equity_headline_scenario": result.headline,
    }


def _log_evaluation(result: _Evaluation, out_dir: Path) -> None:
    """MLflow gets the headline numbers of both scored splits; every scenario x every metric
    (the sweep included) is one table, beside the files of ``out_dir``."""

    test, val = result.test, result.val
    split, sel_split = test["split"], val["split"]
    metrics = test["metrics"]
    tracking.log_metrics(
        {
            **mlflow_numbers(split, metrics),
            **(mlflow_numbers(sel_split, val["metrics"]) if val is not test else {}),
            **eval_headline(metrics, result.headline, split),
        }
    )
    tracking.log_table(
        scenario_table({split: metrics, sel_split: val["metrics"]}), "eval/scenarios.json"
    )
    tracking.log_artifacts(out_dir, artifact_path="eval")


def evaluate(
    model_path: str | Path,
    store: str | Path,
    masks: str | Path | pd.DataFrame,
    out_dir: str | Path,
    cfg: Config,
) -> dict[str, Any]:
    """Score ``model_path`` on ``cfg.evaluate.split`` (and ``evaluate.selection_split``) under
    every scenario in ``masks``.

    Writes into ``out_dir``: ``metrics.json`` (test split; plus ``es_auc/<attribute>`` for
    ``evaluate.equity_attributes`` under ``promote.scenario``), ``scores.csv`` (both splits, with
    bootstrap intervals), ``subgroups.csv``, ``equity.csv``, ``equity.png``, ``calibration.csv``,
    ``reliability/<scenario>.png``, ``rate_curve.csv``, ``confusion.csv`` (``mixed`` scenario),
    ``predictions/<scenario>.parquet``, ``rate_curve.png`` / ``confusion.png``, and ``val/``
    (``metrics.json`` and ``predictions/`` of the selection split, which promotion reads).
    """
    model_path, store, out_dir = Path(model_path), Path(store), Path(out_dir)
    model, spec, st, mask_df, device, dtype = _load_inputs(model_path, store, masks, cfg)
    split, sel_split = cfg.evaluate.split, cfg.evaluate.selection_split
    class_names = list(spec.class_names)

    test = _score_split(model, st, store, mask_df, split, class_names, cfg, device, dtype)
    val = (
        test
        if sel_split == split
        else _score_split(model, st, store, mask_df, sel_split, class_names, cfg, device, dtype)
    )
    result = _tabulate(test, val, st.manifest, cfg)

    with atomic_dir(out_dir) as tmp:
        _write_tables(tmp, result)
        _write_selection(tmp, val)
        write_eval_figures(
            tmp,
            test,
            test["temperatures"],
            result.curve,
            result.equity,
            (result.conf_scenario, result.conf_matrix),
        )
        summary = _eval_summary(model_path, spec, st, result, cfg)
        (tmp / "eval_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    _log_evaluation(result, out_dir)
    return {
        "out_dir": str(out_dir),
        "split": split,
        "metrics": _head_metrics(test["metrics"]),
        "selection_metrics": _head_metrics(val["metrics"]),
    }
