"""The training engine: one loop for RIMA, its ablations and the baselines.

Choices that matter for the science, not just the plumbing:

- Training eyes see only the modalities the masks give them (``cfg.missing.train_scenario``):
  incomplete training data is a first-class setting, not an afterthought.
- Model selection and early stopping look at the VALIDATION split under
  ``cfg.train.selection_scenario`` — never at training data (a defect of the authors' code).
- A run is reproducible bit for bit on CPU: seeded RNGs, a data order re-seeded from
  ``(seed, epoch)`` every epoch, and a checkpoint holding every RNG stream, so a run killed after
  epoch k and resumed ends with the same weights and history as one that was never interrupted.

Outputs for identical inputs are identical files (DVC records their hashes): the timing columns
(``*_seconds``, ``ot_share``) go to ``timings.csv`` rather than ``history.csv``, and the summary's
wall-clock numbers to ``timings.json`` rather than ``train_summary.json``.

This module is the run from start to finish; its parts have modules of their own:
:mod:`~rima_core.runs.train_steps` (optimiser, schedule, gradient steps),
:mod:`~rima_core.runs.epochs` (one epoch and its bookkeeping, the epoch loop),
:mod:`~rima_core.runs.selection` (validation scoring, selection, scenario checks),
:mod:`~rima_core.runs.checkpoint` (checkpoints, RNG state, resume),
:mod:`~rima_core.runs.train_outputs` (history, summary, alignment report) and
:mod:`~rima_core.runs.teacher` (distillation's teacher stage).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from rima_core.config import Config
from rima_core.core.data.dataset import EyeDataset, make_loader
from rima_core.core.data.masks import load_masks, selection_scenarios
from rima_core.core.models import ModelSpec, build_model, save_model
from rima_core.core.models.common import PathPooling
from rima_core.runs.calibration import calibrate_model, calibrate_paths
from rima_core.runs.checkpoint import (
    CHECKPOINT_FORMAT,
    RESUMABLE_KEYS,
    Progress,
    masks_digest,
    resume_checkpoint,
    run_fingerprint,
)
from rima_core.runs.engine import amp_dtype, resolve_device, seed_everything
from rima_core.runs.epochs import EpochCallback, EpochRunner, epoch_seed, run_epochs
from rima_core.runs.selection import (
    check_metric,
    check_scenario,
    check_selection,
    validation_metrics,
)
from rima_core.runs.teacher import TEACHER_DIR, TeacherStage, train_teacher
from rima_core.runs.train_outputs import (
    RUN_SUMMARY_KEYS,
    RUN_TIMINGS_FILE,
    TIMINGS_FILE,
    MetricsSink,
    alignment_report,
    is_timing_column,
    run_summary,
    write_summary,
)
from rima_core.runs.train_steps import Optimisation, lr_factor
from rima_core.tracking import mlflow_runs
from rima_core.tracking.metric_names import train_stat

log = logging.getLogger(__name__)

# Every public name the parts moved out with stays importable from here (re-exported).
__all__ = [
    "CHECKPOINT_FORMAT",
    "RESUMABLE_KEYS",
    "RUN_SUMMARY_KEYS",
    "RUN_TIMINGS_FILE",
    "TEACHER_DIR",
    "TIMINGS_FILE",
    "EpochCallback",
    "MetricsSink",
    "check_scenario",
    "check_selection",
    "epoch_seed",
    "is_timing_column",
    "lr_factor",
    "model_spec",
    "train",
    "validation_metrics",
    "write_summary",
]


def model_spec(cfg: Config, store: Any) -> Any:
    """The :class:`ModelSpec` for ``cfg`` on this store (class names and shapes from its meta)."""

    return ModelSpec.from_config(
        cfg,
        n_classes=int(store.n_classes),
        class_names=list(store.class_names),
        fundus_shape=list(store.meta["fundus_shape"]),
        oct_shape=list(store.meta["oct_shape"]),
    )


@dataclass
class _Data:
    """The store, masks and training eyes of a run, checked before any model is built."""

    store: Any  # the opened store (its meta: class names, shapes, content hash)
    masks: pd.DataFrame
    train_ds: Any
    val_scenarios: list[str]
    n_train: int
    n_val: int


def _load_data(store: str | Path, masks: str | Path | pd.DataFrame, cfg: Config) -> _Data:
    """Open the store and masks; refuse a training or selection scenario with no eyes."""
    from rima_core.core.data import open_store

    tc = cfg.train
    st = open_store(store)
    mask_df = load_masks(masks)
    n_train = check_scenario(mask_df, "train", cfg.missing.train_scenario, "training")
    val_scenarios = selection_scenarios(tc.selection_scenario)
    n_val = check_selection(mask_df, tc.selection_scenario, "model selection")
    train_ds = EyeDataset(store, mask_df, "train", cfg.missing.train_scenario)
    return _Data(st, mask_df, train_ds, val_scenarios, n_train, n_val)


def _training_device(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    """The device and autocast dtype; on CUDA, deterministic cuDNN kernels (reproducible runs)."""
    device = resolve_device(cfg.runtime.device)
    dtype = amp_dtype(device, cfg.runtime.amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return device, dtype


def _new_model(
    cfg: Config, data: _Data, device: torch.device
) -> tuple[Any, nn.Module, dict[str, Any]]:
    """The spec, the freshly seeded model on ``device`` and the run's fingerprint (settings and
    data a checkpoint must match to be resumed)."""

    spec = model_spec(cfg, data.store)
    seed_everything(cfg.runtime.seed)
    model = build_model(spec).to(device)
    pairs = [("train", cfg.missing.train_scenario)] + [("val", v) for v in data.val_scenarios]
    fingerprint = run_fingerprint(
        cfg,
        {
            "data_hash": data.store.meta.get("content_hash"),
            "masks_digest": masks_digest(data.masks, pairs),
        },
    )
    return spec, model, fingerprint


def _distillation_teacher(
    model: nn.Module, store: str | Path, data: _Data, out_dir: Path, stage: TeacherStage
) -> dict[str, Any]:
    """Stage 1 of distillation (:mod:`rima_core.runs.teacher`): the complete-data teacher,
    trained alone, then frozen; stage 2 starts from the same RNG state however stage 1 ran
    (fresh, resumed, skipped)."""
    teacher_summary = train_teacher(model, store, data.masks, out_dir, stage)
    model.freeze_teacher()
    seed_everything(stage.cfg.runtime.seed)
    return teacher_summary


def _start(
    out_dir: Path,
    resume: bool,
    fingerprint: dict[str, Any],
    model: nn.Module,
    opt: Optimisation,
    val_scenarios: list[str],
) -> Progress:
    """The run's progress: from ``out_dir``'s checkpoint with ``resume``, else a fresh start that
    removes an earlier run's result (a half-rewritten folder never looks finished)."""
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        return resume_checkpoint(ckpt_path, fingerprint, model, opt, val_scenarios)
    if resume:
        log.info("no checkpoint in %s: starting a fresh run", out_dir)
    (out_dir / "train_summary.json").unlink(missing_ok=True)
    (out_dir / "headline.json").unlink(missing_ok=True)
    return Progress()


