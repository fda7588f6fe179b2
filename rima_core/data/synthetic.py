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

Output is byte-identical for the same seed, generator version and numpy build: every eye draws
from its own seeded stream, npz archives are written member by member with a fixed timestamp,
sorted keys and no compression (zlib builds differ), and no wall clock is recorded anywhere.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

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
    return values


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
    severity = (grade + rng.uniform(0.0, 1.0, n)) / k
    sev_fundus = severity + rng.normal(0.0, modality_noise(cfg, "fundus"), n)
    sev_oct = severity + rng.normal(0.0, modality_noise(cfg, "oct"), n)

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
    return _Plan(
        grade=grade,
        severity=severity,
        sev_fundus=sev_fundus,
        sev_oct=sev_oct,
        split=split,
        has_fundus=has_fundus,
        has_oct=has_oct,
        site=rng.integers(0, len(SITES), n),
        right_eye=rng.integers(0, 2, n).astype(bool),
        attrs=attrs,
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
    rng: np.random.Generator, sev: float, site: int, right_eye: bool, size: int
) -> np.ndarray:
    """One colour fundus (H×W×3 uint8) showing ``sev`` through cup-to-disc ratio and lesions."""
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
    if n_les:
        ang = rng.uniform(0.0, 2.0 * np.pi, n_les)
        rad = rng.uniform(0.08, 0.62, n_les)
        lx = rad * np.cos(ang) - side * 0.05
        ly = rad * np.sin(ang)
        size_l = (0.025 + 0.045 * max(sev, 0.0)) * rng.uniform(0.7, 1.3, n_les)
        d2 = (x[None] - lx[:, None, None]) ** 2 + (y[None] - ly[:, None, None]) ** 2
        alpha = np.clip(1.6 * np.exp(-d2 / (2.0 * size_l[:, None, None] ** 2)), 0.0, 1.0)
        bright = rng.uniform(size=n_les) < 0.6  # exudates; others haemorrhages
        for mask, colour in ((bright, (1.0, 0.9, 0.45)), (~bright, (0.32, 0.04, 0.03))):
            if mask.any():
                a = alpha[mask].max(axis=0)[..., None]
                img = img * (1.0 - a) + a * np.array(colour)

    style = SITES[site]
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


def render_oct(rng: np.random.Generator, sev: float, shape: tuple[int, int, int]) -> np.ndarray:
    """One OCT volume (D×H×W uint8): thickness and localised lesions grow with ``sev``."""
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
    fluid = np.zeros((n_d, n_h, n_w), dtype=np.float32)
    for _ in range(lesions):
        d0 = rng.uniform(-0.9, 0.9)
        w0 = rng.uniform(-0.7, 0.7)
        sd = rng.uniform(0.6, 1.4) * 2.0 / n_d  # about 2-4 B-scans
        sw = (0.07 + 0.08 * sev_c) * rng.uniform(0.7, 1.3)
        bump = np.exp(-((d - d0) ** 2) / (2 * sd**2) - ((w - w0) ** 2) / (2 * sw**2))
        amp = (0.04 + 0.06 * sev_c) * rng.uniform(0.7, 1.3)
        if rng.uniform() < 0.5:  # drusen: the RPE is lifted
            rpe = rpe - amp * bump
        else:  # fluid pocket: retina swells, a dark cavity forms above the RPE
            ilm = ilm - 0.8 * amp * bump
            zc = (rpe - 0.8 * amp - 0.03)[:, None, :]
            sz = 0.6 * amp + 0.015
            fluid = np.maximum(fluid, bump[:, None, :] * np.exp(-((z - zc) ** 2) / (2 * sz**2)))

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
    vol *= (1.0 - 0.9 * fluid).astype(np.float32)
    vol *= (1.0 + 0.08 * _smooth_field(rng, (n_d, n_w), 6))[:, None, :].astype(np.float32)

    speckle = rng.standard_gamma(4.0, vol.shape, dtype=np.float32) * np.float32(0.25)
    vol = vol * speckle + np.float32(0.02) * rng.standard_normal(vol.shape, dtype=np.float32)
    vol = vol * rng.uniform(0.85, 1.1) + rng.uniform(-0.02, 0.04)
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
    if plan.has_fundus[i]:  # separate streams: dropping one modality never changes the other
        rng_f = np.random.default_rng([cfg.seed, 1, i])
        arrays["slo_fundus"] = render_fundus(
            rng_f,
            float(plan.sev_fundus[i]),
            int(plan.site[i]),
            bool(plan.right_eye[i]),
            cfg.fundus_size,
        )
    if plan.has_oct[i]:
        rng_o = np.random.default_rng([cfg.seed, 2, i])
        arrays["oct_bscans"] = render_oct(rng_o, float(plan.sev_oct[i]), tuple(cfg.oct_shape))
    return arrays


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
            "generator": "rima_core.data.synthetic",
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
