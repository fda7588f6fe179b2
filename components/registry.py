"""Registry components: register the evaluated model, then promote it if it wins.

Both talk to the MLflow server over the network, so the pipeline retries them; neither is cached
(a cached "register" would skip creating the version the run is about).
"""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output


def register(
    config: Input[Artifact],
    model: Input[Model],
    results: Input[Artifact],
    store: Input[Dataset],
    run_id: str,
    registration: Output[Markdown],
) -> str:
    """A new registry version (headline metrics as tags, alias ``challenger``); its number, or
    "" when the registration gate (``promote.register_min_metric``) refused the model.
    ``run_id`` (the KFP run's) tags the MLflow run, so the exit task can find it."""
    import json
    import os

    # tag every MLflow run this task starts with the KFP run (components/exit_handler.py)
    context = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps({**context, "kfp.run_id": run_id})
    from pathlib import Path

    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import summary_markdown

    result = steps.register(
        model.path,
        Path(results.path) / "metrics.json",
        load_task_config(config.path),
        store=store.path,
    )
    title = "Model registration" if result["registered"] else "Model NOT registered"
    Path(registration.path).write_text(summary_markdown(title, result))
    return str(result["version"]) if result["registered"] else ""


def promote(config: Input[Artifact], version: str, run_id: str, decision: Output[Markdown]) -> bool:
    """Move ``champion`` to the challenger only if the promotion policy says it wins.
    ``run_id`` (the KFP run's) tags the MLflow run, so the exit task can find it."""
    import json
    import os

    # tag every MLflow run this task starts with the KFP run (components/exit_handler.py)
    context = json.loads(os.environ.get("MLFLOW_RUN_CONTEXT") or "{}")
    os.environ["MLFLOW_RUN_CONTEXT"] = json.dumps({**context, "kfp.run_id": run_id})
    from pathlib import Path

    from rima_core.pipeline import steps
    from rima_core.pipeline.remote_config import load_task_config
    from rima_core.pipeline.reports import promotion_markdown

    # this run's version, not a newer challenger another run registered meanwhile
    result = steps.promote(load_task_config(config.path), version=version or None)
    text = promotion_markdown(result)
    if str(result["challenger"]) != str(version):
        # another run registered a newer challenger between this run's register and promote
        text += f"\n**Note:** this run registered version {version}; the decision above is "
        text += f"about the newer challenger {result['challenger']}.\n"
    Path(decision.path).write_text(text)
    return bool(result["promoted"])
