"""The pipeline's exit handler: after a failed Kubeflow run, the MLflow runs its tasks left
RUNNING (a pod killed for memory or its deadline never ends its own run) are ended as FAILED.

The exit task's function is called directly against a real ``mlflow server`` on 127.0.0.1, with
a RUNNING run made the way a task makes one (``rima_core.tracking.mlflow_runs.start_run`` under the
``MLFLOW_RUN_CONTEXT`` the components set) in a process that then dies without ending it. The
compiled package is checked for the handler and for the run-id tag on every MLflow task.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl

from components import EXIT_TASK, STEP_FUNCTIONS
from components.exit_handler import RUN_CONTEXT_ENV, RUN_TAG, end_failed_runs
from tests.conftest import clear_mlflow_env
from tests.servers import Server, mlflow_server

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = "rima-exit-handler"
# the tasks whose steps start MLflow runs: each must tag them with the KFP run id
MLFLOW_TASKS = ("tune_worker", "tune_best", "train", "evaluate", "register", "promote")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


@pytest.fixture
def mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_mlflow_env(monkeypatch)  # the URI comes from the task's parameter, as in the pod


def _dead_task_run(url: str, kfp_run: str, step: str) -> str:
    """A run started as a pipeline task starts it, by a process that then dies (``os._exit``,
    as a pod killed for memory): the run stays RUNNING. Returns its id."""
    code = textwrap.dedent(
        f"""
        import os
        from rima_core.tracking import mlflow_runs as tracking
        from rima_core.config import load_config

        cfg = load_config(None, overrides=["mlflow.tracking_uri={url}",
                                           "mlflow.experiment={EXPERIMENT}"])
        with tracking.start_run(cfg, {step!r}, log_params=False) as run:
            print(run.info.run_id, flush=True)
            os._exit(137)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env[RUN_CONTEXT_ENV] = json.dumps({RUN_TAG: kfp_run})  # what the components set
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 137, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def _status(state: str, message: str | None = None) -> dsl.PipelineTaskFinalStatus:
    return dsl.PipelineTaskFinalStatus(
        state=state,
        pipeline_job_resource_name="projects/p/locations/l/pipelineJobs/rima-run",
        pipeline_task_name="exit-handler-1",
        error_code=None if message is None else 9,
        error_message=message,
    )


