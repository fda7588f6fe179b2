"""Artifacts and data on S3, against moto's S3 server on loopback (real HTTP through boto3).

Three setups the mission uses at scale: MLflow writing artifacts straight to ``s3://`` (client
has ``MLFLOW_S3_ENDPOINT_URL`` and credentials), an ``mlflow server`` proxying artifacts to S3
(the client has neither), and a DVC remote on S3.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from rima_core.config import Config
from rima_core.ops import registry, serving
from tests.conftest import clear_mlflow_env
from tests.e2e.test_serving import tiny_model
from tests.servers import S3_ENV, Server, mlflow_server, moto_server, sqlite_uri

BUCKET = "rima-artifacts"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, object]]:
    import boto3

    with moto_server(tmp_path_factory.mktemp("moto")) as server:
        client = boto3.client(
            "s3",
            endpoint_url=server.url,
            aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_ENV["AWS_DEFAULT_REGION"],
        )
        client.create_bucket(Bucket=BUCKET)
        yield server, client


def _keys(client: object, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _cfg(tracking_uri: str, name: str) -> Config:
    c = Config()
    c.mlflow.tracking_uri = tracking_uri
    c.mlflow.experiment = name
    c.mlflow.model_name = name
    return c


def _model_and_metrics(tmp_path: Path) -> tuple[Path, Path]:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tiny_model(model_dir / "model.pt")
    from tests.e2e.test_registry import _evaluation, _mark_complete

    _mark_complete(model_dir)  # a finished training; validation metrics as evaluate writes them
    metrics = _evaluation(tmp_path, {"mixed": {"qwk": 0.5}, "complete": {"qwk": 0.6}})
    return model_dir, metrics


def _register_load_predict(cfg: Config, tmp_path: Path) -> dict:
    """register -> promote -> load models:/NAME@champion -> same numbers as the local file."""
    import mlflow

    model_dir, metrics = _model_and_metrics(tmp_path)
    reg = registry.register(model_dir, metrics, cfg)
    assert registry.promote(cfg)["promoted"]
    model = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.model_name}@champion")
    example = serving.input_example()
    want = serving.Predictor.from_file(model_dir / "model.pt").predict(example)
    pd.testing.assert_frame_equal(
        model.predict(example).reset_index(drop=True), want.reset_index(drop=True)
    )
    return reg


def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_mlflow_env(monkeypatch)
    for key in S3_ENV:
        monkeypatch.delenv(key, raising=False)


def test_direct_s3_artifact_location(
    s3: tuple[Server, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = s3
    _clean_env(monkeypatch)
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", server.url)
    cfg = _cfg(sqlite_uri(tmp_path), "rima-s3-direct")
    cfg.mlflow.artifact_location = f"s3://{BUCKET}/direct"
    reg = _register_load_predict(cfg, tmp_path)
    keys = _keys(client, "direct/")
    assert any(k.endswith("artifacts/model.pt") for k in keys), keys
    assert any(k.endswith("/MLmodel") for k in keys)
    assert any(reg["run_id"] in k and k.endswith("evaluation/metrics.json") for k in keys)
    assert not (tmp_path / "mlartifacts").exists()  # nothing went to local disk


@pytest.mark.slow
def test_server_proxies_artifacts_to_s3(
    s3: tuple[Server, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, client = s3
    _clean_env(monkeypatch)  # the client gets no S3 endpoint and no credentials at all
    env = {**S3_ENV, "MLFLOW_S3_ENDPOINT_URL": server.url}
    with mlflow_server(tmp_path, artifacts_destination=f"s3://{BUCKET}/proxied", env=env) as mls:
        cfg = _cfg(mls.url, "rima-s3-proxied")
        _register_load_predict(cfg, tmp_path)
    keys = _keys(client, "proxied/")
    assert any(k.endswith("artifacts/model.pt") for k in keys), keys
    assert any(k.endswith("/MLmodel") for k in keys)


def _dvc(repo: Path, *args: str, env: dict[str, str]) -> str:
    dvc = str(Path(sys.executable).parent / "dvc")
    proc = subprocess.run([dvc, *args], cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def test_dvc_remote_on_s3_push_pull(s3: tuple[Server, object], tmp_path: Path) -> None:
    server, client = s3
    repo = tmp_path / "repo"
    (repo / "data" / "raw").mkdir(parents=True)
    files = {
        "data/raw/a.bin": bytes(range(256)) * 8,
        "data/raw/b.txt": b"fundus + oct\n",
        "data/raw/sub/c.npy": os.urandom(1000),
    }
    for rel, content in files.items():
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).write_bytes(content)
    env = {**os.environ, **S3_ENV, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    _dvc(repo, "init", "-q", env=env)
    _dvc(repo, "add", "data", env=env)
    assert (repo / "data.dvc").is_file()
    _dvc(repo, "remote", "add", "-d", "s3store", f"s3://{BUCKET}/dvc", env=env)
    _dvc(repo, "remote", "modify", "s3store", "endpointurl", server.url, env=env)
    _dvc(repo, "push", env=env)
    pushed = _keys(client, "dvc/")
    assert len(pushed) >= len(files), pushed  # one object per file (+ the directory listing)

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    _dvc(repo, "pull", env=env)
    for rel, content in files.items():
        assert (repo / rel).read_bytes() == content, rel


@pytest.mark.slow
def test_fetch_dvc_reads_the_versioned_data_from_an_s3_remote(
    s3: tuple[Server, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's fetch-raw path: the data of a given commit, from the project's DVC remote
    (moto on loopback), with no local cache — the same bytes `dvc repro` reads there."""
    from rima_core.core.data.fetch import fetch_dvc

    server, _ = s3
    repo = tmp_path / "project"
    (repo / "data" / "raw" / "sub").mkdir(parents=True)
    env = {**os.environ, **S3_ENV, "DVC_NO_ANALYTICS": "1", "GIT_TERMINAL_PROMPT": "0"}
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    v1 = {"data/raw/a.bin": os.urandom(3000), "data/raw/sub/b.txt": b"version 1\n"}
    for rel, content in v1.items():
        (repo / rel).write_bytes(content)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    _dvc(repo, "init", "-q", env=env)
    _dvc(repo, "remote", "add", "-d", "s3store", f"s3://{BUCKET}/fetch-dvc", env=env)
    _dvc(repo, "remote", "modify", "s3store", "endpointurl", server.url, env=env)
    _dvc(repo, "add", "data", env=env)
    _dvc(repo, "push", env=env)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True, env=env)
    subprocess.run([*git, "commit", "-qm", "v1"], cwd=repo, check=True, env=env)
    subprocess.run([*git, "tag", "v1"], cwd=repo, check=True, env=env)
    (repo / "data/raw/sub/b.txt").write_bytes(b"version 2\n")
    _dvc(repo, "add", "data", env=env)
    _dvc(repo, "push", env=env)
    subprocess.run([*git, "commit", "-qam", "v2"], cwd=repo, check=True, env=env)
    shutil.rmtree(repo / ".dvc" / "cache")  # only the remote holds the data now
    shutil.rmtree(repo / "data")

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    old = fetch_dvc(str(repo), "data/raw", tmp_path / "raw-v1", rev="v1")
    assert old["files"] == 2 and old["rev"] == "v1"
    for rel, content in v1.items():
        assert (tmp_path / "raw-v1" / Path(rel).relative_to("data/raw")).read_bytes() == content
    new = fetch_dvc(str(repo), "data/raw", tmp_path / "raw-head")
    assert (tmp_path / "raw-head" / "sub" / "b.txt").read_bytes() == b"version 2\n"
    assert new["rev"] == "HEAD"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        fetch_dvc(str(repo), "data/nope", tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
