"""Device, precision, seeding and batched inference shared by training and evaluation.

Kept apart from :mod:`rima_core.runs.train` so evaluation (and the serving wrapper) run a model
exactly the way validation inside training did: same device rules, same autocast, same softmax — a
metric computed during model selection and the same metric in ``evaluate`` then mean the same thing.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rima_core.core.metrics import decode
from rima_core.core.models.postprocess import (  # noqa: F401 - engine's public names too
    DECODING_ATTR,
    TEMPERATURE_ATTR,
    TEMPERATURES_ATTR,
    model_decoding,
    model_temperature,
    model_temperatures,
    set_model_decoding,
    set_model_temperature,
)
from rima_core.progress import progress as tqdm
from rima_core.runs.calibration import row_temperatures, softmax


class EngineError(ValueError):
    """A training/evaluation request that cannot run as asked (unknown scenario or metric, no
    CUDA device, a resume against changed settings, a model that does not fit the store)."""


class NonFiniteOutputError(EngineError, FloatingPointError):
    """The model gave a NaN/inf logit for some eyes: an error naming them, never a grade.

    ``rows`` are the ``index`` values (rows in the store, or positions in a served batch) of the
    eyes whose output is not finite, in loader order. A FloatingPointError too, so a tuning
    trial whose model diverged into NaN fails like one whose loss did, and the search goes on.
    """

    def __init__(self, desc: str, rows: list[int]) -> None:
        self.rows = rows
        shown = ", ".join(str(r) for r in rows[:10]) + (" ..." if len(rows) > 10 else "")
        super().__init__(
            f"{desc}: the model's output is not finite (NaN or infinity) for {len(rows)} eye(s), "
            f"row(s) {shown}; no grade is given for non-finite outputs"
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"runtime.device={name!r} but no CUDA device is available")
    return device


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """Mixed precision only on CUDA: bf16 where the GPU has it (no loss scaling needed), else fp16.

    On CPU autocast would change the numbers (bf16 matmuls) for little speed-up and would break the
    bit-for-bit reproducibility that tests and resume rely on, so it is never used there.
    """
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a loader batch; ``non_blocking`` pays off only with pinned host memory (CUDA)."""
    non_blocking = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, so a resumed run continues the same streams."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Predictions:
    """Per-eye outputs of one pass over a loader, in loader order."""

    index: np.ndarray  # row in the store
    y_true: np.ndarray
    proba: np.ndarray  # (n, K) float64 softmax
    has_fundus: np.ndarray
    has_oct: np.ndarray
    logits: np.ndarray | None = None  # (n, K) float64, before temperature scaling
    decoding: str = "argmax"  # how y_pred grades: the model's train.decoding

    @property
    def y_pred(self) -> np.ndarray:
        return decode(self.proba, self.decoding)


def eye_temperatures(model: nn.Module, has_fundus: np.ndarray, has_oct: np.ndarray) -> np.ndarray:
    """Each eye's calibration temperature under ``model``: its availability pattern's."""
    return row_temperatures(
        model_temperatures(model), model_temperature(model), has_fundus, has_oct
    )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no grad for the block; restores the previous train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def predict(
    model: nn.Module,
    loader: Any,
    device: torch.device,
    dtype: torch.dtype | None = None,
    desc: str = "predict",
    progress: bool = True,
    temperature: float | None = None,
) -> Predictions:
    """Run ``model`` over ``loader`` without labels (inference never sees them).

    Probabilities are ``softmax(logits / T)``: ``temperature`` (one for every eye) if given,
    else each eye's calibration temperature for its availability pattern
    (:func:`eye_temperatures`, set by ``load_model`` from the spec), so evaluation and serving
    apply the fitted calibration without knowing about it.

    A NaN or infinite logit (a diverged or damaged model) raises :class:`NonFiniteOutputError`
    naming the rows: argmax over NaN would silently grade the eye as class 0.
    """
    if temperature is not None:
        t = float(temperature)
        if not (math.isfinite(t) and t > 0):
            raise EngineError(f"calibration temperature must be a positive number, got {t!r}")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("index", "y", "hf", "ho", "z")}
    with eval_mode(model):
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            b = to_device(batch, device)
            with autocast(device, dtype):
                out = model(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"])
            parts["z"].append(out.logits.float().cpu().numpy().astype(np.float64))
            parts["y"].append(batch["label"].numpy())
            parts["index"].append(batch["index"].numpy())
            parts["hf"].append(batch["has_fundus"].numpy())
            parts["ho"].append(batch["has_oct"].numpy())
    if not parts["z"]:
        raise ValueError(f"{desc}: the loader yielded no batches (empty split?)")
    logits_all = np.concatenate(parts["z"])
    index = np.concatenate(parts["index"])
    bad = ~np.isfinite(logits_all).all(axis=1)
    if bad.any():
        raise NonFiniteOutputError(desc, [int(i) for i in index[bad]])
    has_f = np.concatenate(parts["hf"]).astype(bool)
    has_o = np.concatenate(parts["ho"]).astype(bool)
    rows_t = eye_temperatures(model, has_f, has_o) if temperature is None else t
    if not np.all(np.isfinite(rows_t) & (np.asarray(rows_t) > 0)):
        raise EngineError(f"calibration temperatures must be positive numbers, got {rows_t!r}")
    return Predictions(
        index=index,
        y_true=np.concatenate(parts["y"]),
        proba=softmax(logits_all, rows_t),
        has_fundus=has_f,
        has_oct=has_o,
        logits=logits_all,
        decoding=model_decoding(model),
    )
