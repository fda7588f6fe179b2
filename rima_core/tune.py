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
- Each trial is an MLflow run nested under the study's run (through :mod:`rima_core.tracking`,
  not the deprecated optuna-integration callback), carrying the trial's own parameter values and
  its per-epoch validation metrics.

Outputs (``out_dir``): ``best_params.json`` (``{"ot.gw_epsilon": ..., "train.lr": ...}``; read
by the train step through :func:`rima_core.steps.apply_best_params`; ``{}`` for a zero budget;
a trial's sample and that file both go through :func:`rima_core.config.with_values`),
``study.json`` (summary), ``headline.json`` (its numbers only: the DVC metrics file),
``trials.csv`` (one row per trial, identical for identical inputs: a committed DVC plot),
``timings.csv`` (trial durations, not a DVC output) and ``plots/*.png`` (optimisation history,
intermediate values, parameter importances).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rima_core.atomic import atomic_dir
from rima_core.config import Config, ConfigError, TuneConfig, with_values
from rima_core.headline import HEADLINE_FILE, tune_headline, write_headline
from rima_core.metric_names import scored, tune_stat
from rima_core.progress import mode as progress_mode

if TYPE_CHECKING:  # pragma: no cover
    import optuna

log = logging.getLogger(__name__)

# Tuned parameter (``section.key`` in the config) -> its search range in TuneConfig. The ranges
# are named ``*_range`` so ``tune.lr_range`` (where to search) cannot be mistaken for ``train.lr``
# (the value trained with).
TUNED: dict[str, str] = {
    "ot.gw_epsilon": "gw_epsilon_range",
    "ot.feature_epsilon": "feature_epsilon_range",
    "ot.loss_weight": "loss_weight_range",
    "train.lr": "lr_range",
    "ot.pairing_mix": "pairing_mix_range",
}
# Searched on a linear scale (a share in [0, 1], where 0 itself is a setting: the paper's
# coupling); every other name on a log scale. A linear name's range may be null: not searched.
LINEAR = frozenset({"ot.pairing_mix"})
# tune.* keys that set the budget or the plumbing, not what a trial measures: changing them
# keeps the study (a bigger n_trials continues it).
_BUDGET_KEYS = frozenset({"out_dir", "storage", "study_name", "n_trials", "timeout_s", "workers"})
# train.* keys a trial overrides or that do not change its result. A trial's value is its best
# validation metric, measured before any path pooling, so a trial skips the pooling fit.
_TRIAL_OVERRIDDEN = frozenset(
    {"out_dir", "epochs", "lr", "selection_metric", "selection_scenario", "pool_paths", "decoding"}
)
# A dead worker's trial is failed (and retried once) after this long without a heartbeat.
HEARTBEAT_S = 15
GRACE_S = 60
SQLITE_TIMEOUT_S = 60


class TuneError(RuntimeError):
    """The search ran but produced no usable result (e.g. no trial completed)."""


# --- search space and configs ------------------------------------------------------------------


def search_space(tc: TuneConfig) -> dict[str, tuple[float, float]]:
    """``{"ot.gw_epsilon": (low, high), ...}``, checked: two positive numbers, low < high."""
    space = {}
    for name, key in TUNED.items():
        bounds = getattr(tc, key)
        if bounds is None and name in LINEAR:
            continue
        if bounds is None or len(bounds) != 2:
            raise ConfigError(f"tune.{key}: expected [low, high], got {bounds!r}")
        low, high = (float(b) for b in bounds)
        if name in LINEAR and not (0 <= low < high <= 1):
            raise ConfigError(f"tune.{key}: need 0 <= low < high <= 1, got {bounds!r}")
        if name not in LINEAR and not (0 < low < high and math.isfinite(high)):
            raise ConfigError(
                f"tune.{key}: need 0 < low < high for a log-scale range, got {bounds!r}"
            )
        space[name] = (low, high)
    return space


def trial_config(cfg: Config, params: Mapping[str, float]) -> Config:
    """The config one trial trains with: its sampled values (only :data:`TUNED` names), the
    short budget, tune's target."""
    unknown = sorted(set(params) - set(TUNED))
    if unknown:
        raise ConfigError(f"{unknown} not tuned parameter(s); known: {sorted(TUNED)}")
    tc = cfg.tune
    return with_values(
        cfg,
        {
            **params,
            "train.epochs": tc.epochs,
            "train.selection_scenario": tc.scenario,
            "train.selection_metric": tc.metric,
            "train.pool_paths": False,
            "train.decoding": "argmax",  # a trial's score does not depend on the decoding
        },
        "trial",
    )


def study_direction(metric: str) -> str:
    from rima_core.metrics import LOWER_IS_BETTER

    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def study_fingerprint(cfg: Config, data_hash: str | None, masks: str | Path) -> str:
    """A short hash of everything that changes what a trial measures (see the module doc)."""
    tune = {k: v for k, v in dataclasses.asdict(cfg.tune).items() if k not in _BUDGET_KEYS}
    train = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in _TRIAL_OVERRIDDEN}
    runtime = {k: v for k, v in dataclasses.asdict(cfg.runtime).items() if k != "num_workers"}
    searched = search_space(cfg.tune)
    ot = {k: v for k, v in dataclasses.asdict(cfg.ot).items() if f"ot.{k}" not in searched}
    masks_md5 = hashlib.md5(Path(masks).read_bytes()).hexdigest()
    payload = {
        "data_hash": data_hash,
        "masks_md5": masks_md5,
        "model": dataclasses.asdict(cfg.model),
        "ot": ot,
        "runtime": runtime,
        "train": train,
        "train_scenario": cfg.missing.train_scenario,
        "tune": tune,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# --- storage and study -------------------------------------------------------------------------


def safe_url(url: str) -> str:
    """The storage URL without its password, for logs, tags and reports."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with a heartbeat (dead workers' trials are retried) and, for SQLite, a
    generous lock timeout so several local worker processes can share one file."""
    import optuna
    from sqlalchemy.engine import make_url

    from rima_core.tracking import in_workspace

    # a relative SQLite file is the workspace's, also in a DVC temp experiment (reports keep the
    # URL as configured, so they do not depend on where the checkout lives)
    url = in_workspace(url)
    ignore_experimental_warnings()  # heartbeat retries
    engine_kwargs: dict[str, Any] = {}
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(
        url,
        engine_kwargs=engine_kwargs,
        heartbeat_interval=HEARTBEAT_S,
        grace_period=GRACE_S,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=1
        ),
    )


def _sampler(tc: TuneConfig, worker: int, n_existing: int) -> optuna.samplers.BaseSampler:
    """Seeded TPE. The seed also moves with the worker index (workers must not propose the same
    points) and with the trials already in the study (a resumed study must not replay the first
    random proposals)."""
    import optuna

    n_startup = max(2, min(10, tc.n_trials // 3))
    return optuna.samplers.TPESampler(
        seed=tc.seed + 1000 * worker + n_existing, n_startup_trials=n_startup
    )


def _pruner(tc: TuneConfig) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.MedianPruner(
        n_startup_trials=tc.pruner_startup_trials, n_warmup_steps=tc.pruner_warmup_epochs
    )


def finished_trials(study: optuna.Study) -> int:
    """Trials that count towards the budget: completed or pruned (not failed, not running)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def ignore_experimental_warnings() -> None:
    """Heartbeat retries, metric names and the matplotlib plots are Optuna features marked
    experimental that we use on purpose; their warning, once per use and per process, is noise
    in every run's log. (A repeated filter replaces the earlier identical one.)"""
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def objective_name(tc: TuneConfig) -> str:
    """What a trial's value is, as Optuna's dashboard shows it (instead of "Objective 0")."""
    return scored("val", tc.scenario, tc.metric)


def study_numbers(summary: dict[str, Any]) -> dict[str, float]:
    """The study's counts and best value under the scheme's names (``tune/n_complete``,
    ``tune/best_value``): what the tuning run and Kubeflow's Metrics artifacts show."""
    return {
        tune_stat(k): v
        for k, v in summary.items()
        if k.startswith(("n_", "best_value", "budget_trials"))
        and isinstance(v, int | float)
        and not isinstance(v, bool)
    }


def describe_study(study: optuna.Study, cfg: Config, data_hash: str | None) -> None:
    """Name the objective and record what the study measures as study user attributes, so a
    study found in the storage (or the dashboard) says what data and target it was run on."""
    ignore_experimental_warnings()
    tc = cfg.tune
    study.set_metric_names([objective_name(tc)])
    attrs = {
        "data_hash": data_hash,
        "metric": tc.metric,
        "scenario": tc.scenario,
        "split": "val",
        "epochs_per_trial": tc.epochs,
        "model": cfg.model.name,
        "train_scenario": cfg.missing.train_scenario,
    }
    for key, value in attrs.items():
        if study.user_attrs.get(key) != value:
            study.set_user_attr(key, value)


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
TRIAL_QUIET_LOGGERS = ("rima_core.train", "rima_core.tracking", "rima_core.calibration")


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

    from rima_core import tracking
    from rima_core.train import train

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
    from rima_core.redact import install_log_redaction

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
    from rima_core import tracking

    with tracking.start_run(cfg, "tune", store=store, tags=tags) as run:
        yield run.info.run_id


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

    from rima_core import tracking
    from rima_core.data.masks import load_masks
    from rima_core.train import check_scenario, check_selection

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
    store, masks, out_dir = str(store), str(masks), Path(out_dir)
    mask_df = load_masks(masks)
    check_selection(mask_df, tc.scenario, "tuning (tune.scenario)")
    check_scenario(mask_df, "train", cfg.missing.train_scenario, "tuning (missing.train_scenario)")
    if tc.n_trials == 0:
        log.info("tune.n_trials is 0: no tuning; train uses the values in params.yaml")
        return write_reports(None, out_dir, cfg)
    data_hash = tracking.manifest_hash(store)
    name = study_name or f"{tc.study_name}-{study_fingerprint(cfg, data_hash, masks)}"

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


# --- reports -----------------------------------------------------------------------------------


def write_reports(
    study: optuna.Study | None, out_dir: Path, cfg: Config, trim_to_budget: bool = False
) -> dict[str, Any]:
    """``best_params.json``, ``study.json``, ``trials.csv`` and ``plots/`` into ``out_dir``.

    ``study`` is None when tuning is off (``tune.n_trials`` = 0): the reports are then empty, and
    so is ``best_params.json``, whatever an earlier study holds. ``trim_to_budget``: report the
    study as a run of budget ``tune.n_trials`` sees it (:func:`within_budget`); tune() asks for
    it when one sequential worker ran a study of its own (not a study shared by parallel workers
    or Kubeflow tasks, whose overshoot past the budget is this run's and is reported).
    """
    from optuna.trial import TrialState

    tc = cfg.tune
    if trim_to_budget:
        study = within_budget(study, tc.n_trials)
    trials = study.get_trials(deepcopy=False) if study is not None else []
    states = [t.state for t in trials]
    counts = {s: states.count(s) for s in TrialState}
    complete = counts[TrialState.COMPLETE]
    if study is not None and complete == 0:
        raise TuneError(
            f"study {study.study_name!r}: no trial completed ({counts[TrialState.PRUNED]} pruned, "
            f"{counts[TrialState.FAIL]} failed); raise tune.timeout_s or tune.n_trials, or check "
            "the failures in the log"
        )
    best = study.best_trial if study is not None else None
    best_params = dict(sorted(best.params.items())) if best else {}
    summary = {
        "study_name": study.study_name if study is not None else None,
        "storage": safe_url(tc.storage),
        "direction": study_direction(tc.metric),
        "metric": tc.metric,
        "scenario": tc.scenario,
        "epochs_per_trial": tc.epochs,
        "budget_trials": tc.n_trials,
        "n_trials": len(states),
        "n_complete": complete,
        "n_pruned": counts[TrialState.PRUNED],
        "n_failed": counts[TrialState.FAIL],
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": best_params,
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / "best_params.json").write_text(json.dumps(best_params, indent=2) + "\n")
        (tmp / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_headline(tmp / HEADLINE_FILE, tune_headline(summary))
        _trials_table(trials).to_csv(tmp / "trials.csv", index=False)
        # wall-clock durations apart: trials.csv is a DVC output and must not change on a rerun
        _durations_table(trials).to_csv(tmp / TIMINGS_FILE, index=False)
        plots = tmp / "plots"
        plots.mkdir()
        if study is not None:
            _plots(study, plots, tc)
    if best:
        log.info("best trial %d: %s %.4f with %s", best.number, tc.metric, best.value, best_params)
    return summary


def within_budget(study: optuna.Study | None, n_trials: int) -> optuna.Study | None:
    """The study as a run with budget ``n_trials`` sees it: its trials up to the ``n_trials``-th
    completed or pruned one (by number; the budget's count), in an in-memory copy, when the
    stored study holds more.

    The study is keyed by what a trial measures, not by the budget, so an interrupted run
    continues it; but an earlier run with a larger budget leaves more trials in it, and a run
    asked for fewer must not report those (DVC records `tune.n_trials` beside the result). With
    one worker the sampler is seeded and sequential, so these are exactly the trials a fresh
    study with this budget runs; with several workers (processes or Kubeflow tasks) the trials
    past the budget are this run's own overshoot, and :func:`write_reports` keeps them.
    """
    import optuna
    from optuna.trial import TrialState

    if study is None or n_trials <= 0:
        return study
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if len(counted) <= n_trials:  # the budget counts these (failed trials do not)
        return study
    last = counted[n_trials - 1].number
    log.info(
        "study %s holds %d finished trials; reporting the first %d (tune.n_trials)",
        study.study_name,
        len(counted),
        n_trials,
    )
    view = optuna.create_study(study_name=study.study_name, directions=study.directions)
    view.add_trials([t for t in trials if t.number <= last and t.state.is_finished()])
    return view


TRIAL_COLUMNS = ["number", "state", "value", "epochs_run", "worker"]
TIMINGS_FILE = "timings.csv"  # per trial: number, duration_s (not a DVC output)


def _trials_table(trials: list[optuna.trial.FrozenTrial]) -> Any:
    import pandas as pd

    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "epochs_run": len(t.intermediate_values),
            "worker": t.user_attrs.get("worker"),
        }
        row.update({f"param:{k}": v for k, v in sorted(t.params.items())})
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else TRIAL_COLUMNS)


def _durations_table(trials: list[optuna.trial.FrozenTrial]) -> Any:
    import pandas as pd

    rows = [
        {"number": t.number, "duration_s": t.duration.total_seconds() if t.duration else None}
        for t in trials
    ]
    return pd.DataFrame(rows, columns=["number", "duration_s"])


def _plots(study: optuna.Study, out: Path, tc: TuneConfig) -> None:
    """Optuna's matplotlib plots (plotly is not a dependency). Parameter importances need a few
    completed trials with varied values; when they cannot be computed the plot is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    ignore_experimental_warnings()  # the matplotlib backend is "experimental"

    def save(fname: str, draw: Any) -> None:
        try:
            ax = draw()
        except (ValueError, RuntimeError) as exc:
            log.warning("plot %s not drawn: %s", fname, exc)
            plt.close("all")
            return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close("all")

    save("optimization_history.png", lambda: ovm.plot_optimization_history(study))
    save("intermediate_values.png", lambda: ovm.plot_intermediate_values(study))
    save(
        "param_importances.png",
        lambda: ovm.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=tc.seed)
        ),
    )
