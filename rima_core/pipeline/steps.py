"""One function per pipeline step: the only place a step is implemented.

DVC stages (via the ``rima`` CLI), MLproject entry points and Kubeflow components all call these
functions with paths and a :class:`~rima_core.config.Config`; none of them holds step logic.
Each function writes its outputs atomically (temporary path, then rename) through the module it
delegates to, and returns a small JSON-able summary. Heavy imports (torch, mlflow, great
expectations) happen inside the functions so ``rima --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from rima_core.atomic import write_text
from rima_core.config import Config, ConfigError, with_values
from rima_core.ops.registry import log_trained_model, skipped_promotion
from rima_core.ops.registry import promote as _promote
from rima_core.ops.registry import register as _register
from rima_core.runs.tune import tune as _tune
from rima_core.tracking import mlflow_runs as tracking
from rima_core.tracking.metric_names import (
    epoch_metrics,
    legacy_history,
    selection_scenario_name,
)

log = logging.getLogger(__name__)


def synth(out: str | Path, cfg: Config) -> dict[str, Any]:
    """Write the synthetic retina phantom in the Harvard FairVision npz layout."""
    from rima_core.core.data.synthetic import generate

    return generate(Path(out), cfg.synth)


def prepare(
    input_dir: str | Path,
    out: str | Path,
    cfg: Config,
    source: str | None = None,
    disease: str | None = None,
    skip_bad: bool | None = None,
) -> dict[str, Any]:
    """Read a source tree, resize and write the Arrow store + Parquet manifest."""
    from rima_core.core.data.prepare import prepare_store

    return prepare_store(
        source=source or cfg.data.source,
        input_dir=Path(input_dir),
        out=Path(out),
        cfg=cfg.prepare,
        disease=disease or cfg.data.disease,
        skip_bad=cfg.prepare.skip_bad if skip_bad is None else skip_bad,
    )


def validate(store: str | Path, report: str | Path, cfg: Config) -> dict[str, Any]:
    """Run the Great Expectations suite; the returned dict has ``success`` and ``failures``."""
    from rima_core.core.data.validation import validate_store

    return validate_store(Path(store), Path(report), cfg.validate)


def simulate_missing(store: str | Path, out: str | Path, cfg: Config) -> dict[str, Any]:
    """Write seeded availability masks for every split and scenario."""
    from rima_core.core.data.masks import simulate_missing as _simulate

    return _simulate(Path(store), Path(out), cfg.missing)


def apply_best_params(cfg: Config, best_params: str | Path) -> Config:
    """``cfg`` with the tuned values of a ``best_params.json`` (``{"ot.gw_epsilon": ..., ...}``).

    The tuning step writes dotted ``section.key`` names; a ``{"params": {...}}`` wrapper is
    accepted too. Unknown keys are errors, so a renamed parameter is never silently ignored.
    """

    path = Path(best_params)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no best-params file (run `rima tune` first)") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("params"), dict):
        data = data["params"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of section.key -> value")
    log.info("tuned parameters from %s: %s", path, data)
    return with_values(cfg, data, str(path))


def train(
    store: str | Path,
    masks: str | Path,
    out_dir: str | Path,
    cfg: Config,
    resume: bool = False,
    best_params: str | Path | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.model.name`` (tuned values from ``best_params`` on top), in an MLflow run.

    The run gets the effective config as params, per-epoch metrics and the output files; its id
    goes into ``mlflow_run.json`` so the register step can find it. ``track=False`` skips
    MLflow entirely (quick local runs, tests).
    """
    from rima_core.runs.train import train as _train
    from rima_core.runs.train import write_summary

    if best_params is not None:
        cfg = apply_best_params(cfg, best_params)
    out = Path(out_dir)
    if not track:
        return _train(Path(store), Path(masks), out, cfg, resume=resume)

    run_id, tags = _train_run(out, cfg, resume)
    with tracking.start_run(
        cfg, "train", store=store, tags=tags, dataset_context="training", run_id=run_id
    ) as run:
        write_run_file(out, run.info.run_id)  # before training: a kill leaves a resumable run
        summary = _train(Path(store), Path(masks), out, cfg, resume=resume)
        if run_id is not None:
            _backfill_epochs(out / "history.csv", run.info.run_id, cfg)
        summary["mlflow_run_id"] = run.info.run_id  # returned; on disk in mlflow_run.json
        write_summary(out, summary)  # tracked files hold no run ids or times (dvc.lock)
        for name in ("model.pt", "history.csv", "train_summary.json"):
            tracking.log_artifacts(out / name, artifact_path="train")
        # the model is logged from the run that trained it; `register` registers this one
        log_trained_model(out, cfg, summary)
    return summary


