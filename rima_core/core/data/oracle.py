"""Bayes-optimal oracle for the synthetic phantom: the best grade any model could give.

The phantom (:mod:`rima_core.core.data.synthetic`) is deterministic from its seed, so the latent
views each modality rendered are known for every eye. Given the views of the modalities present for
an eye, the posterior over grades is

    P(g | views) ∝ prior_g * E_{latents ~ prior(. | g)} [ prod_views N(view; latent, std) ]

(prior: the class weights; the expectation over the grade-conditional latent prior). No model
trained on the images can beat a decision taken on this posterior; the images carry at most the
information in the views (the renderers add their own nuisance on top).

How it is computed (``method``):

* ``"exact"`` (the default). Views of one latent from several modalities combine to one Gaussian
  in that latent (product of Gaussians). Default phantom: the severity is uniform on the grade's
  interval ``[g/K, (g+1)/K)``, so the likelihood is a difference of normal CDFs (closed form).
  A regime (anatomy / private_latent): the score ``t = a_s s + a_u u`` is binned at the prior
  quantiles of ``t``, so the grade posterior is the probability that ``t`` falls in the grade's
  interval under the independent truncated-normal posteriors of ``s`` and ``u`` on [0, 1]: the
  CDF of ``s`` in closed form, ``u`` integrated on a fixed grid of :data:`GRID` midpoints
  (deterministic; error far below the Monte-Carlo noise of the check below).
* ``"mc"``: the generic estimator, for a check (tests/unit/test_oracle.py: it agrees with both): a
  fixed-seed sample of ``mc_draws`` latents per grade from the grade-conditional prior (the
  generator's own sampler), likelihoods averaged in log space (log-sum-exp), in chunks of eyes.

The focus angle (anatomy=shared) is independent of the grade, so its views do not enter.

Two decodings of a posterior row ``P``:

* :func:`decode_argmax`: ``argmax_k P_k``, the grade of highest posterior (maximises the expected
  accuracy);
* :func:`decode_quadratic`: ``argmin_k sum_j P_j (k - j)^2``, the grade of least expected
  quadratic cost (the usual Bayes decision for quadratic weighted kappa; QWK is a ratio, so no
  per-eye rule maximises it exactly, and either decoding can be the higher on a finite set).

:func:`ceiling` is the population Bayes QWK of each availability (fundus only, OCT only, both): eyes
simulated from the generator's latent model (no images rendered), each decoded from its posterior.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import special

from rima_core.config import SynthConfig
from rima_core.core.data.synthetic import (
    FOCUS_MAX_R,
    _check,
    _plan,
    class_prior,
    draw_latents,
    draw_views,
    grade_score,
    score_edges,
    view_noise,
)
from rima_core.core.metrics import _kappa, confusion_matrix

GRID = 128  # midpoints on [0, 1] for the non-severity latent (method "exact")
AVAILABILITY = {"fundus": (True, False), "oct": (False, True), "both": (True, True)}
_CASE_ID = re.compile(r"data_(\d{5,})")
_CHUNK = 2048  # eyes per vectorised block


def plan_index(case_id: str) -> int:
    """Row of eye ``case_id`` in the phantom's plan: ``data_00001`` -> 0 (the npz stem of eye
    ``i`` is ``data_{i+1:05d}``). Anything else is a ValueError naming it."""
    m = _CASE_ID.fullmatch(str(case_id))
    if not m or int(m.group(1)) < 1:
        raise ValueError(
            f"case_id {case_id!r} is not a synthetic phantom eye (expected data_NNNNN, from 1)"
        )
    return int(m.group(1)) - 1


# --- numerics ----------------------------------------------------------------------------------


def _log_mass(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``log(Phi(hi) - Phi(lo))`` for standardised bounds ``lo <= hi``, accurate in both tails
    (reflected where the interval lies above 0). ``-inf`` for an empty interval."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, float), np.asarray(hi, float))
    upper = lo > 0
    a = np.where(upper, -hi, lo)  # Phi(hi) - Phi(lo) == Phi(-lo) - Phi(-hi)
    b = np.where(upper, -lo, hi)
    log_b, log_a = special.log_ndtr(b), special.log_ndtr(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = log_b + np.log1p(-np.exp(log_a - log_b))
    return np.where(b > a, out, -np.inf)


def _combine(views: list[tuple[np.ndarray, float]], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the product of the Gaussians ``N(latent; view, std)`` (per eye); views
    that are NaN (modality absent) are left out. No view at all: std = inf."""
    precision = np.zeros(n)
    weighted = np.zeros(n)
    for value, std in views:
        present = np.isfinite(value)
        precision += np.where(present, 1.0 / std**2, 0.0)
        weighted += np.where(present, np.nan_to_num(value) / std**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(precision > 0, weighted / precision, 0.5)
        std = np.where(precision > 0, 1.0 / np.sqrt(precision), np.inf)
    return mean, std


def _unit_views(
    cfg: SynthConfig, views: dict[str, dict[str, np.ndarray]], present: dict[str, np.ndarray]
) -> dict[str, list[tuple[np.ndarray, float]]]:
    """Every modality's view of each graded unit latent (severity, centrality, private), NaN
    where the modality is absent."""
    noise = view_noise(cfg)
    out: dict[str, list[tuple[np.ndarray, float]]] = {}
    for modality, seen in views.items():
        mask = present[modality]
        for name, value in seen.items():
            std = noise[modality][name]
            if name == "angle":
                continue  # independent of the grade
            if name == "eccentricity":  # centrality = 1 - r / R
                name, value, std = (
                    "centrality",
                    1.0 - np.asarray(value) / FOCUS_MAX_R,
                    std / FOCUS_MAX_R,
                )
            out.setdefault(name, []).append((np.where(mask, value, np.nan), std))
    return out


def _normalise(log_p: np.ndarray) -> np.ndarray:
    return np.exp(log_p - special.logsumexp(log_p, axis=1, keepdims=True))


def _exact(cfg: SynthConfig, unit: dict[str, list[tuple[np.ndarray, float]]], n: int) -> np.ndarray:
    k = cfg.n_classes
    prior = class_prior(cfg)
    edges = score_edges(cfg)
    m_s, sd_s = _combine(unit["severity"], n)
    spec = grade_score(cfg)
    if spec is None:  # s | g ~ U[g/K, (g+1)/K): prior_g * K * P(s in the interval)
        z = (edges[None, :] - m_s[:, None]) / sd_s[:, None]
        with np.errstate(divide="ignore"):
            log_p = np.log(prior)[None, :] + _log_mass(z[:, :-1], z[:, 1:])
        return _normalise(log_p)
    (_, a_s), (other, a_u) = spec
    m_u, sd_u = _combine(unit[other], n)
    u = (np.arange(GRID) + 0.5) / GRID
    out = np.empty((n, k))
    log_all_s = _log_mass(-m_s / sd_s, (1.0 - m_s) / sd_s)  # the s posterior's mass on [0, 1]
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        log_w = -0.5 * ((u[None, :] - m_u[sl, None]) / sd_u[sl, None]) ** 2
        w = _normalise(log_w)  # the u posterior on the grid (uniform prior on [0, 1])
        cdf = np.empty((sl.stop - sl.start, k + 1))
        cdf[:, 0], cdf[:, k] = 0.0, 1.0
        for j in range(1, k):  # P(t < edge_j) = E_u[ F_s((edge_j - a_u u) / a_s) ]
            x = np.clip((edges[j] - a_u * u[None, :]) / a_s, 0.0, 1.0)
            lo = (-m_s[sl] / sd_s[sl])[:, None]
            log_f = _log_mass(lo, (x - m_s[sl, None]) / sd_s[sl, None]) - log_all_s[sl, None]
            cdf[:, j] = (w * np.exp(log_f)).sum(axis=1)
        p = np.clip(np.diff(cdf, axis=1), 0.0, None)
        out[sl] = p / p.sum(axis=1, keepdims=True)
    return out


def _mc(
    cfg: SynthConfig, unit: dict[str, list[tuple[np.ndarray, float]]], n: int, draws: int, seed: int
) -> np.ndarray:
    k = cfg.n_classes
    prior = class_prior(cfg)
    combined = {name: _combine(v, n) for name, v in unit.items()}
    log_lik = np.full((n, k), -np.inf)
    for g in range(k):
        if prior[g] <= 0:
            continue
        rng = np.random.default_rng([seed, 11, g])
        latents = draw_latents(cfg, np.full(draws, g), rng)
        sample = {"severity": latents["severity"]}
        if "eccentricity" in latents:
            sample["centrality"] = 1.0 - latents["eccentricity"] / FOCUS_MAX_R
        if "private" in latents:
            sample["private"] = latents["private"]
        for start in range(0, n, 256):
            sl = slice(start, min(start + 256, n))
            acc = np.zeros((sl.stop - sl.start, draws))
            for name, (mean, std) in combined.items():
                finite = np.isfinite(std[sl])[:, None]
                term = ((sample[name][None, :] - mean[sl, None]) / std[sl, None]) ** 2
                acc -= 0.5 * np.where(finite, term, 0.0)
            log_lik[sl, g] = special.logsumexp(acc, axis=1) - np.log(draws)
    with np.errstate(divide="ignore"):
        return _normalise(np.log(prior)[None, :] + log_lik)


def posterior_from_views(
    cfg: SynthConfig,
    views: dict[str, dict[str, np.ndarray]],
    has_fundus: Sequence[bool] | np.ndarray,
    has_oct: Sequence[bool] | np.ndarray,
    *,
    method: str = "exact",
    mc_draws: int = 20_000,
    mc_seed: int = 0,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """The grade posterior (n, K) of eyes with latent views ``views[modality][latent]`` (as in
    the plan), given which modalities each eye has. ``names`` label eyes in errors."""
    if method not in ("exact", "mc"):
        raise ValueError(f"method must be 'exact' or 'mc', got {method!r}")
    present = {"fundus": np.asarray(has_fundus, bool), "oct": np.asarray(has_oct, bool)}
    n = len(present["fundus"])
    if len(present["oct"]) != n or any(len(v) != n for s in views.values() for v in s.values()):
        raise ValueError("views, has_fundus and has_oct must describe the same eyes")
    neither = np.flatnonzero(~present["fundus"] & ~present["oct"])
    if len(neither):
        who = [names[i] for i in neither[:5]] if names is not None else neither[:5].tolist()
        raise ValueError(f"eyes with neither modality have no posterior: {who}")
    unit = _unit_views(cfg, views, present)
    if method == "mc":
        return _mc(cfg, unit, n, mc_draws, mc_seed)
    return _exact(cfg, unit, n)


def posterior(
    cfg: SynthConfig,
    case_ids: Sequence[str],
    has_fundus: Sequence[bool] | np.ndarray,
    has_oct: Sequence[bool] | np.ndarray,
    *,
    method: str = "exact",
    mc_draws: int = 20_000,
    mc_seed: int = 0,
) -> np.ndarray:
    """Bayes posterior (n, K) over grades of the phantom's eyes ``case_ids`` (npz stems, as in a
    prepared store's manifest), from the views of the modalities each has (``has_*``: e.g. a
    missing-modality scenario's masks). Rows sum to 1. An eye with neither modality, or a
    case_id that is not an eye of this phantom, is a ValueError naming it."""
    _check(cfg)
    ids = [str(c) for c in case_ids]
    idx = np.asarray([plan_index(c) for c in ids], dtype=np.int64)
    outside = [c for c, i in zip(ids, idx, strict=True) if i >= cfg.n_eyes]
    if outside:
        raise ValueError(f"case_ids beyond this phantom's synth.n_eyes={cfg.n_eyes}: {outside[:5]}")
    plan = _plan(cfg)
    views = {m: {name: v[idx] for name, v in seen.items()} for m, seen in plan.views.items()}
    return posterior_from_views(
        cfg,
        views,
        has_fundus,
        has_oct,
        method=method,
        mc_draws=mc_draws,
        mc_seed=mc_seed,
        names=ids,
    )


def decode_argmax(p: np.ndarray) -> np.ndarray:
    """The grade of highest posterior probability (Bayes decision for accuracy)."""
    return np.asarray(p).argmax(axis=1)


def decode_quadratic(p: np.ndarray) -> np.ndarray:
    """The grade ``k`` minimising the expected quadratic cost ``sum_j P_j (k - j)^2``."""
    p = np.asarray(p)
    grades = np.arange(p.shape[1])
    cost = p @ ((grades[:, None] - grades[None, :]) ** 2).astype(float)  # [n, k]
    return cost.argmin(axis=1)


def qwk(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Quadratic weighted kappa (rima_core.core.metrics' definition)."""
    y_true, y_pred = np.asarray(y_true).astype(np.int64), np.asarray(y_pred).astype(np.int64)
    return _kappa(confusion_matrix(y_true, y_pred, n_classes), "quadratic")


def simulate(
    cfg: SynthConfig, n: int, seed: int = 0
) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]]]:
    """``n`` eyes from the generator's latent model (grades i.i.d. from the class weights, latents
    from the grade-conditional prior, each modality's views): ``(grades, views)``. No images."""
    rng = np.random.default_rng([seed, 7])
    grade = rng.choice(cfg.n_classes, size=n, p=class_prior(cfg))
    latents = draw_latents(cfg, grade, rng)
    return grade, draw_views(cfg, latents, rng)


def ceiling(cfg: SynthConfig, n_draws: int = 200_000, seed: int = 0) -> dict[str, Any]:
    """Population Bayes ceiling: QWK and accuracy of both decodings for each availability.

    Returns ``{"qwk": {avail: {"argmax": x, "quadratic": y}}, "accuracy": {...}, "n_draws",
    "seed"}`` with avail in fundus / oct / both (the eye has only that modality, or both)."""
    _check(cfg)
    grade, views = simulate(cfg, n_draws, seed)
    k = cfg.n_classes
    out: dict[str, Any] = {"qwk": {}, "accuracy": {}, "n_draws": n_draws, "seed": seed}
    for avail, (has_f, has_o) in AVAILABILITY.items():
        p = posterior_from_views(cfg, views, np.full(n_draws, has_f), np.full(n_draws, has_o))
        decoded = {"argmax": decode_argmax(p), "quadratic": decode_quadratic(p)}
        out["qwk"][avail] = {d: qwk(grade, pred, k) for d, pred in decoded.items()}
        out["accuracy"][avail] = {d: float(np.mean(pred == grade)) for d, pred in decoded.items()}
    return out
