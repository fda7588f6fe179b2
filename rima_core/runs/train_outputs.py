"""What a training run reports: ``history.csv``, ``train_summary.json``, ``alignment.json`` and
the metrics sink.

Outputs for identical inputs are identical files (DVC records their hashes): the timing columns
(``*_seconds``, ``ot_share``) go to ``timings.csv`` rather than ``history.csv``, and the summary's
wall-clock numbers to ``timings.json`` rather than ``train_summary.json``. Kept together so that
split between deterministic and per-run files is decided in one module.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
from torch import nn

from rima_core.atomic import atomic_file, write_text
from rima_core.config import Config
from rima_core.runs.checkpoint import Progress
from rima_core.runs.diagnostics import alignment_diagnostics, supports_diagnostics
from rima_core.tracking.headline import HEADLINE_FILE, train_headline, write_headline
from rima_core.tracking.metric_names import epoch_row, train_stat

# training's logger (not this module's name): `rima tune` quiets a trial's training lines by it
# (rima_core.runs.tune.TRIAL_QUIET_LOGGERS)
log = logging.getLogger("rima_core.runs.train")

# Beside history.csv and train_summary.json: what differs between two identical runs (wall-clock
# times, the MLflow run). Never DVC outputs, so a rerun with unchanged inputs leaves dvc.lock and
# the committed files as they were.
TIMINGS_FILE = "timings.csv"
RUN_TIMINGS_FILE = "timings.json"
# summary keys that describe this run rather than its result (they stay in the returned summary)
RUN_SUMMARY_KEYS = frozenset(
    {"mean_epoch_seconds", "ot_share", "run_seconds_this_session", "mlflow_run_id"}
)


class MetricsSink(Protocol):
    """Where per-epoch metrics go; :mod:`rima_core.tracking.mlflow_runs` (MLflow) is the default."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


def is_timing_column(name: str) -> bool:
    """A wall-clock column: it differs between identical runs, so it stays out of the
    deterministic ``history.csv`` (``timings.csv`` holds it)."""
    return name.endswith("_seconds") or name == "ot_share"


def json_number(value: float) -> float | None:
    """NaN/inf are not JSON numbers; write them as null."""
    return float(value) if math.isfinite(value) else None


def epoch_history_row(
    epoch: int,
    lr: float,
    train_stats: dict[str, float],
    val_metrics: dict[str, float],
    scenarios: list[str],
    best_epoch: int | None,
    times: tuple[float, float, float],
) -> dict[str, float]:
    """One ``history.csv`` row under :mod:`rima_core.tracking.metric_names` (``train/loss``,
    ``val/mean/qwk``, ``val/complete/qwk`` ...; ``scenarios`` are the validation scenarios),
    with the timing columns that go to ``timings.csv``; ``times`` are the epoch's start, end of
    training and end of validation (``time.perf_counter``)."""
    t0, t1, t2 = times
    train_seconds = t1 - t0
    ot_seconds = train_stats.get("ot_seconds", 0.0)
    stats = {k: v for k, v in train_stats.items() if k != "ot_seconds"}
    row: dict[str, float] = epoch_row(epoch, lr, stats, val_metrics, scenarios, best_epoch)
    row.update(
        {
            "epoch_seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
            "val_seconds": t2 - t1,
            "ot_seconds": ot_seconds,
            "ot_share": ot_seconds / train_seconds if train_seconds > 0 else 0.0,
        }
    )
    return row


def write_history(history: list[dict[str, float]], path: Path) -> None:
    """``history.csv`` (deterministic) and the per-epoch timings in ``timings.csv`` beside it."""
    hist = pd.DataFrame(history)
    timing = [c for c in hist.columns if is_timing_column(c)]
    with atomic_file(path) as tmp:
        hist.drop(columns=timing).to_csv(tmp, index=False)
    with atomic_file(path.parent / TIMINGS_FILE) as tmp:
        hist[["epoch", *timing]].to_csv(tmp, index=False)


def run_summary(
    cfg: Config,
    spec: Any,
    progress: Progress,
    counts: dict[str, int],
    device: torch.device,
    dtype: torch.dtype | None,
    temperature: float,
) -> dict[str, Any]:
    """The run's result (``train_summary.json``) and, under :data:`RUN_SUMMARY_KEYS`, its
    wall-clock numbers; ``counts`` holds ``n_parameters``, ``n_train`` and ``n_val``."""
    hist = pd.DataFrame(progress.history)
    timing = hist[[c for c in hist.columns if is_timing_column(c)]]
    tc = cfg.train
    return {
        "model": spec.name,
        "n_parameters": int(counts["n_parameters"]),
        "device": str(device),
        "amp_dtype": str(dtype).replace("torch.", "") if dtype else None,
        "epochs_run": len(progress.history),
        "stopped_early": progress.stopped_early,
        "best_epoch": progress.best["epoch"],
        "selection_metric": tc.selection_metric,
        "selection_split": "val",
        "selection_scenario": tc.selection_scenario,
        "train_scenario": cfg.missing.train_scenario,
        "n_train": counts["n_train"],
        "n_val": counts["n_val"],
        "best_val_metrics": {k: json_number(v) for k, v in progress.best["metrics"].items()},
        "temperature": temperature,
        "mean_epoch_seconds": float(timing["epoch_seconds"].mean()),
        "ot_share": float(timing["ot_seconds"].sum() / max(1e-12, timing["train_seconds"].sum())),
    }


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> None:
    """``train_summary.json`` (the result), ``headline.json`` (DVC metrics) and
    ``timings.json`` (this run's wall-clock times) into ``out_dir``."""
    out_dir = Path(out_dir)
    result = {k: v for k, v in summary.items() if k not in RUN_SUMMARY_KEYS}
    run = {k: v for k, v in summary.items() if k in RUN_SUMMARY_KEYS and k != "mlflow_run_id"}
    write_text(out_dir / RUN_TIMINGS_FILE, json.dumps(run, indent=2) + "\n")
    write_headline(out_dir / HEADLINE_FILE, train_headline(summary))
    write_text(out_dir / "train_summary.json", json.dumps(result, indent=2, allow_nan=False) + "\n")


def alignment_report(
    model: nn.Module, store: str | Path, masks: pd.DataFrame, path: Path, tracker: MetricsSink
) -> None:
    """Alignment diagnostics of the chosen model on the validation split
    (rima_core.runs.diagnostics)
    to ``path`` and the tracker (``train/alignment/*``), so a change that stops the OT parts from
    carrying signal shows in every run. Models without translators write nothing."""
    path.unlink(missing_ok=True)
    if not supports_diagnostics(model):
        return
    report = alignment_diagnostics(model, store, masks, split="val")
    clean = {k: json_number(v) for k, v in report.items()}
    write_text(path, json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n")
    tracker.log_metrics({train_stat(f"alignment/{k}"): v for k, v in report.items()})
    log.info(
        "alignment (val): probe QWK fundus %.3f, OCT %.3f; translated fundus->OCT read by the "
        "OCT probe %.3f; centred cosine %.3f; T_v column max %.4f (uniform %.4f)",
        report["probe_qwk_fundus"],
        report["probe_qwk_oct"],
        report["cross_probe_qwk_fundus_to_oct"],
        report["centred_cosine_fundus_to_oct"],
        report.get("tv_column_max", float("nan")),
        report.get("tv_column_max_uniform", float("nan")),
    )
