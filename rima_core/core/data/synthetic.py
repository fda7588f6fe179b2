"""Synthetic retina phantom: the embedded default dataset, written in the FairVision npz layout.

Why a phantom and not noise: the pipeline's claims (each modality alone is informative, both
together are better, a missing modality can be stood in for) can only be checked end to end on
data that has those properties by construction. Each eye has a latent disease severity
``s`` in [0, 1); its grade is ``floor(s * K)``. Each modality renders its OWN noisy view of the
severity (``s + N(0, MODALITY_NOISE)``, independently drawn), so either modality alone predicts
the grade, and the two together predict it better because their noises average out.
``synth.fundus_signal`` / ``synth.oct_signal`` set each modality's signal strength: its noise
std is ``MODALITY_NOISE / signal``, so a phantom where the fundus is the stronger modality (the
default one lets the OCT dominate) is one setting away.

* Fundus (H×W×3): optic disc whose cup-to-disc ratio grows with severity, lesion spots
  (exudates, haemorrhages) whose count and size grow with severity, fixed-pattern vessels,
  rendered in one of several "site styles" (illumination gradient, colour cast, blur,
  contrast, gamma) so a model has to ignore acquisition differences.
* OCT (D×H×W, B-scans first, depth down each B-scan): layered retina whose thickness grows with
  severity, plus LOCALISED lesions (fluid pockets, drusen under the RPE) spanning a few B-scans,
  under multiplicative speckle.

Regimes (``synth.*`` keys, all off by default) give the phantom properties real eyes have. Each
stands for a clinical property, not for a method: none is shaped to favour RIMA, a baseline or
either modality, and each one's Bayes ceiling (the best any model could do from the generator's
latent views) is computed by :mod:`rima_core.core.data.oracle`.

* ``synth.anatomy: shared`` -- *where* the disease sits matters, and both modalities see where.
  Each eye has a lesion focus at eccentricity ``r`` in [0, 0.7] from the fovea (uniform) and an
  angle; the grade is the bin of the score ``t = 0.65 s + 0.35 (1 - r / 0.7)`` (centre-involving
  disease is worse, as for centre-involving macular oedema or foveal geographic atrophy). The
  fundus clusters its lesions (drusen) around the focus, the OCT raises its drusen (RPE
  elevations) at the same place: fundus (x, y) <-> OCT (column w, B-scan d). Each modality sees
  ``r`` and the angle with its own small noise, so they agree on the location.
* ``synth.private_latent: oct | fundus`` -- a graded finding that one modality sees much better
  (subretinal / intraretinal fluid is plain on OCT and barely visible on a colour photo). A
  latent ``phi`` in [0, 1) (uniform) enters the score ``t = 0.6 s + 0.4 phi``; the named modality
  sees it with small noise, the other with large noise. The OCT renders it as fluid pockets whose
  number and size follow its view of ``phi``; the fundus as a macular sheen whose strength does.
* ``synth.site_shift: fundus | oct`` -- the test eyes are imaged by other devices than the
  training and validation eyes (a new clinic). ``fundus``: test eyes are photographed by cameras
  no training eye saw (:data:`SHIFT_SITES`, recorded as sites 4 and 5); ``oct``: test volumes
  come from another device (grainier speckle, blur along the A-scan, another gain and contrast
  curve; recorded as ``oct_device`` = 1 in their npz). Training and validation eyes are byte for
  byte those of the unshifted phantom; the latent views, and so the oracle, are unchanged.
* Imbalanced grades (AMD-like: ``synth.n_classes=4, synth.class_weights=[0.45,0.3,0.15,0.1]``)
  need no key and combine with every regime.

With ``anatomy`` or ``private_latent`` on, grades keep their apportioned counts: the latents are
drawn conditional on the grade (rejection sampling from the latent prior restricted to the
grade's score interval), with the score thresholds at the prior quantiles of ``t`` given the
class weights, so this is exactly the model "latents from the prior, grade = bin of t". The
default phantom (every regime key off) is drawn as before: ``s = (grade + U) / K``.

Output is byte-identical for the same seed, generator version and numpy build: every eye draws
from its own seeded stream, npz archives are written member by member with a fixed timestamp,
sorted keys and no compression (zlib builds differ), and no wall clock is recorded anywhere.
The regimes draw their latents from a separate stream, so with them off not one draw changes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, optimize

from rima_core.atomic import atomic_dir
from rima_core.config import ConfigError, SynthConfig
from rima_core.progress import progress as tqdm

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
DISEASE_FOLDER = "Synthetic"
SPLIT_FOLDERS = {"train": "Training", "val": "Validation", "test": "Test"}
SPLIT_USE = {"train": "training", "val": "validation", "test": "test"}
# Std of each modality's independent view of the severity (severity spans [0, 1), one grade
# spans 1/K). Chosen so that on the default 3-grade phantom each modality alone is clearly
# informative yet clearly worse than both (see tests/test_synthetic.py).
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
FOCUS_MIN_LESIONS = 3  # anatomy=shared: drusen that mark the focus in every fundus
FLUID_MAX_POCKETS = 6  # private_latent: OCT fluid pockets at phi = 1
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)

# Acquisition "sites": colour cast (RGB gain), illumination gradient strength, blur sigma in
# pixels at 64 px, contrast, gamma, brightness. Every eye is imaged at one site (+ jitter).
SITES: tuple[dict[str, Any], ...] = (
    {
        "cast": (1.00, 1.00, 1.00),
        "grad": 0.10,
        "blur": 0.0,
        "contrast": 1.00,
        "gamma": 1.00,
        "bright": 1.00,
    },
    {
        "cast": (1.10, 0.93, 0.80),
        "grad": 0.35,
        "blur": 0.8,
        "contrast": 0.85,
        "gamma": 1.25,
        "bright": 0.92,
    },
    {
        "cast": (0.88, 1.06, 1.15),
        "grad": 0.25,
        "blur": 0.3,
        "contrast": 1.20,
        "gamma": 0.85,
        "bright": 1.05,
    },
    {
        "cast": (1.00, 0.88, 1.02),
        "grad": 0.45,
        "blur": 1.3,
        "contrast": 0.75,
        "gamma": 1.40,
        "bright": 0.82,
    },
)
# site_shift=fundus: the test split's cameras, styles no training eye has (a washed-out,
# blue-green, vignetted handheld camera; a dark, contrasty, saturated one). Sites 4 and 5.
SHIFT_SITES: tuple[dict[str, Any], ...] = (
    {
        "cast": (0.85, 1.12, 1.08),
        "grad": 0.55,
        "blur": 1.8,
        "contrast": 0.65,
        "gamma": 0.75,
        "bright": 1.12,
    },
    {
        "cast": (1.20, 0.85, 0.70),
        "grad": 0.60,
        "blur": 0.0,
        "contrast": 1.45,
        "gamma": 1.60,
        "bright": 0.75,
    },
)
_RACES = ("asian", "black", "white")
_MARITAL = (
    "unknown",
    "married",
    "single",
    "divorced",
    "widowed",
    "legally separated",
)  # codes -1..4
_LANGUAGES = ("english", "spanish", "other")


def class_names_for(n_classes: int) -> list[str]:
    """normal/early/advanced for the 3-grade default; ``grade_k`` otherwise."""
    if n_classes == 3:
        return ["normal", "early", "advanced"]
    return [f"grade_{k}" for k in range(n_classes)]


# --- plan: every per-eye decision, drawn once from the seed -----------------------------------


@dataclasses.dataclass
class _Plan:
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


def _check(cfg: SynthConfig) -> None:
    if cfg.n_eyes < 1:
        raise ConfigError(f"synth.n_eyes must be >= 1, got {cfg.n_eyes}")
    if cfg.n_classes < 2:
        raise ConfigError(f"synth.n_classes must be >= 2, got {cfg.n_classes}")
    if cfg.class_weights is not None and (
        len(cfg.class_weights) != cfg.n_classes
        or min(cfg.class_weights) < 0
        or sum(cfg.class_weights) <= 0
    ):
        raise ConfigError(
            f"synth.class_weights must be {cfg.n_classes} non-negative numbers with a positive "
            f"sum, got {cfg.class_weights}"
        )
    if cfg.fundus_size < 16:
        raise ConfigError(f"synth.fundus_size must be >= 16, got {cfg.fundus_size}")
    if len(cfg.oct_shape) != 3 or min(cfg.oct_shape) < 8:
        raise ConfigError(f"synth.oct_shape must be 3 sizes >= 8 (D, H, W), got {cfg.oct_shape}")
    fr = cfg.split_fractions
    if len(fr) != 3 or min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError(
            f"synth.split_fractions must be 3 non-negative numbers summing to 1, got {fr}"
        )
    for key in SIGNAL_KEYS:
        value = getattr(cfg, key)
        if not (np.isfinite(value) and value > 0):
            raise ConfigError(f"synth.{key} must be a positive number, got {value}")
    for key, allowed in REGIMES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(
                f"synth.{key} must be one of {list(allowed)}, got {getattr(cfg, key)!r}"
            )
    if cfg.anatomy != "none" and cfg.private_latent != "none":
        raise ConfigError(
            "synth.anatomy and synth.private_latent cannot both be on (one at a time)"
        )
    mf, mo = cfg.missing_fundus_fraction, cfg.missing_oct_fraction
    if not (0 <= mf <= 1 and 0 <= mo <= 1 and mf + mo <= 1):
        raise ConfigError(
            f"synth.missing_fundus_fraction + missing_oct_fraction must lie in [0, 1] "
            f"(an eye never lacks both), got {mf} + {mo}"
        )


def modality_noise(cfg: SynthConfig, modality: str) -> float:
    """Std of ``modality``'s independent view of the severity: ``MODALITY_NOISE / signal``.

    With signal 1.0 this is exactly ``MODALITY_NOISE`` (x / 1.0 == x in floating point), and
    ``rng.normal(0, s)`` draws ``s * standard_normal``, so the default phantom is unchanged.
    """
    if modality not in ("fundus", "oct"):
        raise ValueError(f"modality must be 'fundus' or 'oct', got {modality!r}")
    return MODALITY_NOISE / float(getattr(cfg, f"{modality}_signal"))


def _meta_config(cfg: SynthConfig) -> dict[str, Any]:
    """The config recorded in SYNTHETIC.json. Signal keys at their 1.0 default are left out,
    so the default phantom's bytes (and data.dvc's hash) are those of generator 1.0, written
    before the keys existed; any other value is recorded."""
    values = dataclasses.asdict(cfg)
    for key in SIGNAL_KEYS:
        if values[key] == 1.0:
            del values[key]
    for key, allowed in REGIMES.items():  # regimes off: as before they existed
        if values[key] == allowed[0]:
            del values[key]
    return values


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


# --- fundus --------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    return y, x


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Low-frequency texture: a coarse random grid upsampled (unit std-ish)."""
    coarse = rng.normal(0.0, 1.0, (cells,) * len(shape))
    return ndimage.zoom(coarse, [s / cells for s in shape], order=1, mode="nearest")


