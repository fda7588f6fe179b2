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

import math
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


def quadratic_decode(proba: np.ndarray) -> np.ndarray:
    """The grade that minimises the expected quadratic cost ``sum_j p_j (k - j)^2``.

    Why beside the argmax: the argmax maximises expected accuracy and ignores how far a wrong
    grade is; QWK charges an error by its squared distance, so under calibrated probabilities
    this decoding (the grade nearest the posterior mean) is the usual choice for ordinal grades.
    """
    p = np.asarray(proba, dtype=np.float64)
    k = p.shape[1]
    grades = np.arange(k, dtype=np.float64)
    cost = p @ (grades[None, :] - grades[:, None]) ** 2  # (n, k): expected cost of each grade
    return cost.argmin(axis=1)


def decode(proba: np.ndarray, decoding: str = "argmax") -> np.ndarray:
    """The grades of ``proba`` under ``decoding``: ``argmax`` or ``ordinal``
    (:func:`quadratic_decode`), the choices of ``train.decoding``."""
    if decoding == "argmax":
        return np.asarray(proba).argmax(axis=1)
    if decoding == "ordinal":
        return quadratic_decode(proba)
    raise ValueError(f"decoding must be 'argmax' or 'ordinal', got {decoding!r}")


def ordinal_qwk(y_true: np.ndarray, proba: np.ndarray) -> float:
    """QWK of :func:`quadratic_decode`'s grades (``qwk`` itself scores the argmax)."""
    return _ordinal_kappa(*_validate(np.asarray(y_true), np.asarray(proba)))


def _ordinal_kappa(y: np.ndarray, p: np.ndarray) -> float:
    return _kappa(confusion_matrix(y, quadratic_decode(p), p.shape[1]), "quadratic")


