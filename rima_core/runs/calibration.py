"""Temperature scaling: calibrated probabilities without changing a single prediction.

A network trained with cross-entropy is usually over-confident; a clinician reading "p = 0.95"
needs that to mean 95 %. Temperature scaling divides the logits by a scalar ``T`` fitted on the
validation split (minimum NLL) after training. ``argmax`` is unchanged, so accuracy, QWK and the
chosen weights are exactly what model selection picked; only the probabilities move.

One ``T`` per availability pattern (:data:`PATTERNS`: complete, fundus only, OCT only): a
complete eye is graded by a different predictor (the pooled paths, two real inputs) from an eye
with one modality (a translation stands in for the other), and the two are over-confident by
different amounts; one shared ``T`` left the default model at ECE 0.10 on complete eyes and 0.035
with the fundus missing. A pattern with too few validation eyes (:data:`MIN_TEMPERATURE_EYES`) or
a single class among them takes the ``T`` fitted on all eyes, which is also stored (``temperature``)
and is what older models carry alone.

The temperatures are saved in the model's spec (``ModelSpec.temperatures`` and
``ModelSpec.temperature``) and applied per eye by :func:`rima_core.runs.engine.predict`, so
evaluation and serving use them without knowing.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from rima_core.core.metrics import ECE_BINS, expected_calibration_error
from rima_core.core.models.common import Inputs, check_inputs
from rima_core.core.models.postprocess import PATTERNS

log = logging.getLogger(__name__)

# log T is searched in [log T_MIN, log T_MAX]: wide enough for any sane network, and bounded so a
# degenerate validation split (one class, perfectly separated) cannot push T to 0 or infinity.
T_MIN, T_MAX = 0.05, 20.0

# fewer validation eyes of a pattern than this: the pattern takes the temperature of all eyes
MIN_TEMPERATURE_EYES = 20

Temperature = float | np.ndarray  # one T for every row, or one per row


def availability(has_fundus: np.ndarray, has_oct: np.ndarray) -> np.ndarray:
    """Each eye's pattern in :data:`PATTERNS` (an eye with neither modality is refused earlier,
    by the model's input check)."""
    hf, ho = np.asarray(has_fundus, dtype=bool), np.asarray(has_oct, dtype=bool)
    return np.where(hf & ho, PATTERNS[0], np.where(hf, PATTERNS[1], PATTERNS[2]))


def row_temperatures(
    temperatures: dict[str, float], default: float, has_fundus: np.ndarray, has_oct: np.ndarray
) -> np.ndarray:
    """Each eye's temperature: its pattern's, or ``default`` for a pattern without one."""
    pattern = availability(has_fundus, has_oct)
    return np.array([float(temperatures.get(p, default)) for p in pattern], dtype=np.float64)


def _scaled(logits: np.ndarray, temperature: Temperature) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    z = z / (t[:, None] if t.ndim == 1 else t)
    return z - z.max(axis=1, keepdims=True)


def softmax(logits: np.ndarray, temperature: Temperature = 1.0) -> np.ndarray:
    """Row softmax of ``logits / temperature`` in float64 (stable: max subtracted); the
    temperature is a scalar or one per row."""
    e = np.exp(_scaled(logits, temperature))
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: Temperature = 1.0) -> float:
    """Mean negative log-likelihood of the labels under ``softmax(logits / T)``."""
    z = _scaled(logits, temperature)
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


def fit_temperatures(
    logits: np.ndarray, y_true: np.ndarray, has_fundus: np.ndarray, has_oct: np.ndarray
) -> tuple[float, dict[str, float]]:
    """The temperature of all eyes and one per availability pattern (module docstring): a
    pattern with fewer than :data:`MIN_TEMPERATURE_EYES` eyes or one class takes the former."""
    y = np.asarray(y_true, dtype=np.int64)
    overall = fit_temperature(logits, y)
    pattern = availability(has_fundus, has_oct)
    per: dict[str, float] = {}
    for p in PATTERNS:
        rows = pattern == p
        if rows.sum() >= MIN_TEMPERATURE_EYES and len(np.unique(y[rows])) >= 2:
            per[p] = fit_temperature(np.asarray(logits)[rows], y[rows])
        else:
            per[p] = overall
    return overall, per


def calibration_report(logits: np.ndarray, y_true: np.ndarray, temperature: Temperature) -> dict:
    """ECE and NLL before (T = 1) and after the fitted ``temperature`` (a scalar or one per
    row) on the same eyes; ``temperature`` in the report is the eyes' mean temperature."""
    y = np.asarray(y_true, dtype=np.int64)
    before, after = softmax(logits), softmax(logits, temperature)
    return {
        "temperature": float(np.mean(temperature)),
        "ece_before": expected_calibration_error(y, before),
        "ece_after": expected_calibration_error(y, after),
        "nll_before": nll(logits, y),
        "nll_after": nll(logits, y, temperature),
    }