def _vessels(
    rng: np.random.Generator, size: int, disc: tuple[float, float], side: float
) -> np.ndarray:
    """Vessel map in [0, 1]: arcades leaving the disc above and below the macula, nasal twigs."""
    t = np.linspace(0.0, 1.0, 6 * size)
    canvas = np.zeros((size, size))
    dx, dy = disc
    for sign in (-1.0, 1.0):
        for reach, bend, nasal in ((1.15, 0.55, False), (0.8, 0.3, False), (0.35, 0.35, True)):
            bend_j = bend * rng.uniform(0.85, 1.15)
            direction = side if nasal else -side
            xs = dx + direction * reach * t
            ys = dy + sign * bend_j * np.sin(np.pi * 0.85 * t) * (1.0 - 0.25 * t)
            # bilinear splat of the curve samples: anti-aliased instead of staircase lines
            fx = np.clip((xs + 1.0) / 2.0 * size - 0.5, 0.0, size - 1.001)
            fy = np.clip((ys + 1.0) / 2.0 * size - 0.5, 0.0, size - 1.001)
            x0, y0 = fx.astype(int), fy.astype(int)
            ax, ay = fx - x0, fy - y0
            for oy, ox, wgt in (
                (0, 0, (1 - ay) * (1 - ax)),
                (0, 1, (1 - ay) * ax),
                (1, 0, ay * (1 - ax)),
                (1, 1, ay * ax),
            ):
                np.add.at(canvas, (y0 + oy, x0 + ox), wgt)
    canvas = ndimage.gaussian_filter(canvas / 6.0, 0.5 * size / 64.0)
    return np.clip(canvas * 3.0, 0.0, 1.0)