def classification_metrics(
    y_true: Sequence[int] | np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """All grading metrics for predicted class probabilities ``proba`` (n×K).

    Predictions are ``argmax(proba)``, except ``qwk_ordinal``, which scores the grades of least
    expected quadratic cost (:func:`quadratic_decode`). Per-class keys use ``class_names`` (made
    key-safe by :func:`metric_key`), or the class index when no names are given.
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
        # the ordinal decoding beside the argmax (train.decoding picks the one that ships)
        "qwk_ordinal": _ordinal_kappa(y, p),
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


# --- equity and uncertainty --------------------------------------------------------------------

# Metrics with a bootstrap interval in ``scores.csv``: each is computed for all resamples at once
# from per-eye count weights (``resampled_metrics``), so 1000 resamples cost a few matrix products.
BOOT_METRICS = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece", "nll")

# The range a valid value of a metric lies in (the promotion gate refuses anything else).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "qwk": (-1.0, 1.0),
    "qwk_ordinal": (-1.0, 1.0),
    "kappa": (-1.0, 1.0),
    "nll": (0.0, math.inf),
}
UNIT_RANGE = (0.0, 1.0)  # every other metric (auc, accuracy, f1, ece, sensitivity, ...)


def metric_range(metric: str) -> tuple[float, float]:
    """``(low, high)`` of a valid ``metric`` value: [-1, 1] for kappas, [0, inf) for NLL,
    [0, 1] for the rest (``es_auc/<attribute>`` included)."""
    return METRIC_RANGES.get(metric, UNIT_RANGE)


def es_auc(auc_overall: float, group_aucs: Sequence[float]) -> float:
    """Equity-scaled AUC as FairVision reports it: ``AUC / (1 + sum_g |AUC - AUC_g|)``.

    Groups whose AUC is undefined (``nan``: too few eyes or one class only) carry no evidence of
    a gap and are left out of the sum; the caller reports how many groups were scored. ``nan``
    when the overall AUC is undefined.
    """
    if not math.isfinite(auc_overall):
        return float("nan")
    gaps = [abs(auc_overall - a) for a in group_aucs if math.isfinite(a)]
    return float(auc_overall / (1.0 + sum(gaps)))


def bootstrap_counts(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, n)`` multiplicities of each eye in each resample (rows sum to ``n``).

    Drawn from ``numpy.random.default_rng(seed).integers(0, n, (n_boot, n))``: resample ``b`` is
    the eyes ``idx[b]`` with replacement, so a loop over ``idx`` reproduces every number.
    """
    if n < 1 or n_boot < 1:
        raise ValueError(f"bootstrap needs n >= 1 and n_boot >= 1, got n={n}, n_boot={n_boot}")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def _pair_matrix(score: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``G[i, j] = 1[s_i > s_j] + 0.5 * 1[s_i == s_j]`` for positives ``i`` and negatives ``j``."""
    sp, sn = score[pos][:, None], score[~pos][None, :]
    return (sp > sn).astype(np.float64) + 0.5 * (sp == sn)


def _weighted_auc(w: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC of each weighted resample (row of ``w``); nan where a side is empty."""
    wp, wn = w[:, positive], w[:, ~positive]
    n_pos, n_neg = wp.sum(axis=1), wn.sum(axis=1)
    if positive.all() or not positive.any():
        return np.full(w.shape[0], np.nan)
    num = ((wp @ _pair_matrix(score, positive)) * wn).sum(axis=1)
    denom = n_pos * n_neg
    return np.divide(num, denom, out=np.full_like(num, np.nan), where=denom > 0)


def _nanmean_rows(a: np.ndarray) -> np.ndarray:
    """Row means over the finite entries; nan (no warning) for a row with none."""
    finite = np.isfinite(a)
    total = np.where(finite, a, 0.0).sum(axis=1)
    count = finite.sum(axis=1)
    return np.divide(total, count, out=np.full(a.shape[0], np.nan), where=count > 0)


def resampled_metrics(
    y_true: np.ndarray, proba: np.ndarray, counts: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """:data:`BOOT_METRICS` of every resample given as a row of eye multiplicities ``counts``.

    A row of ones gives exactly :func:`classification_metrics` (tested), so the point estimate
    and its resamples are one computation with the same undefined-value rules.
    """
    y, p = _validate(np.asarray(y_true), np.asarray(proba))
    w = np.atleast_2d(np.asarray(counts, dtype=np.float64))
    if w.shape[1] != y.shape[0]:
        raise ValueError(f"counts have {w.shape[1]} columns for {y.shape[0]} eyes")
    n, k = p.shape
    total = w.sum(axis=1)
    pred = p.argmax(axis=1)
    correct = (pred == y).astype(np.float64)
    onehot_y = np.eye(k)[y]  # (n, k)

    cells = np.zeros((n, k * k))
    cells[np.arange(n), y * k + pred] = 1.0
    conf = (w @ cells).reshape(-1, k, k)
    rows, cols = conf.sum(axis=2), conf.sum(axis=1)
    expected = rows[:, :, None] * cols[:, None, :] / total[:, None, None] ** 2
    i, j = np.indices((k, k))
    wq = (i - j) ** 2 / (k - 1) ** 2
    denom = (wq * expected).sum(axis=(1, 2))
    num = (wq * conf).sum(axis=(1, 2)) / total
    qwk = np.where(denom > 1e-15, 1.0 - num / np.where(denom > 1e-15, denom, 1.0), np.nan)

    support = w @ onehot_y  # (B, k)
    hits = w @ (onehot_y * correct[:, None])
    present = support > 0
    recall = np.divide(hits, support, out=np.full_like(hits, np.nan), where=present)
    balanced = _nanmean_rows(np.where(present, recall, np.nan))

    if k == 2:
        auc = _weighted_auc(w, y == 1, p[:, 1])
    else:
        per_class = np.stack([_weighted_auc(w, y == c, p[:, c]) for c in range(k)], axis=1)
        per_class = np.where(present, per_class, np.nan)
        auc = np.where(present.sum(axis=1) >= 2, _nanmean_rows(per_class), np.nan)

    top = p.max(axis=1)
    bins = np.clip(np.ceil(top * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    gap = np.zeros((n, n_bins))
    gap[np.arange(n), bins] = correct - top
    ece = np.abs(w @ gap).sum(axis=1) / total
    nll = w @ -np.log(np.clip(p[np.arange(n), y], 1e-12, None)) / total
    return {
        "qwk": qwk,
        "auc": auc,
        "accuracy": w @ correct / total,
        "balanced_accuracy": balanced,
        "ece": ece,
        "nll": nll,
    }


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float, int]:
    """Percentile interval of the defined (finite) resample values: ``(low, high, n_defined)``.

    Resamples where the metric is undefined (e.g. one class only) are left out and counted, not
    scored; ``(nan, nan, 0)`` when none is defined.
    """
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan"), 0
    alpha = (1.0 - level) / 2.0
    low, high = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high), int(finite.size)


def bootstrap_scores(
    y_true: np.ndarray,
    proba: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> list[dict[str, float]]:
    """One row per :data:`BOOT_METRICS` metric: ``metric, value, ci_low, ci_high, n_boot``.

    ``value`` is the metric on all eyes; the interval is the seeded percentile bootstrap over
    eyes. A percentile interval need not contain the point estimate for a skewed statistic, so
    the row says which it is rather than bending the interval.
    """
    y = np.asarray(y_true)
    point = resampled_metrics(y, proba, np.ones((1, y.shape[0])))
    boot = resampled_metrics(y, proba, bootstrap_counts(y.shape[0], n_boot, seed))
    rows = []
    for metric in BOOT_METRICS:
        low, high, defined = percentile_interval(boot[metric], level)
        rows.append(
            {
                "metric": metric,
                "value": float(point[metric][0]),
                "ci_low": low,
                "ci_high": high,
                "n_boot": defined,
            }
        )
    return rows


def paired_bootstrap_difference(
    y_true: np.ndarray,
    proba_new: np.ndarray,
    proba_old: np.ndarray,
    metric: str,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, float]:
    """``metric(new) - metric(old)`` on the same eyes, with a paired percentile interval.

    Both models are scored on the *same* resample each time, so the interval reflects the
    difference between the models, not the luck of the split both were scored on.
    """
    if metric not in BOOT_METRICS:
        raise ValueError(f"no bootstrap for metric {metric!r}; choose one of {list(BOOT_METRICS)}")
    y = np.asarray(y_true)
    ones = np.ones((1, y.shape[0]))
    counts = bootstrap_counts(y.shape[0], n_boot, seed)
    new, old = resampled_metrics(y, proba_new, ones), resampled_metrics(y, proba_old, ones)
    diff_point = new[metric] - old[metric]
    diff = (
        resampled_metrics(y, proba_new, counts)[metric]
        - resampled_metrics(y, proba_old, counts)[metric]
    )
    low, high, defined = percentile_interval(diff, level)
    return {"value": float(diff_point[0]), "ci_low": low, "ci_high": high, "n_boot": defined}