def calibrate_model(
    model: Any, loaders: Any | dict[str, Any], device: Any, dtype: Any = None
) -> dict:
    """Fit the temperatures on one pass of ``model`` over the validation loader(s).

    ``loaders`` is one loader or ``{scenario: loader}`` (the selection scenarios), their eyes
    pooled (:func:`pooled_eyes`); a complete eye that a scenario shows with one modality hidden
    counts for that pattern, which is how the single-modality patterns get their eyes when
    validation is complete. Called where training ends, with the selected weights (and path
    weights) loaded; the caller stores ``report["temperature"]`` and ``report["temperatures"]``
    in the spec before saving.
    """
    from rima_core.runs.engine import predict

    parts = loaders.values() if isinstance(loaders, dict) else [loaders]
    preds = [predict(model, ld, device, dtype, desc="calibrate", temperature=1.0) for ld in parts]
    logits, y, hf, ho = pooled_eyes(preds)
    overall, per = fit_temperatures(logits, y, hf, ho)
    rows_t = row_temperatures(per, overall, hf, ho)
    report = calibration_report(logits, y, rows_t)
    report["temperature"] = overall
    report["temperatures"] = per
    pattern = availability(hf, ho)
    report["n_eyes"] = {p: int((pattern == p).sum()) for p in PATTERNS}
    log.info(
        "temperature scaling on %d validation eyes: T %s, NLL %.4f -> %.4f, ECE %.4f -> %.4f",
        len(y),
        ", ".join(f"{p}={t:.3f}" for p, t in per.items()),
        report["nll_before"],
        report["nll_after"],
        report["ece_before"],
        report["ece_after"],
    )
    return report


def pooled_eyes(preds: list[Any]) -> tuple[np.ndarray, ...]:
    """Logits, labels and availability of the eyes of ``preds`` (one per scenario), pooled: an
    eye shown in several scenarios counts in each, so the fit minimises the NLL summed over the
    selection scenarios, the quantity selection and evaluation report."""
    return tuple(
        np.concatenate([getattr(p, a) for p in preds])
        for a in ("logits", "y_true", "has_fundus", "has_oct")
    )


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


def path_alternatives(
    log_probs: np.ndarray, y_true: np.ndarray, paths: list[str]
) -> dict[str, float]:
    """Validation NLL of each path alone and of the two single paths pooled without the full
    path, each with its own fitted weight(s) (so a path is judged calibrated, not by its raw
    scale).

    Why: a full-path weight of 0 says only that the pooled single paths leave the full path
    nothing to add; these numbers say by how much, which the model card states beside the
    weights. Keys: ``paths`` (the model's, ``full`` first), and ``singles`` (every path but
    ``full``, pooled).
    """
    lp = np.asarray(log_probs, dtype=np.float64)
    subsets = {name: [i] for i, name in enumerate(paths)}
    subsets["singles"] = [i for i, name in enumerate(paths) if name != "full"]
    out: dict[str, float] = {}
    for name, rows in subsets.items():
        part = lp[rows]
        out[name] = pooled_nll(part, y_true, fit_path_weights(part, y_true, np.ones(len(rows))))
    return out


def calibrate_paths(
    model: Any,
    loaders: Any | dict[str, Any],
    device: Any,
    dtype: Any = None,
    quiet: bool = False,
    explain: bool = True,
) -> dict | None:
    """Fit a model's ``path_weights`` on the complete eyes of the validation loader(s).

    The models that pool paths are those with ``complete_eye_log_probs``
    (:class:`rima_core.core.models.common.PathPooling`): the RIMA family and the imputation
    baselines, whose complete eyes have the same three paths (full, fundus + a stand-in for the
    OCT, OCT + a stand-in for the fundus). ``None`` for a model without paths to pool. Eyes
    seen in several selection scenarios count once (by store row). Sets the weights on the model
    (they are a buffer, so ``model.pt`` keeps them) and returns what was fitted, on how many
    eyes, and the NLL before and after. Called where training ends, after model selection and
    before :func:`calibrate_model`, whose temperature then scales the pooled logits, and
    at every epoch's validation (``quiet``: logged at DEBUG; ``explain=False``: without the
    per-path NLLs the model card states, which only the shipped fit needs), so selection scores
    the pooled prediction.
    """
    import torch

    from rima_core.runs.engine import autocast, eval_mode, to_device

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
    say = log.debug if quiet else log.info
    if len(y) < MIN_PATH_EYES or len(np.unique(y)) < 2:
        say(
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
    if explain:  # what the model card states beside the weights (path_alternatives)
        report["nll_alternatives"] = path_alternatives(lp, y, paths)
    say(
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
