"""Tracking conventions against a real MLflow store (SQLite file in tmp_path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rima_core.config import Config, MlflowConfig
from rima_core.tracking import mlflow_runs as tracking
from tests.conftest import clear_mlflow_env
from tests.servers import sqlite_uri


def _store(tmp_path: Path, content_hash: str) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    table = pa.table({"case_id": ["a"]})
    meta = {"rima": json.dumps({"content_hash": content_hash})}
    pq.write_table(table.replace_schema_metadata(meta), store / "manifest.parquet")
    return store


def test_import_does_not_import_mlflow() -> None:
    # A fresh interpreter: importing tracking (and calling the no-op helpers) must not load mlflow.
    code = (
        "import sys; from rima_core.tracking import mlflow_runs as tracking; "
        "tracking.log_metrics({'a': 1.0}, step=0); tracking.set_tags({'x': 1}); "
        "assert 'mlflow' not in sys.modules, 'mlflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_params_tags_metrics_artifacts(cfg: Config, tmp_path: Path) -> None:
    import mlflow

    store = _store(tmp_path, "abc123")
    report = tmp_path / "report.json"
    report.write_text('{"ok": true}')
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "curve.csv").write_text("x,y\n0,1\n")

    with tracking.start_run(cfg, "train", store=store, tags={"extra": 7}) as run:
        for epoch in range(3):
            tracking.log_metrics({"val_qwk": 0.1 * epoch, "note": "n/a"}, step=epoch)
        tracking.log_artifacts(report)
        tracking.log_artifacts(plots, artifact_path="plots")
    assert mlflow.active_run() is None

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    got = client.get_run(run.info.run_id)
    exp = client.get_experiment(got.info.experiment_id)
    assert exp.name == "rima-test"
    # artifacts live beside the SQLite file, not in a cwd-relative ./mlruns
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert got.info.run_name == "train"
    assert got.data.tags["step"] == "train"
    assert got.data.tags["data_hash"] == "abc123"
    assert got.data.tags["extra"] == "7"
    assert len(got.data.tags["git_commit"]) == 40  # the tests run from the project checkout
    assert got.data.params["train.lr"] == str(cfg.train.lr)
    assert got.data.params["prepare.oct_shape"] == "[32, 32, 32]"
    assert got.data.params["model.fundus_weights"] == "null"
    assert set(got.data.params) == set(cfg.flat())
    history = client.get_metric_history(run.info.run_id, "val_qwk")
    assert [m.step for m in history] == [0, 1, 2]
    assert history[-1].value == pytest.approx(0.2)
    assert "note" not in got.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"report.json", "plots"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "plots")] == ["plots/curve.csv"]


def test_nested_runs_and_failed_status(cfg: Config) -> None:
    import mlflow

    with tracking.start_run(cfg, "tune") as parent:
        with tracking.start_run(cfg, "trial-0", nested=True, log_params=False) as child:
            tracking.log_metrics({"qwk": 0.5})
        # a step started inside another step's run nests instead of failing
        with tracking.start_run(cfg, "evaluate", log_params=False) as auto:
            pass
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    for r in (child, auto):
        assert client.get_run(r.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id

    with pytest.raises(RuntimeError, match="boom"), tracking.start_run(cfg, "train") as failed:
        raise RuntimeError("boom")
    assert client.get_run(failed.info.run_id).info.status == "FAILED"


def test_env_tracking_uri_wins(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    (tmp_path / "other").mkdir()
    other = sqlite_uri(tmp_path / "other")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    with tracking.start_run(cfg, "prepare", log_params=False) as run:
        pass
    assert mlflow.MlflowClient(other).get_run(run.info.run_id).info.run_name == "prepare"
    assert (
        mlflow.MlflowClient(cfg.mlflow.tracking_uri).search_experiments(
            filter_string="name = 'rima-test'"
        )
        == []
    )


def test_no_run_is_a_noop_and_missing_artifact_is_an_error(cfg: Config, tmp_path: Path) -> None:
    import mlflow  # imported, but no run is active: still a no-op

    assert mlflow.active_run() is None
    tracking.log_metrics({"a": 1.0})
    tracking.log_artifacts(tmp_path / "does-not-exist")  # no run: nothing to check against
    with (
        tracking.start_run(cfg, "evaluate", log_params=False),
        pytest.raises(FileNotFoundError, match="does-not-exist"),
    ):
        tracking.log_artifacts(tmp_path / "does-not-exist")


def test_explicit_artifact_location_and_missing_hash(cfg: Config, tmp_path: Path) -> None:
    import mlflow

    cfg.mlflow.artifact_location = (tmp_path / "elsewhere").as_uri()
    cfg.mlflow.experiment = "rima-elsewhere"
    with tracking.start_run(cfg, "train", store=tmp_path / "no-store", log_params=False) as run:
        tracking.log_artifacts(Path(__file__))
    got = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(run.info.run_id)
    assert "data_hash" not in got.data.tags
    assert got.info.artifact_uri.startswith((tmp_path / "elsewhere").as_uri())
    assert (tmp_path / "elsewhere" / run.info.run_id / "artifacts" / Path(__file__).name).exists()


def test_resumes_the_mlflow_project_run(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``mlflow run`` the step logs into the run the project created, in its experiment."""
    import mlflow

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.create_experiment("project-experiment")
    project_run = client.create_run(exp)
    client.log_param(project_run.info.run_id, "params", "params.yaml")  # as `mlflow run` does
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run.info.run_id)
    with tracking.start_run(cfg, "train") as run:
        tracking.log_metrics({"loss": 1.0}, step=0)
    assert run.info.run_id == project_run.info.run_id
    got = client.get_run(run.info.run_id)
    assert got.data.tags["step"] == "train" and got.data.params["train.epochs"] == "15"
    assert got.data.metrics["loss"] == 1.0
    assert client.get_experiment_by_name("rima-test") is None  # no stray experiment created


