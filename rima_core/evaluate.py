"""Evaluate a trained model under every missing-modality scenario of one split.

The point of the method is robustness to a missing modality, so one number on complete data says
little: every scenario in the masks is scored, and the ``*@R`` sweeps become a metric-vs-missing-
rate curve. Outputs are shaped for DVC (``metrics.json`` numbers only, ``rate_curve.csv`` and
``confusion.csv`` for ``dvc plots``) and logged to MLflow when a run is active. The output
directory is written atomically as a whole: a failed evaluation never leaves a mix of old and new
files.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.atomic import atomic_dir
from rima_core.config import Config
from rima_core.engine import EngineError, Predictions, amp_dtype, predict, resolve_device
from rima_core.metrics import classification_metrics, metric_key
from rima_core.train import load_masks

log = logging.getLogger(__name__)

CURVE_METRICS = ("qwk", "accuracy", "balanced_accuracy", "f1_macro", "auc", "kappa", "ece")
PLOT_METRICS = ("qwk", "accuracy", "f1_macro", "auc")
CONFUSION_SCENARIO = "mixed"


def parse_sweep(scenario: str) -> tuple[str, float] | None:
    """``fundus_missing@0.25`` -> ``("fundus_missing", 0.25)``; None for a non-sweep scenario."""
    if "@" not in scenario:
        return None
    kind, _, rate = scenario.partition("@")
    try:
        return kind, float(rate)
    except ValueError:
        return None


def mlflow_key(text: str) -> str:
    """MLflow metric names allow ``[A-Za-z0-9_.-/ ]``: ``oct_missing@0.5`` -> ``..._at_0.5``."""
    return re.sub(r"[^A-Za-z0-9_./ -]", "_", text.replace("@", "_at_"))


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


def _check_compatible(spec: Any, st: Any, model_path: Path, store: Path) -> None:
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


def evaluate(
    model_path: str | Path,
    store: str | Path,
    masks: str | Path | pd.DataFrame,
    out_dir: str | Path,
    cfg: Config,
) -> dict[str, Any]:
    """Score ``model_path`` on ``cfg.evaluate.split`` under every scenario in ``masks``.

    Writes ``metrics.json``, ``rate_curve.csv``, ``confusion.csv`` (``mixed`` scenario),
    ``predictions/<scenario>.parquet`` and ``rate_curve.png`` / ``confusion.png`` into ``out_dir``.
    """
    from rima_core import tracking
    from rima_core.data import open_store
    from rima_core.data.dataset import EyeDataset, make_loader
    from rima_core.models import load_model

    model_path, store, out_dir = Path(model_path), Path(store), Path(out_dir)
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path}: no model (run `rima train` first)")
    split = cfg.evaluate.split
    device = resolve_device(cfg.train.device)
    dtype = amp_dtype(device, cfg.train.amp)
    st = open_store(store)
    mask_df = load_masks(masks)
    scenarios = list(pd.unique(mask_df.loc[mask_df["split"] == split, "scenario"]))
    if not scenarios:
        raise EngineError(f"masks have no rows for split {split!r} (evaluate.split)")
    try:
        model, spec = load_model(model_path, map_location=device)
    except ValueError as exc:  # not a model file, or weights that do not fit their spec
        raise EngineError(str(exc)) from exc
    model.to(device)
    _check_compatible(spec, st, model_path, store)
    class_names = list(spec.class_names)
    case_ids = st.manifest["case_id"].to_numpy()

    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, pd.DataFrame] = {}
    for scenario in scenarios:
        ds = EyeDataset(store, mask_df, split, scenario)
        loader = make_loader(
            ds,
            batch_size=cfg.evaluate.batch_size,
            shuffle=False,
            num_workers=cfg.train.num_workers,
            seed=cfg.train.seed,
            pin_memory=device.type == "cuda",
        )
        preds = predict(model, loader, device, dtype, desc=f"{split}/{scenario}")
        m = classification_metrics(preds.y_true, preds.proba, class_names)
        m.update(_availability(preds))
        metrics[scenario] = m
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
        predictions[scenario] = frame
        log.info(
            "%s/%s: n=%d qwk %.4f acc %.4f auc %.4f",
            split,
            scenario,
            len(frame),
            m["qwk"],
            m["accuracy"],
            m["auc"],
        )

    conf_scenario = CONFUSION_SCENARIO if CONFUSION_SCENARIO in predictions else scenarios[0]
    conf_frame = predictions[conf_scenario]
    confusion = pd.DataFrame(
        {
            "actual": [class_names[i] for i in conf_frame["label"]],
            "predicted": [class_names[i] for i in conf_frame["pred"]],
        }
    )
    conf_matrix = np.zeros((len(class_names), len(class_names)), dtype=np.int64)
    np.add.at(conf_matrix, (conf_frame["label"].to_numpy(), conf_frame["pred"].to_numpy()), 1)
    curve = rate_curve(metrics)

    with atomic_dir(out_dir) as tmp:
        clean = {s: {k: _clean(v) for k, v in m.items()} for s, m in metrics.items()}
        (tmp / "metrics.json").write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
        curve.to_csv(tmp / "rate_curve.csv", index=False)
        confusion.to_csv(tmp / "confusion.csv", index=False)
        (tmp / "predictions").mkdir()
        for scenario, frame in predictions.items():
            frame.to_parquet(tmp / "predictions" / f"{scenario}.parquet", index=False)
        if len(curve):
            _plot_rate_curve(curve, tmp / "rate_curve.png")
        _plot_confusion(
            conf_matrix, class_names, f"{split} / {conf_scenario}", tmp / "confusion.png"
        )
        (tmp / "eval_summary.json").write_text(
            json.dumps(
                {
                    "model": str(model_path),
                    "model_name": spec.name,
                    "split": split,
                    "scenarios": scenarios,
                    "confusion_scenario": conf_scenario,
                    "n_eyes": {s: len(f) for s, f in predictions.items()},
                },
                indent=2,
            )
            + "\n"
        )

    tracking.log_metrics(
        {
            mlflow_key(f"{split}/{scenario}/{k}"): v
            for scenario, m in metrics.items()
            for k, v in m.items()
        }
    )
    tracking.log_artifacts(out_dir, artifact_path="eval")
    return {
        "out_dir": str(out_dir),
        "split": split,
        "metrics": {
            s: {k: _clean(m[k]) for k in ("qwk", "accuracy", "auc")} for s, m in metrics.items()
        },
    }
