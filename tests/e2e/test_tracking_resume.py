"""MLflow runs survive faults: `rima train --resume` after ``kill -9`` continues the same run, a
fresh run in the same folder marks the dead one KILLED, and `rima evaluate` with a bad input
leaves no run behind (issue 10, item 9). Real MLflow stores (SQLite), real processes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from rima_core.pipeline import cli, steps
from rima_core.tracking import mlflow_runs as tracking
from tests.conftest import TINY_OVERRIDES, TinyData, clear_mlflow_env, mlflow_free_env
from tests.servers import mlflow_test_config, sqlite_uri

EPOCHS = 4


def _train_cmd(data: TinyData, out: Path, *extra: str) -> list[str]:
    sets = [*TINY_OVERRIDES, f"train.epochs={EPOCHS}", "train.patience=0"]
    sets += ["mlflow.experiment=rima-resume"]
    return [
        sys.executable,
        "-m",
        "rima_core.pipeline.cli",
        "train",
        "--params",
        os.devnull,
        "--store",
        str(data.store),
        "--masks",
        str(data.masks),
        "--out",
        str(out),
        *[a for s in sets for a in ("--set", s)],
        *extra,
    ]


def _checkpoint_epochs(history: Path) -> int:
    try:
        return len(pd.read_csv(history))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


@pytest.mark.slow  # two training processes (torch + MLflow imports, 4 epochs): 1-9 min here
def test_sigkill_then_resume_continues_the_same_run(tiny_data: TinyData, tmp_path: Path) -> None:
    import mlflow

    uri = sqlite_uri(tmp_path)
    env = mlflow_free_env(MLFLOW_TRACKING_URI=uri)
    out = tmp_path / "model"
    log1 = tmp_path / "first.log"
    with open(log1, "wb") as sink:
        proc = subprocess.Popen(
            _train_cmd(tiny_data, out),
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        # SIGKILL as soon as the first epoch's checkpoint (and its history row) is on disk
        while _checkpoint_epochs(out / "history.csv") < 1:
            assert proc.poll() is None, log1.read_text()[-3000:]
            assert time.monotonic() < deadline, "training never finished an epoch"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    done_before_kill = _checkpoint_epochs(out / "history.csv")
    assert 1 <= done_before_kill < EPOCHS, "the run finished before it could be killed"

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("rima-resume")
    (killed,) = client.search_runs([exp.experiment_id])
    assert killed.info.status == "RUNNING"  # the fault: nothing ended the run
    recorded = json.loads((out / steps.MLFLOW_RUN_FILE).read_text())["run_id"]
    assert recorded == killed.info.run_id

    resumed = subprocess.run(
        _train_cmd(tiny_data, out, "--resume"), env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out}" in resumed.stderr  # the checkpoint was used, not a fresh start

    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [killed.info.run_id]  # one run, not two
    run = runs[0]
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "val/mean/qwk", "val/mixed/ece"):
        steps_logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps_logged == list(range(1, EPOCHS + 1)), key
    assert json.loads((out / steps.MLFLOW_RUN_FILE).read_text())["run_id"] == run.info.run_id
    assert json.loads((out / "train_summary.json").read_text())["epochs_run"] == EPOCHS
    assert run.data.params["train.epochs"] == str(EPOCHS)


def test_fresh_run_marks_an_abandoned_one_killed(tmp_path: Path, monkeypatch) -> None:
    """Without --resume a new run starts; the recorded run that no process will ever end (its
    trainer was killed) is marked KILLED and linked from the new one."""
    import mlflow

    cfg = mlflow_test_config(tmp_path, monkeypatch, "rima-abandoned")
    out = tmp_path / "model"
    exp_id = tracking.configure(cfg.mlflow)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    dead = client.create_run(exp_id, run_name="train")  # RUNNING, like a kill -9'd trainer's
    finished = client.create_run(exp_id, run_name="train")
    client.set_terminated(finished.info.run_id, "FINISHED")

    steps.write_run_file(out, finished.info.run_id)
    assert steps._train_run(out, cfg, resume=False) == (None, {"model": cfg.model.name})
    assert client.get_run(finished.info.run_id).info.status == "FINISHED"  # left alone

    steps.write_run_file(out, dead.info.run_id)
    run_id, tags = steps._train_run(out, cfg, resume=False)
    assert run_id is None and tags["replaces_killed_run"] == dead.info.run_id
    assert client.get_run(dead.info.run_id).info.status == "KILLED"

    # --resume reopens a recorded run of this store; one from another store starts afresh
    steps.write_run_file(out, finished.info.run_id)
    assert steps._train_run(out, cfg, resume=True)[0] == finished.info.run_id
    (tmp_path / "other").mkdir()
    cfg.mlflow.tracking_uri = sqlite_uri(tmp_path / "other")
    assert steps._train_run(out, cfg, resume=True)[0] is None


def test_reopened_run_keeps_its_params_and_records_changes(tmp_path: Path, monkeypatch) -> None:
    import mlflow

    cfg = mlflow_test_config(tmp_path, monkeypatch, "rima-reopen")
    with tracking.start_run(cfg, "train") as first:
        tracking.log_metrics({"loss": 1.0}, step=1)
    cfg.train.patience = 9  # a resumable key changed between the kill and the resume
    with tracking.start_run(cfg, "train", run_id=first.info.run_id) as again:
        tracking.log_metrics({"loss": 0.5}, step=2)
    assert again.info.run_id == first.info.run_id
    got = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(first.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params["train.patience"] == "5"  # MLflow params are immutable
    assert got.data.tags["resume.train.patience"] == "9"
    history = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(
        first.info.run_id, "loss"
    )
    assert [m.step for m in history] == [1, 2]


def _untrained_model(data: TinyData, path: Path) -> Path:
    """A real model file for the tiny store (weights untrained: only its format matters here)."""
    from rima_core.core.data import open_store
    from rima_core.core.models import build_model, save_model
    from rima_core.runs.train import model_spec

    spec = model_spec(data.cfg, open_store(data.store))
    path.parent.mkdir(parents=True)
    save_model(build_model(spec), spec, path)
    return path


@pytest.mark.parametrize("fault", ["no-model", "not-a-store", "unknown-split", "not-a-model"])
def test_evaluate_bad_input_leaves_no_run(
    fault: str,
    tiny_data: TinyData,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import mlflow

    clear_mlflow_env(monkeypatch)
    uri = sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = tmp_path / "model.pt"
    store = tiny_data.store
    sets = [*TINY_OVERRIDES, "mlflow.experiment=rima-eval-faults"]
    if fault == "no-model":
        pass  # model.pt does not exist
    elif fault == "not-a-model":
        model.write_bytes(b"not a torch file")
    else:
        model = _untrained_model(tiny_data, tmp_path / "m" / "model.pt")
        if fault == "not-a-store":
            store = tmp_path / "empty"
            store.mkdir()
        else:
            sets.append("evaluate.split=test")
            masks = pd.read_parquet(tiny_data.masks)
            masks = masks[masks["split"] != "test"]
            tiny_masks = tmp_path / "masks.parquet"
            masks.to_parquet(tiny_masks, index=False)
    masks_path = tmp_path / "masks.parquet" if fault == "unknown-split" else tiny_data.masks
    argv = ["evaluate", "--params", os.devnull, "--model", str(model), "--store", str(store)]
    argv += ["--masks", str(masks_path), "--out", str(tmp_path / "eval")]
    argv += [a for s in sets for a in ("--set", s)]
    with caplog.at_level(logging.ERROR, logger="rima"):
        assert cli.main(argv) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("rima-eval-faults")
    assert exp is None or client.search_runs([exp.experiment_id]) == []
    assert not (tmp_path / "eval").exists()
