"""One function per pipeline step: the only place a step is implemented.

DVC stages (via the ``rima`` CLI), MLproject entry points and Kubeflow components all call these
functions with paths and a :class:`~rima_core.config.Config`; none of them holds step logic.
Each function writes its outputs atomically (temporary path, then rename) through the module it
delegates to, and returns a small JSON-able summary. Heavy imports (torch, mlflow, great
expectations) happen inside the functions so ``rima --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rima_core.config import Config

log = logging.getLogger(__name__)


def synth(out: str | Path, cfg: Config) -> dict[str, Any]:
    """Write the synthetic retina phantom in the Harvard FairVision npz layout."""
    from rima_core.data.synthetic import generate

    return generate(Path(out), cfg.synth)


def prepare(
    input_dir: str | Path,
    out: str | Path,
    cfg: Config,
    source: str | None = None,
    disease: str | None = None,
    skip_bad: bool | None = None,
) -> dict[str, Any]:
    """Read a source tree, resize and write the Arrow store + Parquet manifest."""
    from rima_core.data.prepare import prepare_store

    return prepare_store(
        source=source or cfg.data.source,
        input_dir=Path(input_dir),
        out=Path(out),
        cfg=cfg.prepare,
        disease=disease or cfg.data.disease,
        skip_bad=cfg.prepare.skip_bad if skip_bad is None else skip_bad,
    )


def validate(store: str | Path, report: str | Path, cfg: Config) -> dict[str, Any]:
    """Run the Great Expectations suite; the returned dict has ``success`` and ``failures``."""
    from rima_core.data.validation import validate_store

    return validate_store(Path(store), Path(report), cfg.validate)


def simulate_missing(store: str | Path, out: str | Path, cfg: Config) -> dict[str, Any]:
    """Write seeded availability masks for every split and scenario."""
    from rima_core.data.masks import simulate_missing as _simulate

    return _simulate(Path(store), Path(out), cfg.missing)


def apply_best_params(cfg: Config, best_params: str | Path) -> Config:
    """``cfg`` with the tuned values of a ``best_params.json`` (``{"ot.gw_epsilon": ..., ...}``).

    The tuning step writes dotted ``section.key`` names; a ``{"params": {...}}`` wrapper is
    accepted too. Unknown keys are errors, so a renamed parameter is never silently ignored.
    """
    import json

    from rima_core.config import ConfigError, config_from_dict

    path = Path(best_params)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no best-params file (run `rima tune` first)") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(data, dict) and isinstance(data.get("params"), dict):
        data = data["params"]
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of section.key -> value")
    values = cfg.to_dict()
    for dotted, value in data.items():
        section, _, key = str(dotted).partition(".")
        if not key or section not in values or key not in values[section]:
            raise ConfigError(f"{path}: {dotted!r} is not a section.key parameter")
        values[section][key] = value
    log.info("tuned parameters from %s: %s", path, data)
    return config_from_dict(values)


def train(
    store: str | Path,
    masks: str | Path,
    out_dir: str | Path,
    cfg: Config,
    resume: bool = False,
    best_params: str | Path | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Train ``cfg.model.name`` (tuned values from ``best_params`` on top), in an MLflow run.

    The run gets the effective config as params, per-epoch metrics and the output files; its id
    goes into ``train_summary.json`` so the register step can find it. ``track=False`` skips
    MLflow entirely (quick local runs, tests).
    """
    import json

    from rima_core.atomic import write_text
    from rima_core.train import train as _train

    if best_params is not None:
        cfg = apply_best_params(cfg, best_params)
    out = Path(out_dir)
    if not track:
        return _train(Path(store), Path(masks), out, cfg, resume=resume)
    from rima_core import tracking

    with tracking.start_run(cfg, "train", store=store, tags={"model": cfg.model.name}) as run:
        summary = _train(Path(store), Path(masks), out, cfg, resume=resume)
        summary["mlflow_run_id"] = run.info.run_id
        write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
        for name in ("model.pt", "history.csv", "train_summary.json"):
            tracking.log_artifacts(out / name, artifact_path="train")
    return summary


def evaluate(
    model: str | Path,
    store: str | Path,
    masks: str | Path,
    out_dir: str | Path,
    cfg: Config,
    track: bool = True,
) -> dict[str, Any]:
    """Score a model under every missing-modality scenario; metrics and plots to MLflow too."""
    from rima_core.evaluate import evaluate as _evaluate

    if not track:
        return _evaluate(Path(model), Path(store), Path(masks), Path(out_dir), cfg)
    import json

    from rima_core import tracking

    tags = {}
    train_summary = Path(model).parent / "train_summary.json"
    if train_summary.exists():
        run_id = json.loads(train_summary.read_text()).get("mlflow_run_id")
        if run_id:
            tags["train_run_id"] = run_id  # links the evaluation to the run that trained it
    with tracking.start_run(cfg, "evaluate", store=store, tags=tags) as run:
        result = _evaluate(Path(model), Path(store), Path(masks), Path(out_dir), cfg)
        result["mlflow_run_id"] = run.info.run_id
    return result


def tune(
    store: str | Path,
    masks: str | Path,
    out_dir: str | Path,
    cfg: Config,
    workers: int | None = None,
    n_trials: int | None = None,
    timeout_s: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Optuna search (or its continuation); writes ``best_params.json`` for :func:`train`."""
    from rima_core.tune import tune as _tune

    return _tune(
        store,
        masks,
        out_dir,
        cfg,
        workers=workers,
        n_trials=n_trials,
        timeout_s=timeout_s,
        storage=storage,
        study_name=study_name,
        track=track,
    )


def _write_json(out: str | Path | None, result: dict[str, Any]) -> None:
    if out is not None:
        import json

        from rima_core.atomic import write_text

        write_text(out, json.dumps(result, indent=2, default=str) + "\n")


def register(
    model_dir: str | Path,
    metrics: str | Path,
    cfg: Config,
    store: str | Path | None = None,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Register ``model_dir/model.pt`` as a new version of ``cfg.mlflow.model_name`` tagged with
    the evaluation ``metrics`` JSON, aliased ``challenger``; the summary also goes to ``out``."""
    import json

    from rima_core.registry import register as _register

    tags = {}
    summary = Path(model_dir) / "train_summary.json"
    if summary.is_file():
        run_id = json.loads(summary.read_text()).get("mlflow_run_id")
        if run_id:
            tags["train_run_id"] = run_id  # lineage: version -> the run that trained it
    result = _register(model_dir, metrics, cfg, store=store, tags=tags)
    _write_json(out, result)
    return result


def promote(cfg: Config, dry_run: bool = False, out: str | Path | None = None) -> dict[str, Any]:
    """Move ``champion`` to the challenger only if it wins (see :mod:`rima_core.registry`)."""
    from rima_core.registry import promote as _promote

    result = _promote(cfg, dry_run=dry_run)
    _write_json(out, result)
    return result


def predict(model: str, input_path: str | Path, out: str | Path, cfg: Config) -> dict[str, Any]:
    """Batch prediction from a CSV/Parquet table of image paths with a registered model URI."""
    from rima_core import tracking
    from rima_core.serving import predict_files

    tracking.use_store(cfg.mlflow)  # models:/ URIs resolve against the project's registry
    return predict_files(model, input_path, out)
