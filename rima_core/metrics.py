"""Classification metrics for disease grading, in one flat ``{name: float}`` dict.

One function serves model selection (train), tuning, evaluation and promotion, so every place
compares the same numbers. The dict is flat and numeric so it goes unchanged into MLflow metrics,
DVC ``metrics.json`` and ``history.csv``.

Undefined values are ``nan``, never a made-up 0 or 1: on a small test split a grade may be
absent, and silently scoring it would bias the comparison between models. In particular:

- ``auc``: binary -> ROC AUC of the positive class; multiclass -> the mean of one-vs-rest AUCs
  over the classes that occur in ``y_true`` (a class with no positives has no ROC curve and is
  left out of the mean, not scored). ``nan`` when fewer than two classes occur.
- ``balanced_accuracy``: mean recall over the classes that occur in ``y_true``.
- ``f1_macro`` / ``f1_weighted``: over the classes that occur in ``y_true`` or in the
  predictions (a class in neither is no evidence either way).
- ``kappa`` / ``qwk``: ``nan`` when chance agreement is perfect (e.g. one class only).
- ``sensitivity/<class>``: ``nan`` when the class has no positives; ``specificity/<class>``:
  ``nan`` when it has no negatives.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

ECE_BINS = 15

# Metrics for which a smaller value is better; everything else in the dict is higher-is-better.
LOWER_IS_BETTER = frozenset({"ece", "nll"})


def metric_key(name: str) -> str:
    """A class name made safe for metric keys (MLflow allows ``[A-Za-z0-9_.-/ ]`` only)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("_") or "class"


def _validate(y_true: np.ndarray, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"proba must be (n_samples, n_classes>=2); got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true must be 1-d with {p.shape[0]} entries; got shape {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("no samples: cannot compute metrics on an empty set")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(
            f"y_true has labels outside [0, {p.shape[1] - 1}]: {sorted(set(y.tolist()))}"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError("proba contains NaN or infinite values")
    return y.astype(np.int64), p


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``C[i, j]`` of actual class ``i`` predicted as ``j``."""
    c = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(c, (y_true, y_pred), 1)
    return c


def _kappa(conf: np.ndarray, weights: str | None) -> float:
    """Cohen's kappa from a confusion matrix; ``weights="quadratic"`` gives QWK."""
    k = conf.shape[0]
    n = conf.sum()
    observed = conf / n
    expected = np.outer(conf.sum(axis=1), conf.sum(axis=0)) / n**2
    i, j = np.indices((k, k))
    w = (i - j) ** 2 / (k - 1) ** 2 if weights == "quadratic" else (i != j).astype(np.float64)
    denom = float((w * expected).sum())
    if denom <= 1e-15:
        return float("nan")
    return float(1.0 - (w * observed).sum() / denom)


def _binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney statistic with average ranks for ties."""
    n_pos = int(positive.sum())
    n_neg = positive.shape[0] - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _f1(conf: np.ndarray, classes: np.ndarray) -> np.ndarray:
    tp = np.diag(conf)[classes].astype(np.float64)
    fp = conf.sum(axis=0)[classes] - tp
    fn = conf.sum(axis=1)[classes] - tp
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)


def expected_calibration_error(
    y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS
) -> float:
    """Top-label ECE over equal-width confidence bins ``(lo, hi]`` (the first also takes 0)."""
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y_true).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        sel = bins == b
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """All grading metrics for predicted class probabilities ``proba`` (n×K).

    Predictions are ``argmax(proba)``. Per-class keys use ``class_names`` (made key-safe by
    :func:`metric_key`), or the class index when no names are given.
    """
    y, p = _validate(np.asarray(y_true), np.asarray(proba))
    n, k = p.shape
    if class_names is not None and len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} probability columns")
    names = (
        [metric_key(c) for c in class_names]
        if class_names is not None
        else list(map(str, range(k)))
    )
    pred = p.argmax(axis=1)
    conf = confusion_matrix(y, pred, k)
    support = conf.sum(axis=1)
    present = np.flatnonzero(support > 0)
    seen = np.flatnonzero((support > 0) | (conf.sum(axis=0) > 0))

    recall = np.diag(conf)[present] / support[present]
    f1_seen = _f1(conf, seen)
    out: dict[str, float] = {
        "n_samples": float(n),
        "accuracy": float(np.trace(conf) / n),
        "balanced_accuracy": float(recall.mean()),
        "f1_macro": float(f1_seen.mean()),
        "f1_weighted": float((f1_seen * support[seen]).sum() / n),
        "kappa": _kappa(conf, None),
        "qwk": _kappa(conf, "quadratic"),
    }
    if k == 2:
        out["auc"] = _binary_auc(y == 1, p[:, 1])
    else:
        aucs = [_binary_auc(y == c, p[:, c]) for c in present]
        finite = [a for a in aucs if np.isfinite(a)]
        out["auc"] = float(np.mean(finite)) if len(present) >= 2 and finite else float("nan")
    out["ece"] = expected_calibration_error(y, p)
    out["nll"] = float(-np.mean(np.log(np.clip(p[np.arange(n), y], 1e-12, None))))
    for c, name in enumerate(names):
        tp = conf[c, c]
        fn = support[c] - tp
        fp = conf[:, c].sum() - tp
        tn = n - tp - fn - fp
        out[f"sensitivity/{name}"] = float(tp / (tp + fn)) if tp + fn > 0 else float("nan")
        out[f"specificity/{name}"] = float(tn / (tn + fp)) if tn + fp > 0 else float("nan")
    return out


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether ``value`` of ``metric`` improves on ``best`` (``None``: none yet); NaN never does."""
    if not np.isfinite(value):
        return best is None
    if best is None or not np.isfinite(best):
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best
