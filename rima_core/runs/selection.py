"""Model selection: which validation eyes score an epoch, how, and whether it is kept.

Selection and early stopping look at the VALIDATION split under ``cfg.train.selection_scenario``
— never at training data (a defect of the authors' code) — and score the predictor that ships
(calibrated, paths pooled), not the raw network.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from rima_core.core.data.masks import selection_scenarios
from rima_core.core.metrics import classification_metrics, is_better
from rima_core.runs.calibration import fit_temperatures, pooled_eyes, row_temperatures, softmax
from rima_core.runs.checkpoint import Progress
from rima_core.runs.engine import EngineError, predict


def check_scenario(masks: pd.DataFrame, split: str, scenario: str, what: str) -> int:
    """Number of mask rows for (split, scenario); a clear error when there are none."""
    n = int(((masks["split"] == split) & (masks["scenario"] == scenario)).sum())
    if n == 0:
        known = sorted(masks.loc[masks["split"] == split, "scenario"].unique().tolist())
        raise EngineError(
            f"{what}: no eyes in split {split!r} under scenario {scenario!r}; "
            f"scenarios in the masks for {split!r}: {known}"
        )
    return n


def check_selection(masks: pd.DataFrame, selection_scenario: str, what: str) -> int:
    """Validation eyes behind a selection rule (``mean`` needs every main scenario)."""
    counts = [
        check_scenario(masks, "val", scenario, what)
        for scenario in selection_scenarios(selection_scenario)
    ]
    return counts[0]


def check_metric(metric: str, n_classes: int) -> None:
    """Refuse a ``train.selection_metric`` that :func:`classification_metrics` does not report."""
    known = classification_metrics(np.arange(n_classes), np.eye(n_classes))
    if metric not in known:
        raise EngineError(
            f"train.selection_metric={metric!r} is not a metric; known: {sorted(known)}"
        )


def validation_metrics(
    model: nn.Module,
    loaders: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype | None,
    class_names: list[str],
    calibrate: bool = False,
) -> dict[str, float]:
    """Validation metrics under each scenario of ``loaders``; with several scenarios the plain
    metric names hold their mean (what selection and tuning compare) and
    ``<scenario>_<metric>`` the per-scenario values.

    Selecting on one scenario (say ``mixed``) picks epochs and settings that suit that mix and
    can hurt the single-modality paths; the mean over all scenarios weighs every path alike.

    ``calibrate=True`` scores the predictor that ships: the temperatures per availability
    pattern are fitted on these same validation eyes first (as training's end does), so a
    probability metric (NLL, ECE, ordinal QWK) selects the calibrated model, not the raw one;
    ``False`` applies the temperatures the model carries.
    """

    t = 1.0 if calibrate else None  # None: the model's own temperatures
    preds = {
        scenario: predict(model, loader, device, dtype, desc=f"validate {scenario}", temperature=t)
        for scenario, loader in loaders.items()
    }
    if calibrate:
        overall, per = fit_temperatures(*pooled_eyes(list(preds.values())))
        for p in preds.values():
            p.proba = softmax(p.logits, row_temperatures(per, overall, p.has_fundus, p.has_oct))
    per_scenario = {
        scenario: classification_metrics(p.y_true, p.proba, class_names)
        for scenario, p in preds.items()
    }
    if len(per_scenario) == 1:
        return next(iter(per_scenario.values()))
    names = next(iter(per_scenario.values())).keys()
    out = {k: float(np.mean([m[k] for m in per_scenario.values()])) for k in names}
    for scenario, metrics in per_scenario.items():
        out.update({f"{scenario}_{k}": v for k, v in metrics.items()})
    return out


def select_epoch(
    progress: Progress, epoch: int, metric: str, val_metrics: dict[str, float], model: nn.Module
) -> bool:
    """Keep this epoch if it beats the best so far on ``metric``; True if it did."""
    score = val_metrics[metric]
    best = progress.best
    if not is_better(metric, score, best["score"] if best["epoch"] else None):
        progress.stale += 1
        return False
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    progress.best = {
        "epoch": epoch,
        "score": float(score),
        "metrics": val_metrics,
        "state_dict": state,
    }
    progress.stale = 0
    return True
