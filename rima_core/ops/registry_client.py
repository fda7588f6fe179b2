"""Access to the model registry: the MLflow client, the alias reads and writes that registration
and promotion both make, and one lock per registered model so that their changes never interleave.

Apart from :mod:`rima_core.ops.registry` because these are the primitives both of its actions stand
on; how to lock depends only on the tracking store (a file lock for SQLite, an advisory lock for
PostgreSQL, none for an MLflow server), not on what is registered or promoted under the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rima_core.config import Config
from rima_core.ops.registry_tags import CHALLENGER
from rima_core.tracking import mlflow_runs as tracking

# the registry's logger: these lines are the registry's, as before this module was split from it
log = logging.getLogger("rima_core.ops.registry")


def _lock_key(name: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory lock of one registered model."""
    digest = hashlib.sha256(f"rima-registry:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def registry_lock(cfg: Config, name: str) -> Iterator[str]:
    """Serialise registry changes of model ``name`` across processes; yields how.

    With a database tracking store the lock lives beside the data: PostgreSQL's advisory lock on
    its own connection (released by the server if the process dies), a file lock for a SQLite
    database (in the temp folder, keyed by the database's path). An MLflow server offers no
    lock: then promotion relies on its compare-and-set check alone
    (:func:`rima_core.ops.registry.promote`).
    """
    uri = tracking.tracking_uri(cfg.mlflow)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        db = tracking.sqlite_path(uri)
        if db is None:  # in-memory: one process
            yield "none"
            return
        # in the temp folder (SQLite is one machine's), keyed by the database: no file to ignore

        key = hashlib.sha256(f"{db.resolve()}\0{name}".encode()).hexdigest()[:24]
        lock = Path(tempfile.gettempdir()) / f"rima-registry-{key}.lock"
        with lock.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield "file"
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
        return
    if scheme in ("postgresql", "postgres"):
        import sqlalchemy
        from sqlalchemy.pool import NullPool

        engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
        key = _lock_key(name)
        try:
            with engine.connect() as conn:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield "postgresql"
                finally:
                    conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    yield "none"


def _client(cfg: Config) -> Any:
    """An MLflow client of the configured tracking store (registry calls go to the same one)."""
    tracking.configure(cfg.mlflow)
    import mlflow

    return mlflow.MlflowClient()


def set_challenger(client: Any, name: str, version: str) -> None:
    """Point ``@challenger`` at ``version``: the one the next promotion decides on."""
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    log.info("%s version %s is now @%s", name, version, CHALLENGER)


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    """The version ``@alias`` points at now, or None when it is unset (the compare-and-set of
    ``@champion`` reads it before and after moving it)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
