"""MLflow tracking conventions, in one place so every step logs the same way.

Conventions: one experiment per dataset/profile (``cfg.mlflow.experiment``); one run per pipeline
step, named after the step and tagged ``step``; the flattened config as params (so a run can be
reproduced from its params alone); the git commit and the data manifest's content hash as tags
(so a metric can be traced back to code and data). Tune trials are nested runs.

``import mlflow`` costs ~7 s cold, so this module never imports it at import time, and the logging
helpers (:func:`log_metrics`, :func:`log_artifacts`) are free no-ops when mlflow was never
imported: the training loop can call them unconditionally without dragging MLflow into a unit
test or a quick CLI run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rima_core.config import Config, MlflowConfig
from rima_core.redact import redact_config, redact_text, remember_config_secrets

# What counts as uncommitted code has a module of its own; its names stay importable from here
from rima_core.tracking.git_provenance import _git, dirty_code_files
from rima_core.tracking.mlproject import run_name

if TYPE_CHECKING:  # pragma: no cover
    import mlflow

log = logging.getLogger(__name__)

# Tag keys (read back by registry/promotion and by people browsing the UI).
TAG_STEP = "step"
TAG_GIT_COMMIT = "git_commit"
TAG_GIT_DIRTY = "git_dirty"
TAG_DATA_HASH = "data_hash"
# MLflow's own tag for the commit (the UI shows it on the run page and links the source).
TAG_MLFLOW_GIT_COMMIT = "mlflow.source.git.commit"
# Experiment tag the MLflow 3 UI reads to pick its view: without it a new experiment may open in
# the GenAI (traces) view; "custom_model_development" is the classic runs/models view. The value
# is the UI's ``ExperimentKind.CUSTOM_MODEL_DEVELOPMENT`` (mlflow/server/js, MLflow 3.x).
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# Name of the artifact folder beside a SQLite database (see default_artifact_location).
ARTIFACT_DIR = "mlartifacts"


# Variables MLflow writes into ``os.environ`` on its own (``set_tracking_uri`` copies the URI into
# the first, ``set_experiment`` the id into the second) so that child processes inherit them.
# Left there, MLflow's copy is indistinguishable from a user's setting: a second configuration in
# one process (a notebook, kfp.local, a test suite) would keep writing to the first store, or a
# user's own URI would be mistaken for MLflow's copy and dropped. So these variables only ever hold
# what the user put there; our own processes (tune workers) get the config, not the environment.
_MLFLOW_OWN_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_ID")


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    """Undo whatever the block writes to the :data:`_MLFLOW_OWN_ENV` variables."""
    before = {name: os.environ.get(name) for name in _MLFLOW_OWN_ENV}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def tracking_uri(cfg: MlflowConfig) -> str:
    """``MLFLOW_TRACKING_URI`` set by the user wins over params (a cluster points every step at its
    server); MLflow's own copy never stays there (see :data:`_MLFLOW_OWN_ENV`). A relative SQLite
    file is the workspace's (:func:`in_workspace`)."""
    return in_workspace(os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri)


# DVC sets these in every stage's environment; for `dvc exp run --temp` and queued experiments,
# which run in a temporary copy of the repository, DVC_ROOT is the workspace the user ran from.
DVC_ROOT_ENV = "DVC_ROOT"
DVC_EXP_NAME_ENV, DVC_BASELINE_ENV = "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"
TAG_DVC_EXP, TAG_DVC_BASELINE = "dvc.exp_name", "dvc.baseline_rev"


def in_workspace(uri: str) -> str:
    """A relative ``sqlite:///`` URI anchored at the workspace DVC runs the stage for.

    SQLite paths resolve against the working directory, and `dvc exp run --temp` (and every
    queued experiment) runs the stages in a temporary copy under ``.dvc/tmp/exps``: its runs,
    registry versions and Optuna trials went into a database that was deleted afterwards. DVC
    names the workspace in ``DVC_ROOT``; outside DVC (or for a server URL, an absolute path, an
    in-memory database) the URI is returned unchanged.
    """
    root = os.environ.get(DVC_ROOT_ENV)
    prefix = "sqlite:///"
    if not root or not uri.startswith(prefix):
        return uri
    path = uri[len(prefix) :]
    if path in ("", ":memory:") or Path(path).is_absolute():
        return uri
    return f"{prefix}{(Path(root) / path).resolve()}"


