"""The synthetic phantom's plan: every per-eye decision and latent, drawn once from the seed.

Split from :mod:`rima_core.core.data.synthetic` (which writes the phantom and re-exports these
names) so the latent model -- what the grade depends on, what each modality sees of it, how eyes
are split and which modality each lacks -- reads apart from the pixel renderers. The oracle
(:mod:`rima_core.core.data.oracle`) samples from the same functions, so its Bayes ceiling is the
generator's own model, not a copy of it.

Reproducibility: the default stream ``[seed, 0]`` draws grades, severity noise, splits, masks,
attributes, sites and eye sides in that order; the regimes draw from ``[seed, 3]``, so with them
off not one default draw changes.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
from scipy import optimize

from rima_core.config import SynthConfig
from rima_core.core.data.synthetic_fundus import SHIFT_SITES, SITES

# Std of each modality's independent view of the severity (severity spans [0, 1), one grade
# spans 1/K). Chosen so that on the default 3-grade phantom each modality alone is clearly
# informative yet clearly worse than both (see tests/unit/test_synthetic.py).
MODALITY_NOISE = 0.12
SIGNAL_KEYS = ("fundus_signal", "oct_signal")  # SynthConfig keys scaling MODALITY_NOISE
# Regime keys and their allowed values; the first value is the default ("off": left out of
# SYNTHETIC.json, so the default phantom's bytes are those written before the keys existed).
REGIMES: dict[str, tuple[str, ...]] = {
    "anatomy": ("none", "shared"),
    "private_latent": ("none", "oct", "fundus"),
    "site_shift": ("none", "fundus", "oct"),
}
# The grade's score t = sum of weight * unit latent (each uniform on [0, 1) under the prior).
# "centrality" is 1 - r / FOCUS_MAX_R (r: the focus's eccentricity); "private" is phi.
GRADE_SCORES: dict[str, tuple[tuple[str, float], ...]] = {
    "anatomy": (("severity", 0.65), ("centrality", 0.35)),
    "private_latent": (("severity", 0.6), ("private", 0.4)),
}
FOCUS_MAX_R = 0.7  # largest eccentricity of the lesion focus (fundus units: field radius ~0.94)
LOCATION_NOISE = 0.04  # std of each modality's view of the eccentricity r
ANGLE_NOISE = 0.1  # std (radians) of each modality's view of the focus angle
PRIVATE_NOISE = {"clear": 0.05, "faint": 0.5}  # view std of phi: the named modality / the other


@dataclasses.dataclass
class _Plan:
    """Every per-eye decision of the phantom, one array entry per eye (eye i: index i)."""

    grade: np.ndarray
    severity: np.ndarray
    sev_fundus: np.ndarray
    sev_oct: np.ndarray
    split: np.ndarray  # str: train/val/test
    has_fundus: np.ndarray
    has_oct: np.ndarray
    site: np.ndarray
    right_eye: np.ndarray
    attrs: dict[str, np.ndarray]
    # every latent (severity; eccentricity + angle with anatomy=shared; private with
    # private_latent) and each modality's view of each: views[modality][latent]
    latents: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    views: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    oct_device: np.ndarray | None = None  # site_shift=oct: 1 for the test split's volumes


def modality_noise(cfg: SynthConfig, modality: str) -> float:
    """Std of ``modality``'s independent view of the severity: ``MODALITY_NOISE / signal``.

    With signal 1.0 this is exactly ``MODALITY_NOISE`` (x / 1.0 == x in floating point), and
    ``rng.normal(0, s)`` draws ``s * standard_normal``, so the default phantom is unchanged.
    """
    if modality not in ("fundus", "oct"):
        raise ValueError(f"modality must be 'fundus' or 'oct', got {modality!r}")
    return MODALITY_NOISE / float(getattr(cfg, f"{modality}_signal"))


# --- latent model: what the grade depends on, and what each modality sees of it -----------------


def class_prior(cfg: SynthConfig) -> np.ndarray:
    """The grades' prior probabilities: ``class_weights`` normalised (None: uniform)."""
    k = cfg.n_classes
    w = np.ones(k) if cfg.class_weights is None else np.asarray(cfg.class_weights, float)
    return w / w.sum()


def grade_score(cfg: SynthConfig) -> tuple[tuple[str, float], ...] | None:
    """``((unit latent, weight), ...)`` of the grade's score, or None for the default phantom
    (grade = floor(s K), equal-width severity bins whatever the class weights)."""
    if cfg.anatomy != "none":
        return GRADE_SCORES["anatomy"]
    if cfg.private_latent != "none":
        return GRADE_SCORES["private_latent"]
    return None


