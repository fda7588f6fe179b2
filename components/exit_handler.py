"""The pipeline's exit task: close the MLflow runs a failed Kubeflow run left RUNNING.

A task that raises ends its own MLflow run as FAILED
(``rima_core.tracking.mlflow_runs.start_run``), but a
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
#: are shipped as source, so each one spells the key out; tests/e2e/test_kfp_exit_handler.py checks
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
    from rima_core.pipeline.pipeline_runs import end_orphan_runs

    tag = "kfp.run_id"  # components.exit_handler.RUN_TAG (only this source reaches the pod)
    return end_orphan_runs(
        mlflow_tracking_uri,
        mlflow_experiment,
        tag,
        run_id,
        str(status.state or ""),
        str(status.error_message or ""),
    )
