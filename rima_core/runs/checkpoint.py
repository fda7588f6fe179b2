"""Training checkpoints: what a run saves after every epoch and how a killed run resumes.

A checkpoint holds the weights, the optimisation state, every RNG stream and the run's progress,
so a run killed after epoch k and resumed ends with the same weights and history as one that was
never interrupted. It also holds a fingerprint of the settings and data that decide the result:
a resume under anything else is refused rather than silently mixing two runs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from rima_core.atomic import atomic_file
from rima_core.config import Config
from rima_core.runs.engine import EngineError, rng_state, set_rng_state
from rima_core.runs.train_steps import Optimisation
from rima_core.tracking.metric_names import legacy_history

# training's logger (not this module's name): `rima tune` quiets a trial's training lines by it
# (rima_core.runs.tune.TRIAL_QUIET_LOGGERS)
log = logging.getLogger("rima_core.runs.train")

CHECKPOINT_FORMAT = 1
# train.* / runtime.* keys that may change between a killed run and its resume without changing the
# result.
RESUMABLE_KEYS = frozenset({"out_dir", "num_workers", "patience", "pool_paths"})


def masks_digest(masks: pd.DataFrame, pairs: list[tuple[str, str]]) -> str:
    """Hash of the mask rows a run reads, so a resume against different masks is refused."""
    h = hashlib.sha256()
    for split, scenario in pairs:
        rows = masks[(masks["split"] == split) & (masks["scenario"] == scenario)]
        rows = rows.sort_values("case_id")[["case_id", "has_fundus", "has_oct"]]
        h.update(f"{split}/{scenario}\n".encode())
        h.update(rows.to_csv(index=False).encode())
    return h.hexdigest()[:16]


def run_fingerprint(cfg: Config, data: dict[str, Any]) -> dict[str, Any]:
    """The settings (but :data:`RESUMABLE_KEYS`) and ``data`` identity a checkpoint must match."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in RESUMABLE_KEYS}
    runtime = {k: v for k, v in asdict(cfg.runtime).items() if k not in RESUMABLE_KEYS}
    return {
        "model": asdict(cfg.model),
        "ot": asdict(cfg.ot),
        "train": train,
        "runtime": runtime,
        "train_scenario": cfg.missing.train_scenario,
        **data,
    }


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return out


def _save_torch(obj: Any, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


def _np_state_to_builtin(state: dict[str, Any]) -> dict[str, Any]:
    """numpy's RNG state holds an ndarray; store it as a list so ``weights_only`` loading works."""
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, keys.tolist(), pos, has_gauss, gauss)}


def _np_state_from_builtin(state: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)}


@dataclass
class Progress:
    """Where a run stands after its last finished epoch (saved in every checkpoint)."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    # the selected epoch, its score and validation metrics, and its weights (CPU copies)
    best: dict[str, Any] = field(
        default_factory=lambda: {"epoch": None, "score": None, "metrics": {}, "state_dict": None}
    )
    stale: int = 0  # epochs since the last improvement
    stopped_early: bool = False


def save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: Optimisation,
    progress: Progress,
    fingerprint: dict[str, Any],
    spec: Any,
) -> None:
    """Everything :func:`resume_checkpoint` needs to continue exactly where this epoch ended,
    RNG streams included."""
    _save_torch(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": progress.epoch,
            "model": model.state_dict(),
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict() if opt.scaler is not None else None,
            "rng": _np_state_to_builtin(rng_state()),
            "history": progress.history,
            "best": progress.best,
            "stale_epochs": progress.stale,
            "stopped_early": progress.stopped_early,
            "fingerprint": fingerprint,
            "spec": asdict(spec),
        },
        path,
    )


def resume_checkpoint(
    path: Path,
    fingerprint: dict[str, Any],
    model: nn.Module,
    opt: Optimisation,
    scenarios: list[str],
) -> Progress:
    """Restore model, optimisation and RNG state from a checkpoint of the same settings and
    data (anything else is refused: a resumed run must equal an uninterrupted one). A history
    written by an older version (``train_loss``, ``val_qwk`` ...) continues under the current
    names; ``scenarios`` are the run's validation scenarios."""
    # loaded to the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated/foreign file
        raise EngineError(f"{path}: unreadable checkpoint ({exc}); train without --resume") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise EngineError(f"{path}: not a checkpoint of this trainer (format)")
    changed = _diff(ckpt["fingerprint"], fingerprint)
    if changed:
        raise EngineError(
            f"{path}: cannot resume, the run's settings or data changed: "
            + "; ".join(changed)
            + " (train without --resume to start over)"
        )
    model.load_state_dict(ckpt["model"])
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.scheduler.load_state_dict(ckpt["scheduler"])
    if opt.scaler is not None and ckpt.get("scaler") is not None:
        opt.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(_np_state_from_builtin(ckpt["rng"]))
    progress = Progress(
        epoch=int(ckpt["epoch"]),
        history=legacy_history(ckpt["history"], scenarios),
        best=dict(ckpt["best"]),
        stale=int(ckpt["stale_epochs"]),
        stopped_early=bool(ckpt["stopped_early"]),
    )
    log.info(
        "resuming %s after epoch %d (best so far: epoch %s)",
        path.parent,
        progress.epoch,
        progress.best["epoch"],
    )
    return progress
