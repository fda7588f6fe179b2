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
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from rima_core.atomic import atomic_file, write_text
from rima_core.config import Config
from rima_core.core.augment import STREAM as AUGMENT_STREAM
from rima_core.core.augment import augment_batch
from rima_core.core.data.masks import MAIN_SCENARIOS, load_masks, selection_scenarios
from rima_core.core.metrics import classification_metrics, is_better
from rima_core.core.models.common import PathPooling
from rima_core.progress import progress as tqdm
from rima_core.runs.engine import (
    EngineError,
    amp_dtype,
    autocast,
    predict,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
    to_device,
)
from rima_core.tracking.metric_names import (
    epoch_metrics,
    epoch_row,
    legacy_history,
    selection_scenario_name,
    train_stat,
)

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# train.* / runtime.* keys that may change between a killed run and its resume without changing the
# result.
RESUMABLE_KEYS = frozenset({"out_dir", "num_workers", "patience", "pool_paths"})


class MetricsSink(Protocol):
    """Where per-epoch metrics go; :mod:`rima_core.tracking.mlflow_runs` (MLflow) is the default."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


EpochCallback = Callable[[int, dict[str, float]], None]


def is_timing_column(name: str) -> bool:
    return name.endswith("_seconds") or name == "ot_share"


def check_scenario(masks: pd.DataFrame, split: str, scenario: str, what: str) -> int:
    """Number of mask rows for (split, scenario); a clear error when there are none."""
    n = int(((masks["split"] == split) & (masks["scenario"] == scenario)).sum())
    if n == 0:
        known = sorted(masks.loc[masks["split"] == split, "scenario"].unique().tolist())
        raise EngineError(
            f"{what}: no eyes in split {split!r} under scenario {scenario!r}; "
            f"scenarios in the masks for {split!r}: {known}"
        )
    return n


def check_selection(masks: pd.DataFrame, selection_scenario: str, what: str) -> int:
    """Validation eyes behind a selection rule (``mean`` needs every main scenario)."""
    counts = [
        check_scenario(masks, "val", scenario, what)
        for scenario in selection_scenarios(selection_scenario)
    ]
    return counts[0]


def validation_metrics(
    model: nn.Module,
    loaders: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype | None,
    class_names: list[str],
    calibrate: bool = False,
) -> dict[str, float]:
    """Validation metrics under each scenario of ``loaders``; with several scenarios the plain
    metric names hold their mean (what selection and tuning compare) and
    ``<scenario>_<metric>`` the per-scenario values.

    Selecting on one scenario (say ``mixed``) picks epochs and settings that suit that mix and
    can hurt the single-modality paths; the mean over all scenarios weighs every path alike.

    ``calibrate=True`` scores the predictor that ships: the temperatures per availability
    pattern are fitted on these same validation eyes first (as training's end does), so a
    probability metric (NLL, ECE, ordinal QWK) selects the calibrated model, not the raw one;
    ``False`` applies the temperatures the model carries.
    """
    from rima_core.runs.calibration import fit_temperatures, pooled_eyes, row_temperatures, softmax

    t = 1.0 if calibrate else None  # None: the model's own temperatures
    preds = {
        scenario: predict(model, loader, device, dtype, desc=f"validate {scenario}", temperature=t)
        for scenario, loader in loaders.items()
    }
    if calibrate:
        overall, per = fit_temperatures(*pooled_eyes(list(preds.values())))
        for p in preds.values():
            p.proba = softmax(p.logits, row_temperatures(per, overall, p.has_fundus, p.has_oct))
    per_scenario = {
        scenario: classification_metrics(p.y_true, p.proba, class_names)
        for scenario, p in preds.items()
    }
    if len(per_scenario) == 1:
        return next(iter(per_scenario.values()))
    names = next(iter(per_scenario.values())).keys()
    out = {k: float(np.mean([m[k] for m in per_scenario.values()])) for k in names}
    for scenario, metrics in per_scenario.items():
        out.update({f"{scenario}_{k}": v for k, v in metrics.items()})
    return out


def _masks_digest(masks: pd.DataFrame, pairs: list[tuple[str, str]]) -> str:
    """Hash of the mask rows a run reads, so a resume against different masks is refused."""
    h = hashlib.sha256()
    for split, scenario in pairs:
        rows = masks[(masks["split"] == split) & (masks["scenario"] == scenario)]
        rows = rows.sort_values("case_id")[["case_id", "has_fundus", "has_oct"]]
        h.update(f"{split}/{scenario}\n".encode())
        h.update(rows.to_csv(index=False).encode())
    return h.hexdigest()[:16]


def model_spec(cfg: Config, store: Any) -> Any:
    """The :class:`ModelSpec` for ``cfg`` on this store (class names and shapes from its meta)."""
    from rima_core.core.models import ModelSpec

    return ModelSpec.from_config(
        cfg,
        n_classes=int(store.n_classes),
        class_names=list(store.class_names),
        fundus_shape=list(store.meta["fundus_shape"]),
        oct_shape=list(store.meta["oct_shape"]),
    )


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to the base lr, then cosine decay to 0 at ``total_steps`` (per step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_seed(seed: int, epoch: int, *stream: int) -> int:
    """The seed of one epoch: a resumed run re-creates exactly the same shuffles (no ``stream``)
    and augmentations (``stream`` = augment.STREAM)."""
    return int(np.random.SeedSequence([seed, epoch, *stream]).generate_state(1)[0])


def _fingerprint(cfg: Config, data: dict[str, Any]) -> dict[str, Any]:
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


# Beside history.csv and train_summary.json: what differs between two identical runs (wall-clock
# times, the MLflow run). Never DVC outputs, so a rerun with unchanged inputs leaves dvc.lock and
# the committed files as they were.
TIMINGS_FILE = "timings.csv"
RUN_TIMINGS_FILE = "timings.json"
# summary keys that describe this run rather than its result (they stay in the returned summary)
RUN_SUMMARY_KEYS = frozenset(
    {"mean_epoch_seconds", "ot_share", "run_seconds_this_session", "mlflow_run_id"}
)


def _write_history(history: list[dict[str, float]], path: Path) -> None:
    """``history.csv`` (deterministic) and the per-epoch timings in ``timings.csv`` beside it."""
    hist = pd.DataFrame(history)
    timing = [c for c in hist.columns if is_timing_column(c)]
    with atomic_file(path) as tmp:
        hist.drop(columns=timing).to_csv(tmp, index=False)
    with atomic_file(path.parent / TIMINGS_FILE) as tmp:
        hist[["epoch", *timing]].to_csv(tmp, index=False)


def write_summary(out_dir: str | Path, summary: dict[str, Any]) -> None:
    """``train_summary.json`` (the result), ``headline.json`` (DVC metrics) and
    ``timings.json`` (this run's wall-clock times) into ``out_dir``."""
    from rima_core.tracking.headline import HEADLINE_FILE, train_headline, write_headline

    out_dir = Path(out_dir)
    result = {k: v for k, v in summary.items() if k not in RUN_SUMMARY_KEYS}
    run = {k: v for k, v in summary.items() if k in RUN_SUMMARY_KEYS and k != "mlflow_run_id"}
    write_text(out_dir / RUN_TIMINGS_FILE, json.dumps(run, indent=2) + "\n")
    write_headline(out_dir / HEADLINE_FILE, train_headline(summary))
    write_text(out_dir / "train_summary.json", json.dumps(result, indent=2, allow_nan=False) + "\n")


def _np_state_to_builtin(state: dict[str, Any]) -> dict[str, Any]:
    """numpy's RNG state holds an ndarray; store it as a list so ``weights_only`` loading works."""
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, keys.tolist(), pos, has_gauss, gauss)}


