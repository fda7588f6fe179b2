"""Models: RIMA, its ablations and the baselines behind one interface (docs/interfaces.md).

Every model is called as ``model(fundus, oct, has_fundus, has_oct, labels=None) ->
ModelOutput(logits, aux_loss, stats)``, so one engine trains, evaluates and serves them all. A
model is fully described by a :class:`ModelSpec` (its name, its :class:`RimaConfig`, classes and
shapes; models/spec.py); ``model.pt`` holds the spec and the state dict, so loading never needs
params.yaml or the pretrained-weights files used at training time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from rima_core.atomic import atomic_file

from .baselines import Distillation, Imputation, LateFusion, SingleModality
from .common import MissingModalityError, ModelOutput
from .rima import RIMA
from .spec import RIMA_VARIANTS, ModelSpec, RimaConfig

__all__ = [
    "MODEL_NAMES",
    "RIMA_VARIANTS",
    "MissingModalityError",
    "ModelOutput",
    "ModelSpec",
    "RimaConfig",
    "build_model",
    "load_model",
    "save_model",
]

# (config, n_classes, pretrained) -> the model
Builder = Callable[[RimaConfig, int, bool], nn.Module]

# Every model name and its builder, matched exactly (a new name never falls into another model's
# branch). RIMA's ablations differ only in the switches of their RimaConfig (RIMA_VARIANTS);
# late_fusion_zero is late fusion trained without modality dropout.
BUILDERS: dict[str, Builder] = {
    **dict.fromkeys(RIMA_VARIANTS, lambda c, k, pre: RIMA(c, k, pretrained=pre)),
    "fundus_only": lambda c, k, pre: SingleModality(c, k, "fundus", pretrained=pre),
    "oct_only": lambda c, k, pre: SingleModality(c, k, "oct", pretrained=pre),
    "late_fusion_zero": lambda c, k, pre: LateFusion(c, k, modality_dropout=0.0, pretrained=pre),
    "late_fusion_dropout": lambda c, k, pre: LateFusion(
        c, k, modality_dropout=c.modality_dropout, pretrained=pre
    ),
    "imputation": lambda c, k, pre: Imputation(c, k, pretrained=pre),
    "imputation_paths": lambda c, k, pre: Imputation(c, k, train_paths=True, pretrained=pre),
    "distillation": lambda c, k, pre: Distillation(c, k, pretrained=pre),
}
MODEL_NAMES = tuple(BUILDERS)


def build_model(spec: ModelSpec, pretrained: bool = True) -> nn.Module:
    """Build the model ``spec.name``. ``pretrained=False`` skips loading the local backbone
    weights named in the spec (``load_model`` overwrites every parameter anyway, and a serving
    machine does not have those files)."""
    return BUILDERS[spec.name](spec.config, spec.n_classes, pretrained)


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
        spec = ModelSpec.from_dict(blob["spec"])
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
