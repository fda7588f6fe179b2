"""Credentials in URL-like settings never leave the process (issue 10, item 2): not in MLflow
params, tags or artifacts, not in logs, not in saved configs, not in a compiled pipeline."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rima_core import cli
from rima_core.config import Config, ConfigError, load_config
from rima_core.redact import (
    MASK,
    RedactingFilter,
    find_secrets,
    redact_config,
    redact_text,
    redact_url,
)
from tests.conftest import TINY_OVERRIDES, TinyData, clear_mlflow_env, mlflow_free_env
from tests.servers import sqlite_uri

DB_PASSWORD = "Db-Pa55word-7f3a"
TRACKING_PASSWORD = "Ml-Pa55word-91c2"
STORAGE = f"postgresql://optuna:{DB_PASSWORD}@postgres.db.svc:5432/optuna"
TRACKING = f"https://rima:{TRACKING_PASSWORD}@mlflow.example.org"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (STORAGE, f"postgresql://optuna:{MASK}@postgres.db.svc:5432/optuna"),
        (
            "postgresql+psycopg2://u:p%40ss@h/db?sslmode=require",
            f"postgresql+psycopg2://u:{MASK}@h/db?sslmode=require",
        ),
        # SQLAlchemy reads a password up to the first "@", "/" and "#" included
        ("postgresql://u:ab#c/d@h/db", f"postgresql://u:{MASK}@h/db"),
        (TRACKING, f"https://rima:{MASK}@mlflow.example.org"),
        ("https://ghp_token123@github.com/o/r", f"https://{MASK}@github.com/o/r"),
        (
            "https://b.s3.amazonaws.com/k.npz?X-Amz-Credential=AK%2F1&X-Amz-Signature=ab12&x=1",
            f"https://b.s3.amazonaws.com/k.npz?X-Amz-Credential={MASK}&X-Amz-Signature={MASK}&x=1",
        ),
        ("s3://bucket/raw?token=abc", f"s3://bucket/raw?token={MASK}"),
        # nothing secret: unchanged
        ("sqlite:///optuna.db", "sqlite:///optuna.db"),
        ("postgresql://optuna@db/optuna", "postgresql://optuna@db/optuna"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("s3://bucket/data@v1/raw", "s3://bucket/data@v1/raw"),
        ("data/raw", "data/raw"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected
    assert redact_url(expected) == expected  # idempotent


def test_redact_text_config_and_find() -> None:
    line = f"could not connect to {STORAGE}: timeout (tracking '{TRACKING}')"
    clean = redact_text(line)
    assert DB_PASSWORD not in clean and TRACKING_PASSWORD not in clean
    assert "postgres.db.svc:5432" in clean  # what is left still says where
    cfg = load_config(
        None, overrides=[f"tune.storage={STORAGE}", f"mlflow.tracking_uri={TRACKING}"]
    )
    values = cfg.to_dict()
    values["extra"] = {"password": "hunter2", "list": ["x", STORAGE]}
    red = redact_config(values)
    assert red["tune"]["storage"] == redact_url(STORAGE)
    assert red["extra"] == {"password": MASK, "list": ["x", redact_url(STORAGE)]}
    assert values["tune"]["storage"] == STORAGE  # a copy: the run still needs the real value
    assert sorted(find_secrets(values)) == [
        "extra.list[1]",
        "extra.password",
        "mlflow.tracking_uri",
        "tune.storage",
    ]
    assert find_secrets(Config().to_dict()) == []


def test_log_filter_masks_messages_and_tracebacks() -> None:
    logger = logging.getLogger("test_redact_filter")
    logger.propagate = False
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(RedactingFilter())
    logger.addHandler(handler)
    try:
        logger.warning("storage %s unreachable", STORAGE)
        try:
            raise RuntimeError(f"connect failed: {TRACKING}")
        except RuntimeError:
            logger.exception("tracking failed")
    finally:
        logger.removeHandler(handler)
    text = "\n".join(records)
    assert DB_PASSWORD not in text and TRACKING_PASSWORD not in text
    assert "postgres.db.svc" in text and "RuntimeError" in text


def test_params_show_masks(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["params", "show", "--params", os.devnull, "--set", f"tune.storage={STORAGE}"])
    assert code == 0
    out = capsys.readouterr().out
    assert DB_PASSWORD not in out and redact_url(STORAGE) in out


def _all_bytes(root: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in root.rglob("*") if p.is_file()]


@pytest.mark.slow  # one real training process with MLflow logging: ~1 min here
def test_training_run_leaks_no_password(tiny_data: TinyData, tmp_path: Path) -> None:
    """`rima train` with a PostgreSQL tune.storage and a tracking URI holding a password (the run
    itself logs to a SQLite store named by MLFLOW_TRACKING_URI, as a cluster pod's env would):
    the passwords are nowhere in the MLflow database, the artifacts (the logged model's config
    included), the output folder, or the process's output."""
    import mlflow

    uri = sqlite_uri(tmp_path)
    env = mlflow_free_env(MLFLOW_TRACKING_URI=uri)
    out = tmp_path / "model"
    sets = [
        *TINY_OVERRIDES,
        "train.epochs=1",
        "mlflow.experiment=rima-secrets",
        f"tune.storage={STORAGE}",
        f"mlflow.tracking_uri={TRACKING}",
    ]
    cmd = [sys.executable, "-m", "rima_core.cli", "-v", "train", "--params", os.devnull]
    cmd += ["--store", str(tiny_data.store), "--masks", str(tiny_data.masks), "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("rima-secrets")
    (run,) = client.search_runs([exp.experiment_id])
    # the settings were logged (so the check below could have found them), masked
    assert run.data.params["tune.storage"] == redact_url(STORAGE)
    assert run.data.params["mlflow.tracking_uri"] == redact_url(TRACKING)
    everything = [("stdout", proc.stdout.encode()), ("stderr", proc.stderr.encode())]
    everything += [(str(k), str(v).encode()) for k, v in run.data.params.items()]
    everything += [(str(k), str(v).encode()) for k, v in run.data.tags.items()]
    everything += _all_bytes(tmp_path)  # mlflow.db, mlartifacts/ (model, config.json), model/
    configs = [p for p, _ in everything if isinstance(p, Path) and p.name == "config.json"]
    assert configs, "the logged model's config.json was not found among the artifacts"
    for where, data in everything:
        for secret in (DB_PASSWORD, TRACKING_PASSWORD):
            assert secret.encode() not in data, f"{secret} leaked into {where}"


def test_compile_refuses_a_credential(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pipelines import cli as pipelines_cli
    from pipelines.compile import compile_pipeline

    out = tmp_path / "pipeline.yaml"
    server = "mlflow.tracking_uri=http://mlflow.mlflow.svc:5000"  # a cluster's, no credential
    with pytest.raises(ConfigError) as err:
        compile_pipeline(out, None, None, [server, f"tune.storage={STORAGE}"])
    message = str(err.value)
    assert "tune.storage" in message and "RIMA_OPTUNA_STORAGE" in message
    assert "rima-credentials" in message and DB_PASSWORD not in message
    assert not out.exists() and list(tmp_path.iterdir()) == []

    params = tmp_path / "params.yaml"  # from a params file too, and through the CLI
    params.write_text(f"mlflow:\n  tracking_uri: {TRACKING}\n")
    argv = ["compile", "--params", str(params), "--out", str(out), "--secret", "s"]
    with caplog.at_level(logging.ERROR, logger="rima"):
        assert pipelines_cli.main(argv) == 2
    (message,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "mlflow.tracking_uri" in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert TRACKING_PASSWORD not in message and not out.exists()

    # without the credential the same settings compile, and the package holds no "***" either
    compile_pipeline(out, None, None, [server, "tune.storage=sqlite:///optuna.db"])
    assert out.is_file() and MASK not in out.read_text()


def test_credential_hints_name_keys_of_the_secret() -> None:
    from pipelines.compile import CREDENTIAL_ENV, S3_CREDENTIAL_ENV
    from pipelines.rima_pipeline import SECRET_ENV_KEYS

    named = {v for values in CREDENTIAL_ENV.values() for v in values} | set(S3_CREDENTIAL_ENV)
    assert named <= set(SECRET_ENV_KEYS)
    assert set(CREDENTIAL_ENV) <= set(Config().flat())


def test_pod_storage_from_the_secret_is_masked_in_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster route of issue 10: RIMA_OPTUNA_STORAGE (from the Kubernetes secret) becomes
    cfg.tune.storage inside the pod; the step's MLflow run must not log it, nor the task's
    resolved-config artifact hold it."""
    import mlflow

    from rima_core import tracking
    from rima_core.remote_config import OPTUNA_STORAGE_ENV, load_task_config, write_config

    uri = sqlite_uri(tmp_path)
    clear_mlflow_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv(OPTUNA_STORAGE_ENV, STORAGE)
    resolved = tmp_path / "config.yaml"
    write_config(load_config(None, overrides=["mlflow.experiment=rima-pod"]), resolved)
    cfg = load_task_config(resolved)
    assert cfg.tune.storage == STORAGE  # the pod connects with the real URL
    with tracking.start_run(cfg, "tune", tags={"optuna_storage": cfg.tune.storage}) as run:
        tracking.set_tags({"note": f"study in {cfg.tune.storage}"})
    got = mlflow.MlflowClient(uri).get_run(run.info.run_id)
    assert got.data.params["tune.storage"] == redact_url(STORAGE)
    assert got.data.tags["optuna_storage"] == redact_url(STORAGE)
    assert DB_PASSWORD not in got.data.tags["note"]
    assert DB_PASSWORD not in resolved.read_text()
    assert DB_PASSWORD.encode() not in (tmp_path / "mlflow.db").read_bytes()
