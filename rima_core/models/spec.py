"""What a model is: its hyperparameters (:class:`RimaConfig`) and everything else needed to
rebuild it from ``model.pt`` (:class:`ModelSpec`).

The pipeline config splits a model's settings over two sections (``model`` and ``ot``) and names
the variant in ``model.name``; the models read one flat record instead, built once by
:meth:`RimaConfig.from_sections`, with the ablation switches spelled out. That record is saved in
``model.pt``, so a loaded model knows its variant without params.yaml.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from rima_core.calibration import PATTERNS
from rima_core.config import DECODINGS, Config, ModelConfig, OTConfig

# RIMA, its ablations and its OT controls: the switches each name turns off (models/rima.py).
# Every other model name is a baseline, which reads no switch and keeps them all on.
# - rima_no_translators: no translators at all (hence no class-wise OT, whose only use is their
#   targets) and no feature-wise OT either: a learned missing-modality token stands in for a
#   missing modality, the OCT token of the fundus branch is a learned linear map (as in
#   rima_no_feature_ot). Same fusion, same path training: the control without any OT.
# - rima_flat_coupling: the translators' targets come from the flat within-class coupling
#   (class means) instead of Gromov-Wasserstein; everything else as rima.
RIMA_VARIANTS: dict[str, dict[str, bool]] = {
    "rima": {},
    "rima_no_feature_ot": {"feature_ot": False},
    "rima_no_class_ot": {"class_ot": False},
    "rima_no_missing_paths": {"missing_paths": False},
    "rima_no_translators": {"translators": False, "class_ot": False, "feature_ot": False},
    "rima_flat_coupling": {"gw": False},
}
SWITCHES = ("class_ot", "feature_ot", "missing_paths", "translators", "gw")
# Keys added to RimaConfig after models were first saved, with the value a model saved before
# them behaved as: a saved spec that lacks one gets it (every model then had all switches on and
# the fixed online-distillation weights, and a full path that was the fused head alone).
ADDED_KEYS: dict[str, Any] = {
    "translators": True,
    "gw": True,
    "distill_alpha": 0.5,
    "distill_temperature": 2.0,
    "full_path": "head",
    "bank_size": 0,
    "pairing_mix": 0.0,
}


def variant_switches(name: str) -> dict[str, bool]:
    """The ablation switches of model ``name``: all on, except those its variant turns off."""
    return {key: RIMA_VARIANTS.get(name, {}).get(key, True) for key in SWITCHES}


@dataclass(frozen=True)
class RimaConfig:
    """Every hyperparameter a model reads, in one record.

    The encoder/fusion fields carry the names of the config's ``model`` section and the OT fields
    those of its ``ot`` section (their meaning is documented there, in rima_core/config.py), so
    :meth:`from_sections` copies them by name and a key added to either section without a field
    here fails loudly. No field has a default: the defaults live in the config alone.
    """

    # encoders and fusion (config section ``model``)
    fundus_encoder: str
    oct_encoder: str
    fundus_dim: int
    oct_dim: int
    hidden_dim: int
    heads: int
    dropout: float
    modality_dropout: float
    missing_path_weight: float
    consistency_weight: float
    full_path: str
    distill_alpha: float
    distill_temperature: float
    fundus_weights: str | None
    oct_weights: str | None
    # optimal transport (config section ``ot``)
    gw_epsilon: float
    feature_epsilon: float
    loss_weight: float
    feature_momentum: float
    target: str
    bank_size: int
    pairing_mix: float
    # ablation switches (from the model name, see RIMA_VARIANTS)
    class_ot: bool
    feature_ot: bool
    missing_paths: bool
    translators: bool
    gw: bool

    @classmethod
    def from_sections(cls, model: ModelConfig, ot: OTConfig, name: str | None = None) -> RimaConfig:
        """The record for model ``name`` (default ``model.name``) from the two config sections."""
        values = {k: v for k, v in asdict(model).items() if k != "name"}
        clash = set(values) & set(asdict(ot))
        if clash:  # a flat record cannot hold two settings of one name
            raise ValueError(f"config sections model and ot both define {sorted(clash)}")
        return cls(**values, **asdict(ot), **variant_switches(name or model.name))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RimaConfig:
        """Rebuild from :func:`dataclasses.asdict` output (a saved spec), naming any key that
        does not fit rather than failing on the first. A key of :data:`ADDED_KEYS` that an
        older spec lacks takes the value that model was trained with."""
        known = {f.name for f in fields(cls)}
        values = {**{k: v for k, v in ADDED_KEYS.items() if k not in values}, **values}
        unknown, missing = set(values) - known, known - set(values)
        if unknown or missing:
            raise ValueError(
                f"model config: unknown key(s) {sorted(unknown)}, missing key(s) {sorted(missing)}"
            )
        return cls(**values)


def model_names() -> tuple[str, ...]:
    """Every model name (the builder table in rima_core/models/__init__.py is their source)."""
    from rima_core.models import MODEL_NAMES

    return MODEL_NAMES


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: its name, hyperparameters, classes and shapes.

    ``fundus_shape`` is [H, W, 3] and ``oct_shape`` [D, H, W], as in the store.
    """

    name: str
    config: RimaConfig
    n_classes: int
    class_names: list[str] = field(default_factory=list)
    fundus_shape: list[int] = field(default_factory=list)
    oct_shape: list[int] = field(default_factory=list)
    # softmax temperature fitted on the validation split after training (rima_core.calibration);
    # engine.predict applies it. 1.0 = uncalibrated.
    temperature: float = 1.0
    # one temperature per availability pattern (rima_core.calibration.PATTERNS), fitted the same
    # way; engine.predict gives each eye its pattern's. {} (older models): ``temperature`` for all.
    temperatures: dict[str, float] = field(default_factory=dict)
    # the grade predict gives (rima_core.metrics.decode; train.decoding): argmax or ordinal
    decoding: str = "argmax"

    def __post_init__(self) -> None:
        names = model_names()
        if self.name not in names:
            raise ValueError(f"unknown model {self.name!r}; choose one of {list(names)}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.class_names and len(self.class_names) != self.n_classes:
            raise ValueError(f"{len(self.class_names)} class names for n_classes={self.n_classes}")
        if not (isinstance(self.temperature, int | float) and 0 < self.temperature < float("inf")):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")
        for key, value in self.temperatures.items():
            if key not in PATTERNS or not (
                isinstance(value, int | float) and 0 < value < float("inf")
            ):
                raise ValueError(
                    f"temperatures must map {list(PATTERNS)} to positive numbers, got "
                    f"{key!r}: {value!r}"
                )
        if self.decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {list(DECODINGS)}, got {self.decoding!r}")
        # the switches are saved so a loaded model states its variant; they must agree with it
        switches = {key: getattr(self.config, key) for key in SWITCHES}
        if switches != variant_switches(self.name):
            raise ValueError(
                f"model {self.name!r} has switches {variant_switches(self.name)}, "
                f"but its config says {switches}"
            )

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        n_classes: int,
        class_names: list[str] | None = None,
        fundus_shape: list[int] | None = None,
        oct_shape: list[int] | None = None,
        name: str | None = None,
    ) -> ModelSpec:
        """The spec of model ``name`` (default ``cfg.model.name``) under the pipeline config."""
        name = name or cfg.model.name
        return cls(
            name=name,
            config=RimaConfig.from_sections(cfg.model, cfg.ot, name),
            n_classes=n_classes,
            class_names=list(class_names or []),
            fundus_shape=list(fundus_shape or []),
            oct_shape=list(oct_shape or []),
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        """Rebuild from :func:`dataclasses.asdict` output, as stored in ``model.pt``.

        A spec written before the flat record existed holds the two config sections (``model``,
        ``ot``) instead of ``config``; it is read through :meth:`RimaConfig.from_sections`, so
        models already registered keep loading.
        """
        values = dict(values)
        if "config" in values:
            values["config"] = RimaConfig.from_dict(values["config"])
        elif {"model", "ot"} <= set(values):
            model, ot = values.pop("model"), values.pop("ot")
            values["config"] = RimaConfig.from_sections(
                ModelConfig(**model), OTConfig(**ot), values.get("name")
            )
        return cls(**values)
