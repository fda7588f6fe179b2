"""Distillation's stage 1: the complete-data teacher, trained alone before its students.

The knowledge-distillation baseline (rima_core/core/models/baselines.py) trains in two stages
with the ordinary engine; this module is the first, apart from :mod:`rima_core.runs.train` so
the main loop reads without the one model that needs a second run inside it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from rima_core.config import Config
from rima_core.core.data.dataset import EyeDataset, make_loader
from rima_core.runs.checkpoint import Progress, resume_checkpoint
from rima_core.runs.engine import EngineError
from rima_core.runs.epochs import EpochRunner, run_epochs
from rima_core.runs.selection import check_scenario
from rima_core.runs.train_outputs import MetricsSink, json_number
from rima_core.runs.train_steps import Optimisation

# training's logger (not this module's name): `rima tune` quiets a trial's training lines by it
# (rima_core.runs.tune.TRIAL_QUIET_LOGGERS)
log = logging.getLogger("rima_core.runs.train")

# distillation's teacher stage writes its checkpoint and history here, inside the run's out_dir
TEACHER_DIR = "teacher"


@dataclass
class TeacherStage:
    """What distillation's teacher stage shares with the run that starts it."""

    cfg: Config
    spec: Any
    device: torch.device
    dtype: torch.dtype | None
    tracker: MetricsSink
    fingerprint: dict[str, Any]
    resume: bool


class _Prefixed:
    """A metrics sink that prefixes every key (the teacher stage's epochs log as
    ``teacher/*``, so they do not collide with the students' epochs of the same number)."""

    def __init__(self, sink: MetricsSink, prefix: str) -> None:
        self.sink, self.prefix = sink, prefix

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.sink.log_metrics({self.prefix + k: v for k, v in metrics.items()}, step=step)


def _complete_eyes(ds: Any) -> Any:
    """A copy of the :class:`EyeDataset` ``ds`` reduced to its eyes with both modalities."""
    keep = ds.has_fundus & ds.has_oct
    out = copy.copy(ds)
    for name in ("rows", "labels", "case_ids", "has_fundus", "has_oct"):
        setattr(out, name, getattr(ds, name)[keep])
    return out


def _teacher_data(store: str | Path, mask_df: pd.DataFrame, cfg: Config) -> tuple[Any, Any]:
    """The teacher's training and validation datasets: their eyes with both modalities."""

    check_scenario(mask_df, "val", "complete", "distillation teacher selection")
    train_ds = _complete_eyes(EyeDataset(store, mask_df, "train", cfg.missing.train_scenario))
    val_ds = _complete_eyes(EyeDataset(store, mask_df, "val", "complete"))
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise EngineError(
            f"distillation: its teacher needs training and validation eyes with both "
            f"modalities; have {len(train_ds)} and {len(val_ds)}"
        )
    return train_ds, val_ds


def _teacher_runner(
    stage: TeacherStage,
    teacher: nn.Module,
    opt: Optimisation,
    train_ds: Any,
    val_ds: Any,
    stage_dir: Path,
) -> EpochRunner:
    """The ordinary epoch runner, on the teacher alone: selected on the complete validation
    eyes, logging as ``teacher/*``, saving no model file (its best weights live in its
    checkpoint)."""

    rt = stage.cfg.runtime
    loader = make_loader(
        val_ds,
        batch_size=rt.eval_batch_size,
        shuffle=False,
        num_workers=rt.num_workers,
        seed=rt.seed,
        pin_memory=stage.device.type == "cuda",
    )
    return EpochRunner(
        stage.cfg,
        stage.spec,
        teacher,
        opt,
        stage.device,
        stage.dtype,
        train_ds,
        {"complete": loader},
        stage_dir,
        _Prefixed(stage.tracker, "teacher/"),
        model_file=None,
    )


def train_teacher(
    model: nn.Module, store: str | Path, mask_df: pd.DataFrame, out_dir: Path, stage: TeacherStage
) -> dict[str, Any]:
    """Distillation's stage 1: train ``model.teacher`` alone on the training eyes that have both
    modalities, for the run's epoch budget, with the same engine, optimiser, schedule, early
    stopping and selection metric, selected on the complete validation eyes; load its best
    weights into the model and return its summary.

    Resumable like any run: its checkpoint and history are in ``out_dir/teacher``; a stage
    that already finished is not trained again (``resume``), and a fresh stage removes a
    student checkpoint left by an earlier run, whose teacher it would not match.
    """
    cfg = stage.cfg
    stage_dir = out_dir / TEACHER_DIR
    stage_dir.mkdir(parents=True, exist_ok=True)
    train_ds, val_ds = _teacher_data(store, mask_df, cfg)
    teacher = model.teacher
    opt = Optimisation.build(teacher, cfg, len(train_ds), stage.dtype)
    fingerprint = {**stage.fingerprint, "stage": "teacher"}
    ckpt = stage_dir / "checkpoint.pt"
    if stage.resume and ckpt.exists():
        progress = resume_checkpoint(ckpt, fingerprint, teacher, opt, ["complete"])
    else:
        progress = Progress()
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    log.info(
        "distillation, stage 1: teacher on %d complete training eyes, selected on %d complete "
        "validation eyes",
        len(train_ds),
        len(val_ds),
    )
    run = _teacher_runner(stage, teacher, opt, train_ds, val_ds, stage_dir)
    run_epochs(run, progress, fingerprint)
    if progress.best["state_dict"] is None:
        raise RuntimeError(f"{stage_dir}: no teacher epoch was trained")
    teacher.load_state_dict(progress.best["state_dict"])
    log.info("distillation, stage 2: students distilled from the frozen teacher")
    return {
        "epochs_run": len(progress.history),
        "stopped_early": progress.stopped_early,
        "best_epoch": progress.best["epoch"],
        "n_train": len(train_ds),
        "n_val": len(val_ds),
        "best_val_metrics": {k: json_number(v) for k, v in progress.best["metrics"].items()},
    }