def dvc_tags() -> dict[str, str]:
    """The DVC experiment a run belongs to (name and baseline commit), when DVC runs it."""
    tags = {}
    if os.environ.get(DVC_EXP_NAME_ENV):
        tags[TAG_DVC_EXP] = os.environ[DVC_EXP_NAME_ENV]
    if os.environ.get(DVC_BASELINE_ENV):
        tags[TAG_DVC_BASELINE] = os.environ[DVC_BASELINE_ENV]
    return tags


def default_artifact_location(cfg: MlflowConfig, uri: str) -> str | None:
    """Where a new experiment keeps artifacts.

    Explicit config wins (``s3://`` for direct S3). For a SQLite store, artifacts go beside the
    database file rather than into MLflow's cwd-relative ``./mlruns``, so a run's database and its
    artifacts move together and two working directories never share one artifact tree. For a
    server URI the server decides (proxied ``mlflow-artifacts:`` or its own S3 destination).
    """
    if cfg.artifact_location:
        return cfg.artifact_location
    db = sqlite_path(uri)
    if db is not None:
        return (db.resolve().parent / ARTIFACT_DIR).as_uri()
    return None


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (relative to the cwd), else None."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and uri != prefix + ":memory:":
        return Path(uri[len(prefix) :])
    return None


# Where MLflow keeps absolute artifact URIs in a tracking/registry database: (table, column).
_LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def relocate_artifacts(uri: str) -> dict[str, str]:
    """Make a moved or copied workspace's SQLite store point at its own ``mlartifacts/``.

    MLflow stores every artifact location as an absolute ``file://`` URI (it resolves relative
    paths against the cwd when an experiment is created; there is no relative form), so a copy
    of a workspace would keep reading and writing the original folder's artifacts. The default
    layout is "artifacts beside the database" (:func:`default_artifact_location`); when the
    database's recorded root is a ``.../mlartifacts`` folder other than the one beside it, the
    database was moved with its artifacts: rewrite that prefix, in one transaction, in every
    location column. Explicit ``artifact_location`` settings (any other folder name, ``s3://``)
    are never touched. Returns ``{old_root: new_root}`` for what was rewritten.
    """

    db = sqlite_path(uri)
    if db is None or not db.is_file():
        return {}
    new_root = (db.resolve().parent / ARTIFACT_DIR).as_uri()
    moved: dict[str, str] = {}
    con = sqlite3.connect(db, timeout=60)
    try:
        try:
            rows = con.execute("SELECT DISTINCT artifact_location FROM experiments").fetchall()
        except sqlite3.OperationalError:  # a database MLflow has not initialised yet
            return {}
        for (location,) in rows:
            if not location or not location.startswith("file://"):
                continue
            root = location.rstrip("/")
            if root.rsplit("/", 1)[-1] == ARTIFACT_DIR and root != new_root:
                moved[root] = new_root
        if not moved:
            return {}
        with con:  # one transaction: a half-rewritten store never exists
            con.execute("BEGIN IMMEDIATE")
            for old, new in moved.items():
                for table, column in _LOCATION_COLUMNS:
                    con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                        f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                        (new, len(old) + 1, old, len(old) + 1, old + "/"),
                    )
    finally:
        con.close()
    for old, new in moved.items():
        log.warning("%s was moved or copied: its artifact root %s now points at %s", db, old, new)
    return moved


