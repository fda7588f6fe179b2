"""The Kubeflow pipeline executed on this machine with kfp.local (SubprocessRunner, no venv).

Every component runs as a subprocess of this interpreter exactly as it runs in its pod (same
source from the compiled component, same executor), minus the image and Kubernetes settings.
No ``from __future__ import annotations``: KFP reads the test pipeline's annotations as types.
"""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components import build_components
from tests.conftest import TINY_PROFILE, clear_mlflow_env, profile_overrides

# kfp.local warns that the project's image is not used: intended (the venv has what it holds)
pytestmark = pytest.mark.filterwarnings("ignore:You may be attemping:RuntimeWarning")

# the tiny profile, shorter still: the whole pipeline runs as one subprocess per task
TINY = [
    *profile_overrides(TINY_PROFILE),
    "runtime.device=cpu",
    "missing.sweep=[0.5, 1.0]",
    "tune.epochs=1",
    "tune.n_trials=2",
    "tune.workers=2",  # two parallel tune tasks share the study
]


@pytest.fixture
def local_runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from kfp import local

    clear_mlflow_env(monkeypatch)
    monkeypatch.delenv("RIMA_OPTUNA_STORAGE", raising=False)
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.chdir(tmp_path)  # relative SQLite URLs land here, never in the checkout
    root = tmp_path / "kfp"
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
    )
    return root


def test_resolve_config_component_runs_locally(local_runner: Path) -> None:
    c = build_components()
    params = yaml.safe_dump({"train": {"epochs": 9}, "tune": {"workers": 3}})
    common = dict(
        profile_yaml="train:\n  lr: 0.005\n",
        data_source="auto",
        disease="auto",
        missing_rate=0.8,
        missing_mixed=[0.2, 0.4],
        missing_sweep=[0.5],
        tune_trials=6,
        tune_workers=2,
        promote_metric="qwk",
        promote_scenario="mixed",
        promote_margin=0.0,
        promote_tolerance=0.05,
        register_min_metric=0.1,
        mlflow_tracking_uri="sqlite:///m.db",
        mlflow_experiment="exp",
        model_name="rima-x",
    )
    task = c.resolve_config(params_yaml=params, **common)
    assert task.outputs["Output"] == [0, 1]  # the tune fan-out: the typed parameter wins
    cfg = yaml.safe_load(Path(task.outputs["config"].path).read_text())
    assert cfg["train"]["epochs"] == 9 and cfg["train"]["lr"] == 0.005
    assert cfg["missing"]["mixed"] == [0.2, 0.4] and cfg["tune"]["n_trials"] == 6
    assert cfg["promote"]["register_min_metric"] == 0.1
    assert cfg["mlflow"]["model_name"] == "rima-x"
    with pytest.raises(RuntimeError, match="resolve-config"):
        c.resolve_config(params_yaml="train:\n  epoch: 9\n", **common)


def _fetch_pipeline():  # type: ignore[no-untyped-def]
    from kfp import dsl
    from kfp.dsl import Dataset

    c = build_components()

    @dsl.pipeline(name="fetch")
    def fetch(uri: str, dvc_repo: str = "", dvc_rev: str = "") -> Dataset:
        config = c.resolve_config(
            params_yaml="",
            profile_yaml="",
            data_source="auto",
            disease="auto",
            missing_rate=1.0,
            missing_mixed=[0.3, 0.3],
            missing_sweep=[0.5],
            tune_trials=1,
            tune_workers=1,
            promote_metric="qwk",
            promote_scenario="mixed",
            promote_margin=0.0,
            promote_tolerance=0.02,
            register_min_metric=0.0,
            mlflow_tracking_uri="sqlite:///m.db",
            mlflow_experiment="e",
            model_name="m",
        )
        return c.fetch_raw(
            config=config.outputs["config"],
            data_source_uri=uri,
            data_dvc_repo=dvc_repo,
            data_dvc_rev=dvc_rev,
        ).outputs["raw"]

    return fetch


def test_fetch_raw_component_copies_a_mounted_path(local_runner: Path, tmp_path: Path) -> None:
    fetch = _fetch_pipeline()
    src = tmp_path / "fairvision"
    (src / "Glaucoma").mkdir(parents=True)
    (src / "Glaucoma" / "data_0001.npz").write_bytes(b"npz")
    raw = fetch(uri=str(src)).output
    assert (Path(raw.path) / "Glaucoma" / "data_0001.npz").read_bytes() == b"npz"
    assert raw.metadata["files"] == 1 and raw.metadata["uri"] == str(src)