def _uniform_sum_cdf(t: float, weights: tuple[float, ...]) -> float:
    """P(sum w_i U_i <= t) for independent U_i ~ U[0, 1) (inclusion-exclusion, exact)."""
    n = len(weights)
    total = 0.0
    for chosen in itertools.product((0, 1), repeat=n):
        shift = sum(w for w, c in zip(weights, chosen, strict=True) if c)
        total += (-1) ** sum(chosen) * max(t - shift, 0.0) ** n
    return total / (math.factorial(n) * math.prod(weights))


def score_edges(cfg: SynthConfig) -> np.ndarray:
    """The K+1 edges of the grades' intervals of the score (default: of the severity, i/K).

    With a regime on, edge k is the prior quantile of the score at the cumulative class weight,
    so the prior mass of grade k's interval is exactly its class weight."""
    k = cfg.n_classes
    spec = grade_score(cfg)
    if spec is None:
        return np.arange(k + 1) / k
    weights = tuple(w for _, w in spec)
    top = float(sum(weights))
    cum = np.cumsum(class_prior(cfg))
    edges = [0.0]
    for q in cum[:-1]:
        if q <= 0.0:
            edges.append(0.0)
        elif q >= 1.0:
            edges.append(top)
        else:
            edges.append(
                optimize.brentq(
                    lambda t, q=q: _uniform_sum_cdf(t, weights) - q, 0.0, top, xtol=1e-13
                )
            )
    edges.append(top)
    return np.asarray(edges)


