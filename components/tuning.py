"""Tuning components: parallel Optuna workers on one shared study, then its best parameters.

Every worker joins the same study, ``<tune.study_name>-<pipeline run id>`` (each run tunes
afresh; a retried worker resumes), in the same RDB storage: ``RIMA_OPTUNA_STORAGE`` from the
Kubernetes secret in a cluster (PostgreSQL, so several pods write at once), the config's SQLite
URL on one machine. The tuner stops every worker at the shared trial budget (``tune.n_trials``
finished trials in the study), so the budget does not grow with the number of workers.
"""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


def tune_worker(
    config: Input[Artifact],
    store: Input[Dataset],
    masks: Input[Dataset],
    worker: int,
    run_id: str,
    study: Output[Artifact],
    summary: Output[Metrics],
) -> int:
    """Run trials of the shared study until its budget is spent; returns the study's finished
    trials as this worker last saw them. ``run_id`` (the KFP run's) names the study and tags
    the MLflow runs (trials included), so the exit task can find them."""
    import json
    import os

    # tag every MLflow run this task starts with the KFP run (components/exit_handler.py)
    context = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps({**context, "kfp.run_id": run_id})
    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import tune_metrics
    from rima_core.runs.tune_workers import study_name_for_run, worker_config

    cfg = worker_config(load_task_config(config.path), int(worker))
    result = steps.tune(
        store.path,
        masks.path,
        study.path,
        cfg,
        workers=1,
        study_name=study_name_for_run(cfg, run_id),
    )
    for name, value in tune_metrics(result).items():
        summary.log_metric(name, value)
    return int(result["n_complete"]) + int(result["n_pruned"])


def tune_best(
    config: Input[Artifact],
    store: Input[Dataset],
    masks: Input[Dataset],
    finished: list[int],
    run_id: str,
    study: Output[Artifact],
    best_params: Output[Artifact],
    best: Output[Metrics],
    report: Output[HTML],
):
    """Read the finished study: ``best_params.json`` for training, the trials table and plots.

    The budget passed to the tuner is what the workers finished, so this CPU task only writes
    the study's reports and never runs a trial itself.
    """
    import json
    import os

    # tag every MLflow run this task starts with the KFP run (components/exit_handler.py)
    context = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps({**context, "kfp.run_id": run_id})
    import shutil
    from pathlib import Path

    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import html_report, tune_metrics
    from rima_core.runs.tune_workers import study_name_for_run

    cfg = load_task_config(config.path)
    done = max(int(n) for n in finished)  # collected ints arrive as floats under kfp.local
    result = steps.tune(
        store.path,
        masks.path,
        study.path,
        cfg,
        workers=1,
        n_trials=done,
        study_name=study_name_for_run(cfg, run_id),
    )
    out = Path(study.path)
    shutil.copyfile(out / "best_params.json", best_params.path)
    best_params.metadata.update({"study": result["study_name"], "finished_trials": done})
    for name, value in tune_metrics(result).items():
        best.log_metric(name, value)
    scalars = {k: v for k, v in result.items() if not isinstance(v, dict)}
    tables = {"study": scalars, "best parameters": result["best_params"]}
    Path(report.path).write_text(
        html_report("Optuna study", tables, sorted((out / "plots").glob("*.png")))
    )
