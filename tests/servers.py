"""Real servers on loopback for tests: MLflow tracking server, MLflow model server, moto S3.

Each helper is a context manager that starts the server as a subprocess in its own process
group on a free 127.0.0.1 port, waits until it answers HTTP, and always stops the whole group
(uvicorn workers included) on exit — also when the test fails or the server never came up, in
which case the server's own log is part of the error so a failure is diagnosable.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
# dummy credentials: moto accepts any; boto3, MLflow and DVC need *some* to sign requests
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


_TEMPLATE_DB: Path | None = None


def sqlite_uri(directory: Path) -> str:
    """``sqlite:///directory/mlflow.db``, a fresh MLflow store with its tables already created.

    Creating the tables (MLflow's schema migrations) costs 5-10 s on this machine; doing it once
    per test process and copying the empty database keeps every test isolated and fast.
    """
    global _TEMPLATE_DB
    if _TEMPLATE_DB is None:
        import atexit
        import shutil
        import tempfile

        import mlflow

        tmp = Path(tempfile.mkdtemp(prefix="rima-mlflow-template-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        db = tmp / "template.db"
        mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()  # runs the migrations
        _TEMPLATE_DB = db
    import shutil

    target = directory / "mlflow.db"
    shutil.copyfile(_TEMPLATE_DB, target)
    return f"sqlite:///{target}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _wait(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.proc.returncode} before answering {path}:\n"
                f"{server.tail()}"
            )
        try:
            with urllib.request.urlopen(server.url + path, timeout=2) as resp:
                if resp.status < 500:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(
        f"{server.url}{path} did not answer within {timeout:.0f} s:\n{server.tail()}"
    )


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    pgid = proc.pid  # start_new_session=True: the server leads its own process group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=15)


@contextlib.contextmanager
def _serve(
    cmd: list[str], port: int, log: Path, env: dict[str, str], health: str, timeout: float
) -> Iterator[Server]:
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **env}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    server = Server(url=f"http://127.0.0.1:{port}", port=port, proc=proc, log=log)
    try:
        _wait(server, health, timeout)
        yield server
    finally:
        _stop(proc)


@contextlib.contextmanager
def moto_server(workdir: Path, timeout: float = 60) -> Iterator[Server]:
    """An S3-compatible HTTP server (moto's server mode). Use with :data:`S3_ENV`."""
    port = free_port()
    cmd = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with _serve(cmd, port, workdir / f"moto-{port}.log", S3_ENV, "/", timeout) as server:
        yield server


@contextlib.contextmanager
def mlflow_server(
    workdir: Path,
    artifacts_destination: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[Server]:
    """``mlflow server`` over a SQLite file in ``workdir``, proxying artifacts.

    ``artifacts_destination`` defaults to a local folder; pass ``s3://bucket/prefix`` (and the
    S3 endpoint in ``env``) for the proxied-S3 setup — the clients then need no S3 settings.
    """
    port = free_port()
    destination = artifacts_destination or (workdir / "server-artifacts").as_uri()
    cmd = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'server.db'}",
        "--artifacts-destination",
        destination,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = workdir / f"mlflow-server-{port}.log"
    with _serve(cmd, port, log, env or {}, "/health", timeout) as server:
        yield server


@contextlib.contextmanager
def model_server(
    model_uri: str,
    tracking_uri: str,
    workdir: Path,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """``mlflow models serve`` for ``model_uri`` in the current environment (no venv build).

    ``env`` adds variables for the server only (e.g. ``RIMA_SERVE_FILE_ROOT``); the test
    process's own ``RIMA_SERVE_*`` settings are removed first, so a server runs on its defaults
    unless the test says otherwise.
    """
    port = free_port()
    cmd = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        model_uri,
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    server_env = {
        **{k: "" for k in os.environ if k.startswith("RIMA_SERVE_")},
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        **(env or {}),
    }
    log = workdir / f"model-server-{port}.log"
    with _serve(cmd, port, log, server_env, "/ping", timeout) as server:
        yield server


def mlflow_test_config(tmp_path: Path, monkeypatch, experiment: str, model_name: str | None = None):  # type: ignore[no-untyped-def]
    """A Config on a fresh SQLite MLflow store in tmp_path, with no MLflow env left from outside."""
    from rima_core.config import Config
    from tests.conftest import clear_mlflow_env

    clear_mlflow_env(monkeypatch)
    c = Config()
    c.mlflow.tracking_uri = sqlite_uri(tmp_path)
    c.mlflow.experiment = experiment
    if model_name is not None:
        c.mlflow.model_name = model_name
    return c
