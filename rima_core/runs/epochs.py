"""One training epoch with its bookkeeping, and the loop over a run's epochs.

An epoch trains, validates the predictor that ships, keeps the model if it is the best so far,
and only then writes the checkpoint and history: whatever stops a run after an epoch (a kill,
Optuna pruning) leaves it resumable. The data order is re-seeded from ``(seed, epoch)`` every
epoch, so a resumed run re-creates exactly the shuffles and augmentations it would have drawn.
Shared by the main run and distillation's teacher stage (:mod:`rima_core.runs.teacher`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rima_core.config import Config
from rima_core.core.augment import STREAM as AUGMENT_STREAM
from rima_core.core.data.dataset import make_loader
from rima_core.core.data.masks import MAIN_SCENARIOS
from rima_core.core.models import save_model
from rima_core.core.models.common import PathPooling
from rima_core.runs.calibration import calibrate_paths
from rima_core.runs.checkpoint import Progress, save_checkpoint
from rima_core.runs.selection import select_epoch, validation_metrics
from rima_core.runs.train_outputs import MetricsSink, epoch_history_row, write_history
from rima_core.runs.train_steps import Optimisation, train_one_epoch
from rima_core.tracking.metric_names import epoch_metrics, selection_scenario_name

# training's logger (not this module's name): `rima tune` quiets a trial's training lines by it
# (rima_core.runs.tune.TRIAL_QUIET_LOGGERS)
log = logging.getLogger("rima_core.runs.train")

EpochCallback = Callable[[int, dict[str, float]], None]


def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """The seed of one epoch: a resumed run re-creates exactly the same shuffles (no ``stream``)
    and augmentations (``stream`` = augment.STREAM)."""
    return int(np.random.SeedSequence([seed, epoch, *stream]).generate_state(1)[0])


@dataclass
class EpochRunner:
    """What every epoch of one training run uses; :meth:`epoch` trains and records one."""

    cfg: Config
    spec: Any
    model: nn.Module
    opt: Optimisation
    device: torch.device
    dtype: torch.dtype | None
    train_ds: Any
    val_loaders: dict[str, Any]
    out_dir: Path
    tracker: MetricsSink
    # where the best epoch's model is saved (None: nowhere, e.g. distillation's teacher stage,
    # whose best weights live in its checkpoint)
    model_file: str | None = "model.pt"

    def validate(self) -> dict[str, float]:
        """Validation metrics of the predictor that ships (select what ships): with
        ``train.pool_paths`` the path weights are fitted on validation first, exactly as
        training's end fits them, and the temperatures per availability pattern likewise, so an
        epoch is chosen for the pooled, calibrated prediction a user gets, not for the full path
        alone. The fitted weights stay on the model until :meth:`epoch` has kept the best
        epoch's state (weights included), then go back to the full path for training."""

        if self.cfg.train.pool_paths and isinstance(self.model, PathPooling):
            self.model.reset_path_weights()  # every epoch's fit starts from the full path alone
            calibrate_paths(
                self.model, self.val_loaders, self.device, self.dtype, quiet=True, explain=False
            )
        return validation_metrics(
            self.model,
            self.val_loaders,
            self.device,
            self.dtype,
            self.spec.class_names,
            calibrate=True,
        )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """The epoch's gradient steps, over a data order (and augmentations) seeded from
        ``(seed, epoch)``; returns the epoch's training stats."""

        tc, rt = self.cfg.train, self.cfg.runtime
        loader = make_loader(
            self.train_ds,
            batch_size=tc.batch_size,
            shuffle=True,
            num_workers=rt.num_workers,
            seed=epoch_seed(rt.seed, epoch),
            pin_memory=self.device.type == "cuda",
        )
        desc = f"epoch {epoch}/{tc.epochs}"
        augment = None
        if tc.augment:
            generator = torch.Generator().manual_seed(epoch_seed(rt.seed, epoch, AUGMENT_STREAM))
            augment = (tc.augment, generator)
        return train_one_epoch(
            self.model, loader, self.opt, self.device, self.dtype, tc.grad_clip, desc, augment
        )

    def epoch(
        self, epoch: int, progress: Progress, fingerprint: dict[str, Any]
    ) -> dict[str, float]:
        """Train one epoch, validate, keep the model if it is the best so far, then write the
        checkpoint and history and report; returns the validation metrics."""

        tc = self.cfg.train
        metric = tc.selection_metric
        t0 = time.perf_counter()
        train_stats = self.train_epoch(epoch)
        t1 = time.perf_counter()
        val_metrics = self.validate()
        t2 = time.perf_counter()
        model = self.model
        improved = select_epoch(progress, epoch, metric, val_metrics, model)
        if improved and self.model_file is not None:
            save_model(model, self.spec, self.out_dir / self.model_file)
        if isinstance(model, PathPooling):  # training (and the checkpoint) use the full path
            model.reset_path_weights()
        progress.stopped_early = tc.patience > 0 and progress.stale >= tc.patience
        progress.stopped_early = progress.stopped_early and epoch < tc.epochs
        lr = self.opt.scheduler.get_last_lr()[0]
        scenarios = list(self.val_loaders)
        row = epoch_history_row(
            epoch, lr, train_stats, val_metrics, scenarios, progress.best["epoch"], (t0, t1, t2)
        )
        progress.history.append(row)
        progress.epoch = epoch
        save_checkpoint(
            self.out_dir / "checkpoint.pt", model, self.opt, progress, fingerprint, self.spec
        )
        write_history(progress.history, self.out_dir / "history.csv")
        self._report(epoch, row, val_metrics, improved, progress)
        return val_metrics

    def _report(
        self,
        epoch: int,
        row: dict[str, float],
        val_metrics: dict[str, float],
        improved: bool,
        progress: Progress,
    ) -> None:
        """The epoch's curves to the tracker and its log line."""
        tc = self.cfg.train
        metric = tc.selection_metric
        # MLflow gets the curves worth watching; history.csv (an artifact at the end) has all
        selection = selection_scenario_name(list(self.val_loaders))
        self.tracker.log_metrics(epoch_metrics(row, metric, selection, MAIN_SCENARIOS), step=epoch)
        log.info(
            "epoch %d/%d: loss %.4f, val %s %.4f%s (%.1f s, OT %.0f%%)",
            epoch,
            tc.epochs,
            row["train/loss"],
            metric,
            val_metrics[metric],
            " *" if improved else "",
            row["epoch_seconds"],
            100 * row["ot_share"],
        )
        if progress.stopped_early:
            log.info("early stop: no %s improvement for %d epochs", metric, progress.stale)


def run_epochs(
    run: EpochRunner,
    progress: Progress,
    fingerprint: dict[str, Any],
    epoch_callback: EpochCallback | None = None,
) -> None:
    """The epochs after ``progress.epoch`` up to ``train.epochs``, until early stopping;
    ``epoch_callback(epoch, val_metrics)`` after each epoch's checkpoint is on disk."""
    for epoch in range(progress.epoch + 1, run.cfg.train.epochs + 1):
        if progress.stopped_early:
            break
        val_metrics = run.epoch(epoch, progress, fingerprint)
        if epoch_callback is not None:
            epoch_callback(epoch, val_metrics)
