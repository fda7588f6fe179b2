"""What a saved model carries besides its weights: the calibration temperature of each
availability pattern and how its grade is decoded.

They are plain attributes set on the module when a model is loaded (not parameters: no
``state_dict`` change, so weights files stay loadable by older code and vice versa). Defined
here, with the models, because loading a model sets them; the engine reads them when it
predicts.
"""

from __future__ import annotations

from torch import nn

from rima_core.config import DECODINGS

# The availability patterns an eye can have, each with its own temperature.
PATTERNS = ("complete", "fundus_only", "oct_only")


# The attributes ``load_model`` sets on a loaded model: its fitted calibration temperature (all
# eyes) and one per availability pattern (:data:`PATTERNS`).
TEMPERATURE_ATTR = "calibration_temperature"
TEMPERATURES_ATTR = "calibration_temperatures"


def model_temperature(model: nn.Module) -> float:
    """The calibration temperature of all eyes a model carries (1.0 = none: fresh from training)."""
    return float(getattr(model, TEMPERATURE_ATTR, 1.0))


def model_temperatures(model: nn.Module) -> dict[str, float]:
    """The per-availability temperatures a model carries ({} = the one temperature for all)."""
    return dict(getattr(model, TEMPERATURES_ATTR, {}))


def set_model_temperature(
    model: nn.Module, temperature: float, temperatures: dict[str, float] | None = None
) -> None:
    """Attach the calibration temperature(s) ``predict`` applies (not parameters: no state_dict
    change, so weights files stay loadable by older code and vice versa)."""
    setattr(model, TEMPERATURE_ATTR, float(temperature))
    setattr(model, TEMPERATURES_ATTR, {k: float(v) for k, v in (temperatures or {}).items()})


DECODING_ATTR = "decoding"


def model_decoding(model: nn.Module) -> str:
    """How a model's grade is read from its probabilities (``argmax`` unless its spec says)."""
    return str(getattr(model, DECODING_ATTR, "argmax"))


def set_model_decoding(model: nn.Module, decoding: str) -> None:
    if decoding not in DECODINGS:  # refused here, not at the first grade
        raise ValueError(f"decoding must be one of {list(DECODINGS)}, got {decoding!r}")
    setattr(model, DECODING_ATTR, decoding)