# The MLflow run a training output folder belongs to, beside its checkpoint: `rima train --resume`
# reopens that run, so a run killed and resumed keeps one whole history in MLflow.
MLFLOW_RUN_FILE = "mlflow_run.json"


def read_run_file(out_dir: str | Path) -> str | None:
    """The MLflow run id recorded in ``out_dir``, or None (none recorded, or unreadable)."""

    path = Path(out_dir) / MLFLOW_RUN_FILE
    try:
        run_id = json.loads(path.read_text()).get("run_id")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as exc:
        log.warning("%s unreadable (%s): its MLflow run is not continued", path, exc)
        return None
    return run_id if isinstance(run_id, str) and run_id else None


def write_run_file(out_dir: str | Path, run_id: str) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_text(Path(out_dir) / MLFLOW_RUN_FILE, json.dumps({"run_id": run_id}) + "\n")


def _train_run(out: Path, cfg: Config, resume: bool) -> tuple[str | None, dict[str, Any]]:
    """(run id to reopen or None, tags) for a training run in ``out``.

    ``--resume`` continues the run recorded in ``out`` when the configured store still has it.
    Otherwise a new run starts; a recorded run still RUNNING had its process killed (nothing else
    ends a run without ending it), so it is marked KILLED and linked from the new run. Under
    ``mlflow run`` (``MLFLOW_RUN_ID``) the project's run is used as it is.
    """

    tags: dict[str, Any] = {"model": cfg.model.name}
    previous = read_run_file(out)
    if previous is None or os.environ.get("MLFLOW_RUN_ID"):
        return None, tags
    if resume:
        why = tracking.reopenable(previous, cfg.mlflow)
        if why is None:
            return previous, tags
        log.warning("cannot continue MLflow run %s (%s): starting a new run", previous, why)
    if tracking.end_abandoned_run(previous, cfg.mlflow):
        tags["replaces_killed_run"] = previous
    return None, tags


def _backfill_epochs(history_csv: Path, run_id: str, cfg: Config) -> None:
    """Log the epochs of ``history.csv`` that the run lacks: a kill between an epoch's checkpoint
    and its metrics leaves that epoch in the checkpoint's history but not in MLflow. What is
    logged is what training logs per epoch (:func:`rima_core.tracking.metric_names.epoch_metrics`);
    a history written by an older version (``train_loss``, ``val_qwk``) is read under the current
    names."""
    import mlflow
    import pandas as pd

    from rima_core.core.data.masks import MAIN_SCENARIOS, selection_scenarios

    if not history_csv.is_file():
        return
    hist = pd.read_csv(history_csv)
    if hist.empty or "epoch" not in hist.columns:
        return
    scenarios = selection_scenarios(cfg.train.selection_scenario)
    rows = legacy_history(hist.to_dict("records"), scenarios)
    selection = selection_scenario_name(scenarios)
    metric = cfg.train.selection_metric
    picked = [epoch_metrics(row, metric, selection, MAIN_SCENARIOS) for row in rows]
    if not picked[0]:
        log.warning("%s: no column training logs per epoch; nothing backfilled", history_csv)
        return
    probe = next(iter(picked[0]))
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, probe)}

    for row, metrics in zip(rows, picked, strict=True):
        epoch = int(row["epoch"])
        if epoch not in logged:
            tracking.log_metrics(metrics, step=epoch)
            log.info("MLflow run %s: logged epoch %d from history.csv", run_id, epoch)


def evaluate(
    model: str | Path,
    store: str | Path,
    masks: str | Path,
    out_dir: str | Path,
    cfg: Config,
    track: bool = True,
) -> dict[str, Any]:
    """Score a model under every missing-modality scenario; metrics and plots to MLflow too."""
    from rima_core.runs.evaluate import evaluate as _evaluate

    if not track:
        return _evaluate(Path(model), Path(store), Path(masks), Path(out_dir), cfg)

    tags = {}
    run_id = read_run_file(Path(model).parent)
    if run_id:
        tags["train_run_id"] = run_id  # links the evaluation to the run that trained it
    check_evaluate_inputs(model, store, masks, cfg)  # a bad input must not leave a FAILED run
    with tracking.start_run(
        cfg, "evaluate", store=store, tags=tags, dataset_context="evaluation"
    ) as run:
        result = _evaluate(Path(model), Path(store), Path(masks), Path(out_dir), cfg)
        result["mlflow_run_id"] = run.info.run_id
    return result


