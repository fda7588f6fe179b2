"""How the parallel tune tasks of one pipeline run share a study: its name and each worker's seed.

A pipeline fans tuning out over pods that each run the tuner with one process; these two rules
make those pods behave like the tuner's own multi-process mode on one machine.
"""

from __future__ import annotations

from rima_core.config import Config


def study_name_for_run(cfg: Config, run_id: str) -> str:
    """The Optuna study a pipeline run's tune tasks share: ``<tune.study_name>-<run id>``.

    Each run tunes afresh in a long-lived shared storage, while a retried worker (same run id)
    resumes the same study instead of starting another.
    """
    if not run_id:
        raise ValueError("a pipeline run id is needed to name the shared study")
    return f"{cfg.tune.study_name}-{run_id}"


def worker_config(cfg: Config, worker: int) -> Config:
    """The config of parallel tune worker ``worker`` (one pod each, one process per pod).

    Each pod runs the tuner with one process, which seeds its sampler as if it were worker 0;
    pods starting together would then propose the same points. Offsetting the seed by
    ``1000 * worker`` gives them the streams the tuner's own multi-process mode gives its
    processes.
    """
    if worker < 0:
        raise ValueError(f"tune worker index must be >= 0, got {worker}")
    cfg.tune.seed = cfg.tune.seed + 1000 * worker
    return cfg
