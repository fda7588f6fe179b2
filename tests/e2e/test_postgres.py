"""The parts that meet concurrency in production, against a real PostgreSQL server (not only
SQLite): parallel tune workers on one Optuna study, two promotions at once, a retried register.

The server is started by :mod:`tests.postgres` on a free 127.0.0.1 port in a temporary data
directory and stopped at the end of the session. Without PostgreSQL these tests skip on a
developer machine and fail in CI (``CI=true``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from rima_core.config import Config
from tests.conftest import TinyData, clear_mlflow_env
from tests.e2e.test_promotion_safety import check_concurrent_promotions, check_register_retried
from tests.e2e.test_registry import NAME
from tests.postgres import create_database, postgres_server, unavailable

pytestmark = pytest.mark.servers  # starts a PostgreSQL server


@pytest.fixture(scope="module")
def pg_server() -> Iterator[str]:
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        unavailable("the psycopg2 driver is not installed (pip install -e '.[test]')")
    try:
        with postgres_server() as url:
            yield url
    except RuntimeError as exc:
        unavailable(str(exc))


@pytest.fixture(scope="module")
def mlflow_template(pg_server: str) -> str:
    """A database with MLflow's tables, migrated once: each test copies it (CREATE DATABASE
    ... TEMPLATE), which takes a moment instead of MLflow's migrations."""
    import mlflow
    import sqlalchemy

    url = create_database(pg_server, "mlflow_template")
    mlflow.MlflowClient(url).search_experiments()  # runs the migrations
    sqlalchemy.create_engine(url).dispose()
    # MLflow keeps an engine per URI: close its connections, or the template cannot be copied
    from mlflow.store.db import utils as db_utils

    for engine in getattr(db_utils, "_engine_cache", {}).values():
        engine.dispose()
    return url.rsplit("/", 1)[1]


def _from_template(server: str, template: str) -> str:
    import uuid

    import psycopg2

    name = f"mlflow_{uuid.uuid4().hex[:12]}"
    conn = psycopg2.connect(server.replace("+psycopg2", "", 1))
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(  # drop what still holds the template open (a pooled MLflow engine)
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (template,),
            )
            cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        conn.close()
    return server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def pg_cfg(
    pg_server: str, mlflow_template: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Config:
    """The registry tests' config on a fresh PostgreSQL tracking store (artifacts in tmp_path)."""
    clear_mlflow_env(monkeypatch)
    cfg = Config()
    cfg.mlflow.tracking_uri = _from_template(pg_server, mlflow_template)
    cfg.mlflow.artifact_location = (tmp_path / "artifacts").as_uri()
    cfg.mlflow.experiment = "rima-test"
    cfg.mlflow.model_name = NAME
    cfg.promote.margin = 0.01
    cfg.promote.tolerance = 0.02
    return cfg


def test_two_promotions_at_once_on_postgresql(
    pg_cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rima_core.ops import registry

    with registry.registry_lock(pg_cfg, NAME) as how:
        assert how == "postgresql"  # the advisory lock, not the lock-free fallback
    check_concurrent_promotions(pg_cfg, tmp_path, monkeypatch)


def test_register_retried_on_postgresql(pg_cfg: Config, tmp_path: Path) -> None:
    check_register_retried(pg_cfg, tmp_path)


def test_tune_workers_share_one_study_on_postgresql(
    pg_server: str, tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path
) -> None:
    """Three worker processes on one study in PostgreSQL: every worker runs trials, the shared
    budget holds (overshot at most by the trials in flight), and trial numbers are unique."""
    import optuna

    from rima_core.runs.tune import tune

    storage = create_database(pg_server, "optuna")
    cfg = tiny_cfg
    cfg.tune.n_trials, cfg.tune.epochs, cfg.train.warmup_epochs = 5, 1, 0
    cfg.tune.pruner_startup_trials = 1
    summary = tune(
        tiny_data.store, tiny_data.masks, tmp_path / "tune", cfg, workers=3, storage=storage,
        track=False,
    )  # fmt: skip
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv")
    assert set(trials["worker"]) == {0, 1, 2}
    assert 5 <= summary["n_complete"] + summary["n_pruned"] <= 7
    study = optuna.load_study(study_name=summary["study_name"], storage=storage)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) == len(trials)


def test_no_postgresql_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import postgres

    monkeypatch.setattr(postgres, "_bin", lambda name: None)
    with pytest.raises(RuntimeError, match="initdb/pg_ctl not found"), postgres.postgres_server():
        pass
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required in CI"):
        unavailable("initdb/pg_ctl not found")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        unavailable("initdb/pg_ctl not found")
