"""Model-side components: train and evaluate (GPU tasks in the cluster).

Thin wrappers over :func:`rima_core.pipeline.steps.train` /
:func:`rima_core.pipeline.steps.evaluate`. Neither is
cached: GPU kernels are not bit-reproducible, and each run should leave its own MLflow run.
"""

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def train(
    config: Input[Artifact],
    store: Input[Dataset],
    masks: Input[Dataset],
    best_params: Input[Artifact],
    run_id: str,
    model: Output[Model],
    summary: Output[Metrics],
):
    """Train with the tuned parameters; ``model`` is the training directory (model.pt, history).
    ``run_id`` (the KFP run's) tags the MLflow runs, so the exit task can find them."""
    import json
    import os

    # tag every MLflow run this task starts with the KFP run (components/exit_handler.py)
    context = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps({**context, "kfp.run_id": run_id})
    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import train_metrics

    cfg = load_task_config(config.path)
    result = steps.train(store.path, masks.path, model.path, cfg, best_params=best_params.path)
    model.metadata.update(
        {
            "framework": "pytorch",
            "model_name": cfg.model.name,
            "mlflow_run_id": str(result.get("mlflow_run_id", "")),
        }
    )
    for name, value in train_metrics(result).items():
        summary.log_metric(name, value)


def evaluate(
    config: Input[Artifact],
    model: Input[Model],
    store: Input[Dataset],
    masks: Input[Dataset],
    run_id: str,
    results: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
) -> float:
    """Score every missing-modality scenario; returns the promotion metric (the gate's input).
    ``run_id`` (the KFP run's) tags the MLflow run, so the exit task can find it."""
    import json
    import os
    from pathlib import Path

    # tag every MLflow run this task starts with the KFP run (components/exit_handler.py)
    context = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps({**context, "kfp.run_id": run_id})

    from rima_core.core.data import open_store
    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import (
        confusion_matrix,
        eval_metrics,
        html_report,
        primary_metric,
    )

    cfg = load_task_config(config.path)
    steps.evaluate(str(Path(model.path) / "model.pt"), store.path, masks.path, results.path, cfg)
    out = Path(results.path)
    scores = json.loads((out / "metrics.json").read_text())
    evaluated = json.loads((out / "eval_summary.json").read_text())
    split = evaluated.get("split", cfg.evaluate.split)
    promoted = evaluated.get("equity_headline_scenario", cfg.promote.scenario)
    for name, value in eval_metrics(scores, split, promoted).items():
        metrics.log_metric(name, value)
    class_names = list(open_store(store.path).class_names)
    confusion.log_confusion_matrix(
        class_names, confusion_matrix(out / "confusion.csv", class_names)
    )
    Path(report.path).write_text(
        html_report(
            f"Evaluation ({cfg.evaluate.split} split)",
            {"scenario": scores},
            sorted(out.glob("*.png")),
        )
    )
    return primary_metric(scores, cfg.promote.scenario, cfg.promote.metric)