def test_fetch_raw_component_reads_a_dvc_revision(local_runner: Path, tmp_path: Path) -> None:
    """``data_dvc_repo``/``data_dvc_rev``: data.raw_dir of that commit, from the DVC remote."""
    import os
    import shutil
    import subprocess
    import sys

    repo = tmp_path / "project"
    (repo / "data" / "raw").mkdir(parents=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]

    def run(*cmd: str) -> None:
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)

    run("git", "init", "-q")
    run(dvc, "init", "-q")
    run(dvc, "remote", "add", "-d", "store", str(tmp_path / "remote"))
    (repo / "data" / "raw" / "eye.npz").write_bytes(b"v1")
    run(dvc, "add", "data")
    run(dvc, "push")
    run(*git, "add", "-A")
    run(*git, "commit", "-qm", "v1")
    first = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    (repo / "data" / "raw" / "eye.npz").write_bytes(b"v2")
    run(dvc, "add", "data")
    run(dvc, "push")
    run(*git, "commit", "-qam", "v2")
    shutil.rmtree(repo / ".dvc" / "cache")

    fetch = _fetch_pipeline()
    raw = fetch(uri="ignored://when-dvc-is-given", dvc_repo=str(repo), dvc_rev=first).output
    assert (Path(raw.path) / "eye.npz").read_bytes() == b"v1"
    assert raw.metadata["rev"] == first and raw.metadata["files"] == 1


def manifest_digest(run_dir: Path) -> str:
    import pyarrow.parquet as pq

    meta = pq.read_schema(run_dir / "prepare" / "store" / "manifest.parquet").metadata
    return json.loads(meta[b"rima"])["content_hash"][:36]


@pytest.mark.slow
def test_whole_pipeline_runs_locally_and_registers_a_model(local_runner: Path) -> None:
    import mlflow
    import optuna

    from pipelines.local import run_local
    from rima_core.config import load_config
    from rima_core.core.data.masks import scenario_names
    from rima_core.runs.tune import search_space

    work = local_runner.parent
    mlflow_uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = f"sqlite:///{work / 'optuna.db'}"
    overrides = [
        *TINY,
        f"mlflow.tracking_uri={mlflow_uri}",
        f"tune.storage={storage}",
        "mlflow.experiment=kfp-local",
        "mlflow.model_name=rima-kfp",
    ]
    result = run_local(
        None,
        None,
        overrides,
        root=local_runner,
        argument_pairs=["register_min_metric=-1"],  # the gate opens for any real kappa
    )
    cfg = load_config(None, overrides=overrides)
    run_dir = Path(result["model"]).parents[1]

    # data-side artifacts
    manifest = pd.read_parquet(run_dir / "prepare" / "store" / "manifest.parquet")
    assert len(manifest) == 60
    masks = pd.read_parquet(run_dir / "simulate-missing" / "masks")
    assert set(masks["scenario"]) == set(scenario_names(cfg.missing))
    assert json.loads((run_dir / "validate" / "report").read_text())["success"] is True

    # tuning: two workers, one shared study, the budget counted once
    best = json.loads((run_dir / "tune-best" / "best_params").read_text())
    assert set(best) == set(search_space(cfg.tune)) and "ot.pairing_mix" in best
    workers = sorted(run_dir.glob("for-loop-*-iteration-*/tune-worker"))
    assert len(workers) == 2
    (study_summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=study_summary.study_name, storage=storage).trials
    # the shared budget (2) stops both workers; a trial already started when it was reached
    # still finishes, so the total may exceed it by at most workers - 1
    assert 2 <= len(trials) <= 3
    assert all(t.state.is_finished() for t in trials)
    assert trials[0].params != trials[1].params  # the workers' samplers are seeded apart
    study = json.loads((run_dir / "tune-best" / "study" / "study.json").read_text())
    assert study["n_trials"] == len(trials) and study["study_name"] == study_summary.study_name

    # model and evaluation
    assert (Path(result["model"]) / "model.pt").is_file()
    metrics = json.loads((Path(result["evaluation"]) / "metrics.json").read_text())
    assert set(metrics) == set(scenario_names(cfg.missing))
    assert (run_dir / "evaluate" / "report").read_text().startswith("<!doctype html>")

    # registry: version 1 registered and, as the first one, promoted to champion
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    # a local run never writes to the configured (production) model: it gets its own name
    assert client.search_registered_models("name = 'rima-kfp'") == []
    champion = client.get_model_version_by_alias("rima-kfp-local", "champion")
    assert str(champion.version) == "1"
    assert "test/mixed/qwk" in champion.tags and len(champion.tags) <= 30
    # lineage: the version is the model logged by the train task's run, on the store it read
    source = client.get_run(champion.run_id)
    assert source.data.tags["step"] == "train"
    # every MLflow run of the pipeline run carries its KFP run id, the tag the exit handler
    # (which ran last, found the run succeeded and ended nothing) searches by
    kfp_run = source.data.tags["kfp.run_id"]
    runs = client.search_runs([source.info.experiment_id])
    assert {r.data.tags.get("step") for r in runs} >= {"tune", "train", "evaluate", "register"}
    assert {r.data.tags.get("kfp.run_id") for r in runs} == {kfp_run}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert source.inputs.dataset_inputs[0].dataset.digest == manifest_digest(run_dir)
    decision = (run_dir / "promote" / "decision").read_text()
    assert "no champion yet" in decision