def test_failed_run_ends_its_running_mlflow_runs_as_failed(
    server: Server, mlflow_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    import mlflow

    client = mlflow.MlflowClient(server.url)
    kfp_run, other_run = "6f1c-failed-run", "other-pipeline-run"
    dead = _dead_task_run(server.url, kfp_run, "train")
    assert client.get_run(dead).info.status == "RUNNING"
    assert client.get_run(dead).data.tags[RUN_TAG] == kfp_run  # the tag the components set
    exp = client.get_experiment_by_name(EXPERIMENT).experiment_id
    # this run's task that raised (it ended its own run), one that finished, and another
    # pipeline run's task that is still running: none of these may change
    raised = client.create_run(exp, tags={RUN_TAG: kfp_run, "step": "tune"}).info.run_id
    client.set_terminated(raised, status="FAILED")
    done = client.create_run(exp, tags={RUN_TAG: kfp_run, "step": "evaluate"}).info.run_id
    client.set_terminated(done, status="FINISHED")
    alive = client.create_run(exp, tags={RUN_TAG: other_run, "step": "train"}).info.run_id

    with caplog.at_level(logging.INFO, logger="rima.exit_handler"):
        report = end_failed_runs(
            status=_status("FAILED", "The DAG failed because task train failed (OOMKilled)."),
            run_id=kfp_run,
            mlflow_tracking_uri=server.url,
            mlflow_experiment=EXPERIMENT,
        )

    ended = client.get_run(dead).info
    assert ended.status == "FAILED" and ended.end_time is not None
    assert client.get_run(raised).info.status == "FAILED"
    assert client.get_run(done).info.status == "FINISHED"
    assert client.get_run(alive).info.status == "RUNNING"  # another pipeline run's
    assert f"pipeline run {kfp_run}: FAILED" in report
    assert "task train failed (OOMKilled)" in report
    assert "failed task(s), by their MLflow runs: tune" in report
    assert f"ended MLflow run {dead} (train) as FAILED" in report
    assert raised not in report and alive not in report  # only the runs ended here are named
    warnings = [r for r in caplog.records if r.name == "rima.exit_handler"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert warnings[0].getMessage() == report

    # a second pass (a retried exit task) finds nothing left to end
    again = end_failed_runs(_status("FAILED"), kfp_run, server.url, EXPERIMENT)
    assert "no MLflow run of this pipeline run was left RUNNING" in again


def test_succeeded_run_ends_nothing_and_cancelled_ends_killed(
    server: Server, mlflow_env: None
) -> None:
    import mlflow

    client = mlflow.MlflowClient(server.url)
    mlflow.set_tracking_uri(server.url)
    exp = mlflow.set_experiment(EXPERIMENT).experiment_id
    running = client.create_run(exp, tags={RUN_TAG: "ok-run"}).info.run_id
    report = end_failed_runs(_status("SUCCEEDED"), "ok-run", server.url, EXPERIMENT)
    assert "nothing to end" in report
    assert client.get_run(running).info.status == "RUNNING"
    # a cancelled run's runs were killed, not failed (MLflow's own word for it)
    end_failed_runs(_status("CANCELLED"), "ok-run", server.url, EXPERIMENT)
    assert client.get_run(running).info.status == "KILLED"
    # an experiment no task created: nothing was started, nothing to end
    report = end_failed_runs(_status("FAILED"), "ok-run", server.url, "never-created")
    assert "no MLflow experiment 'never-created'" in report


def test_every_mlflow_task_tags_its_runs_with_the_kfp_run_id() -> None:
    """Only a component's source reaches its pod, so each spells the tag out: it must be the
    one the exit task searches for, set where MLflow adds it to every run the process starts."""
    for name in MLFLOW_TASKS:
        source = inspect.getsource(STEP_FUNCTIONS[name])
        assert f'os.environ["{RUN_CONTEXT_ENV}"]' in source, name
        assert f'"{RUN_TAG}": run_id' in source, name
    assert f'tag = "{RUN_TAG}"' in inspect.getsource(end_failed_runs)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from pipelines.compile import compile_pipeline

    out = tmp_path_factory.mktemp("kfp") / "p.yaml"
    compile_pipeline(out, None, None, ["mlflow.tracking_uri=http://mlflow.mlflow.svc:5000"])
    docs = list(yaml.safe_load_all(out.read_text()))
    return {"spec": docs[0], "platform": docs[1]["platforms"]["kubernetes"]}


def test_compiled_pipeline_wraps_every_task_in_the_exit_handler(compiled: dict[str, Any]) -> None:
    spec = compiled["spec"]
    exit_name = EXIT_TASK.name.replace("_", "-")
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", exit_name}  # nothing runs outside the handler
    handler = spec["components"][root["exit-handler-1"]["componentRef"]["name"]]["dag"]["tasks"]
    assert {"resolve-config", "train", "register"} <= set(handler)

    exit_task = root[exit_name]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert exit_task["dependentTasks"] == ["exit-handler-1"]
    params = exit_task["inputs"]["parameters"]
    assert params["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert params["run_id"] == {"runtimeValue": {"constant": "{{$.pipeline_job_uuid}}"}}
    assert params["mlflow_tracking_uri"] == {"componentInputParameter": "mlflow_tracking_uri"}
    assert params["mlflow_experiment"] == {"componentInputParameter": "mlflow_experiment"}
    assert exit_task["taskInfo"]["name"] == EXIT_TASK.display_name
    assert exit_task["retryPolicy"]["maxRetryCount"] == 3
    # it reaches the server with the run's credentials, from the secret only
    executor = spec["components"][exit_task["componentRef"]["name"]]["executorLabel"]
    platform = compiled["platform"]["deploymentSpec"]["executors"][executor]
    (secret,) = platform["secretAsEnv"]
    assert "MLFLOW_TRACKING_PASSWORD" in {m["envVar"] for m in secret["keyToEnv"]}
    assert int(platform["activeDeadlineSeconds"]) == EXIT_TASK.timeout_s

    # every MLflow task gets the same run id the exit task searches for
    def all_tasks() -> dict[str, Any]:
        out = dict(root)
        for comp in spec["components"].values():
            out.update(comp.get("dag", {}).get("tasks", {}))
        return out

    tasks = all_tasks()
    for name in MLFLOW_TASKS:
        got = tasks[name.replace("_", "-")]["inputs"]["parameters"]["run_id"]
        assert got == params["run_id"], name
