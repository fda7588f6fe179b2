"""Credentials in URL-like settings never leave the process (issue 10, item 2): not in MLflow
params, tags or artifacts, not in logs, not in saved configs, not in a compiled pipeline."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rima_core.config import Config, ConfigError, load_config
from rima_core.pipeline import cli
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
    cmd = [sys.executable, "-m", "rima_core.pipeline.cli", "-v", "train", "--params", os.devnull]
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

    from rima_core.pipeline.remote_config import OPTUNA_STORAGE_ENV, load_task_config, write_config
    from rima_core.tracking import mlflow_runs as tracking

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


# --- any password, every exit (second round) -----------------------------------------------------
#
# A password may hold any printable character: quotes, "<", ">", backticks, spaces, a raw "@",
# "/", "#", "?". The settings the schema declares secret are masked by their key (exactly: the
# masked value is the URL with "***" for the password), free text by the scanner and by the
# verbatim mask of the secrets this process was configured with.

import re  # noqa: E402

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rima_core import redact  # noqa: E402
from rima_core.tracking import mlflow_runs as tracking  # noqa: E402

PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
CORE = "Zq9Xv"  # in every generated password and nowhere else: its absence proves no leak
_URL_START = re.compile(r"\s+[A-Za-z][A-Za-z0-9+.\-]*:/|[A-Za-z][A-Za-z0-9+.\-]*://")
ISSUE_PASSWORDS = ["S3CRET'Q", "S3CRET<HTTP>", "p@ssW0RD", 'a"b`c d#e/f?g@h', "x@y@z", "@", " "]


def _urls(password: str) -> dict[str, tuple[str, str]]:
    """setting -> (value with the password, the value as it must be shown)."""
    return {
        "tune.storage": (
            f"postgresql://optuna:{password}@db.svc:5432/optuna",
            f"postgresql://optuna:{MASK}@db.svc:5432/optuna",
        ),
        "mlflow.tracking_uri": (
            f"https://bob:{password}@mlflow:5000",
            f"https://bob:{MASK}@mlflow:5000",
        ),
    }


def _leaks(password: str, texts: dict[str, str]) -> list[str]:
    return [where for where, text in texts.items() if password in text or CORE in text]


def _check_everywhere(password: str) -> None:
    import contextlib
    import io
    import json

    from pipelines.compile import compile_pipeline
    from pipelines.rima_pipeline import ClusterOptions

    urls = _urls(password)
    sets = [f"{k}={json.dumps(v)}" for k, (v, _) in urls.items()]  # JSON is YAML: no parsing
    cfg = load_config(None, overrides=sets)
    assert cfg.tune.storage == urls["tune.storage"][0]  # the process keeps the real value
    texts: dict[str, str] = {}
    # MLflow params and the logged model's config.json: exactly the URL with *** for the password
    params = tracking._params(cfg)
    for key, (_, shown) in urls.items():
        assert params[key] == shown, (key, params[key])
    texts["params"] = json.dumps(params)
    texts["config.json"] = json.dumps(redact_config(cfg.to_dict()))
    # tags, a log line and a traceback: free text, by the scanner alone and with the known mask
    redact._KNOWN.clear()
    starts = _URL_START.search(password)  # the scanner's documented limits (rima_core.redact)
    for key, (value, shown) in urls.items():
        line = f"study in {value} (tag {key}), 'quoted {value}' and <{value}>"
        if starts is None:  # exact: every copy masked, nothing else touched
            assert redact_text(line) == line.replace(value, shown), line
        elif "@" not in password[: starts.start()]:  # masked, possibly more than the password
            assert not _leaks(password, {"scan": redact_text(line)}), line
    tracking.remember_config_secrets(cfg.flat())
    texts["tags"] = json.dumps(tracking._tags({k: f"x {v} y" for k, (v, _) in urls.items()}))
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "connect %s: %s", None, None)
    record.args = (urls["tune.storage"][0], urls["mlflow.tracking_uri"][0])
    RedactingFilter().filter(record)
    texts["log"] = record.getMessage()
    # stdout of `rima params show`
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["params", "show", "--params", os.devnull, *(
            a for s in sets for a in ("--set", s))]) == 0  # fmt: skip
    texts["stdout"] = out.getvalue()
    # the compiled package: refused, in a message that does not hold the password either
    for options in (
        ClusterOptions(),
        ClusterOptions(image=f"https://u:{password}@registry.example/rima:1"),
        ClusterOptions(gpu_node_selector={"pool": f"https://u:{password}@x"}),
    ):
        cluster = ["mlflow.tracking_uri=http://mlflow.svc:5000"]
        overrides = sets[:1] + cluster if options == ClusterOptions() else cluster
        with pytest.raises(ConfigError) as err:
            compile_pipeline(Path(os.devnull + ".yaml"), None, None, overrides, options)
        texts[f"compile {options.image or options.gpu_node_selector}"] = str(err.value)
    assert _leaks(password, texts) == [], {k: texts[k] for k in _leaks(password, texts)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=PRINTABLE, suffix=PRINTABLE)
@example(prefix="S3CRET'Q", suffix="")
@example(prefix="S3CRET<HTTP>", suffix="")
@example(prefix="p@ss", suffix="@W0RD")
@example(prefix="a b", suffix=" models:/x@y")
@example(prefix="a://b", suffix="")
@example(prefix="p@q http://", suffix="@")
def test_any_printable_password_never_leaves(prefix: str, suffix: str) -> None:
    """Random passwords over all printable ASCII (around a fixed core, so a leak of any part
    that holds it shows), through every exit: MLflow params, tags, the logged model's
    config.json, log lines, `rima params show`, and the pipeline compiler (which refuses)."""
    password = prefix + CORE + suffix
    try:
        _check_everywhere(password)
    finally:
        redact._KNOWN.clear()  # this example's secrets must not mask the next one's leaks


@pytest.mark.parametrize("password", ISSUE_PASSWORDS)
def test_issue_passwords_are_masked_exactly(password: str) -> None:
    for value, shown in _urls(password).values():
        assert redact_url(value) == shown
        assert redact_text(f'--set "tune.storage={value}"') == f'--set "tune.storage={shown}"'
    assert redact_text("loading models:/rima@champion from http://127.0.0.1:5000") == (
        "loading models:/rima@champion from http://127.0.0.1:5000"
    )


def test_compile_cli_refuses_a_quoted_password(tmp_path: Path) -> None:
    """`python -m pipelines compile --set "tune.storage=postgresql://optuna:S3CRET'Q@db..."`
    used to exit 0 with the password in the package."""
    out = tmp_path / "p.yaml"
    cmd = [sys.executable, "-m", "pipelines", "compile", "--params", os.devnull, "--out", str(out),
           "--set", "mlflow.tracking_uri=http://mlflow.svc:5000",
           "--set", "tune.storage=postgresql://optuna:S3CRET'Q@db:5432/optuna"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=mlflow_free_env())
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "S3CRET" not in proc.stdout + proc.stderr and not out.exists()
    assert "tune.storage" in proc.stderr
    for flag, value in (("--image", "https://u:S3CRET'Q@reg/rima:1"),
                        ("--gpu-node-selector", "pool=https://u:S3CRET<HTTP>@x")):  # fmt: skip
        extra = [flag, value, "--set", "mlflow.tracking_uri=http://mlflow.svc:5000"]
        proc = subprocess.run(
            [*cmd[:7], *extra], capture_output=True, text=True, env=mlflow_free_env()
        )
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "S3CRET" not in proc.stdout + proc.stderr and not out.exists()


@pytest.mark.parametrize("password", ISSUE_PASSWORDS[:3])
def test_mlflow_store_holds_no_odd_password(
    password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real MLflow run (params, tags, a log line) with the issue's passwords: the database
    file does not contain them."""
    uri = sqlite_uri(tmp_path)
    clear_mlflow_env(monkeypatch)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    urls = _urls(password + CORE)
    cfg = load_config(None, overrides=["mlflow.experiment=rima-odd"])
    cfg.tune.storage, cfg.mlflow.tracking_uri = (v for v, _ in urls.values())
    with tracking.start_run(cfg, "tune", tags={"optuna_storage": cfg.tune.storage}):
        tracking.set_tags({"note": f"study in {cfg.tune.storage}"})
    data = (tmp_path / "mlflow.db").read_bytes()
    assert (password + CORE).encode() not in data and CORE.encode() not in data