def render_fundus(
    rng: np.random.Generator,
    sev: float,
    site: int,
    right_eye: bool,
    size: int,
    *,
    focus: tuple[float, float] | None = None,
    sheen: float | None = None,
) -> np.ndarray:
    """One colour fundus (H×W×3 uint8) showing ``sev`` through cup-to-disc ratio and lesions.

    ``focus`` (x, y; anatomy=shared): the lesions are drusen clustered around it (at least
    FOCUS_MIN_LESIONS, so the focus shows in mild eyes too). ``sheen`` (private_latent): a
    macular sheen whose strength follows it. None: neither, and not one draw changes."""
    y, x = _grid(size)
    px = 2.0 / size  # one pixel in normalised units
    r2 = x * x + y * y
    shade = 1.0 - 0.4 * r2 + 0.05 * _smooth_field(rng, (size, size), 6)
    img = np.array([0.80, 0.36, 0.17])[None, None, :] * shade[..., None]

    mac = np.exp(-((x - rng.normal(0, 0.03)) ** 2 + (y - rng.normal(0, 0.03)) ** 2) / 0.035)
    img *= (1.0 - 0.35 * mac)[..., None]

    side = 1.0 if right_eye else -1.0
    disc_c = (side * 0.45 + rng.normal(0, 0.03), rng.normal(0, 0.04))
    vessels = _vessels(rng, size, disc_c, side)
    img = img * (1.0 - 0.55 * vessels[..., None]) + 0.55 * vessels[..., None] * np.array(
        [0.45, 0.08, 0.06]
    )

    rd = 0.17 * rng.uniform(0.93, 1.07)
    dist = np.sqrt((x - disc_c[0]) ** 2 + (y - disc_c[1]) ** 2)
    disc = 1.0 / (1.0 + np.exp(-(rd - dist) / (0.6 * px)))
    img = img * (1.0 - disc[..., None]) + disc[..., None] * np.array([0.93, 0.72, 0.45])
    cdr = float(np.clip(0.25 + 0.55 * sev, 0.1, 0.92))
    cup = 1.0 / (1.0 + np.exp(-(cdr * rd - dist) / (0.6 * px)))
    img = img * (1.0 - cup[..., None]) + cup[..., None] * np.array([1.0, 0.96, 0.82])

    n_les = int(np.clip(np.rint(16.0 * max(sev, 0.0) ** 2 + rng.normal(0.0, 0.7)), 0, 30))
    if focus is not None:
        n_les = max(n_les, FOCUS_MIN_LESIONS)
    if n_les:
        ang = rng.uniform(0.0, 2.0 * np.pi, n_les)
        rad = rng.uniform(0.08, 0.62, n_les)
        if focus is None:
            lx = rad * np.cos(ang) - side * 0.05
            ly = rad * np.sin(ang)
        else:  # a cluster around the focus, 0.03-0.13 from it
            spread = 0.03 + 0.10 * (rad - 0.08) / 0.54
            lx = focus[0] + spread * np.cos(ang)
            ly = focus[1] + spread * np.sin(ang)
        size_l = (0.025 + 0.045 * max(sev, 0.0)) * rng.uniform(0.7, 1.3, n_les)
        d2 = (x[None] - lx[:, None, None]) ** 2 + (y[None] - ly[:, None, None]) ** 2
        alpha = np.clip(1.6 * np.exp(-d2 / (2.0 * size_l[:, None, None] ** 2)), 0.0, 1.0)
        bright = rng.uniform(size=n_les) < 0.6  # exudates; others haemorrhages
        if focus is not None:
            bright[:] = True  # drusen
        for mask, colour in ((bright, (1.0, 0.9, 0.45)), (~bright, (0.32, 0.04, 0.03))):
            if mask.any():
                a = alpha[mask].max(axis=0)[..., None]
                img = img * (1.0 - a) + a * np.array(colour)
    if sheen is not None:  # a greyish-yellow glow over the macula (no draw: streams unchanged)
        a = (0.5 * float(np.clip(sheen, 0.0, 1.0)) * np.exp(-(x * x + y * y) / 0.05))[..., None]
        img = img * (1.0 - a) + a * np.array([0.90, 0.84, 0.62])

    style = (SITES + SHIFT_SITES)[site]
    theta = rng.uniform(0.0, 2.0 * np.pi)
    illum = 1.0 + style["grad"] * (np.cos(theta) * x + np.sin(theta) * y)
    cast = np.asarray(style["cast"]) * (1.0 + rng.normal(0.0, 0.03, 3)) * style["bright"]
    img = img * illum[..., None] * cast
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = np.clip((img - mean) * style["contrast"] + mean, 0.0, 1.0) ** style["gamma"]
    blur = (style["blur"] + rng.uniform(0.0, 0.3)) * size / 64.0
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, (blur, blur, 0.0))
    img = img + rng.normal(0.0, 0.015, img.shape)
    field = 1.0 / (1.0 + np.exp(-(0.94 - np.sqrt(r2)) / px))
    img = img * field[..., None]
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# --- OCT -----------------------------------------------------------------------------------------


