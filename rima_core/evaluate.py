"""Evaluate a trained model under every missing-modality scenario of one split.

The point of the method is robustness to a missing modality, so one number on complete data says
little: every scenario in the masks is scored, and the ``*@R`` sweeps become a metric-vs-missing-
rate curve. Outputs are shaped for DVC (``metrics.json`` numbers only, ``rate_curve.csv`` and
``confusion.csv`` for ``dvc plots``, ``headline.json`` for ``dvc metrics``) and logged to MLflow
when a run is active: the headline numbers of both scored splits as metrics, named as in
:mod:`rima_core.metric_names` (``test/complete/qwk``), and every scenario x every metric as one
table (``eval/scenarios.json``) beside the output files. The output
directory is written atomically as a whole: a failed evaluation never leaves a mix of old and new
files.

What a clinical team needs beyond point estimates (docs/evaluation.md):

- ``scores.csv``: every headline metric of both scored splits with a seeded percentile
  bootstrap interval over eyes (:func:`rima_core.metrics.bootstrap_scores`).
- ``subgroups.csv`` / ``equity.csv`` / ``equity.png``: metrics per group of every ``source_*``
  attribute of the store, and the equity-scaled AUC per attribute (FairVision's ES-AUC).
- ``calibration.csv`` / ``reliability/<scenario>.png``: ECE and NLL before and after the
  temperature fitted at the end of training.
- ``val/``: the validation split scored the same way. Promotion decides on it (``register``
  reads ``val/metrics.json``); the test split is reported, never selected on.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.atomic import atomic_dir
from rima_core.calibration import calibration_report
from rima_core.config import Config
from rima_core.data.masks import MAIN_SCENARIOS, load_masks
from rima_core.engine import (
    EngineError,
    Predictions,
    amp_dtype,
    eye_temperatures,
    predict,
    resolve_device,
)
from rima_core.figures import plot_reliability
from rima_core.headline import HEADLINE_FILE, eval_headline, write_headline
from rima_core.metric_names import scored_numbers
from rima_core.metrics import bootstrap_scores, classification_metrics, es_auc, metric_key
from rima_core.plots import PLOTS_DIR, write_eval_plots
from rima_core.train import check_scenario

log = logging.getLogger(__name__)

CURVE_METRICS = ("qwk", "accuracy", "balanced_accuracy", "f1_macro", "auc", "kappa", "ece")
PLOT_METRICS = ("qwk", "accuracy", "f1_macro", "auc")
CONFUSION_SCENARIO = "mixed"
SUBGROUP_METRICS = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece")
MISSING_GROUP = "<missing>"
SELECTION_DIR = "val"  # evaluate's sub-folder for the selection split (register reads it)


def parse_sweep(scenario: str) -> tuple[str, float] | None:
    """``fundus_missing@0.25`` -> ``("fundus_missing", 0.25)``; None for a non-sweep scenario."""
    if "@" not in scenario:
        return None
    kind, _, rate = scenario.partition("@")
    try:
        return kind, float(rate)
    except ValueError:
        return None


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


def _plot_rate_curve(curve: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PLOT_METRICS), figsize=(4 * len(PLOT_METRICS), 3.4))
    complete = curve[curve["scenario_kind"] == "complete"]
    for ax, metric in zip(axes, PLOT_METRICS, strict=True):
        for kind, part in curve[curve["scenario_kind"] != "complete"].groupby("scenario_kind"):
            ax.plot(part["missing_rate"], part[metric], marker="o", label=str(kind))
        if len(complete):
            ax.axhline(
                float(complete[metric].iloc[0]), color="grey", ls="--", lw=1, label="complete"
            )
        ax.set_xlabel("missing rate")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_confusion(conf: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.2 * k + 2))
    ax.imshow(conf, cmap="Blues")
    for i in range(k):
        for j in range(k):
            color = "white" if conf[i, j] > conf.max() / 2 else "black"
            ax.text(j, i, str(conf[i, j]), ha="center", va="center", color=color)
    ax.set_xticks(range(k), class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


# --- subgroups and equity ------------------------------------------------------------------------


def attribute_groups(manifest: pd.DataFrame, max_groups: int) -> dict[str, pd.Series]:
    """``{attribute: group label per store row}`` for every ``source_*`` column of the store.

    Patient identifiers (:data:`rima_core.data.prepare.PATIENT_ID_ATTRIBUTES`) are not groups.
    A numeric attribute with more than ``max_groups`` distinct values (age) is cut into
    quartiles; a missing value is its own group (:data:`MISSING_GROUP`), never dropped.
    """
    from rima_core.data.prepare import PATIENT_ID_ATTRIBUTES

    out: dict[str, pd.Series] = {}
    for col in manifest.columns:
        if not col.startswith("source_"):
            continue
        name = col.removeprefix("source_")
        if name.lower() in PATIENT_ID_ATTRIBUTES:
            continue
        values = manifest[col]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric and values.nunique(dropna=True) > max_groups:
            q = pd.qcut(values.astype("float64"), 4, duplicates="drop")
            labels = q.map(lambda iv: f"[{iv.left:g}, {iv.right:g}]").astype("object")
        else:
            labels = values.astype("object").map(lambda v: str(v) if not pd.isna(v) else None)
        out[name] = labels.where(labels.notna(), MISSING_GROUP).astype(str).reset_index(drop=True)
    return out


def subgroup_tables(
    scenario: str,
    y: np.ndarray,
    proba: np.ndarray,
    groups: dict[str, np.ndarray],
    auc_overall: float,
    class_names: list[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of ``subgroups.csv`` (one per attribute x group, every group with its ``n``) and of
    ``equity.csv`` (one per attribute: ES-AUC and how many groups had a defined AUC)."""
    sub_rows: list[dict[str, Any]] = []
    eq_rows: list[dict[str, Any]] = []
    for attribute, labels in groups.items():
        aucs = []
        for group in sorted(pd.unique(labels)):
            sel = labels == group
            m = classification_metrics(y[sel], proba[sel], class_names)
            aucs.append(m["auc"])
            sub_rows.append(
                {
                    "scenario": scenario,
                    "attribute": attribute,
                    "group": group,
                    "n": int(sel.sum()),
                    "n_classes_present": len(np.unique(y[sel])),
                    **{k: m[k] for k in SUBGROUP_METRICS},
                    "auc_gap": m["auc"] - auc_overall,
                }
            )
        finite = [abs(a - auc_overall) for a in aucs if math.isfinite(a)]
        eq_rows.append(
            {
                "scenario": scenario,
                "attribute": attribute,
                "auc": auc_overall,
                "es_auc": es_auc(auc_overall, aucs),
                "n_groups": len(aucs),
                "n_groups_scored": len(finite),
                "max_auc_gap": max(finite) if finite else float("nan"),
            }
        )
    return sub_rows, eq_rows