def draw_latents(
    cfg: SynthConfig, grade: np.ndarray, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Every latent of eyes with grades ``grade``, drawn from the prior given the grade.

    Default phantom: ``severity = (grade + U) / K``. A regime: the unit latents by rejection from
    the uniform prior restricted to the grade's score interval (grade by grade, in eye order),
    then the focus angle (anatomy), all from ``rng``."""
    grade = np.asarray(grade)
    n, k = len(grade), cfg.n_classes
    spec = grade_score(cfg)
    if spec is None:
        return {"severity": (grade + rng.uniform(0.0, 1.0, n)) / k}
    names = [name for name, _ in spec]
    a = np.asarray([w for _, w in spec])
    edges = score_edges(cfg)
    prior = class_prior(cfg)
    unit = np.empty((n, len(names)))
    for g in range(k):
        idx = np.flatnonzero(grade == g)
        if not len(idx):
            continue
        if prior[g] <= 0:
            raise ValueError(f"grade {g} has class weight 0 but {len(idx)} eyes")
        lo, hi = edges[g], edges[g + 1]
        parts, need = [], len(idx)
        while need > 0:
            batch = rng.uniform(0.0, 1.0, (min(int(1.3 * need / prior[g]) + 64, 1 << 20), len(a)))
            t = batch @ a
            keep = batch[(t >= lo) & ((t < hi) if g < k - 1 else (t <= hi))][:need]
            parts.append(keep)
            need -= len(keep)
        unit[idx] = np.concatenate(parts)
    latents = {"severity": unit[:, 0]}
    if "centrality" in names:
        latents["eccentricity"] = FOCUS_MAX_R * (1.0 - unit[:, names.index("centrality")])
        latents["angle"] = rng.uniform(0.0, 2.0 * np.pi, n)
    if "private" in names:
        latents["private"] = unit[:, names.index("private")]
    return latents


def view_noise(cfg: SynthConfig) -> dict[str, dict[str, float]]:
    """Std of each modality's view of each latent: ``{modality: {latent: std}}``."""
    out: dict[str, dict[str, float]] = {}
    for modality in ("fundus", "oct"):
        std = {"severity": modality_noise(cfg, modality)}
        if cfg.anatomy == "shared":
            std["eccentricity"] = LOCATION_NOISE
            std["angle"] = ANGLE_NOISE
        if cfg.private_latent != "none":
            clear = cfg.private_latent == modality
            std["private"] = PRIVATE_NOISE["clear" if clear else "faint"]
        out[modality] = std
    return out


def draw_views(
    cfg: SynthConfig,
    latents: dict[str, np.ndarray],
    rng: np.random.Generator,
    skip: tuple[str, ...] = (),
) -> dict[str, dict[str, np.ndarray]]:
    """Each modality's independent noisy view of each latent (``skip``: latents not drawn here).
    Order: modality by modality (fundus, oct), latent by latent in :func:`view_noise` order."""
    views: dict[str, dict[str, np.ndarray]] = {}
    for modality, stds in view_noise(cfg).items():
        views[modality] = {
            name: latents[name] + rng.normal(0.0, std, len(latents[name]))
            for name, std in stds.items()
            if name not in skip
        }
    return views


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts proportional to ``weights`` that sum to ``total`` (largest remainder)."""
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


def _stratified_counts(class_counts: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Eyes per (class, split): every class split by ``fractions`` AND split totals exact.

    Per-class rounding alone lets the totals drift (three classes each rounding the same way);
    so the floors are topped up one eye at a time, largest remainder first, within what each
    class still has and what each split still needs.
    """
    exact = class_counts[:, None] * fractions[None, :] / fractions.sum()
    counts = np.floor(exact).astype(int)
    need_col = _apportion(int(class_counts.sum()), fractions) - counts.sum(axis=0)
    need_row = class_counts - counts.sum(axis=1)
    remainder = exact - counts
    while need_row.sum() > 0:
        open_cells = (need_row[:, None] > 0) & (need_col[None, :] > 0)
        g, s = np.unravel_index(np.argmax(np.where(open_cells, remainder, -np.inf)), exact.shape)
        counts[g, s] += 1
        need_row[g] -= 1
        need_col[s] -= 1
        remainder[g, s] -= 1.0
    return counts


def _plan(cfg: SynthConfig) -> _Plan:
    """Draw the plan of ``cfg``'s phantom: grades, latents and views, splits, masks, attributes."""
    n, k = cfg.n_eyes, cfg.n_classes
    rng = np.random.default_rng([cfg.seed, 0])
    weights = np.ones(k) if cfg.class_weights is None else np.asarray(cfg.class_weights, float)
    grade = rng.permutation(np.repeat(np.arange(k), _apportion(n, weights)))
    # the default stream's draws are the same in every regime (so are splits, masks, attributes)
    unit_u = rng.uniform(0.0, 1.0, n)
    noise_f = rng.normal(0.0, modality_noise(cfg, "fundus"), n)
    noise_o = rng.normal(0.0, modality_noise(cfg, "oct"), n)
    if grade_score(cfg) is None:
        latents = {"severity": (grade + unit_u) / k}
        views: dict[str, dict[str, np.ndarray]] = {"fundus": {}, "oct": {}}
    else:  # a separate stream: with the regimes off, not one draw above changes
        rng_latent = np.random.default_rng([cfg.seed, 3])
        latents = draw_latents(cfg, grade, rng_latent)
        views = draw_views(cfg, latents, rng_latent, skip=("severity",))
    severity = latents["severity"]
    sev_fundus = severity + noise_f
    sev_oct = severity + noise_o
    views = {
        "fundus": {"severity": sev_fundus, **views["fundus"]},
        "oct": {"severity": sev_oct, **views["oct"]},
    }

    split = np.empty(n, dtype=object)
    counts = _stratified_counts(np.bincount(grade, minlength=k), np.asarray(cfg.split_fractions))
    for g in range(k):
        idx = rng.permutation(np.flatnonzero(grade == g))
        bounds = np.cumsum(counts[g])
        for name, part in zip(("train", "val", "test"), np.split(idx, bounds[:-1]), strict=True):
            split[part] = name

    order = rng.permutation(n)
    n_mf = round(cfg.missing_fundus_fraction * n)
    n_mo = min(round(cfg.missing_oct_fraction * n), n - n_mf)
    has_fundus = np.ones(n, bool)
    has_oct = np.ones(n, bool)
    has_fundus[order[:n_mf]] = False
    has_oct[order[n_mf : n_mf + n_mo]] = False

    attrs = {
        "race": rng.choice(3, n, p=[0.12, 0.15, 0.73]),
        "male": rng.integers(0, 2, n),
        "hispanic": (rng.uniform(size=n) < 0.08).astype(int),
        "maritalstatus": rng.choice(np.arange(-1, 5), n, p=[0.05, 0.5, 0.2, 0.12, 0.1, 0.03]),
        "language": rng.choice(3, n, p=[0.85, 0.1, 0.05]),
        "age": np.round(np.clip(rng.normal(62.0, 12.0, n), 20.0, 95.0), 1),
    }
    site = rng.integers(0, len(SITES), n)
    right_eye = rng.integers(0, 2, n).astype(bool)
    test = split == "test"
    if cfg.site_shift == "fundus":  # test eyes at the unseen sites 4 and 5
        site = np.where(test, len(SITES) + site % len(SHIFT_SITES), site)
    return _Plan(
        grade=grade,
        severity=severity,
        sev_fundus=sev_fundus,
        sev_oct=sev_oct,
        split=split,
        has_fundus=has_fundus,
        has_oct=has_oct,
        site=site,
        right_eye=right_eye,
        attrs=attrs,
        latents=latents,
        views=views,
        oct_device=test.astype(np.int64) if cfg.site_shift == "oct" else None,
    )


def focus_xy(r: np.ndarray | float, angle: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Fundus (x, y) of a focus at eccentricity ``r`` (clipped to [0, 0.9]) and ``angle`` from
    the fovea at (0, 0); the same numbers are the OCT's (column w, B-scan d)."""
    r = np.clip(r, 0.0, 0.9)
    return r * np.cos(angle), r * np.sin(angle)