def test_the_mlflow_project_run_is_named_and_a_wrong_experiment_is_said(
    cfg: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Under ``mlflow run`` the step names the project's run ``<step>[-<profile>]-seed<seed>``
    (as scripts/mlflow_run.sh does) and warns when the run is not in mlflow.experiment (a
    plain ``mlflow run .`` lands in the Default experiment)."""
    import mlflow

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.create_experiment("Default-ish")
    project_run = client.create_run(exp, run_name="random-name-123")
    client.log_param(project_run.info.run_id, "profile", "configs/tiny.yaml")  # -P profile=...
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run.info.run_id)
    with (
        caplog.at_level("WARNING", logger="rima_core.tracking.mlflow_runs"),
        tracking.start_run(cfg, "evaluate", log_params=False),
    ):
        pass
    got = client.get_run(project_run.info.run_id)
    assert got.info.run_name == f"evaluate-tiny-seed{cfg.runtime.seed}"
    assert "not 'rima-test'" in caplog.text and "scripts/mlflow_run.sh" in caplog.text


def test_a_second_store_in_one_process_is_used(tmp_path, monkeypatch):
    """MLflow copies the URI it is given into MLFLOW_TRACKING_URI; that copy must not pin every
    later configuration of the same process to the first store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    import mlflow

    first = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'a.db'}", experiment="e")
    second = MlflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'b.db'}", experiment="e")
    tracking.use_store(first)
    assert tracking.tracking_uri(second) == second.tracking_uri
    tracking.use_store(second)
    assert mlflow.get_tracking_uri() == second.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", first.tracking_uri + "-user")  # a user's own choice
    assert tracking.tracking_uri(second) == first.tracking_uri + "-user"


