"""Run the Kubeflow pipeline on this machine with ``kfp.local`` — the same DAG, no cluster.

``SubprocessRunner(use_venv=False)`` executes every component in a subprocess of the current
interpreter (so ``rima_core`` must be installed here, as it is in the image). It ignores the
image, accelerators and every ``kfp.kubernetes`` setting; those are checked in the compiled
YAML instead. Relative SQLite URLs (MLflow, Optuna) resolve against the current directory,
exactly as for ``dvc repro``.
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

from pipelines.compile import parameter_types, pipeline_arguments
from pipelines.rima_pipeline import (
    EVALUATION_OUTPUT,
    MODEL_OUTPUT,
    ClusterOptions,
    build_pipeline,
)
from pipelines.submit import parse_arguments
from rima_core.config import Config, load_config

log = logging.getLogger(__name__)


def _init_sqlite_stores(cfg: Config) -> None:
    """Create the MLflow and Optuna SQLite schemas before any task runs.

    The parallel tune workers would otherwise both create a fresh database at the same moment
    and one of them lose the race on the schema-version row (``UNIQUE constraint failed:
    alembic_version``). A cluster's servers and PostgreSQL exist before the run, like these.
    """
    from rima_core.tracking import mlflow_runs as tracking

    if tracking.tracking_uri(cfg.mlflow).startswith("sqlite:"):
        tracking.configure(cfg.mlflow)
    if cfg.tune.storage.startswith("sqlite:"):
        from rima_core.runs.tune import make_storage

        make_storage(cfg.tune.storage)


LOCAL_SUFFIX = "-local"


def local_model_name(name: str) -> str:
    """The registered model a local run writes to: ``<name>-local``."""
    return name if name.endswith(LOCAL_SUFFIX) else name + LOCAL_SUFFIX


def _run_output(root: Path, before: set[Path], output: tuple[str, str]) -> str:
    """The path of ``(task, output)`` in the run kfp.local just made under ``root``.

    The pipeline returns no outputs (they cannot leave its ``dsl.ExitHandler``), so they are
    found where kfp.local writes every task's outputs: ``<root>/<run>/[<group>/]<task>/<name>``,
    in the one run folder that was not there before.
    """
    runs = [d for d in root.iterdir() if d.is_dir() and d not in before]
    if len(runs) != 1:
        raise RuntimeError(f"expected one new kfp.local run under {root}, found {sorted(runs)}")
    task, name = output
    found = sorted(runs[0].glob(f"**/{task}/{name}"))
    if len(found) != 1:
        raise RuntimeError(f"expected one {task}/{name} output in {runs[0]}, found {found}")
    return str(found[0])


def run_local(
    params: str | Path | None = "params.yaml",
    profile: str | Path | None = None,
    overrides: list[str] | None = None,
    root: str | Path = "reports/kfp-local",
    argument_pairs: list[str] | None = None,
) -> dict[str, Any]:
    """Run the whole pipeline locally; returns the output artifacts' paths and the wall time.

    ``argument_pairs`` (``name=value``, typed and checked exactly as for ``submit``) override
    pipeline parameters, on top of the values resolved from params/profile/overrides. The model
    is registered as ``<model_name>-local`` unless ``model_name=`` is given there. A failing
    task raises ``RuntimeError`` (kfp.local's ``raise_on_error``) naming the task.
    """
    from kfp import local

    args = pipeline_arguments(params, profile, overrides)
    explicit = parse_arguments(argument_pairs, parameter_types()) if argument_pairs else {}
    if "model_name" not in explicit:
        # a local run is a test of the pipeline: it never registers into (or moves the
        # @challenger of) the production model
        args["model_name"] = local_model_name(args["model_name"])
    args.update(explicit)
    cfg = load_config(params, profile, overrides)
    cfg.mlflow.tracking_uri = args["mlflow_tracking_uri"]
    cfg.mlflow.experiment = args["mlflow_experiment"]
    _init_sqlite_stores(cfg)
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
    )
    # no CPU/memory requests: kfp.local ignores them and would warn once per task
    pipeline = build_pipeline(ClusterOptions(resources={}))
    # kfp.local warns for every task that the image is not used; that is the point here
    warnings.filterwarnings("ignore", "You may be attemping", RuntimeWarning)
    before = set(root.iterdir())
    start = time.perf_counter()
    pipeline(**args)
    seconds = time.perf_counter() - start
    result = {
        "pipeline_root": str(root),
        "model": _run_output(root, before, MODEL_OUTPUT),
        "evaluation": _run_output(root, before, EVALUATION_OUTPUT),
        "seconds": round(seconds, 1),
    }
    log.info("local pipeline run finished in %.0f s: %s", seconds, result)
    return result
