"""Models: RIMA, its ablations and the baselines behind one interface (docs/interfaces.md).

Every model is called as ``model(fundus, oct, has_fundus, has_oct, labels=None) ->
ModelOutput(logits, aux_loss, stats)``, so one engine trains, evaluates and serves them all. A
model is fully described by a :class:`ModelSpec` (its name, its :class:`RimaConfig`, classes and
shapes; models/spec.py); ``model.pt`` holds the spec and the state dict, so loading never needs
params.yaml or the pretrained-weights files used at training time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rima_core.atomic import atomic_file

from .baselines import Distillation, Imputation, LateFusion, OnlineDistillation, SingleModality
from .common import MissingModalityError, ModelOutput
from .postprocess import set_model_decoding, set_model_temperature
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


# Input shapes a model file may ask the server to allocate per eye (numbers in one image).
MAX_SPEC_FUNDUS_ELEMENTS = 1 << 26
MAX_SPEC_OCT_ELEMENTS = 1 << 27


def _check_spec_sizes(
    path: Path, spec: ModelSpec, state_dict: Any, meta_model: Callable[[], nn.Module]
) -> None:
    """Refuse a spec that asks for more than its file holds, before anything is allocated.

    A damaged or hostile ``model.pt`` can hold a tiny state dict and a spec asking for a 40 GB
    layer; building it would allocate first and fail after. Widths whose square fits in the
    file's weight count are safe as they are; otherwise the model is first built on the ``meta``
    device (shapes only, no memory) and its weight count compared with the file's. The input
    shapes the spec declares are capped too (serving allocates them per request).
    """
    for name, shape, limit in (
        ("fundus_shape", spec.fundus_shape, MAX_SPEC_FUNDUS_ELEMENTS),
        ("oct_shape", spec.oct_shape, MAX_SPEC_OCT_ELEMENTS),
    ):
        dims = [int(d) for d in shape]
        if any(d < 1 for d in dims) or math.prod(dims) > limit:
            raise ValueError(f"{name} {list(shape)} is not a size this model could have")
    if not isinstance(state_dict, dict) or not all(
        isinstance(v, torch.Tensor) for v in state_dict.values()
    ):
        raise ValueError("the weights are not a mapping of tensors")
    in_file = sum(int(v.numel()) for v in state_dict.values())
    c = spec.config
    widths = [int(w) for w in (c.fundus_dim, c.oct_dim, c.hidden_dim, c.heads, spec.n_classes)]
    if max(widths) ** 2 <= in_file:
        return  # every layer of such widths is at most the file's size: building is bounded
    # Rarely needed (a width unused by this model, or a hostile one): the meta build costs a
    # one-time import of torch's reference kernels (~2 s), so it is not done for every load.
    asked = sum(int(v.numel()) for v in meta_model().state_dict().values())
    if asked > in_file:
        raise ValueError(
            f"model {spec.name!r} as specified has {asked:,} weights ({asked * 4 / 2**30:.1f} GiB "
            f"as float32) but the file holds {in_file:,}: refused before allocating"
        )


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

    def build(device: str | None = None) -> nn.Module:
        with torch.device(device) if device else contextlib.nullcontext():
            if spec.name == "distillation" and "teacher.net.0.weight" in blob["state_dict"]:
                # saved before the two-stage protocol: one set of encoders shared by all heads
                return OnlineDistillation(spec.config, spec.n_classes, pretrained=False)
            return build_model(spec, pretrained=False)

    try:
        spec = ModelSpec.from_dict(blob["spec"])
        _check_spec_sizes(path, spec, blob["state_dict"], lambda: build("meta"))
        model = build()
    except Exception as exc:  # a damaged spec fails in many ways (e.g. heads not dividing dims)
        reason = str(exc) if isinstance(exc, ValueError | TypeError) else repr(exc)
        raise ValueError(f"{path}: bad model spec: {reason}") from exc
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: weights do not fit model {spec.name!r}: {exc}") from exc
    set_model_temperature(model, spec.temperature, spec.temperatures)
    set_model_decoding(model, spec.decoding)
    model.to(map_location)
    model.eval()
    return model, spec