def render_oct(
    rng: np.random.Generator,
    sev: float,
    shape: tuple[int, int, int],
    *,
    focus: tuple[float, float] | None = None,
    fluid: float | None = None,
    device: int = 0,
) -> np.ndarray:
    """One OCT volume (D×H×W uint8): thickness and localised lesions grow with ``sev``.

    ``focus`` (x, y in fundus units = column w, B-scan d; anatomy=shared): the lesions are drusen
    clustered there (at least 2). ``fluid`` (private_latent): every severity lesion is a druse and
    fluid pockets whose number and size follow ``fluid`` are added. ``device`` 1 (site_shift=oct):
    another device's look (grainier speckle, A-scan blur, other gain and contrast curve). The
    defaults change nothing."""
    n_d, n_h, n_w = shape
    d = np.linspace(-1.0, 1.0, n_d)[:, None]
    w = np.linspace(-1.0, 1.0, n_w)[None, :]
    z = ((np.arange(n_h) + 0.5) / n_h)[None, :, None]  # depth, 0 at the top of a B-scan
    sev_c = max(sev, 0.0)

    pit = np.exp(-((d - rng.normal(0, 0.05)) ** 2 + (w - rng.normal(0, 0.05)) ** 2) / 0.08)
    top = 0.22 + rng.normal(0, 0.02) + 0.05 * rng.uniform(-1, 1) * w + 0.02 * rng.uniform(-1, 1) * d
    rpe = top + (0.26 + 0.20 * sev_c) * rng.uniform(0.95, 1.05)
    ilm = top + 0.08 * pit  # the foveal pit: inner retina thins, the RPE stays flat

    lesions = int(np.clip(np.rint(7.0 * sev_c**2 + rng.normal(0.0, 0.6)), 0, 12))
    if focus is not None:
        lesions = max(lesions, 2)
    cavity = np.zeros((n_d, n_h, n_w), dtype=np.float32)
    cluster = np.zeros((n_d, n_w))  # anatomy=shared: the RPE's lift by the focus's drusen

    def pocket(bump: np.ndarray, amp: float) -> None:
        """Fluid: the retina swells, a dark cavity forms above the RPE."""
        nonlocal ilm, cavity
        ilm = ilm - 0.8 * amp * bump
        zc = (rpe - 0.8 * amp - 0.03)[:, None, :]
        sz = 0.6 * amp + 0.015
        cavity = np.maximum(cavity, bump[:, None, :] * np.exp(-((z - zc) ** 2) / (2 * sz**2)))

    for _ in range(lesions):
        d0 = rng.uniform(-0.9, 0.9)
        w0 = rng.uniform(-0.7, 0.7)
        if focus is not None:  # within 0.12 of the focus
            d0, w0 = focus[1] + 0.12 * d0 / 0.9, focus[0] + 0.12 * w0 / 0.7
        sd = rng.uniform(0.6, 1.4) * 2.0 / n_d  # about 2-4 B-scans
        sw = (0.07 + 0.08 * sev_c) * rng.uniform(0.7, 1.3)
        bump = np.exp(-((d - d0) ** 2) / (2 * sd**2) - ((w - w0) ** 2) / (2 * sw**2))
        amp = (0.04 + 0.06 * sev_c) * rng.uniform(0.7, 1.3)
        drusen = rng.uniform() < 0.5
        if focus is not None:  # a cluster of drusen: overlapping ones merge, they do not stack
            cluster = np.maximum(cluster, amp * bump)
        elif drusen or fluid is not None:  # drusen: the RPE is lifted
            rpe = rpe - amp * bump
        else:
            pocket(bump, amp)
    rpe = rpe - cluster
    if fluid is not None:
        phi = float(np.clip(fluid, 0.0, 1.0))
        for _ in range(int(np.rint(FLUID_MAX_POCKETS * phi))):
            d0, w0 = rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5)
            sd = rng.uniform(1.0, 2.0) * 2.0 / n_d  # about 2-6 B-scans
            sw = (0.08 + 0.12 * phi) * rng.uniform(0.7, 1.3)
            bump = np.exp(-((d - d0) ** 2) / (2 * sd**2) - ((w - w0) ** 2) / (2 * sw**2))
            pocket(bump, (0.05 + 0.10 * phi) * rng.uniform(0.7, 1.3))

    # Boundaries top->bottom (D×W each) and the reflectivity below each one.
    frac = np.cumsum([0.0, 0.16, 0.22, 0.12, 0.10])  # RNFL, GCL-IPL, INL, OPL, then ONL to the RPE
    bounds = [ilm + f * (rpe - ilm) for f in frac] + [rpe, rpe + 0.035, rpe + 0.035 + 0.14]
    refl = [0.05, 0.78, 0.50, 0.22, 0.48, 0.14, 0.95, 0.45, 0.12]  # vitreous first
    ramp = 1.2 / n_h  # boundaries blur over about one pixel (linear ramp: cheaper than a sigmoid)
    zf = z.astype(np.float32)
    vol = np.full((n_d, n_h, n_w), refl[0], dtype=np.float32)
    for b, below, above in zip(bounds, refl[1:], refl[:-1], strict=True):
        step = np.clip((zf - b[:, None, :].astype(np.float32)) / ramp + 0.5, 0.0, 1.0)
        vol += np.float32(below - above) * step
    vol *= (1.0 - 0.9 * cavity).astype(np.float32)
    vol *= (1.0 + 0.08 * _smooth_field(rng, (n_d, n_w), 6))[:, None, :].astype(np.float32)

    looks = 4.0 if not device else 1.6  # speckle: gamma shape (fewer looks: grainier)
    speckle = rng.standard_gamma(looks, vol.shape, dtype=np.float32) * np.float32(1.0 / looks)
    vol = vol * speckle + np.float32(0.02) * rng.standard_normal(vol.shape, dtype=np.float32)
    vol = vol * rng.uniform(0.85, 1.1) + rng.uniform(-0.02, 0.04)
    if device:  # another device: blur along the A-scan, a compressive curve, lower gain, offset
        vol = ndimage.gaussian_filter(vol, (0.0, 0.9, 0.6))
        vol = 0.75 * np.clip(vol, 0.0, None) ** 0.7 + 0.05
    return np.clip(np.rint(vol * 230.0), 0, 255).astype(np.uint8)