def _plot_equity(equity: pd.DataFrame, path: Path) -> None:
    """ES-AUC per scenario (rows) and attribute (columns), annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = equity.pivot(index="scenario", columns="attribute", values="es_auc")
    table = table.reindex(pd.unique(equity["scenario"]))
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 3.0, 0.35 * table.shape[0] + 1.6))
    ax.imshow(table.to_numpy(dtype=float), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), v in np.ndenumerate(table.to_numpy(dtype=float)):
        ax.text(
            j,
            i,
            "-" if not np.isfinite(v) else f"{v:.2f}",
            ha="center",
            va="center",
            color="white" if np.isfinite(v) and v < 0.6 else "black",
            fontsize=7,
        )
    ax.set_xticks(range(table.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), table.index, fontsize=7)
    ax.set_title("ES-AUC = AUC / (1 + sum |AUC - AUC_group|)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- scoring one split ---------------------------------------------------------------------------


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
    from rima_core.data.dataset import EyeDataset, make_loader

    scenarios = list(pd.unique(mask_df.loc[mask_df["split"] == split, "scenario"]))
    if not scenarios:
        raise EngineError(f"masks have no rows for split {split!r} (evaluate.split)")
    case_ids = st.manifest["case_id"].to_numpy()
    ev = cfg.evaluate
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
        ds = EyeDataset(store, mask_df, split, scenario)
        loader = make_loader(
            ds,
            batch_size=cfg.runtime.eval_batch_size,
            shuffle=False,
            num_workers=cfg.runtime.num_workers,
            seed=cfg.runtime.seed,
            pin_memory=device.type == "cuda",
        )
        preds = predict(model, loader, device, dtype, desc=f"{split}/{scenario}")
        m = classification_metrics(preds.y_true, preds.proba, class_names)
        m.update(_availability(preds))
        out["metrics"][scenario] = m
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
    return out


def _load_inputs(
    model_path: Path, store: Path, masks: str | Path | pd.DataFrame, cfg: Config
) -> tuple[Any, Any, Any, pd.DataFrame, Any, Any]:
    """Check the settings and inputs, then load them: ``(model, spec, store, masks, device,
    dtype)``. Every refusal comes before a prediction is made."""
    from rima_core.data import open_store
    from rima_core.models import load_model

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


def _subgroups_and_equity(
    test: dict[str, Any], manifest: pd.DataFrame, max_groups: int, class_names: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Subgroup metrics and equity of every scenario of the evaluated split, and the attributes
    they group by. The same eyes appear in every scenario, so the groups are fixed once from the
    store's attributes."""
    groups_by_row = attribute_groups(manifest, max_groups)
    sub_rows: list[dict[str, Any]] = []
    eq_rows: list[dict[str, Any]] = []
    for scenario in test["scenarios"]:
        preds = test["raw"][scenario]
        groups = {a: lab.to_numpy()[preds.index] for a, lab in groups_by_row.items()}
        auc = test["metrics"][scenario]["auc"]
        s_rows, e_rows = subgroup_tables(
            scenario, preds.y_true, preds.proba, groups, auc, class_names
        )
        sub_rows += s_rows
        eq_rows += e_rows
    subgroups = pd.DataFrame(
        sub_rows,
        columns=[
            "scenario",
            "attribute",
            "group",
            "n",
            "n_classes_present",
            *SUBGROUP_METRICS,
            "auc_gap",
        ],
    )
    equity = pd.DataFrame(
        eq_rows,
        columns=[
            "scenario",
            "attribute",
            "auc",
            "es_auc",
            "n_groups",
            "n_groups_scored",
            "max_auc_gap",
        ],
    )
    return subgroups, equity, list(groups_by_row)


