"""The missing-modality benchmark's protocol, written once: phantom regimes, training regimes,
the settings of each grid, and the validation sweep every method gets.

Why one module: the driver (``missing_modality.py``), its report and its tests all read these
tables; a regime described in the report but run with other overrides would be a silent lie.

Phantom regimes are properties of real eyes that the default phantom lacks; each names the
clinical property it stands for, and none is shaped to favour a method (every method trains on
the same data, and the oracle of each regime is computed from the generator's own latents).
Training regimes are what the training split looks like: complete, partly incomplete, scarcely
paired, and a learning-curve point with four times the training eyes (is a gap to the ceiling
the data's size or the model's?).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PhantomRegime:
    overrides: tuple[str, ...]
    property: str  # the clinical property the regime stands for


@dataclass(frozen=True)
class TrainingRegime:
    # (fundus, OCT) missing rates among training eyes that have both; None: as the source has
    rates: tuple[float, float] | None
    property: str
    train_multiplier: int = 1  # training eyes relative to the base dataset (val/test unchanged)
    methods: tuple[str, ...] | None = None  # None: every method of the grid


PHANTOM_REGIMES: dict[str, PhantomRegime] = {
    "default": PhantomRegime((), "both modalities see one severity; the OCT cues are easier"),
    "fundus_strong": PhantomRegime(
        ("synth.fundus_signal=2.0", "synth.oct_signal=0.5"),
        "the fundus is the stronger modality (e.g. disc-driven glaucoma grading)",
    ),
    "shared_anatomy": PhantomRegime(
        ("synth.anatomy=shared",),
        "where the lesions are (drusen in the fundus, retinal elevation in the OCT at the same "
        "place) is seen by both modalities and the grade depends on it (centre involvement)",
    ),
    "oct_private": PhantomRegime(
        ("synth.private_latent=oct",),
        "a latent that matters for the grade (fluid) that the OCT sees much better than the fundus",
    ),
    "imbalanced": PhantomRegime(
        ("synth.n_classes=4", "synth.class_weights=[0.45,0.3,0.15,0.1]"),
        "four grades with AMD-like frequencies (normal, early, intermediate, late)",
    ),
    "site_shift": PhantomRegime(
        ("synth.site_shift=fundus",),
        "the test eyes' fundus photos come from cameras (sites) not seen in training",
    ),
}

TRAINING_REGIMES: dict[str, TrainingRegime] = {
    "complete": TrainingRegime(None, "training eyes keep what the source has (~90 % paired)"),
    "incomplete": TrainingRegime(
        (0.25, 0.25), "of the training eyes with both, 25 % lose the fundus and 25 % the OCT"
    ),
    "paired10": TrainingRegime((0.45, 0.45), "10 % of the training eyes with both stay paired"),
    "paired5": TrainingRegime((0.475, 0.475), "5 % of the training eyes with both stay paired"),
    "complete_x4": TrainingRegime(
        None,
        "learning-curve point: four times the training eyes, same validation/test sizes",
        train_multiplier=4,
        methods=("fundus_only", "oct_only", "rima"),
    ),
}
TRAIN_INCOMPLETE = "train_incomplete"  # mask scenario name of the training split's rows

# Settings of each grid: (phantom regime, training regime). The full grid puts every regime
# under complete and scarce-paired training; the default phantom gets every training regime.
GRIDS: dict[str, tuple[tuple[str, str], ...]] = {
    "full": (
        ("default", "complete"),
        ("default", "incomplete"),
        ("default", "paired10"),
        ("default", "paired5"),
        ("default", "complete_x4"),
        ("fundus_strong", "complete"),
        ("fundus_strong", "paired10"),
        ("fundus_strong", "complete_x4"),
        ("shared_anatomy", "complete"),
        ("shared_anatomy", "paired10"),
        ("oct_private", "complete"),
        ("oct_private", "paired10"),
        ("imbalanced", "complete"),
        ("imbalanced", "paired10"),
        ("site_shift", "complete"),
    ),
    # development: the main cells (complete vs scarce pairing on the default phantom) with the
    # full budget and sweep, fewer seeds; same verdict rules
    "quick": (("default", "complete"), ("default", "paired10")),
}

# The validation sweep: every method gets the same learning rates (factors of train.lr); a
# method with a knob of its own gets it searched at the base learning rate as well. Each
# candidate is one training run; the benchmark keeps, per (setting, method, seed), the candidate
# with the best validation score (the model-selection score), never looking at the test split.
LR_FACTORS = (0.5, 1.0, 2.0)
METHOD_KNOBS: dict[str, tuple[tuple[str, ...], ...]] = {
    # rima's own: how much of the translators' coupling pairs each eye's own modalities instead
    # of the class-wise GW coupling (0, the paper's, is the lr candidates; 1 trains as
    # rima_no_class_ot), the knob the pipeline's tune stage searches
    "rima": (("ot.pairing_mix=0.5",), ("ot.pairing_mix=1.0",)),
    "late_fusion_dropout": (("model.modality_dropout=0.1",), ("model.modality_dropout=0.5",)),
    "distillation": (("model.distill_alpha=0.9",), ("model.distill_temperature=4.0",)),
}
BASE_VARIANT = "lr1"


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = field(default_factory=tuple)


def variants(
    method: str, base_lr: float, lr_factors: tuple[float, ...] = LR_FACTORS
) -> list[Variant]:
    """The sweep candidates of ``method``: one per learning-rate factor, then its own knobs."""
    out = [
        Variant(f"lr{f:g}", () if f == 1.0 else (f"train.lr={base_lr * f:.6g}",))
        for f in lr_factors
    ]
    for knob in METHOD_KNOBS.get(method, ()):
        out.append(Variant(",".join(k.split(".", 1)[1] for k in knob), knob))
    return out


def settings_of(grid: str, regimes: list[str] | None = None, trainings: list[str] | None = None):
    """The (regime, training) settings of ``grid``, filtered by the given regimes/trainings."""
    return [
        (r, t)
        for r, t in GRIDS[grid]
        if (regimes is None or r in regimes) and (trainings is None or t in trainings)
    ]


def methods_of(training: str, methods: list[str]) -> list[str]:
    """The methods a training regime runs (the learning-curve point runs a few)."""
    only = TRAINING_REGIMES[training].methods
    return [m for m in methods if only is None or m in only]