def test_mlflow_own_env_copies_do_not_outlive_configure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: MLflow's copies of the URI and experiment id in ``os.environ`` leaked; when an
    earlier copy came back (a saved environment restored, as pytest's monkeypatch does), it was
    taken for the user's choice and a later step logged into an old store."""
    import mlflow

    clear_mlflow_env(monkeypatch)
    cfgs = []
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        cfgs.append(MlflowConfig(tracking_uri=sqlite_uri(tmp_path / name), experiment="e"))

    tracking.configure(cfgs[0])
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    saved = os.environ.get("MLFLOW_TRACKING_URI")  # an environment snapshot taken here ...
    tracking.configure(cfgs[1])
    if saved is not None:  # ... and restored later
        monkeypatch.setenv("MLFLOW_TRACKING_URI", saved)
    c = Config()
    c.mlflow = cfgs[2]
    with tracking.start_run(c, "train", log_params=False) as run:
        pass
    assert mlflow.MlflowClient(cfgs[2].tracking_uri).get_run(run.info.run_id).info.run_name == (
        "train"
    )


def test_user_tracking_uri_wins_on_every_configuration(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: the user's MLFLOW_TRACKING_URI was honoured once, then mistaken for MLflow's
    own copy, so a second step in the process (a tune trial, the register step) used params."""
    import mlflow

    (tmp_path / "user").mkdir()
    user = sqlite_uri(tmp_path / "user")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user)
    ids = []
    for step in ("tune", "trial-0"):
        with tracking.start_run(cfg, step, log_params=False) as run:
            ids.append(run.info.run_id)
        assert os.environ["MLFLOW_TRACKING_URI"] == user
    client = mlflow.MlflowClient(user)
    assert [client.get_run(i).info.run_name for i in ids] == ["tune", "trial-0"]


def test_experiment_kind_and_mlflow_git_commit_tag(cfg: Config) -> None:
    import mlflow

    with tracking.start_run(cfg, "prepare", log_params=False) as run:
        pass
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    got = client.get_run(run.info.run_id)
    assert got.data.tags["mlflow.source.git.commit"] == got.data.tags["git_commit"]
    exp = client.get_experiment(got.info.experiment_id)
    # the classic ML view in the MLflow UI, not the GenAI one
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment created before the tag existed gets it on the next configuration
    client.delete_experiment_tag(exp.experiment_id, "mlflow.experimentKind")
    tracking.configure(cfg.mlflow)
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def test_git_dirty_counts_only_code(tmp_path: Path) -> None:
    """What `dvc repro` itself changes (lock, .dvc files, committed metrics outputs, params) and
    untracked/ignored outputs do not make a run dirty; an edited source file does."""
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    (repo / "src").mkdir()
    files = {
        "dvc.yaml": "stages:\n  evaluate:\n    cmd: x\n    outs:\n      - models/rima\n"
        "    metrics:\n      - ${evaluate.out_dir}/metrics.json:\n          cache: false\n"
        "    plots:\n      - reports/plots\n"
        "plots:\n  - curve:\n      x: epoch\n"
        "      y:\n        ${evaluate.out_dir}/curve.csv: [a]\n",
        "dvc.lock": "schema: '2.0'\n",
        "params.yaml": "train:\n  epochs: 1\nevaluate:\n  out_dir: reports\n",
        "reports/curve.csv": "epoch,a\n0,1\n",
        "data.dvc": "outs:\n- path: data\n",
        "reports/metrics.json": "{}\n",
        "src/code.py": "x = 1\n",
        ".dvc/config": "[core]\n",
    }
    for name, text in files.items():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(text)
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    changed = ("dvc.lock", "params.yaml", "data.dvc", "reports/metrics.json", "reports/curve.csv")
    for name in (*changed, ".dvc/config"):
        (repo / name).write_text("changed by the run\n")
    # `dvc exp run -S` rewrites params.yaml; outputs are still found through it
    (repo / "params.yaml").write_text("train:\n  epochs: 2\nevaluate:\n  out_dir: reports\n")
    (repo / "untracked.txt").write_text("a run output\n")
    status = _git(repo, "status", "--porcelain", "--untracked-files=all")
    assert "untracked.txt" in status and "dvc.lock" in status  # the filter has work to do
    assert tracking.dirty_code_files(repo, status) == []
    head = _git(repo, "rev-parse", "HEAD").strip()
    assert tracking.git_tags(repo) == {
        "git_commit": head,
        "mlflow.source.git.commit": head,
        "git_dirty": "false",
    }
    (repo / "src/code.py").write_text("x = 2\n")
    status = _git(repo, "status", "--porcelain", "--untracked-files=no")
    assert tracking.dirty_code_files(repo, status) == ["src/code.py"]
    assert tracking.git_tags(repo)["git_dirty"] == "true"
    # the first porcelain line starts with a space (" M path"): its path must survive intact
    (repo / ".dvcignore").write_text("# changed\n")
    _git(repo, "add", ".dvcignore")
    _git(repo, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "ignore")
    (repo / ".dvcignore").write_text("# changed again\n")
    status = tracking._git("status", "--porcelain", "--untracked-files=no", cwd=repo) or ""
    assert status.startswith(" M .dvc/config")  # one leading space, path intact
    assert tracking.dirty_code_files(repo, status) == ["src/code.py"]


def test_copied_workspace_logs_into_its_own_artifacts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A workspace (relative sqlite:///mlflow.db, artifacts beside it) copied to another folder
    reads and writes its own artifacts there, also after the original is deleted."""
    import shutil

    import mlflow

    clear_mlflow_env(monkeypatch)
    cfg = Config()
    cfg.mlflow.tracking_uri = "sqlite:///mlflow.db"  # the default: relative to the workspace
    cfg.mlflow.experiment = "portable"
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    monkeypatch.chdir(original)
    note = original / "note.txt"
    note.write_text("first")
    with tracking.start_run(cfg, "train", log_params=False) as first:
        tracking.log_artifacts(note)
    client = mlflow.MlflowClient(f"sqlite:///{original / 'mlflow.db'}")
    client.create_registered_model("m")
    client.create_model_version("m", f"{first.info.artifact_uri}/note.txt", first.info.run_id)
    assert (original / "mlartifacts" / first.info.run_id / "artifacts" / "note.txt").exists()

    shutil.copytree(original, copy)
    monkeypatch.chdir(copy)
    note = copy / "note.txt"
    note.write_text("second")
    with tracking.start_run(cfg, "train", log_params=False) as second:
        tracking.log_artifacts(note)
    root = (copy / "mlartifacts").as_uri()
    assert (copy / "mlartifacts" / second.info.run_id / "artifacts" / "note.txt").exists()
    assert not (original / "mlartifacts" / second.info.run_id).exists()
    shutil.rmtree(original)  # the copy no longer needs it
    client = mlflow.MlflowClient(f"sqlite:///{copy / 'mlflow.db'}")
    old = client.get_run(first.info.run_id)
    assert old.info.artifact_uri.startswith(root)
    assert client.get_experiment_by_name("portable").artifact_location == root
    assert client.get_model_version("m", "1").source.startswith(root)
    got = mlflow.artifacts.download_artifacts(f"runs:/{first.info.run_id}/note.txt")
    assert Path(got).read_text() == "first"
    # the original layout is checked once; a second configuration has nothing to rewrite
    assert tracking.relocate_artifacts("sqlite:///mlflow.db") == {}


def test_a_dvc_temp_experiment_writes_into_the_workspace_databases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dvc exp run --temp` runs stages in a copy under .dvc/tmp/exps with DVC_ROOT naming the
    workspace: relative SQLite files (MLflow and Optuna) must be the workspace's, not the copy's."""
    from rima_core.config import MlflowConfig
    from rima_core.runs.tune import make_storage
    from rima_core.tracking.mlflow_runs import dvc_tags, in_workspace, tracking_uri

    workspace = tmp_path / "ws"
    copy_dir = workspace / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    copy_dir.mkdir(parents=True)
    monkeypatch.chdir(copy_dir)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert in_workspace("sqlite:///mlflow.db") == "sqlite:///mlflow.db"  # outside DVC: as given
    monkeypatch.setenv("DVC_ROOT", str(workspace))
    assert tracking_uri(MlflowConfig()) == f"sqlite:///{(workspace / 'mlflow.db').resolve()}"
    for unchanged in ("sqlite:///:memory:", f"sqlite:///{tmp_path}/x.db", "http://127.0.0.1:5000"):
        assert in_workspace(unchanged) == unchanged
    make_storage("sqlite:///optuna.db")
    assert (workspace / "optuna.db").is_file() and not (copy_dir / "optuna.db").exists()

    monkeypatch.setenv("DVC_EXP_NAME", "keen-lark")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    assert dvc_tags() == {"dvc.exp_name": "keen-lark", "dvc.baseline_rev": "abc123"}
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    assert dvc_tags() == {}
