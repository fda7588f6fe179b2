"""What a tuning study is: the search space, the config one trial trains with, the study's
fingerprint and its storage.

Apart from :mod:`rima_core.runs.tune` (which re-exports these names) because these rules decide
which study a run joins and what its trials measure, whoever runs the trials: the tune step's
own worker processes, or the pipeline's parallel tune tasks (:mod:`rima_core.runs.tune_workers`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rima_core.config import Config, ConfigError, TuneConfig, with_values
from rima_core.config.schema import tuned_parameters
from rima_core.core.metrics import LOWER_IS_BETTER
from rima_core.tracking.metric_names import scored, tune_stat
from rima_core.tracking.mlflow_runs import in_workspace

if TYPE_CHECKING:  # pragma: no cover
    import optuna

# --- search space and configs ------------------------------------------------------------------


# Tuned parameter (``section.key`` in the config) -> its search range in TuneConfig, and the
# names searched on a linear scale (a linear name's range may be null: not searched); both read
# from the schema, where each ``tune.*_range`` key says what it tunes and on which scale.
TUNED: dict[str, str] = {name: key for name, (key, _) in tuned_parameters().items()}
LINEAR = frozenset(name for name, (_, scale) in tuned_parameters().items() if scale == "linear")


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