def _val_loaders(
    store: str | Path, data: _Data, cfg: Config, device: torch.device
) -> dict[str, Any]:
    """A fixed-order loader of the validation eyes per selection scenario."""

    rt = cfg.runtime
    return {
        scenario: make_loader(
            EyeDataset(store, data.masks, "val", scenario),
            batch_size=rt.eval_batch_size,
            shuffle=False,
            num_workers=rt.num_workers,
            seed=rt.seed,
            pin_memory=device.type == "cuda",
        )
        for scenario in data.val_scenarios
    }


def _finish_model(
    run: EpochRunner, progress: Progress, store: str | Path, mask_df: pd.DataFrame
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Load the selected epoch, fit path weights and temperatures on validation, save
    ``model.pt`` and the alignment report; returns the pooling and calibration results."""

    model, spec, tc = run.model, run.spec, run.cfg.train
    if progress.best["state_dict"] is None:
        raise RuntimeError(f"{run.out_dir}: no epoch was trained (train.epochs={tc.epochs})")
    model.load_state_dict(progress.best["state_dict"])
    loaders, device, dtype = run.val_loaders, run.device, run.dtype
    # both fitted on validation after selection; T changes no argmax, the path weights may
    if isinstance(model, PathPooling):  # refit from the full path alone, as every epoch did:
        model.reset_path_weights()  # the shipped weights are those selection scored
    pooling = calibrate_paths(model, loaders, device, dtype) if tc.pool_paths else None
    calibration = calibrate_model(model, loaders, device, dtype)
    spec.temperature = calibration["temperature"]
    spec.temperatures = calibration["temperatures"]
    spec.decoding = tc.decoding
    save_model(model, spec, run.out_dir / "model.pt")
    alignment_report(model, store, mask_df, run.out_dir / "alignment.json", run.tracker)
    return pooling, calibration


def train(
    store: str | Path,
    masks: str | Path | pd.DataFrame,
    out_dir: str | Path,
    cfg: Config,
    resume: bool = False,
    epoch_callback: EpochCallback | None = None,
    tracker: MetricsSink | None = None,
) -> dict[str, Any]:
    """Train ``cfg.model.name`` on the train split; keep the best epoch on validation.

    Writes ``model.pt`` (best epoch), ``checkpoint.pt`` (last epoch; ``resume=True`` continues
    from it), ``history.csv`` and ``train_summary.json`` into ``out_dir``. ``epoch_callback(epoch,
    val_metrics)`` runs after each epoch's checkpoint is on disk, so an exception from it (Optuna
    pruning, a kill) leaves a resumable run. ``tracker`` receives per-epoch metrics (default:
    :mod:`rima_core.tracking.mlflow_runs`, a no-op without an active MLflow run).
    """
    if tracker is None:
        tracker = mlflow_runs
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _load_data(store, masks, cfg)
    device, dtype = _training_device(cfg)
    spec, model, fingerprint = _new_model(cfg, data, device)
    teacher_summary = None
    if spec.name == "distillation":
        stage = TeacherStage(cfg, spec, device, dtype, tracker, fingerprint, resume)
        teacher_summary = _distillation_teacher(model, store, data, out_dir, stage)
    opt = Optimisation.build(model, cfg, len(data.train_ds), dtype)
    progress = _start(out_dir, resume, fingerprint, model, opt, data.val_scenarios)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "training %s (%d parameters) on %s%s: %d train eyes (%s), %d val eyes (%s), %d epochs",
        spec.name,
        n_params,
        device,
        f" with {dtype}" if dtype else "",
        data.n_train,
        cfg.missing.train_scenario,
        data.n_val,
        cfg.train.selection_scenario,
        cfg.train.epochs,
    )
    val_loaders = _val_loaders(store, data, cfg, device)
    check_metric(cfg.train.selection_metric, spec.n_classes)
    run = EpochRunner(
        cfg, spec, model, opt, device, dtype, data.train_ds, val_loaders, out_dir, tracker
    )
    t_run = time.perf_counter()
    run_epochs(run, progress, fingerprint, epoch_callback)
    pooling, calibration = _finish_model(run, progress, store, data.masks)
    counts = {"n_parameters": n_params, "n_train": data.n_train, "n_val": data.n_val}
    summary = run_summary(cfg, spec, progress, counts, device, dtype, calibration["temperature"])
    return _complete_summary(run, summary, pooling, teacher_summary, t_run)


def _complete_summary(
    run: EpochRunner,
    summary: dict[str, Any],
    pooling: dict[str, Any] | None,
    teacher_summary: dict[str, Any] | None,
    t_run: float,
) -> dict[str, Any]:
    """Add the calibration, pooling and teacher results, the run time and the finished mark to
    ``summary``, log the fitted path weights and write the summary files."""
    spec = run.spec
    summary["temperatures"] = spec.temperatures
    summary["decoding"] = spec.decoding
    if teacher_summary is not None:
        summary["teacher"] = teacher_summary
    if pooling is not None:
        summary["path_pooling"] = pooling
        if pooling["fitted"]:
            run.tracker.log_metrics(
                {train_stat(f"path_weight/{k}"): v for k, v in pooling["weights"].items()}
            )
    summary["run_seconds_this_session"] = time.perf_counter() - t_run
    # the mark `rima register` requires: training finished, with exactly these weights
    summary["model_sha256"] = hashlib.sha256((run.out_dir / "model.pt").read_bytes()).hexdigest()
    summary["complete"] = True
    write_summary(run.out_dir, summary)
    return summary
