"""Temperature scaling: calibrated probabilities without changing a single prediction.

A network trained with cross-entropy is usually over-confident; a clinician reading "p = 0.95"
needs that to mean 95 %. Temperature scaling divides the logits by one scalar ``T`` fitted on the
validation split (minimum NLL) after training. ``argmax`` is unchanged, so accuracy, QWK and the
chosen weights are exactly what model selection picked; only the probabilities move.

``T`` is saved in the model's spec (``ModelSpec.temperature``, default 1.0 for older models) and
applied by :func:`rima_core.engine.predict`, so evaluation and serving use it without knowing.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from rima_core.metrics import ECE_BINS, expected_calibration_error

log = logging.getLogger(__name__)

# log T is searched in [log T_MIN, log T_MAX]: wide enough for any sane network, and bounded so a
# degenerate validation split (one class, perfectly separated) cannot push T to 0 or infinity.
T_MIN, T_MAX = 0.05, 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of ``logits / temperature`` in float64 (stable: max subtracted)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / T)``."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    y = np.asarray(y_true, dtype=np.int64)
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """The ``T`` in ``[T_MIN, T_MAX]`` minimising validation NLL (bounded 1-d search on log T)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != y.shape[0] or y.shape[0] == 0:
        raise ValueError(f"need (n, K) logits and n labels, got {logits.shape} and {y.shape}")
    if not np.all(np.isfinite(logits)):
        raise ValueError("logits contain NaN or infinite values: cannot fit a temperature")
    res = minimize_scalar(
        lambda log_t: nll(logits, y, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-4},
    )
    t = float(math.exp(res.x))
    # never worse than no scaling: the bounded search can stop on a flat plateau
    return t if nll(logits, y, t) <= nll(logits, y, 1.0) else 1.0


def calibration_report(logits: np.ndarray, y_true: np.ndarray, temperature: float) -> dict:
    """ECE and NLL before (T = 1) and after (the fitted ``temperature``) on the same eyes."""
    y = np.asarray(y_true, dtype=np.int64)
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": float(temperature),
        "ece_before": expected_calibration_error(y, before),
        "ece_after": expected_calibration_error(y, after),
        "nll_before": nll(logits, y),
        "nll_after": nll(logits, y, temperature),
    }


def calibrate_model(
    model: Any, loaders: Any | dict[str, Any], device: Any, dtype: Any = None
) -> dict:
    """Fit ``T`` on one pass of ``model`` over the validation loader(s); the report holds it.

    ``loaders`` is one loader or ``{scenario: loader}`` (the selection scenarios): the eyes of
    all scenarios are pooled, so one ``T`` serves complete and incomplete eyes alike. Called where
    training ends, with the selected weights loaded; the caller stores ``report["temperature"]``
    in the spec before saving the model.
    """
    from rima_core.engine import predict

    parts = loaders.values() if isinstance(loaders, dict) else [loaders]
    preds = [predict(model, ld, device, dtype, desc="calibrate", temperature=1.0) for ld in parts]
    logits = np.concatenate([p.logits for p in preds])
    y = np.concatenate([p.y_true for p in preds])
    t = fit_temperature(logits, y)
    report = calibration_report(logits, y, t)
    log.info(
        "temperature scaling on %d validation eyes: T=%.3f, NLL %.4f -> %.4f, ECE %.4f -> %.4f",
        len(y),
        t,
        report["nll_before"],
        report["nll_after"],
        report["ece_before"],
        report["ece_after"],
    )
    return report


# Path pooling (models/rima.py, step 7; models/common.py, PathPooling): weights searched in
# [0, PATH_WEIGHT_MAX]; fewer complete validation eyes than MIN_PATH_EYES (or a single class
# among them) leaves the model's weights as they are, since three weights fitted on a handful of
# eyes would be noise.
PATH_WEIGHT_MAX = 10.0
MIN_PATH_EYES = 20


def pooled_nll(log_probs: np.ndarray, y_true: np.ndarray, weights: np.ndarray) -> float:
    """NLL of the labels under ``softmax(Σ_k weights_k · log_probs_k)``; log_probs is (P, n, K)."""
    return nll(np.tensordot(np.asarray(weights, dtype=np.float64), log_probs, axes=1), y_true)