def _np_state_from_builtin(state: dict[str, Any]) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = state["numpy"]
    return {**state, "numpy": (name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss)}


class _EpochStats:
    """Sample-weighted means of losses and model stats; ``*_seconds`` stats are summed.

    A stat a model reports only for some batches (e.g. ``ot_skipped``) is averaged over the
    samples of the batches that reported it.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = {}
        self.weights: dict[str, int] = {}

    def add(self, batch_size: int, values: dict[str, float]) -> None:
        self.n += batch_size
        for key, value in values.items():
            weight = 1 if key.endswith("_seconds") else batch_size
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
            self.weights[key] = self.weights.get(key, 0) + batch_size

    def result(self) -> dict[str, float]:
        return {
            k: v if k.endswith("_seconds") else v / self.weights[k] for k, v in self.sums.items()
        }


def _train_one_epoch(
    model: nn.Module,
    loader: Any,
    opt: _Optimisation,
    device: torch.device,
    dtype: torch.dtype | None,
    grad_clip: float,
    desc: str,
    augment: tuple[list[str], torch.Generator] | None = None,
) -> dict[str, float]:
    optimizer, scheduler, scaler = opt.optimizer, opt.scheduler, opt.scaler
    model.train()
    acc = _EpochStats()
    bar = tqdm(loader, desc=desc, leave=False)
    for step, batch in enumerate(bar):
        b = to_device(batch, device)
        if augment is not None:
            b = augment_batch(b, *augment)
        with autocast(device, dtype):
            out = model(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"], labels=b["label"])
        ce = F.cross_entropy(out.logits.float(), b["label"])
        aux = out.aux_loss.float()
        loss = ce + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{desc}, batch {step}: non-finite loss (ce={ce.item()}, aux={aux.item()}); "
                "lower train.lr or the OT epsilons"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        values = {"loss": loss.item(), "ce": ce.item(), "aux": aux.item()}
        values.update({k: float(v) for k, v in out.stats.items()})
        acc.add(int(b["label"].shape[0]), values)
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    if acc.n == 0:
        raise ValueError(f"{desc}: the training loader yielded no batches")
    return acc.result()


@dataclass
class _Optimisation:
    """The optimiser, its lr schedule and (fp16 only) the loss scaler: what a step updates
    besides the weights, and what a checkpoint must restore for a bit-identical resume."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None

    @classmethod
    def build(
        cls, model: nn.Module, cfg: Config, n_train: int, dtype: torch.dtype | None
    ) -> _Optimisation:
        """AdamW with linear warm-up and cosine decay per step (:func:`lr_factor`), over the
        parameters that train (all of them, but for distillation's frozen teacher)."""
        tc = cfg.train
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        steps_per_epoch = math.ceil(n_train / tc.batch_size)
        total_steps = steps_per_epoch * tc.epochs
        warmup_steps = round(tc.warmup_epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup_steps, total_steps)
        )
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return cls(optimizer, scheduler, scaler)


