"""End the MLflow runs a failed pipeline run left RUNNING, and say what happened.

A task that raises ends its own MLflow run as FAILED
(:func:`rima_core.tracking.mlflow_runs.start_run`), but
a process that is killed (out of memory, a deadline, a lost node, a cancelled run) never gets
to: its run stays RUNNING for ever, and the MLflow UI shows a training "in progress" that died
hours ago. The Kubeflow pipeline's exit task (``components/exit_handler.py``) calls
:func:`end_orphan_runs` after every run; the pipeline's tasks tag their runs with the run's id,
so its runs are found by that tag, never by time or name.
"""

from __future__ import annotations

import logging
import os

from rima_core.config import MlflowConfig
from rima_core.redact import redact_text
from rima_core.tracking.mlflow_runs import TAG_STEP, tracking_uri

log = logging.getLogger("rima.exit_handler")


def end_orphan_runs(
    mlflow_tracking_uri: str,
    experiment_name: str,
    tag: str,
    run_id: str,
    state: str,
    error_message: str = "",
) -> str:
    """When the pipeline run (``state``) did not succeed, end its MLflow runs (tagged
    ``tag = run_id``) still RUNNING as FAILED (KILLED when the run was cancelled); return a
    short report: the run's state and error, which steps' runs had failed on their own, and
    which runs were ended here."""
    from mlflow.tracking import MlflowClient

    if not logging.getLogger().handlers:  # a pod's executor configures no logging
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    state = state.upper()
    lines = [f"pipeline run {run_id}: {state or 'UNKNOWN'}"]
    if error_message:
        lines.append(f"error: {redact_text(' '.join(error_message.split()))}")
    if state == "SUCCEEDED":
        report = "\n".join([*lines, "nothing to end: the run succeeded"])
        log.info("%s", report)
        return report
    if not run_id or "'" in run_id or "`" in run_id:
        raise ValueError(f"run_id {run_id!r} cannot name this run's MLflow runs")
    end_as = "KILLED" if state.startswith("CANCEL") else "FAILED"

    client = MlflowClient(tracking_uri=tracking_uri(MlflowConfig(tracking_uri=mlflow_tracking_uri)))
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        lines.append(f"no MLflow experiment {experiment_name!r}: no run was started")
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
    for run in running:  # their processes died without ending them: the likely failing task
        client.set_terminated(run.info.run_id, status=end_as)
        lines.append(
            f"ended MLflow run {run.info.run_id} ({run.data.tags.get(TAG_STEP, '?')}) as {end_as}"
        )
    if not running:
        lines.append("no MLflow run of this pipeline run was left RUNNING")
    report = "\n".join(lines)
    log.warning("%s", report)
    return report
