"""A real PostgreSQL server on loopback for tests (the tracking store and the Optuna storage of
a cluster are PostgreSQL, and their concurrency is not SQLite's).

:func:`postgres_server` runs ``initdb`` into a fresh temporary data directory (as the
``postgres`` user when the tests run as root: PostgreSQL refuses to run as root), starts the
server on a free 127.0.0.1 port with its socket in that directory, yields a superuser URL and
always stops the server and removes the directory. When no PostgreSQL is installed or it does not
start, :func:`unavailable` says why: tests skip on a developer machine, and fail in CI
(``CI=true``), where a skipped concurrency test would hide a missing component.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port

USER = "rima"


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_owner(cmd: list[str]) -> list[str]:
    """``cmd`` run as the ``postgres`` user when this process is root (initdb refuses root)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def unavailable(reason: str) -> None:
    """Skip (developer machine) or fail (CI) a test that needs PostgreSQL."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL not available: {reason}")


@contextlib.contextmanager
def postgres_server(timeout: float = 60) -> Iterator[str]:
    """A running PostgreSQL; yields ``postgresql+psycopg2://rima@127.0.0.1:PORT/postgres``. Raises
    RuntimeError (with the server's log) when it cannot be started."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        raise RuntimeError("initdb/pg_ctl not found (apt-get install -y postgresql)")
    root = Path(tempfile.mkdtemp(prefix="rima-pg-"))
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError as exc:
            shutil.rmtree(root, ignore_errors=True)
            raise RuntimeError("running as root and there is no postgres user") from exc
        os.chmod(root, 0o755)
        os.chown(root, owner.pw_uid, owner.pw_gid)
    port = free_port()
    started = False
    try:
        init = subprocess.run(
            _as_owner(
                [
                    initdb,
                    "-D",
                    str(data),
                    "--username",
                    USER,
                    "--auth",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr[-2000:]}")
        options = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=100"
        start = subprocess.run(
            _as_owner(
                [
                    pg_ctl,
                    "-D",
                    str(data),
                    "-l",
                    str(log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    str(int(timeout)),
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
            timeout=timeout + 10,
        )
        if start.returncode != 0:
            text = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {start.stderr[-1000:]}\n{text}")
        started = True
        yield f"postgresql+psycopg2://{USER}@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(
                _as_owner([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(root, ignore_errors=True)


def create_database(server_url: str, prefix: str = "t") -> str:
    """A new, empty database on the server; returns its URL."""
    import psycopg2

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(server_url.replace("+psycopg2", "", 1))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return server_url.rsplit("/", 1)[0] + f"/{name}"