def use_store(cfg: MlflowConfig) -> str:
    """Point MLflow at the tracking/registry store only (no experiment is created): enough to
    resolve ``models:/NAME@alias`` for prediction. Returns the tracking URI."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        # MLflow caches one store per URI string and SQLAlchemy keeps its connections open, so a
        # relative URI would keep using the first directory's database after a chdir
        uri = f"sqlite:///{db.resolve()}"
    if not cfg.artifact_location:
        relocate_artifacts(uri)
    with _environment_kept():
        mlflow.set_tracking_uri(uri)
    return uri


def configure(cfg: MlflowConfig) -> str:
    """Point MLflow at the tracking store and the experiment; return the experiment id.

    Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) the project already chose the experiment and the
    run; selecting another experiment would make MLflow refuse to resume that run.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = use_store(cfg)
    if os.environ.get("MLFLOW_RUN_ID"):
        client = mlflow.MlflowClient()
        run = client.get_run(os.environ["MLFLOW_RUN_ID"])
        name = client.get_experiment(run.info.experiment_id).name
        if name != cfg.experiment:
            log.warning(
                "this `mlflow run` logs into experiment %r, not %r (mlflow.experiment): start it "
                "with scripts/mlflow_run.sh, or pass `--experiment-name %s` to mlflow run",
                name,
                cfg.experiment,
                cfg.experiment,
            )
        return run.info.experiment_id
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = default_artifact_location(cfg, uri)
        try:
            exp_id = client.create_experiment(
                cfg.experiment,
                artifact_location=location,
                tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
            )
        except MlflowException as exc:  # another process created it first
            if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
                raise
            exp_id = client.get_experiment_by_name(cfg.experiment).experiment_id
        log.info(
            "created MLflow experiment %r (artifacts: %s)",
            cfg.experiment,
            redact_text(str(location)),
        )
    else:
        exp_id = exp.experiment_id
        if TAG_EXPERIMENT_KIND not in exp.tags:  # experiments created before the tag existed
            client.set_experiment_tag(exp_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
        if cfg.artifact_location and exp.artifact_location != cfg.artifact_location:
            log.warning(
                "experiment %r keeps its artifacts at %s, not %s (an experiment's artifact "
                "location is fixed when it is created; use a new experiment name to move it)",
                cfg.experiment,
                redact_text(exp.artifact_location),
                redact_text(cfg.artifact_location),
            )
    with _environment_kept():
        mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_tags(cwd: Path | None = None) -> dict[str, str]:
    """Commit of the code that ran: from git when installed from a checkout, else from
    ``RIMA_GIT_COMMIT`` (baked into the component image at build time). Empty when unknown.

    Written twice: ``git_commit`` (the project's key, read by the registry) and MLflow's own
    ``mlflow.source.git.commit``. ``git_dirty`` is true only for uncommitted *code* (see
    :func:`dirty_code_files`), so every ``dvc repro`` run is not flagged dirty by DVC's own files.
    ``cwd``: the checkout to describe (default: the one this package is imported from).
    """
    commit = _git("rev-parse", "HEAD", cwd=cwd)
    if commit:
        top = _git("rev-parse", "--show-toplevel", cwd=cwd)
        status = _git("status", "--porcelain", "--untracked-files=no", cwd=cwd) or ""
        dirty = dirty_code_files(Path(top), status) if top else status.splitlines()
        if dirty:
            log.info("uncommitted code: %s", ", ".join(dirty[:10]))
        return {
            TAG_GIT_COMMIT: commit,
            TAG_MLFLOW_GIT_COMMIT: commit,
            TAG_GIT_DIRTY: str(bool(dirty)).lower(),
        }
    if os.environ.get("RIMA_GIT_COMMIT"):
        commit = os.environ["RIMA_GIT_COMMIT"]
        return {TAG_GIT_COMMIT: commit, TAG_MLFLOW_GIT_COMMIT: commit}
    return {}


def manifest_hash(store: str | Path) -> str | None:
    """The store manifest's content hash (``rima`` Parquet metadata), or None if unreadable.

    Reads only the Parquet footer, so tagging a run with its data costs milliseconds.
    """
    from rima_core.core.data.store import read_meta

    try:
        return read_meta(store)["content_hash"]
    except (OSError, KeyError, ValueError) as exc:  # StoreError is a ValueError
        log.warning("no content hash in %s (%s); the run is not tagged with data", store, exc)
        return None


def log_dataset(store: str | Path, context: str) -> str | None:
    """Record the store as the active run's input dataset (MLflow's Datasets panel).

    The dataset is the manifest (one row per eye: id, label, split, modalities), named after the
    store folder, with the store's content hash as its digest (so two runs on the same data show
    the same dataset) and the store path as its source. ``context`` is ``training``,
    ``evaluation``, ... Returns the digest, or None when the store has no readable manifest (the
    run is then not linked to data; :func:`manifest_hash` has logged why).
    """
    mlflow = _active()
    digest = manifest_hash(store)
    if mlflow is None or digest is None:
        return None

    import mlflow.data
    import pandas as pd

    from rima_core.core.data.store import MANIFEST_FILE

    path = Path(store)
    manifest = pd.read_parquet(path / MANIFEST_FILE)
    with warnings.catch_warnings():
        # a local path matches two of MLflow's equivalent local-file source types; it says so
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        dataset = mlflow.data.from_pandas(
            manifest,
            source=str(path.resolve()),
            targets="label" if "label" in manifest.columns else None,
            name=path.name,
            digest=digest[:36],  # MLflow's digest column holds 36 characters
        )
    mlflow.log_input(dataset, context=context)
    return digest


def _params(cfg: Config) -> dict[str, str]:
    """The flattened config as MLflow params, credentials masked (``tune.storage`` may be a
    PostgreSQL URL with a password; see :mod:`rima_core.redact`)."""
    # JSON keeps lists/None readable and identical across runs (str() would write Python reprs).
    return {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in redact_config(cfg.flat()).items()
    }


def _tags(tags: dict[str, Any]) -> dict[str, str]:
    """Tag values as strings, credentials masked."""
    return {k: redact_text(str(v)) for k, v in tags.items()}


@contextlib.contextmanager
def start_run(
    cfg: Config,
    step: str,
    nested: bool = False,
    tags: dict[str, Any] | None = None,
    store: str | Path | None = None,
    data_hash: str | None = None,
    log_params: bool = True,
    run_id: str | None = None,
    dataset_context: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """One MLflow run for one pipeline step, with the project's params and tags.

    ``store`` (a store directory) or ``data_hash`` tags the run with the data it read. When a run
    is already active (a step called from inside another step's run), the new run is nested under
    it rather than failing. An exception inside the block marks the run FAILED. With
    ``dataset_context`` (``training``, ``evaluation``) the store is also the run's input dataset
    (:func:`log_dataset`).

    ``run_id`` reopens that run instead of starting one (a resumed training continues its own
    run, so its history stays whole; check it with :func:`reopenable` first). Its params are
    kept: only keys it lacks are added, and a value that changed since (a resumable key such as
    ``train.epochs``) is recorded as a ``resume.<key>`` tag, because MLflow params are immutable.
    """
    import mlflow

    remember_config_secrets(cfg.flat())  # masked verbatim in this run's tags and log lines
    configure(cfg.mlflow)
    all_tags: dict[str, str] = {TAG_STEP: step, **git_tags(), **dvc_tags()}
    if data_hash is None and store is not None:
        data_hash = manifest_hash(store)
    if data_hash:
        all_tags[TAG_DATA_HASH] = data_hash
    all_tags.update(_tags(tags or {}))
    nested = nested or mlflow.active_run() is not None
    if run_id is not None:
        cm = mlflow.start_run(run_id=run_id, tags=all_tags)
    else:
        name = step if nested else _project_run_name(cfg, step)
        cm = mlflow.start_run(run_name=name, nested=nested, tags=all_tags)
    with cm as run:
        if log_params and run_id is not None:
            _log_params_on_resume(run.info.run_id, _params(cfg))
        elif log_params:
            mlflow.log_params(_params(cfg))
        if store is not None and dataset_context:
            log_dataset(store, dataset_context)
        log.info(
            "MLflow run %s (%s%s) in %s",
            run.info.run_id,
            step,
            ", resumed" if run_id is not None else "",
            redact_text(mlflow.get_tracking_uri()),
        )
        yield run


def _project_run_name(cfg: Config, step: str) -> str:
    """The run name of ``step``: the step itself, or under ``mlflow run`` (``MLFLOW_RUN_ID``)
    the step, the profile the project was run with and the seed (``train-tiny-seed0``, as
    scripts/mlflow_run.sh names it; :func:`rima_core.tracking.mlproject.run_name`)."""
    project = os.environ.get("MLFLOW_RUN_ID")
    if not project:
        return step
    import mlflow

    profile = mlflow.MlflowClient().get_run(project).data.params.get("profile")
    return run_name(step, profile, cfg.runtime.seed)


def _log_params_on_resume(run_id: str, params: dict[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    logged = client.get_run(run_id).data.params
    new = {k: v for k, v in params.items() if k not in logged}
    changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
    if new:
        mlflow.log_params(new)
    if changed:
        log.info("resumed run %s with changed settings: %s", run_id, sorted(changed))
        mlflow.set_tags({f"resume.{k}": v for k, v in changed.items()})


def reopenable(run_id: str, cfg: MlflowConfig) -> str | None:
    """Why ``run_id`` cannot be reopened in the configured store and experiment, or None if it
    can (it exists there, is not deleted). Configures MLflow as a side effect."""
    import mlflow
    from mlflow.exceptions import MlflowException

    exp_id = configure(cfg)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        return f"run {run_id} is not in {redact_text(tracking_uri(cfg))} ({exc.error_code})"
    if run.info.lifecycle_stage == "deleted":
        return f"run {run_id} was deleted"
    if run.info.experiment_id != exp_id:
        return f"run {run_id} belongs to experiment {run.info.experiment_id}, not {exp_id}"
    return None


def end_abandoned_run(run_id: str, cfg: MlflowConfig) -> bool:
    """Mark ``run_id`` KILLED if it is still RUNNING: its process died (``kill -9``, a lost pod)
    without ending it, and a new run in the same output folder replaces it. True if marked."""
    import mlflow
    from mlflow.exceptions import MlflowException

    configure(cfg)
    client = mlflow.MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return False
    if run.info.status != "RUNNING":
        return False
    client.set_terminated(run_id, status="KILLED")
    log.info("MLflow run %s had no live process: marked KILLED", run_id)
    return True


def _active() -> Any:
    """The mlflow module when a run is active, else None — without importing mlflow."""
    if "mlflow" not in sys.modules:
        return None
    import mlflow

    return mlflow if mlflow.active_run() is not None else None


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Log numeric metrics to the active run; a no-op when there is none."""
    mlflow = _active()
    if mlflow is None:
        return
    clean = {}
    for key, value in metrics.items():
        try:
            clean[key] = float(value)
        except (TypeError, ValueError):
            log.debug("metric %s=%r is not numeric; not logged", key, value)
    mlflow.log_metrics(clean, step=step)


def log_artifacts(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a directory to the active run; a no-op when there is none."""
    mlflow = _active()
    if mlflow is None:
        return
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: cannot log a missing artifact")
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_table(frame: Any, artifact_file: str) -> None:
    """Log a table (a pandas DataFrame) as one MLflow table artifact (shown in the run's
    Evaluation/Artifacts views); a no-op when there is no active run or the table is empty."""
    mlflow = _active()
    if mlflow is None or len(frame) == 0:
        return
    mlflow.log_table(data=frame, artifact_file=artifact_file)


def set_tags(tags: dict[str, Any]) -> None:
    """Tag the active run; a no-op when there is none."""
    mlflow = _active()
    if mlflow is None:
        return
    mlflow.set_tags(_tags(tags))
