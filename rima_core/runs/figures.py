"""The evaluation's figures that are not DVC plots: PNGs drawn with matplotlib (reliability
diagrams, the missing-rate curve, equity and the confusion matrix; :func:`write_eval_figures`
draws them all for :mod:`rima_core.runs.evaluate`).

Kept apart from the numerical modules (calibration, metrics) so that serving, which imports
those, never imports matplotlib.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.core.metrics import expected_calibration_error
from rima_core.runs.calibration import Temperature, reliability_bins, softmax


def plot_reliability(
    y_true: np.ndarray, logits: np.ndarray, temperature: Temperature, title: str, path: Path
) -> None:
    """Reliability diagram: accuracy vs confidence per bin, before and after scaling (one
    temperature, or one per eye: its availability pattern's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect")
    t_text = f"T={float(np.mean(temperature)):.2f}" + ("" if np.ndim(temperature) == 0 else " mean")
    for t, label in ((1.0, "before"), (temperature, f"after ({t_text})")):
        proba = softmax(logits, t)
        b = reliability_bins(y_true, proba)
        used = b["count"] > 0
        ece = expected_calibration_error(np.asarray(y_true, dtype=np.int64), proba)
        ax.plot(
            b["confidence"][used], b["accuracy"][used], marker="o", label=f"{label}, ECE {ece:.3f}"
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


PLOT_METRICS = ("qwk", "accuracy", "f1_macro", "auc")


def plot_rate_curve(curve: pd.DataFrame, path: Path) -> None:
    """Each metric of :data:`PLOT_METRICS` against the missing rate, one line per scenario kind,
    the complete-data value as a dashed reference: what robustness to a missing modality costs."""
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


def plot_confusion(conf: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    """The confusion matrix ``conf`` (actual rows, predicted columns) with its counts written in,
    so that which grades are mistaken for which reads at a glance."""
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


def plot_equity(equity: pd.DataFrame, path: Path) -> None:
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


def write_eval_figures(
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
        plot_rate_curve(curve, folder / "rate_curve.png")
    if len(equity):
        plot_equity(equity, folder / "equity.png")
    conf_scenario, conf_matrix = confusion
    plot_confusion(conf_matrix, class_names, f"{split} / {conf_scenario}", folder / "confusion.png")
