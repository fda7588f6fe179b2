"""The evaluation's figures that are not DVC plots: PNGs drawn with matplotlib.

Kept apart from the numerical modules (calibration, metrics) so that serving, which imports
those, never imports matplotlib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rima_core.calibration import Temperature, reliability_bins, softmax
from rima_core.metrics import expected_calibration_error


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
