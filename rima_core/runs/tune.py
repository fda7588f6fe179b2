"""Hyperparameter search over the OT regularisation and the learning rate, with Optuna.

What is searched, and why these choices:

- The four values RIMA is sensitive to: the labeled-GW epsilon, the feature-OT epsilon, the
  translation-loss weight and the learning rate (:data:`TUNED`), each on a log scale over the range
  given in ``params.yaml`` (``tune.<name>_range: [low, high]``) — they span orders of magnitude;
  and ``ot.pairing_mix`` on a linear scale (:data:`LINEAR`), the share of the translators'
  coupling that pairs each eye's own modalities, so that on a dataset where the class-wise OT
  does not help, validation can turn it down (at 1 the model trains as ``rima_no_class_ot``).
- A trial is a short training run (``tune.epochs``) scored on the VALIDATION split under the
  missing-modality scenario ``tune.scenario``, with the same selection rule the final training
  uses (best epoch of ``tune.metric``), so tuning optimises what model selection later picks on.
  Each epoch's score is reported to a MedianPruner, which stops trials that trail the median.
- The study lives in an RDB storage (SQLite file by default, any SQLAlchemy URL such as
  PostgreSQL for several machines). Its name carries a fingerprint of everything that changes
  what a trial measures (data, masks, model, fixed training settings, search space), so re-running
  after an interruption continues the same study, while a changed input starts a fresh one
  instead of mixing incomparable trials. The budget (``tune.n_trials``) counts the finished
  trials already in the study, so a resumed study stops at the same total.
- Trials whose process died are noticed by the storage heartbeat and re-queued once with the
  same parameters; a trial whose loss diverged (``FloatingPointError``) is recorded as failed and
  the search goes on.
- Each trial is an MLflow run nested under the study's run (through
:mod:`rima_core.tracking.mlflow_runs`,
  not the deprecated optuna-integration callback), carrying the trial's own parameter values and
  its per-epoch validation metrics.

Outputs (``out_dir``): ``best_params.json`` (``{"ot.gw_epsilon": ..., "train.lr": ...}``; read
by the train step through :func:`rima_core.pipeline.steps.apply_best_params`; ``{}`` for a zero
budget; a trial's sample and that file both go through :func:`rima_core.config.with_values`),
``study.json`` (summary), ``headline.json`` (its numbers only: the DVC metrics file),
``trials.csv`` (one row per trial, identical for identical inputs: a committed DVC plot),
``timings.csv`` (trial durations, not a DVC output) and ``plots/*.png`` (optimisation history,
intermediate values, parameter importances).

This module runs the trials (one worker per process) and the step; the study's rules (search
space, trial config, fingerprint, storage) are :mod:`rima_core.runs.tune_study` and the reports
:mod:`rima_core.runs.tune_reports`, each name still importable from here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rima_core.config import Config, ConfigError
from rima_core.progress import mode as progress_mode
from rima_core.redact import install_log_redaction

# The study's rules and its reports have modules of their own; every public name stays
# importable from here (re-exported: hence the noqa).
from rima_core.runs.tune_reports import (  # noqa: F401
    TIMINGS_FILE,
    TRIAL_COLUMNS,
    within_budget,
    write_reports,
)
from rima_core.runs.tune_study import (  # noqa: F401
    _BUDGET_KEYS,
    _TRIAL_OVERRIDDEN,
    GRACE_S,
    HEARTBEAT_S,
    LINEAR,
    SQLITE_TIMEOUT_S,
    TUNED,
    TuneError,
    _pruner,
    _sampler,
    describe_study,
    finished_trials,
    ignore_experimental_warnings,
    make_storage,
    objective_name,
    safe_url,
    search_space,
    study_direction,
    study_fingerprint,
    study_numbers,
    trial_config,
)
from rima_core.tracking import mlflow_runs as tracking
from rima_core.tracking.metric_names import tune_stat

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger(__name__)


# --- one worker --------------------------------------------------------------------------------


@dataclasses.dataclass
class _Job:
    """Everything a worker process needs (picklable, for the ``spawn`` start method)."""

    store: str
    masks: str
    cfg: Config
    storage: str
    study_name: str
    worker: int
    deadline: float | None
    parent_run_id: str | None
    data_hash: str | None
    track: bool
    threads: int | None = None
    log_level: int = logging.INFO


# What a trial's training logs per epoch (and its MLflow run lines) goes to DEBUG: a study of 8
# trials printed ~40 lines; the tune step logs one line per trial instead (-v brings them back).
TRIAL_QUIET_LOGGERS = (
    "rima_core.runs.train",
    "rima_core.tracking.mlflow_runs",
    "rima_core.runs.calibration",
)


def _quiet_optuna(level: int) -> None:
    """Optuna's own INFO lines ("Trial 3 finished with value ...") in its own format, beside the
    project's one line per trial, only with -v (``level`` DEBUG)."""
    import optuna

    verbose = level <= logging.DEBUG
    optuna.logging.set_verbosity(optuna.logging.INFO if verbose else optuna.logging.WARNING)


