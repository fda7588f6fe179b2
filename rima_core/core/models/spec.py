"""What a model is: its hyperparameters (:class:`RimaConfig`) and everything else needed to
rebuild it from ``model.pt`` (:class:`ModelSpec`).

The pipeline config splits a model's settings over two sections (``model`` and ``ot``) and names
the variant in ``model.name``; the models read one flat record instead, built once by
:meth:`RimaConfig.from_sections`, with the ablation switches spelled out. That record is saved in
``model.pt``, so a loaded model knows its variant without params.yaml.
"""

from __future__ import annotations

import typing
from dataclasses import asdict, dataclass, field, fields, make_dataclass
from typing import Any

from rima_core.config import DECODINGS, Config, ModelConfig, OTConfig
from rima_core.core.models.postprocess import PATTERNS

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


def _section_fields(section: type) -> list[tuple[str, Any]]:
    """``(name, type)`` of a config section's keys, in the schema's order (``model.name`` is the
    spec's own field, not a hyperparameter)."""
    hints = typing.get_type_hints(section)
    return [(f.name, hints[f.name]) for f in fields(section) if f.name != "name"]


class _RimaConfigMethods:
    """Every hyperparameter a model reads, in one record: the keys of the config's ``model``
    section (encoders, fusion, loss weights), then those of its ``ot`` section, then the ablation
    switches of the model's name (:data:`RIMA_VARIANTS`).

    The fields are made from the two sections of the schema (rima_core/config/schema.py, where
    each key's meaning is written), not re-declared: a key added to either section is a field
    here at once. No field has a default: the defaults live in the config alone.
    """

    @classmethod
    def from_sections(cls, model: ModelConfig, ot: OTConfig, name: str | None = None) -> Any:
        """The record for model ``name`` (default ``model.name``) from the two config sections."""
        values = {k: v for k, v in asdict(model).items() if k != "name"}
        return cls(**values, **asdict(ot), **variant_switches(name or model.name))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """Rebuild from :func:`dataclasses.asdict` output (a saved spec), naming any key that
        does not fit rather than failing on the first. A key of :data:`ADDED_KEYS` that an
        older spec lacks takes the value that model was trained with."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        values = {**{k: v for k, v in ADDED_KEYS.items() if k not in values}, **values}
        unknown, missing = set(values) - known, known - set(values)
        if unknown or missing:
            raise ValueError(
                f"model config: unknown key(s) {sorted(unknown)}, missing key(s) {sorted(missing)}"
            )
        return cls(**values)


# A flat record: make_dataclass refuses a key that both sections define.
RimaConfig = make_dataclass(
    "RimaConfig",
    [
        *_section_fields(ModelConfig),
        *_section_fields(OTConfig),
        *((switch, bool) for switch in SWITCHES),
    ],
    bases=(_RimaConfigMethods,),
    frozen=True,
)
RimaConfig.__module__ = __name__
RimaConfig.__doc__ = _RimaConfigMethods.__doc__


def model_names() -> tuple[str, ...]:
    """Every model name (the builder table in rima_core/core/models/__init__.py is their source)."""
    from rima_core.core.models import MODEL_NAMES

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
    # softmax temperature fitted on the validation split after training
    # (rima_core.runs.calibration); engine.predict applies it. 1.0 = uncalibrated.
    temperature: float = 1.0
    # one temperature per availability pattern (postprocess.PATTERNS), fitted the
    # same way; engine.predict gives each eye its pattern's. {} (older models): ``temperature`` for
    # all.
    temperatures: dict[str, float] = field(default_factory=dict)
    # the grade predict gives (rima_core.core.metrics.decode; train.decoding): argmax or ordinal
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