@dataclass
class _Progress:
    """Where a run stands after its last finished epoch (saved in every checkpoint)."""

    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    # the selected epoch, its score and validation metrics, and its weights (CPU copies)
    best: dict[str, Any] = field(
        default_factory=lambda: {"epoch": None, "score": None, "metrics": {}, "state_dict": None}
    )
    stale: int = 0  # epochs since the last improvement
    stopped_early: bool = False


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    opt: _Optimisation,
    progress: _Progress,
    fingerprint: dict[str, Any],
    spec: Any,
) -> None:
    """Everything :func:`_resume` needs to continue exactly where this epoch ended, RNG
    streams included."""
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


def _resume(
    path: Path,
    fingerprint: dict[str, Any],
    model: nn.Module,
    opt: _Optimisation,
    scenarios: list[str],
) -> _Progress:
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
    progress = _Progress(
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


def _check_metric(metric: str, n_classes: int) -> None:
    known = classification_metrics(np.arange(n_classes), np.eye(n_classes))
    if metric not in known:
        raise EngineError(
            f"train.selection_metric={metric!r} is not a metric; known: {sorted(known)}"
        )


def _epoch_row(
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


def _select(
    progress: _Progress, epoch: int, metric: str, val_metrics: dict[str, float], model: nn.Module
) -> bool:
    """Keep this epoch if it beats the best so far on ``metric``; True if it did."""
    score = val_metrics[metric]
    best = progress.best
    if not is_better(metric, score, best["score"] if best["epoch"] else None):
        progress.stale += 1
        return False
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    progress.best = {
        "epoch": epoch,
        "score": float(score),
        "metrics": val_metrics,
        "state_dict": state,
    }
    progress.stale = 0
    return True


def _summary(
    cfg: Config,
    spec: Any,
    progress: _Progress,
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
        "best_val_metrics": {k: _json_number(v) for k, v in progress.best["metrics"].items()},
        "temperature": temperature,
        "mean_epoch_seconds": float(timing["epoch_seconds"].mean()),
        "ot_share": float(timing["ot_seconds"].sum() / max(1e-12, timing["train_seconds"].sum())),
    }


@dataclass
class _Run:
    """What every epoch of one training run uses; :meth:`epoch` trains and records one."""

    cfg: Config
    spec: Any
    model: nn.Module
    opt: _Optimisation
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
        from rima_core.runs.calibration import calibrate_paths

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

    def epoch(
        self, epoch: int, progress: _Progress, fingerprint: dict[str, Any]
    ) -> dict[str, float]:
        """Train one epoch, validate, keep the model if it is the best so far, then write the
        checkpoint and history and report; returns the validation metrics."""
        from rima_core.core.data.dataset import make_loader
        from rima_core.core.models import save_model

        tc, rt = self.cfg.train, self.cfg.runtime
        metric = tc.selection_metric
        t0 = time.perf_counter()
        loader = make_loader(
            self.train_ds,
            batch_size=tc.batch_size,
            shuffle=True,
            num_workers=rt.num_workers,
            seed=epoch_seed(rt.seed, epoch),
            pin_memory=self.device.type == "cuda",
        )
        desc = f"epoch {epoch}/{tc.epochs}"
        model, device, dtype = self.model, self.device, self.dtype
        augment = None
        if tc.augment:
            generator = torch.Generator().manual_seed(epoch_seed(rt.seed, epoch, AUGMENT_STREAM))
            augment = (tc.augment, generator)
        train_stats = _train_one_epoch(
            model, loader, self.opt, device, dtype, tc.grad_clip, desc, augment
        )
        t1 = time.perf_counter()
        val_metrics = self.validate()
        t2 = time.perf_counter()
        improved = _select(progress, epoch, metric, val_metrics, model)
        if improved and self.model_file is not None:
            save_model(model, self.spec, self.out_dir / self.model_file)
        if isinstance(model, PathPooling):  # training (and the checkpoint) use the full path
            model.reset_path_weights()
        progress.stopped_early = tc.patience > 0 and progress.stale >= tc.patience
        progress.stopped_early = progress.stopped_early and epoch < tc.epochs
        lr = self.opt.scheduler.get_last_lr()[0]
        scenarios = list(self.val_loaders)
        row = _epoch_row(
            epoch, lr, train_stats, val_metrics, scenarios, progress.best["epoch"], (t0, t1, t2)
        )
        progress.history.append(row)
        progress.epoch = epoch
        _save_checkpoint(
            self.out_dir / "checkpoint.pt", model, self.opt, progress, fingerprint, self.spec
        )
        _write_history(progress.history, self.out_dir / "history.csv")
        # MLflow gets the curves worth watching; history.csv (an artifact at the end) has all
        selection = selection_scenario_name(scenarios)
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
        return val_metrics


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
    from rima_core.core.data import open_store
    from rima_core.core.data.dataset import EyeDataset, make_loader
    from rima_core.core.models import build_model, save_model

    if tracker is None:
        from rima_core.tracking import mlflow_runs as tracker  # type: ignore[no-redef]
    tc, rt = cfg.train, cfg.runtime
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.pt"
    model_path = out_dir / "model.pt"

    st = open_store(store)
    mask_df = load_masks(masks)
    n_train = check_scenario(mask_df, "train", cfg.missing.train_scenario, "training")
    val_scenarios = selection_scenarios(tc.selection_scenario)
    n_val = check_selection(mask_df, tc.selection_scenario, "model selection")
    train_ds = EyeDataset(store, mask_df, "train", cfg.missing.train_scenario)

    device = resolve_device(rt.device)
    dtype = amp_dtype(device, rt.amp)
    pin = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True

    spec = model_spec(cfg, st)
    seed_everything(rt.seed)
    model = build_model(spec).to(device)
    pairs = [("train", cfg.missing.train_scenario)] + [("val", v) for v in val_scenarios]
    fingerprint = _fingerprint(
        cfg,
        {"data_hash": st.meta.get("content_hash"), "masks_digest": _masks_digest(mask_df, pairs)},
    )
    teacher_summary = None
    if spec.name == "distillation":
        # stage 1: the complete-data teacher, trained alone, then frozen (models/baselines.py)
        stage = _Stage(cfg, spec, device, dtype, tracker, fingerprint, resume)
        teacher_summary = _train_teacher(model, store, mask_df, out_dir, stage)
        model.freeze_teacher()
        # stage 2 starts from the same RNG state however stage 1 ran (fresh, resumed, skipped)
        seed_everything(rt.seed)
    opt = _Optimisation.build(model, cfg, len(train_ds), dtype)
    if resume and ckpt_path.exists():
        progress = _resume(ckpt_path, fingerprint, model, opt, val_scenarios)
    else:
        if resume:
            log.info("no checkpoint in %s: starting a fresh run", out_dir)
        progress = _Progress()
        (out_dir / "train_summary.json").unlink(missing_ok=True)
        (out_dir / "headline.json").unlink(missing_ok=True)

    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "training %s (%d parameters) on %s%s: %d train eyes (%s), %d val eyes (%s), %d epochs",
        spec.name,
        n_params,
        device,
        f" with {dtype}" if dtype else "",
        n_train,
        cfg.missing.train_scenario,
        n_val,
        tc.selection_scenario,
        tc.epochs,
    )
    val_loaders = {
        scenario: make_loader(
            EyeDataset(store, mask_df, "val", scenario),
            batch_size=rt.eval_batch_size,
            shuffle=False,
            num_workers=rt.num_workers,
            seed=rt.seed,
            pin_memory=pin,
        )
        for scenario in val_scenarios
    }
    _check_metric(tc.selection_metric, spec.n_classes)
    run = _Run(cfg, spec, model, opt, device, dtype, train_ds, val_loaders, out_dir, tracker)
    t_run = time.perf_counter()
    for epoch in range(progress.epoch + 1, tc.epochs + 1):
        if progress.stopped_early:
            break
        val_metrics = run.epoch(epoch, progress, fingerprint)
        if epoch_callback is not None:
            epoch_callback(epoch, val_metrics)

    if progress.best["state_dict"] is None:
        raise RuntimeError(f"{out_dir}: no epoch was trained (train.epochs={tc.epochs})")
    model.load_state_dict(progress.best["state_dict"])
    from rima_core.runs.calibration import calibrate_model, calibrate_paths

    # both fitted on validation after selection; T changes no argmax, the path weights may
    if isinstance(model, PathPooling):  # refit from the full path alone, as every epoch did:
        model.reset_path_weights()  # the shipped weights are those selection scored
    pooling = calibrate_paths(model, val_loaders, device, dtype) if tc.pool_paths else None
    calibration = calibrate_model(model, val_loaders, device, dtype)
    spec.temperature = calibration["temperature"]
    spec.temperatures = calibration["temperatures"]
    spec.decoding = tc.decoding
    save_model(model, spec, model_path)
    _alignment_report(model, store, mask_df, out_dir / "alignment.json", tracker)
    counts = {"n_parameters": n_params, "n_train": n_train, "n_val": n_val}
    summary = _summary(cfg, spec, progress, counts, device, dtype, calibration["temperature"])
    summary["temperatures"] = spec.temperatures
    summary["decoding"] = spec.decoding
    if teacher_summary is not None:
        summary["teacher"] = teacher_summary
    if pooling is not None:
        summary["path_pooling"] = pooling
        if pooling["fitted"]:
            tracker.log_metrics(
                {train_stat(f"path_weight/{k}"): v for k, v in pooling["weights"].items()}
            )
    summary["run_seconds_this_session"] = time.perf_counter() - t_run
    # the mark `rima register` requires: training finished, with exactly these weights
    summary["model_sha256"] = hashlib.sha256(model_path.read_bytes()).hexdigest()
    summary["complete"] = True
    write_summary(out_dir, summary)
    return summary


# distillation's teacher stage writes its checkpoint and history here, inside the run's out_dir
TEACHER_DIR = "teacher"


@dataclass
class _Stage:
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


def _train_teacher(
    model: nn.Module, store: str | Path, mask_df: pd.DataFrame, out_dir: Path, stage: _Stage
) -> dict[str, Any]:
    """Distillation's stage 1: train ``model.teacher`` alone on the training eyes that have both
    modalities, for the run's epoch budget, with the same engine, optimiser, schedule, early
    stopping and selection metric, selected on the complete validation eyes; load its best
    weights into the model and return its summary.

    Resumable like any run: its checkpoint and history are in ``out_dir/teacher``; a stage
    that already finished is not trained again (``resume``), and a fresh stage removes a
    student checkpoint left by an earlier run, whose teacher it would not match.
    """
    from rima_core.core.data.dataset import EyeDataset, make_loader

    cfg, tc, rt = stage.cfg, stage.cfg.train, stage.cfg.runtime
    stage_dir = out_dir / TEACHER_DIR
    stage_dir.mkdir(parents=True, exist_ok=True)
    check_scenario(mask_df, "val", "complete", "distillation teacher selection")
    train_ds = _complete_eyes(EyeDataset(store, mask_df, "train", cfg.missing.train_scenario))
    val_ds = _complete_eyes(EyeDataset(store, mask_df, "val", "complete"))
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise EngineError(
            f"distillation: its teacher needs training and validation eyes with both "
            f"modalities; have {len(train_ds)} and {len(val_ds)}"
        )
    teacher = model.teacher
    opt = _Optimisation.build(teacher, cfg, len(train_ds), stage.dtype)
    fingerprint = {**stage.fingerprint, "stage": "teacher"}
    ckpt = stage_dir / "checkpoint.pt"
    if stage.resume and ckpt.exists():
        progress = _resume(ckpt, fingerprint, teacher, opt, ["complete"])
    else:
        progress = _Progress()
        (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    log.info(
        "distillation, stage 1: teacher on %d complete training eyes, selected on %d complete "
        "validation eyes",
        len(train_ds),
        len(val_ds),
    )
    loader = make_loader(
        val_ds,
        batch_size=rt.eval_batch_size,
        shuffle=False,
        num_workers=rt.num_workers,
        seed=rt.seed,
        pin_memory=stage.device.type == "cuda",
    )
    run = _Run(
        cfg,
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
    for epoch in range(progress.epoch + 1, tc.epochs + 1):
        if progress.stopped_early:
            break
        run.epoch(epoch, progress, fingerprint)
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
        "best_val_metrics": {k: _json_number(v) for k, v in progress.best["metrics"].items()},
    }


def _alignment_report(
    model: nn.Module, store: str | Path, masks: pd.DataFrame, path: Path, tracker: MetricsSink
) -> None:
    """Alignment diagnostics of the chosen model on the validation split
    (rima_core.runs.diagnostics)
    to ``path`` and the tracker (``train/alignment/*``), so a change that stops the OT parts from
    carrying signal shows in every run. Models without translators write nothing."""
    from rima_core.runs.diagnostics import alignment_diagnostics, supports_diagnostics

    path.unlink(missing_ok=True)
    if not supports_diagnostics(model):
        return
    report = alignment_diagnostics(model, store, masks, split="val")
    clean = {k: _json_number(v) for k, v in report.items()}
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


def _json_number(value: float) -> float | None:
    """NaN/inf are not JSON numbers; write them as null."""
    return float(value) if math.isfinite(value) else None
