"""The pipeline's exit task: close the MLflow runs a failed Kubeflow run left RUNNING.

A task that raises ends its own MLflow run as FAILED (``rima_core.tracking.start_run``), but a
pod that is killed (out of memory, its deadline, a lost node, a cancelled run) never gets to: its
run stays RUNNING for ever, and the MLflow UI shows a training "in progress" that died hours ago.
``dsl.ExitHandler`` runs this task after every run, whatever happened to the others, so it ends
them: every MLflow task of the pipeline tags its runs with the KFP run id (:data:`RUN_TAG`, via
MLflow's ``MLFLOW_RUN_CONTEXT``, which tags every run the process starts, nested trial runs and
worker subprocesses included), so this run's runs are found by that tag, never by time or name.

It reads only pipeline parameters (the tracking URI and experiment), never an output of the
tasks it watches: an exit task cannot wait on a task that may not have run.
"""

from kfp import dsl

#: MLflow tag holding the KFP run id on every run a pipeline task starts. Component functions
#: are shipped as source, so each one spells the key out; tests/test_kfp_exit_handler.py checks
#: that they all use this one.
RUN_TAG = "kfp.run_id"
#: Environment variable whose JSON object MLflow adds as tags to every run it starts.
RUN_CONTEXT_ENV = "MLFLOW_RUN_CONTEXT"


def end_failed_runs(
    status: dsl.PipelineTaskFinalStatus,
    run_id: str,
    mlflow_tracking_uri: str,
    mlflow_experiment: str,
) -> str:
    """When the run did not succeed, end its MLflow runs still RUNNING (FAILED; KILLED when the
    run was cancelled) and return a short report: the run's state and error, which steps' runs
    had failed on their own, and which runs were ended here."""
    import logging
    import os

    from mlflow.tracking import MlflowClient

    from rima_core.config import MlflowConfig
    from rima_core.redact import redact_text
    from rima_core.tracking import TAG_STEP, tracking_uri

    log = logging.getLogger("rima.exit_handler")
    if not logging.getLogger().handlers:  # the pod's executor configures no logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    tag = "kfp.run_id"  # components.exit_handler.RUN_TAG (only this source reaches the pod)
    state = str(status.state or "").upper()
    lines = [f"pipeline run {run_id}: {state or 'UNKNOWN'}"]
    if status.error_message:
        lines.append(f"error: {redact_text(' '.join(str(status.error_message).split()))}")
    if state == "SUCCEEDED":
        report = "\n".join([*lines, "nothing to end: the run succeeded"])
        log.info("%s", report)
        return report
    if not run_id or "'" in run_id or "`" in run_id:
        raise ValueError(f"run_id {run_id!r} cannot name this run's MLflow runs")
    end_as = "KILLED" if state.startswith("CANCEL") else "FAILED"

    uri = tracking_uri(MlflowConfig(tracking_uri=mlflow_tracking_uri))
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(mlflow_experiment)
    if experiment is None:
        lines.append(f"no MLflow experiment {mlflow_experiment!r}: no run was started")
        report = "\n".join(lines)
        log.warning("%s", report)
        return report

    def runs(where: str) -> list:
        found, token = [], None
        while True:
            page = client.search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`{tag}` = '{run_id}' and {where}",
                max_results=1000,
                page_token=token,
            )
            found += list(page)
            token = page.token
            if not token:
                return found

    failed = runs("attributes.status = 'FAILED'")
    if failed:  # a task that raised ended its own run: its step is the failing task
        steps = sorted({r.data.tags.get(TAG_STEP, "?") for r in failed})
        lines.append(f"failed task(s), by their MLflow runs: {', '.join(steps)}")
    running = runs("attributes.status = 'RUNNING'")
    for run in running:  # their pods died without ending them: the likely failing task
        client.set_terminated(run.info.run_id, status=end_as)
        lines.append(
            f"ended MLflow run {run.info.run_id} ({run.data.tags.get(TAG_STEP, '?')}) as {end_as}"
        )
    if not running:
        lines.append("no MLflow run of this pipeline run was left RUNNING")
    report = "\n".join(lines)
    log.warning("%s", report)
    return report
