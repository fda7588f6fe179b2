"""Registration: the trained model becomes a new registry version, tagged with its evaluation.

Lineage: the model is logged from the training run (:func:`log_trained_model`) and that logged
model is what :func:`register` registers, so a version's source run is the run that trained it.
A model training did not mark complete (:func:`check_complete`), or one the registration gate
refuses (:func:`rima_core.ops.registry_tags.registration_gate`), never becomes a version, and a
retried registration returns the version the first attempt made.

Apart from :mod:`rima_core.ops.registry` (which re-exports these names) because registering and
promoting are two steps with their own inputs: registration reads the training and evaluation
outputs on disk, promotion only the registry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

from rima_core.config import Config
from rima_core.ops.registry_client import _alias_version, _client, registry_lock, set_challenger
from rima_core.ops.registry_compare import evaluated_split, log_selection
from rima_core.ops.registry_tags import (
    CHALLENGER,
    TAG_MODEL_SHA,
    RegistryError,
    _description_limit,
    headline_tags,
    read_metrics,
    registration_gate,
    version_description,
)
from rima_core.tracking import mlflow_runs as tracking
from rima_core.tracking.metric_names import flat_scored, validation_numbers

# the registry's logger: these lines are the registry's, as before this module was split from it
log = logging.getLogger("rima_core.ops.registry")


def model_sha256(model_dir: str | Path) -> str:
    """Content hash of the trained weights file: what ties a registry version to its training."""

    from rima_core.ops.serving import model_file

    digest = hashlib.sha256()
    with model_file(model_dir).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_trained_model(model_dir: str | Path, cfg: Config, summary: dict[str, Any]) -> Any:
    """Log the trained model (pyfunc) from the active *training* run; returns MLflow's ModelInfo.

    MLflow 3 makes it a logged model whose source run is the training run; the weights' hash is
    a tag on it (how :func:`find_logged_model` finds it again at register time, without any
    run-specific file in the training outputs). The selected epoch's validation numbers
    (``summary``'s) are linked to it when it is registered (:func:`selected_validation_numbers`,
    from the register run: logged from the training run they would add a point to its epoch
    curves of the same names), so the model page shows what it was selected on.
    """
    import mlflow

    from rima_core.ops import serving

    info = serving.log_pyfunc(model_dir, cfg)
    client = mlflow.MlflowClient()
    client.set_logged_model_tags(
        info.model_id, {TAG_MODEL_SHA: model_sha256(model_dir), "model": cfg.model.name}
    )
    return info


def selected_validation_numbers(model_dir: str | Path) -> dict[str, float]:
    """The selected epoch's validation numbers of the training in ``model_dir``
    (``train_summary.json``), named as its epoch curves (``val/mean/qwk``, ``val/complete/qwk``
    ...); empty when the summary has none."""
    from rima_core.core.data.masks import selection_scenarios

    try:
        summary = json.loads((Path(model_dir) / "train_summary.json").read_text())
    except (OSError, ValueError):
        return {}
    best = summary.get("best_val_metrics") or {}
    scenarios = selection_scenarios(summary.get("selection_scenario") or "mean")
    return {
        k: float(v)
        for k, v in validation_numbers(best, scenarios).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def find_logged_model(model_dir: str | Path, cfg: Config) -> Any | None:
    """The newest finished logged model of these exact weights in the experiment, or None."""
    import mlflow

    exp_id = tracking.configure(cfg.mlflow)
    found = mlflow.search_logged_models(
        experiment_ids=[exp_id],
        filter_string=f"tags.{TAG_MODEL_SHA} = '{model_sha256(model_dir)}'",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1,
        output_format="list",
    )
    return found[0] if found else None


TRAIN_SUMMARY = "train_summary.json"


def check_complete(model_dir: str | Path) -> str:
    """The hash of ``model_dir/model.pt`` when training marked it complete, else RegistryError.

    ``rima train`` writes ``"complete": true`` and the weights' sha256 into ``train_summary.json``
    only after selection and calibration; a ``model.pt`` left by a killed run (an early epoch's
    weights, no temperature) has no such summary, or one of another model file.
    """
    from rima_core.ops.serving import model_file

    path = Path(model_dir) / TRAIN_SUMMARY if Path(model_dir).is_dir() else None
    sha = model_sha256(model_dir)
    try:
        summary = json.loads(path.read_text()) if path is not None else None
    except (OSError, ValueError):
        summary = None
    if not isinstance(summary, dict) or summary.get("complete") is not True:
        raise RegistryError(
            f"{model_file(model_dir)}: training did not finish ({TRAIN_SUMMARY} does not mark it "
            "complete): a killed run's model is never registered; run `rima train` to the end"
        )
    if summary.get(TAG_MODEL_SHA) != sha:
        raise RegistryError(
            f"{model_file(model_dir)}: its sha256 {sha[:12]} is not the one training finished "
            f"with ({str(summary.get(TAG_MODEL_SHA))[:12]}, {TRAIN_SUMMARY}): the file changed "
            "after training; train again"
        )
    return sha


def _same_version(client: Any, name: str, sha: str, train_run: str | None) -> Any | None:
    """An existing version of ``name`` of the same weights and training run (a retried
    register), or None."""
    page = None
    while True:
        found = client.search_model_versions(f"name = '{name}'", page_token=page)
        for mv in found:
            tags = mv.tags or {}
            if tags.get(TAG_MODEL_SHA) == sha and tags.get("train_run_id") == train_run:
                return mv
        page = getattr(found, "token", None)
        if not page:
            return None


def register(
    model_dir: str | Path,
    metrics_json: str | Path,
    cfg: Config,
    store: str | Path | None = None,
    tags: dict[str, str] | None = None,
    description: str | None = None,
) -> dict[str, Any]:
    """Register the trained model as a new version tagged with its evaluation, and point
    ``@challenger`` at it — unless :func:`registration_gate` refuses it.

    The version is the logged model of the *training* run (found by the weights' hash,
    :func:`find_logged_model`), so its source run is the run that trained it, with that run's
    params, data input and commit. Only when no such logged model exists (trained with
    ``track=False``, or against another store) is the model logged here, from the ``register``
    run, with a warning. ``description`` (e.g. a model card) replaces the default
    :func:`version_description`; ``tags`` go on the version too (within the tag budget).

    Refused (RegistryError) unless training marked ``model_dir`` complete with these weights
    (:func:`check_complete`). Idempotent: a version of the same weights and training run that
    already exists (a retried task) is returned as it is, not registered twice; the check and
    the registration run under :func:`registry_lock`.
    """
    metrics = read_metrics(metrics_json)
    name = cfg.mlflow.model_name
    primary = metrics.get(cfg.promote.scenario, {}).get(cfg.promote.metric)
    sha = check_complete(model_dir)
    ok, gate = registration_gate(metrics, cfg)
    result: dict[str, Any] = {"model_name": name, "primary_metric": primary, "gate": gate}
    if not ok:
        log.warning("%s: not registered: %s", name, gate)
        return {**result, "registered": False, "version": None}
    logged = find_logged_model(model_dir, cfg)
    client = _client(cfg)
    with registry_lock(cfg, name):
        train_run = (tags or {}).get("train_run_id") or (
            logged.source_run_id if logged is not None else None
        )
        existing = _same_version(client, name, sha, train_run)
        if existing is not None:  # a retried task: the first attempt registered it
            log.info("%s v%s holds these weights: not registered again", name, existing.version)
            if _alias_version(client, name, CHALLENGER) is None:
                set_challenger(client, name, existing.version)
            return {
                **result,
                "registered": True,
                "version": str(existing.version),
                "alias": CHALLENGER,
                "model_uri": f"models:/{name}/{existing.version}",
                "logged_model": existing.source,
                "source_run_id": existing.run_id,
                "run_id": None,
                "existing": True,
            }
        return _register_new(
            model_dir, metrics_json, metrics, cfg, store, tags, description, logged, sha, result
        )


def _register_new(
    model_dir: str | Path,
    metrics_json: str | Path,
    metrics: dict[str, dict[str, float]],
    cfg: Config,
    store: str | Path | None,
    tags: dict[str, str] | None,
    description: str | None,
    logged: Any,
    sha: str,
    result: dict[str, Any],
) -> dict[str, Any]:
    import mlflow

    from rima_core.ops import serving

    name = cfg.mlflow.model_name
    with tracking.start_run(cfg, "register", store=store, tags=tags, log_params=False) as run:
        if logged is None:
            log.warning(
                "no logged model of %s in experiment %r (trained without tracking?): logging it "
                "from the register run, so its source run is not the training run",
                model_dir,
                cfg.mlflow.experiment,
            )
            info = serving.log_pyfunc(model_dir, cfg)
            model_id, source_run = info.model_id, run.info.run_id
        else:
            model_id, source_run = logged.model_id, logged.source_run_id
            tags = {**(tags or {}), "train_run_id": source_run}
        tracking.log_artifacts(metrics_json, artifact_path="evaluation")
        split = evaluated_split(metrics_json) or cfg.evaluate.split
        # the model page lists what it was selected on and its evaluation; logged from this
        # run, whose metrics have no epoch curves of the same names (the training run's do)
        mlflow.log_metrics(
            {
                **selected_validation_numbers(model_dir),
                **{k: v for k, v in flat_scored(split, metrics).items() if math.isfinite(v)},
            },
            model_id=model_id,
        )
        source_tags = mlflow.MlflowClient().get_run(source_run).data.tags
        data_hash = source_tags.get(tracking.TAG_DATA_HASH)
        version_tags = {
            **headline_tags(metrics, cfg, split),
            TAG_MODEL_SHA: sha,
            **{
                k: source_tags[k]
                for k in (tracking.TAG_GIT_COMMIT, tracking.TAG_DATA_HASH)
                if k in source_tags
            },
            **(tags or {}),
            **log_selection(metrics_json, cfg),  # validation metrics: what promotion decides on
        }
        model_uri = f"models:/{model_id}"
        version = mlflow.register_model(model_uri, name, tags=version_tags)
        client = mlflow.MlflowClient()
        text = (
            description
            or model_card_or_none(model_dir, metrics_json, cfg, data_hash, model_uri)
            or version_description(metrics, cfg, data_hash, model_uri)
        )
        mlflow.log_text(text, "model_card.md")  # the full card; the description may be cut
        client.update_model_version(name, version.version, description=_description_limit(text))
        set_challenger(client, name, version.version)
        tracking.set_tags({"registered_version": version.version, "model_id": model_id})
    return {
        **result,
        "registered": True,
        "version": str(version.version),
        "alias": CHALLENGER,
        "model_uri": f"models:/{name}/{version.version}",
        "logged_model": model_uri,
        "source_run_id": source_run,
        "run_id": run.info.run_id,
    }


def model_card_or_none(
    model_dir: str | Path,
    metrics_json: str | Path,
    cfg: Config,
    data_hash: str | None,
    model_uri: str,
) -> str | None:
    """The version's model card (:mod:`rima_core.ops.model_card`) from the evaluation folder that
    holds ``metrics_json``; None when that folder lacks evaluate's tables (an older evaluation)."""
    from rima_core.ops.model_card import build_model_card, has_card_inputs

    eval_dir = Path(metrics_json).parent
    if not has_card_inputs(eval_dir):
        log.info("%s lacks evaluate's tables: the version gets no model card", eval_dir)
        return None
    return build_model_card(model_dir, eval_dir, cfg, data_hash=data_hash, model_uri=model_uri)