# --- writing -------------------------------------------------------------------------------------


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``np.load``-able npz whose bytes depend only on the arrays (no timestamps, no zlib)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asanyarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _eye_arrays(i: int, plan: _Plan, cfg: SynthConfig, names: np.ndarray) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "grade": np.asarray(int(plan.grade[i]), dtype=np.int64),
        "class_names": names,
        "site": np.asarray(int(plan.site[i]), dtype=np.int64),
    }
    for key in ("race", "male", "hispanic", "maritalstatus", "language"):
        arrays[key] = np.asarray(int(plan.attrs[key][i]), dtype=np.int64)
    if plan.oct_device is not None:
        arrays["oct_device"] = np.asarray(int(plan.oct_device[i]), dtype=np.int64)
    if plan.has_fundus[i]:  # separate streams: dropping one modality never changes the other
        rng_f = np.random.default_rng([cfg.seed, 1, i])
        arrays["slo_fundus"] = render_fundus(
            rng_f,
            float(plan.sev_fundus[i]),
            int(plan.site[i]),
            bool(plan.right_eye[i]),
            cfg.fundus_size,
            **_extra_views(plan, "fundus", i),
        )
    if plan.has_oct[i]:
        rng_o = np.random.default_rng([cfg.seed, 2, i])
        device = 0 if plan.oct_device is None else int(plan.oct_device[i])
        arrays["oct_bscans"] = render_oct(
            rng_o,
            float(plan.sev_oct[i]),
            tuple(cfg.oct_shape),
            device=device,
            **_extra_views(plan, "oct", i),
        )
    return arrays


