"""Models: RIMA, its ablations and the baselines behind one interface (docs/interfaces.md).

Every model is called as ``model(fundus, oct, has_fundus, has_oct, labels=None) ->
ModelOutput(logits, aux_loss, stats)``, so one engine trains, evaluates and serves them all. A
model is fully described by a :class:`ModelSpec`; ``model.pt`` holds the spec and the state
dict, so loading never needs params.yaml or the pretrained-weights files used at training time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rima_core.atomic import atomic_file
from rima_core.config import Config, ModelConfig, OTConfig

from .common import MissingModalityError, ModelOutput

MODEL_NAMES = (
    "rima",
    "rima_no_feature_ot",
    "rima_no_class_ot",
    "rima_no_missing_paths",
    "fundus_only",
    "oct_only",
    "late_fusion_zero",
    "late_fusion_dropout",
    "imputation",
    "distillation",
)

# RIMA and its ablations: the switches each name turns off (models/rima.py).
RIMA_VARIANTS: dict[str, dict[str, bool]] = {
    "rima": {},
    "rima_no_feature_ot": {"feature_ot": False},
    "rima_no_class_ot": {"class_ot": False},
    "rima_no_missing_paths": {"missing_paths": False},
}

__all__ = [
    "MODEL_NAMES",
    "MissingModalityError",
    "ModelOutput",
    "ModelSpec",
    "build_model",
    "load_model",
    "save_model",
]


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model: its name, config sections, classes and shapes.

    ``name`` selects the model (it wins over ``model["name"]``, so one config can build any
    ablation). ``fundus_shape`` is [H, W, 3] and ``oct_shape`` [D, H, W], as in the store.
    """

    name: str
    model: dict[str, Any]
    ot: dict[str, Any]
    n_classes: int
    class_names: list[str] = field(default_factory=list)
    fundus_shape: list[int] = field(default_factory=list)
    oct_shape: list[int] = field(default_factory=list)
    # softmax temperature fitted on the validation split after training (rima_core.calibration);
    # engine.predict applies it. 1.0 = uncalibrated (and every model saved before it existed).
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}; choose one of {list(MODEL_NAMES)}")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {self.n_classes}")
        if self.class_names and len(self.class_names) != self.n_classes:
            raise ValueError(f"{len(self.class_names)} class names for n_classes={self.n_classes}")
        if not (isinstance(self.temperature, int | float) and 0 < self.temperature < float("inf")):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}")

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
        return cls(
            name=name or cfg.model.name,
            model=asdict(cfg.model),
            ot=asdict(cfg.ot),
            n_classes=n_classes,
            class_names=list(class_names or []),
            fundus_shape=list(fundus_shape or []),
            oct_shape=list(oct_shape or []),
        )

    def model_config(self) -> ModelConfig:
        return _section(ModelConfig, self.model, "model")

    def ot_config(self) -> OTConfig:
        return _section(OTConfig, self.ot, "ot")


def _section(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"model spec: unknown {where} key(s) {sorted(unknown)}")
    return cls(**values)


def build_model(spec: ModelSpec, pretrained: bool = True) -> nn.Module:
    """Build the model ``spec.name``. ``pretrained=False`` skips loading the local backbone
    weights named in the spec (``load_model`` overwrites every parameter anyway, and a serving
    machine does not have those files)."""
    from .baselines import Distillation, Imputation, LateFusion, SingleModality
    from .rima import RIMA

    mcfg, ocfg = spec.model_config(), spec.ot_config()
    name, k = spec.name, spec.n_classes
    # Every name is matched exactly (a new name never falls into another model's branch).
    if name == "imputation":
        model: nn.Module = Imputation(
            mcfg, k, modality_dropout=mcfg.modality_dropout, pretrained=pretrained
        )
    elif name == "distillation":
        model = Distillation(mcfg, k, pretrained=pretrained)
    elif name in RIMA_VARIANTS:
        model = RIMA(mcfg, ocfg, k, **RIMA_VARIANTS[name], pretrained=pretrained)
    elif name in ("fundus_only", "oct_only"):
        model = SingleModality(mcfg, k, name.removesuffix("_only"), pretrained=pretrained)
    elif name == "late_fusion_zero":
        model = LateFusion(mcfg, k, modality_dropout=0.0, pretrained=pretrained)
    elif name == "late_fusion_dropout":
        model = LateFusion(mcfg, k, modality_dropout=mcfg.modality_dropout, pretrained=pretrained)
    else:  # pragma: no cover - ModelSpec validates the name
        raise ValueError(f"unknown model {name!r}")
    return model


def save_model(model: nn.Module, spec: ModelSpec, path: str | Path) -> None:
    """Write ``{"spec", "state_dict"}`` to ``path`` atomically (tensors moved to CPU)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    with atomic_file(path) as tmp:
        torch.save({"spec": asdict(spec), "state_dict": state}, tmp)


def load_model(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, ModelSpec]:
    """Rebuild a model saved by :func:`save_model`, in eval mode on ``map_location``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise ValueError(f"{path}: not a readable model file: {exc}") from exc
    if not isinstance(blob, dict) or not {"spec", "state_dict"} <= set(blob):
        raise ValueError(f"{path}: not a model file (expected keys 'spec' and 'state_dict')")
    try:
        spec = ModelSpec(**blob["spec"])
        model = build_model(spec, pretrained=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: bad model spec: {exc}") from exc
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit model {spec.name!r}: {exc}") from exc
    from rima_core.engine import set_model_temperature

    set_model_temperature(model, spec.temperature)
    model.to(map_location)
    model.eval()
    return model, spec