def check_evaluate_inputs(
    model: str | Path, store: str | Path, masks: str | Path, cfg: Config
) -> None:
    """Fail on a missing/unreadable model, a store that is not one, masks without the split, or a
    model trained for other classes/sizes — before any MLflow run is opened, so a typo in a path
    never leaves a FAILED evaluation run behind. (The same checks as the top of
    :func:`rima_core.runs.evaluate.evaluate`, which repeats them for its direct callers.)"""
    from rima_core.core.data.masks import load_masks
    from rima_core.core.models import load_model
    from rima_core.runs.engine import EngineError, resolve_device
    from rima_core.runs.evaluate import check_compatible

    model, store = Path(model), Path(store)
    if not model.is_file():
        raise FileNotFoundError(f"{model}: no model file (run `rima train` first)")

    from rima_core.core.data import open_store  # lazy: the store needs pandas and pyarrow

    st = open_store(store)
    try:
        mask_df = load_masks(masks)
    except ValueError as exc:  # a table that is not a mask table
        raise EngineError(str(exc)) from exc
    for key in ("split", "selection_split"):
        split = getattr(cfg.evaluate, key, None)
        if split is not None and not (mask_df["split"] == split).any():
            raise EngineError(f"{masks}: no rows for split {split!r} (evaluate.{key})")
    resolve_device(cfg.runtime.device)  # runtime.device=cuda on a machine without one
    try:
        _, spec = load_model(model, map_location="cpu")
    except ValueError as exc:  # torch's own explanation runs over several lines: keep the first
        raise EngineError(str(exc).splitlines()[0]) from exc
    check_compatible(spec, st, model, store)


def tune(
    store: str | Path,
    masks: str | Path,
    out_dir: str | Path,
    cfg: Config,
    workers: int | None = None,
    n_trials: int | None = None,
    timeout_s: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Optuna search (or its continuation); writes ``best_params.json`` for :func:`train`."""

    return _tune(
        store,
        masks,
        out_dir,
        cfg,
        workers=workers,
        n_trials=n_trials,
        timeout_s=timeout_s,
        storage=storage,
        study_name=study_name,
        track=track,
    )


def _write_json(out: str | Path | None, result: dict[str, Any]) -> None:
    if out is not None:
        write_text(out, json.dumps(result, indent=2, default=str) + "\n")


def register(
    model_dir: str | Path,
    metrics: str | Path,
    cfg: Config,
    store: str | Path | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Register ``model_dir/model.pt`` as a new version of ``cfg.mlflow.model_name`` tagged with
    the evaluation ``metrics`` JSON, aliased ``challenger``; the summary also goes to ``out``."""

    tags = {}
    run_id = read_run_file(model_dir)
    if run_id:
        tags["train_run_id"] = run_id  # lineage: version -> the run that trained it
    result = _register(model_dir, metrics, cfg, store=store, tags=tags)
    _write_json(out, result)
    return result


def promote(
    cfg: Config,
    dry_run: bool = False,
    out: str | Path | None = None,
    after: str | Path | None = None,
    version: str | None = None,
) -> dict[str, Any]:
    """Move ``champion`` to the challenger only if it wins (see :mod:`rima_core.ops.registry`).

    ``version`` (or the version in ``after``) is the one decided on; default ``@challenger``.

    ``after`` is the summary ``register`` wrote (its ``--out``): when it says the model was not
    registered, the decision is "skip" (recorded, not an error), so a pipeline that runs
    register then promote does not fail on a model the gate refused.
    """

    summary = json.loads(Path(after).read_text()) if after is not None else None
    if summary is not None and not summary.get("registered", False):
        result = skipped_promotion(cfg, summary, dry_run)
    else:  # the version register registered, not whatever @challenger is by now
        if version is None and summary is not None:
            version = summary.get("version")
        result = _promote(cfg, dry_run=dry_run, version=version)
    _write_json(out, result)
    return result


def predict(model: str, input_path: str | Path, out: str | Path, cfg: Config) -> dict[str, Any]:
    """Batch prediction from a CSV/Parquet table of image paths with a registered model URI."""
    from rima_core.ops.serving import predict_files

    tracking.use_store(cfg.mlflow)  # models:/ URIs resolve against the project's registry
    return predict_files(model, input_path, out)