def _add_equity_headline(
    metrics: dict[str, dict[str, float]], equity: pd.DataFrame, cfg: Config
) -> str:
    """Add ``es_auc/<attribute>`` of ``evaluate.equity_attributes`` to the metrics of the
    promotion scenario (evaluate checked the masks have it); return that scenario."""
    headline = cfg.promote.scenario
    for attribute in cfg.evaluate.equity_attributes:
        row = equity[(equity["scenario"] == headline) & (equity["attribute"] == attribute)]
        if row.empty:
            log.info("store has no attribute %r: no ES-AUC headline for it", attribute)
            continue
        metrics[headline][f"es_auc/{metric_key(attribute)}"] = float(row["es_auc"].iloc[0])
    return headline


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


def _write_figures(
    folder: Path,
    test: dict[str, Any],
    temperatures: dict[str, np.ndarray],
    curve: pd.DataFrame,
    equity: pd.DataFrame,
    confusion: tuple[str, np.ndarray],
) -> None:
    """The PNGs of the evaluated split: reliability per scenario, the missing-rate curve, equity
    and the confusion matrix of ``confusion = (scenario, counts)``; ``temperatures`` are each
    scenario's per-eye temperatures (their availability patterns')."""
    split, class_names = test["split"], test["class_names"]
    (folder / "reliability").mkdir()
    for scenario, preds in test["raw"].items():
        plot_reliability(
            preds.y_true,
            preds.logits,
            temperatures[scenario],
            f"{split} / {scenario}",
            folder / "reliability" / f"{scenario}.png",
        )
    if len(curve):
        _plot_rate_curve(curve, folder / "rate_curve.png")
    if len(equity):
        _plot_equity(equity, folder / "equity.png")
    conf_scenario, conf_matrix = confusion
    _plot_confusion(
        conf_matrix, class_names, f"{split} / {conf_scenario}", folder / "confusion.png"
    )


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
    from rima_core import tracking

    model_path, store, out_dir = Path(model_path), Path(store), Path(out_dir)
    model, spec, st, mask_df, device, dtype = _load_inputs(model_path, store, masks, cfg)
    ev = cfg.evaluate
    split, sel_split = ev.split, ev.selection_split
    class_names = list(spec.class_names)

    test = _score_split(model, st, store, mask_df, split, class_names, cfg, device, dtype)
    val = (
        test
        if sel_split == split
        else _score_split(model, st, store, mask_df, sel_split, class_names, cfg, device, dtype)
    )
    scenarios, metrics, predictions = test["scenarios"], test["metrics"], test["predictions"]
    subgroups, equity, attributes = _subgroups_and_equity(
        test, st.manifest, ev.max_groups, class_names
    )
    headline = _add_equity_headline(metrics, equity, cfg)
    scores = pd.DataFrame(
        val["scores"] + (test["scores"] if val is not test else []),
        columns=["split", "scenario", "metric", "value", "ci_low", "ci_high", "n_boot", "n"],
    )
    calibration = pd.DataFrame(
        val["calibration"] + (test["calibration"] if val is not test else [])
    )
    conf_scenario, confusion, conf_matrix = _confusion(predictions, class_names)
    conf_frame = predictions[conf_scenario]
    curve = rate_curve(metrics)

    with atomic_dir(out_dir) as tmp:
        (tmp / "metrics.json").write_text(_dump_metrics(metrics))
        # what DVC shows and compares: a few numbers, and plot tables shaped for its templates
        write_headline(tmp / HEADLINE_FILE, eval_headline(metrics, headline, split))
        write_eval_plots(
            tmp / PLOTS_DIR, curve, conf_frame["label"], conf_frame["pred"], class_names, split
        )
        curve.to_csv(tmp / "rate_curve.csv", index=False)
        confusion.to_csv(tmp / "confusion.csv", index=False)
        scores.to_csv(tmp / "scores.csv", index=False)
        subgroups.to_csv(tmp / "subgroups.csv", index=False)
        equity.to_csv(tmp / "equity.csv", index=False)
        calibration.to_csv(tmp / "calibration.csv", index=False)
        (tmp / "predictions").mkdir()
        for scenario, frame in predictions.items():
            frame.to_parquet(tmp / "predictions" / f"{scenario}.parquet", index=False)
        (tmp / SELECTION_DIR / "predictions").mkdir(parents=True)
        (tmp / SELECTION_DIR / "metrics.json").write_text(_dump_metrics(val["metrics"]))
        for scenario, frame in val["predictions"].items():
            frame.to_parquet(tmp / SELECTION_DIR / "predictions" / f"{scenario}.parquet")
        _write_figures(tmp, test, test["temperatures"], curve, equity, (conf_scenario, conf_matrix))
        summary = {
            "model": str(model_path),
            "model_name": spec.name,
            "split": split,
            "selection_split": sel_split,
            "scenarios": scenarios,
            "confusion_scenario": conf_scenario,
            "n_eyes": {s: len(f) for s, f in predictions.items()},
            "n_eyes_selection": {s: len(f) for s, f in val["predictions"].items()},
            "temperature": spec.temperature,
            "temperatures": spec.temperatures,
            "data": {k: st.meta.get(k) for k in ("source", "disease", "content_hash")},
            "bootstrap": {
                "resamples": ev.bootstrap,
                "seed": ev.bootstrap_seed,
                "level": ev.ci_level,
            },
            "attributes": attributes,
            "equity_headline_scenario": headline,
        }
        (tmp / "eval_summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    # MLflow gets the headline numbers of both scored splits; every scenario x every metric
    # (the sweep included) is one table, beside the files of out_dir
    tracking.log_metrics(
        {
            **mlflow_numbers(split, metrics),
            **(mlflow_numbers(sel_split, val["metrics"]) if val is not test else {}),
            **eval_headline(metrics, headline, split),
        }
    )
    tracking.log_table(
        scenario_table({split: metrics, sel_split: val["metrics"]}), "eval/scenarios.json"
    )
    tracking.log_artifacts(out_dir, artifact_path="eval")
    return {
        "out_dir": str(out_dir),
        "split": split,
        "metrics": _head_metrics(metrics),
        "selection_metrics": _head_metrics(val["metrics"]),
    }