def focus_xy(r: np.ndarray | float, angle: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Fundus (x, y) of a focus at eccentricity ``r`` (clipped to [0, 0.9]) and ``angle`` from
    the fovea at (0, 0); the same numbers are the OCT's (column w, B-scan d)."""
    r = np.clip(r, 0.0, 0.9)
    return r * np.cos(angle), r * np.sin(angle)


def _extra_views(plan: _Plan, modality: str, i: int) -> dict[str, Any]:
    """A renderer's keyword arguments for ``modality``'s views of the regime latents of eye i."""
    view = plan.views[modality]
    kwargs: dict[str, Any] = {}
    if "eccentricity" in view:
        x, y = focus_xy(view["eccentricity"][i], view["angle"][i])
        kwargs["focus"] = (float(x), float(y))
    if "private" in view:
        kwargs["sheen" if modality == "fundus" else "fluid"] = float(view["private"][i])
    return kwargs


def _summary_csv(path: Path, plan: _Plan, names: list[str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(
            [
                "filename",
                "age",
                "gender",
                "race",
                "ethnicity",
                "language",
                "maritalstatus",
                "grade",
                "use",
            ]
        )
        for i in range(len(plan.grade)):
            a = {k: v[i] for k, v in plan.attrs.items()}
            writer.writerow(
                [
                    f"data_{i + 1:05d}.npz",
                    f"{a['age']:.1f}",
                    "male" if a["male"] else "female",
                    _RACES[a["race"]],
                    "hispanic" if a["hispanic"] else "non-hispanic",
                    _LANGUAGES[a["language"]],
                    _MARITAL[a["maritalstatus"] + 1],
                    int(plan.grade[i]),
                    SPLIT_USE[plan.split[i]],
                ]
            )


def generate(out: Path, cfg: SynthConfig) -> dict[str, Any]:
    """Write the phantom to ``out`` (replaced atomically); return counts per split/class/missing."""
    _check(cfg)
    out = Path(out)
    plan = _plan(cfg)
    names = class_names_for(cfg.n_classes)
    names_arr = np.asarray(names)
    with atomic_dir(out) as tmp:
        split_dirs = {s: tmp / DISEASE_FOLDER / folder for s, folder in SPLIT_FOLDERS.items()}
        for d in split_dirs.values():
            d.mkdir(parents=True)
        for i in tqdm(range(cfg.n_eyes), desc="synth", unit="eye", disable=None):
            write_npz(
                split_dirs[plan.split[i]] / f"data_{i + 1:05d}.npz",
                _eye_arrays(i, plan, cfg, names_arr),
            )
        (tmp / "ReadMe").mkdir()
        _summary_csv(tmp / "ReadMe" / "data_summary_synthetic.csv", plan, names)
        meta = {
            "generator": "rima_core.core.data.synthetic",
            "version": GENERATOR_VERSION,
            "config": _meta_config(cfg),
        }
        (tmp / "SYNTHETIC.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    summary = {
        "out": str(out),
        "n_eyes": cfg.n_eyes,
        "class_names": names,
        "splits": {s: int((plan.split == s).sum()) for s in SPLIT_FOLDERS},
        "classes": {names[g]: int((plan.grade == g).sum()) for g in range(cfg.n_classes)},
        "split_classes": {
            s: {
                names[g]: int(((plan.split == s) & (plan.grade == g)).sum())
                for g in range(cfg.n_classes)
            }
            for s in SPLIT_FOLDERS
        },
        "missing_fundus": int((~plan.has_fundus).sum()),
        "missing_oct": int((~plan.has_oct).sum()),
        "version": GENERATOR_VERSION,
    }
    log.info("synthetic phantom: %d eyes -> %s %s", cfg.n_eyes, out, summary["splits"])
    return summary