@contextlib.contextmanager
def _trial_logging(level: int) -> Iterator[None]:
    """A trial's training logs at WARNING unless the step runs with -v."""
    if level <= logging.DEBUG:
        yield
        return
    loggers = [logging.getLogger(n) for n in TRIAL_QUIET_LOGGERS]
    before = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, before, strict=True):
            lg.setLevel(lvl)


def _objective(job: _Job) -> Any:
    import optuna

    from rima_core.runs.train import train

    space = search_space(job.cfg.tune)
    metric = job.cfg.tune.metric

    def objective(trial: optuna.Trial) -> float:
        params = {
            name: trial.suggest_float(name, low, high, log=name not in LINEAR)
            for name, (low, high) in space.items()
        }
        tcfg = trial_config(job.cfg, params)
        trial.set_user_attr("worker", job.worker)

        def report(epoch: int, val_metrics: dict[str, float]) -> None:
            value = float(val_metrics[metric])
            trial.report(value, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {metric} {value:.4f} trails the median")

        tags = {
            "optuna_study": job.study_name,
            "optuna_trial": trial.number,
        }
        if job.parent_run_id:
            tags["mlflow.parentRunId"] = job.parent_run_id
        run = (
            tracking.start_run(
                tcfg, f"trial-{trial.number}", nested=True, tags=tags, data_hash=job.data_hash
            )
            if job.track
            else contextlib.nullcontext()
        )
        pruned: optuna.TrialPruned | None = None
        with (
            _trial_logging(job.log_level),
            run,
            tempfile.TemporaryDirectory(prefix=f"rima-trial-{trial.number}-") as tmp,
        ):
            try:
                summary = train(job.store, job.masks, tmp, tcfg, epoch_callback=report)
            except optuna.TrialPruned as exc:
                pruned = exc
                tracking.set_tags({"optuna_state": "PRUNED"})
            else:
                value = summary["best_val_metrics"].get(metric)
                value = float("nan") if value is None else float(value)
                trial.set_user_attr("best_epoch", summary["best_epoch"])
                tracking.set_tags({"optuna_state": "COMPLETE"})
                # the trial's value (its best epoch's objective_name(...)), one number per
                # trial to compare them by; the epoch curves are the training's own metrics
                tracking.log_metrics({tune_stat("objective"): value})
        shown = ", ".join(f"{k} {v:.3g}" for k, v in params.items())
        if pruned is not None:
            log.info("trial %d pruned (%s) with %s", trial.number, pruned, shown)
            raise pruned
        log.info(
            "trial %d: %s %.4f (epoch %s) with %s",
            trial.number,
            metric,
            value,
            summary["best_epoch"],
            shown,
        )
        return value

    return objective


def run_worker(job: _Job) -> None:
    """Join the study and run trials until the budget (finished trials) or the deadline is hit."""
    import optuna

    logging.basicConfig(
        level=job.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    install_log_redaction()  # a spawned worker's own handlers: no password in its log lines
    _quiet_optuna(job.log_level)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    ignore_experimental_warnings()
    tc = job.cfg.tune
    storage = make_storage(job.storage)
    probe = optuna.load_study(study_name=job.study_name, storage=storage)
    study = optuna.load_study(
        study_name=job.study_name,
        storage=storage,
        sampler=_sampler(tc, job.worker, len(probe.trials)),
        pruner=_pruner(tc),
    )
    objective = _objective(job)
    max_trials = optuna.study.MaxTrialsCallback(
        tc.n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )
    # Failed trials (diverged) do not count towards the budget: go round again for the missing
    # ones, but stop when a whole round finished nothing (every trial failing is a real problem).
    while True:
        finished = finished_trials(study)
        remaining = tc.n_trials - finished
        timeout = None if job.deadline is None else job.deadline - time.time()
        if remaining <= 0 or (timeout is not None and timeout <= 0):
            break
        study.optimize(
            objective,
            n_trials=remaining,  # an upper bound per worker; the callback stops them all
            timeout=timeout,
            catch=(FloatingPointError,),
            callbacks=[max_trials],
            gc_after_trial=True,
            show_progress_bar=job.worker == 0 and job.threads is None and progress_mode() == "on",
        )
        if finished_trials(study) == finished:
            log.warning("worker %d: no trial finished in the last round; stopping", job.worker)
            break


# --- the step ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _study_run(cfg: Config, track: bool, store: str, tags: dict[str, Any]) -> Iterator[str | None]:
    if not track:
        yield None
        return

    with tracking.start_run(cfg, "tune", store=store, tags=tags) as run:
        yield run.info.run_id


def _with_budget(
    cfg: Config,
    workers: int | None,
    n_trials: int | None,
    timeout_s: float | None,
    storage: str | None,
) -> Config:
    """A copy of ``cfg`` with the budget arguments that were given (None: ``cfg.tune``'s), checked.

    A copy, so the caller's config is left as it was; the budget keys never change what a trial
    measures (:data:`_BUDGET_KEYS`), so they may be set here without changing the study's name.
    """
    cfg = copy.deepcopy(cfg)
    tc = cfg.tune
    if workers is not None:
        tc.workers = workers
    if n_trials is not None:
        tc.n_trials = n_trials
    if timeout_s is not None:
        tc.timeout_s = timeout_s
    if storage is not None:
        tc.storage = storage
    if tc.workers < 1:
        raise ConfigError(f"tune.workers must be >= 1, got {tc.workers}")
    if tc.n_trials < 0:
        raise ConfigError(f"tune.n_trials must be >= 0, got {tc.n_trials}")
    if tc.epochs < 1:
        raise ConfigError(f"tune.epochs must be >= 1, got {tc.epochs}")
    search_space(tc)
    return cfg


def _check_masks(masks: str, cfg: Config) -> None:
    """Refuse a scenario the masks lack before any trial starts, not in the middle of one."""
    from rima_core.core.data.masks import load_masks
    from rima_core.runs.train import check_scenario, check_selection

    mask_df = load_masks(masks)
    check_selection(mask_df, cfg.tune.scenario, "tuning (tune.scenario)")
    check_scenario(mask_df, "train", cfg.missing.train_scenario, "tuning (missing.train_scenario)")


def _open_study(name: str, cfg: Config, data_hash: str | None) -> int:
    """Create the study ``name`` in the storage, or join it when it exists (a resumed or shared
    study), describe it, and log where it stands; returns its finished trials so far."""
    import optuna

    tc = cfg.tune
    ignore_experimental_warnings()
    _quiet_optuna(logging.getLogger().getEffectiveLevel())
    study = optuna.create_study(
        study_name=name,
        storage=make_storage(tc.storage),
        direction=study_direction(tc.metric),
        load_if_exists=True,
    )
    describe_study(study, cfg, data_hash)
    before = finished_trials(study)
    log.info(
        "study %r in %s: %d finished trial(s), budget %d%s, %d worker(s)",
        name,
        safe_url(tc.storage),
        before,
        tc.n_trials,
        f", timeout {tc.timeout_s:g} s" if tc.timeout_s else "",
        tc.workers,
    )
    return before


def tune(
    store: str | Path,
    masks: str | Path,
    out_dir: str | Path,
    cfg: Config,
    *,
    workers: int | None = None,
    n_trials: int | None = None,
    timeout_s: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Run (or continue) the study and write the reports; returns the ``study.json`` summary.

    Arguments left ``None`` come from ``cfg.tune``. ``study_name`` given explicitly is used as is
    (several machines sharing one study); otherwise it is ``<tune.study_name>-<fingerprint>``.
    ``workers`` > 1 runs that many processes on the one study (each with a share of the cores).
    """
    import optuna

    cfg = _with_budget(cfg, workers, n_trials, timeout_s, storage)
    tc = cfg.tune
    store, masks, out_dir = str(store), str(masks), Path(out_dir)
    _check_masks(masks, cfg)
    if tc.n_trials == 0:
        log.info("tune.n_trials is 0: no tuning; train uses the values in params.yaml")
        return write_reports(None, out_dir, cfg)
    data_hash = tracking.manifest_hash(store)
    name = study_name or f"{tc.study_name}-{study_fingerprint(cfg, data_hash, masks)}"
    before = _open_study(name, cfg, data_hash)
    tags = {"optuna_study": name, "optuna_storage": safe_url(tc.storage)}
    with _study_run(cfg, track, store, tags) as parent_run_id:
        deadline = time.time() + tc.timeout_s if tc.timeout_s else None
        if tc.n_trials > before:
            _run_workers(cfg, store, masks, name, deadline, parent_run_id, data_hash, track)
        study = optuna.load_study(study_name=name, storage=make_storage(tc.storage))
        summary = write_reports(
            study, out_dir, cfg, trim_to_budget=study_name is None and tc.workers == 1
        )
        if track:
            tracking.log_metrics(study_numbers(summary))
            tracking.set_tags({f"best.{k}": v for k, v in summary["best_params"].items()})
            tracking.log_artifacts(out_dir, "tune")
    return summary


def _run_workers(
    cfg: Config,
    store: str,
    masks: str,
    name: str,
    deadline: float | None,
    parent_run_id: str | None,
    data_hash: str | None,
    track: bool,
) -> None:
    tc = cfg.tune
    level = logging.getLogger().getEffectiveLevel()
    jobs = [
        _Job(
            store,
            masks,
            cfg,
            tc.storage,
            name,
            i,
            deadline,
            parent_run_id,
            data_hash,
            track,
            log_level=level,
        )
        for i in range(tc.workers)
    ]
    if tc.workers == 1:
        run_worker(jobs[0])
        return
    threads = max(1, (os.cpu_count() or 1) // tc.workers)
    ctx = multiprocessing.get_context("spawn")  # torch and fork do not mix
    procs = []
    for job in jobs:
        job.threads = threads
        proc = ctx.Process(target=run_worker, args=(job,), name=f"tune-worker-{job.worker}")
        proc.start()
        procs.append(proc)
    for proc in procs:
        proc.join()
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed:
        raise TuneError(f"tuning worker(s) {failed} exited with an error (see the log above)")
