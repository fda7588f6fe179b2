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

Layout: this module checks the config and writes the phantom; the plan and the latent model are
in :mod:`rima_core.core.data.synthetic_latents`, the renderers in
:mod:`rima_core.core.data.synthetic_fundus` and :mod:`rima_core.core.data.synthetic_oct`. Their
public names (and those the oracle and tests use) stay importable from here.

Output is byte-identical for the same seed, generator version and numpy build: every eye draws
from its own seeded stream, npz archives are written member by member with a fixed timestamp,
sorted keys and no compression (zlib builds differ), and no wall clock is recorded anywhere.
The regimes draw their latents from a separate stream, so with them off not one draw changes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from rima_core.atomic import atomic_dir
from rima_core.config import ConfigError, SynthConfig
from rima_core.core.data.synthetic_fundus import (
    FOCUS_MIN_LESIONS,
    SHIFT_SITES,
    SITES,
    render_fundus,
)
from rima_core.core.data.synthetic_latents import (
    ANGLE_NOISE,
    FOCUS_MAX_R,
    GRADE_SCORES,
    LOCATION_NOISE,
    MODALITY_NOISE,
    PRIVATE_NOISE,
    REGIMES,
    SIGNAL_KEYS,
    _apportion,
    _Plan,
    _plan,
    _stratified_counts,
    class_prior,
    draw_latents,
    draw_views,
    focus_xy,
    grade_score,
    modality_noise,
    score_edges,
    view_noise,
)
from rima_core.core.data.synthetic_oct import FLUID_MAX_POCKETS, render_oct
from rima_core.progress import progress as tqdm

# Names kept importable from here: the oracle, the benchmark and the tests import them from this
# module (the phantom's one public entry), wherever they are defined.
__all__ = [
    "ANGLE_NOISE",
    "DISEASE_FOLDER",
    "FLUID_MAX_POCKETS",
    "FOCUS_MAX_R",
    "FOCUS_MIN_LESIONS",
    "GENERATOR_VERSION",
    "GRADE_SCORES",
    "LOCATION_NOISE",
    "MODALITY_NOISE",
    "PRIVATE_NOISE",
    "REGIMES",
    "SHIFT_SITES",
    "SIGNAL_KEYS",
    "SITES",
    "SPLIT_FOLDERS",
    "SPLIT_USE",
    "_Plan",
    "_apportion",
    "_check",
    "_plan",
    "_stratified_counts",
    "class_names_for",
    "class_prior",
    "draw_latents",
    "draw_views",
    "focus_xy",
    "generate",
    "grade_score",
    "modality_noise",
    "render_fundus",
    "render_oct",
    "score_edges",
    "view_noise",
    "write_npz",
]

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
DISEASE_FOLDER = "Synthetic"
SPLIT_FOLDERS = {"train": "Training", "val": "Validation", "test": "Test"}
SPLIT_USE = {"train": "training", "val": "validation", "test": "test"}
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
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


def _check(cfg: SynthConfig) -> None:
    """Refuse a ``synth`` config the generator cannot honour, naming the key, before any draw."""
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
            # verbatim, whichever module holds this code: data.dvc records these bytes
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