def fit_path_weights(log_probs: np.ndarray, y_true: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Non-negative path weights minimising the validation NLL of the pooled prediction.

    L-BFGS-B from ``start`` (the model's current weights) within ``[0, PATH_WEIGHT_MAX]``; the
    result is kept only if it is no worse than ``start``, so fitting can never make a model's
    validation likelihood worse. The NLL is convex in the weights (a log-linear model), so the
    search finds the optimum rather than a local dip.
    """
    from scipy.optimize import minimize

    lp = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(y_true, dtype=np.int64)
    start = np.asarray(start, dtype=np.float64)
    if lp.ndim != 3 or lp.shape[1] != y.shape[0] or lp.shape[0] != start.shape[0]:
        raise ValueError(
            f"need (P, n, K) log-probabilities, n labels and P weights, got {lp.shape}, "
            f"{y.shape} and {start.shape}"
        )
    if not np.all(np.isfinite(lp)):
        raise ValueError("path log-probabilities contain NaN or infinite values")
    onehot = np.eye(lp.shape[2])[y]

    def loss_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = np.tensordot(w, lp, axes=1)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.log(np.clip(p[np.arange(len(y)), y], 1e-300, None)).mean()
        grad = np.einsum("pnk,nk->p", lp, p - onehot) / len(y)
        return float(loss), grad

    res = minimize(
        loss_grad, start, jac=True, method="L-BFGS-B", bounds=[(0.0, PATH_WEIGHT_MAX)] * len(start)
    )
    w = np.asarray(res.x, dtype=np.float64)
    return w if pooled_nll(lp, y, w) <= pooled_nll(lp, y, start) else start


def calibrate_paths(
    model: Any, loaders: Any | dict[str, Any], device: Any, dtype: Any = None
) -> dict | None:
    """Fit a model's ``path_weights`` on the complete eyes of the validation loader(s).

    The models that pool paths are those with ``complete_eye_log_probs``
    (:class:`rima_core.models.common.PathPooling`): the RIMA family and the imputation
    baselines, whose complete eyes have the same three paths (full, fundus + a stand-in for the
    OCT, OCT + a stand-in for the fundus). ``None`` for a model without paths to pool. Eyes
    seen in several selection scenarios count once (by store row). Sets the weights on the model
    (they are a buffer, so ``model.pt`` keeps them) and returns what was fitted, on how many
    eyes, and the NLL before and after. Called where training ends, after model selection and
    before :func:`calibrate_model`, whose temperature then scales the pooled logits.
    """
    import torch

    from rima_core.engine import autocast, eval_mode, to_device
    from rima_core.models.common import Inputs, check_inputs

    if not hasattr(model, "complete_eye_log_probs"):
        return None
    parts = loaders.values() if isinstance(loaders, dict) else [loaders]
    seen: set[int] = set()
    lps, ys = [], []
    with eval_mode(model):
        for loader in parts:
            for batch in loader:
                b = to_device(batch, device)
                has_f, has_o = check_inputs(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"])
                with autocast(device, dtype):
                    lp, rows = model.complete_eye_log_probs(
                        Inputs(b["fundus"], b["oct"], has_f, has_o, None)
                    )
                index = batch["index"].numpy()[rows.cpu().numpy()]
                new = np.array([int(i) not in seen for i in index], dtype=bool)
                seen.update(int(i) for i in index)
                lps.append(lp.float().cpu().numpy()[:, new])
                ys.append(batch["label"].numpy()[rows.cpu().numpy()][new])
    start = model.path_weights.detach().cpu().double().numpy()
    paths = list(model.PATHS)
    y = np.concatenate(ys) if ys else np.zeros(0, dtype=np.int64)
    report: dict[str, Any] = {"paths": paths, "n_eyes": len(y)}
    if len(y) < MIN_PATH_EYES or len(np.unique(y)) < 2:
        log.info(
            "path pooling: %d complete validation eye(s) with %d class(es); weights kept at %s",
            len(y),
            len(np.unique(y)),
            start.tolist(),
        )
        return {**report, "fitted": False, "weights": dict(zip(paths, start.tolist(), strict=True))}
    lp = np.concatenate(lps, axis=1)
    w = fit_path_weights(lp, y, start)
    model.path_weights.copy_(torch.as_tensor(w, dtype=model.path_weights.dtype))
    report.update(
        fitted=True,
        weights=dict(zip(paths, w.tolist(), strict=True)),
        nll_before=pooled_nll(lp, y, start),
        nll_after=pooled_nll(lp, y, w),
    )
    log.info(
        "path pooling on %d complete validation eyes: weights %s, NLL %.4f -> %.4f",
        len(y),
        ", ".join(f"{p}={v:.3f}" for p, v in report["weights"].items()),
        report["nll_before"],
        report["nll_after"],
    )
    return report


def reliability_bins(
    y_true: np.ndarray, proba: np.ndarray, n_bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Per confidence bin (the ECE's bins): mean confidence, accuracy and eye count."""
    y = np.asarray(y_true, dtype=np.int64)
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins).astype(np.float64)
    safe = np.maximum(count, 1.0)
    return {
        "confidence": np.bincount(bins, conf, minlength=n_bins) / safe,
        "accuracy": np.bincount(bins, correct, minlength=n_bins) / safe,
        "count": count,
    }


def plot_reliability(
    y_true: np.ndarray, logits: np.ndarray, temperature: float, title: str, path: Path
) -> None:
    """Reliability diagram: accuracy vs confidence per bin, before and after scaling."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect")
    for t, label in ((1.0, "before"), (temperature, f"after (T={temperature:.2f})")):
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
