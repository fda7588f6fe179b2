"""Model registry: register a trained model as a new version, and promote it only on evidence.

Aliases, not stages (stages are deprecated in MLflow 3): the newest registered version is
``@challenger``; ``@champion`` is what serving loads (``models:/NAME@champion``). A challenger
becomes champion only if it beats the champion on the primary metric (``cfg.promote.metric``
under ``cfg.promote.scenario``) by at least ``cfg.promote.margin`` *and* regresses no other
evaluated scenario by more than ``cfg.promote.tolerance`` — a model that wins the headline number
by collapsing when the OCT is missing must not reach the clinic. Every decision and its reason is
written as tags on the challenger version (and as an MLflow run), so "why is v7 not serving?" has
an answer in the registry itself.

Evaluation metrics travel as version tags named as everywhere else (:mod:`rima_core.metric_names`:
``test/mixed/qwk``, ``test/fundus_missing_at_0.5/qwk``), plus ``scenarios`` (JSON list of the
original names) so comparisons never have to parse keys — a headline subset only
(:func:`headline_tags`, at most :data:`MAX_VERSION_TAGS` tags per version); the full evaluation
is the version's ``evaluation/metrics.json`` and the logged model's metrics (same names).
Versions registered by older releases carry ``metric.<scenario>.<metric>`` tags instead;
:func:`version_metric` reads either.

Lineage: the model is logged from the training run (:func:`log_trained_model`) and that logged
model is what :func:`register` registers, so a version's source run is the run that trained it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rima_core import tracking
from rima_core.config import Config
from rima_core.metric_names import flat_scored, legacy_version_tag, scored, validation_numbers
from rima_core.metrics import LOWER_IS_BETTER

log = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
TAG_SCENARIOS = "scenarios"
TAG_DECISION = "promotion.decision"
TAG_REASON = "promotion.reason"
TAG_COMPARED_TO = "promotion.compared_to"
TAG_DECIDED_AT = "promotion.decided_at"


class RegistryError(ValueError):
    """The registry is not in a state the request can act on (no challenger, bad metrics file)."""


def metric_tag(scenario: str, metric: str, split: str = "test") -> str:
    """The version tag key holding ``metric`` under ``scenario`` of the evaluated ``split``
    (``test/mixed/qwk``)."""
    return scored(split, scenario, metric)


def version_metric(
    tags: dict[str, str], scenario: str, metric: str, split: str = "test"
) -> float | None:
    """``metric`` under ``scenario`` from a version's tags: the current tag
    (:func:`metric_tag`), else the ``metric.<scenario>.<metric>`` tag of versions registered by
    older releases; None when the version has neither or it is not a number."""
    for key in (metric_tag(scenario, metric, split), legacy_version_tag(scenario, metric)):
        value = _tag_float(tags, key)
        if value is not None:
            return value
    return None


def read_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    """``metrics.json`` from evaluate (``{scenario: {metric: value}}``), numbers only."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{path}: no metrics file (run `rima evaluate` first)") from exc
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise RegistryError(f"{path}: expected a non-empty object {{scenario: {{metric: value}}}}")
    out: dict[str, dict[str, float]] = {}
    for scenario, values in data.items():
        if not isinstance(values, dict):
            raise RegistryError(f"{path}: scenario {scenario!r} is not an object of metrics")
        out[scenario] = {
            k: float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        }
    return out


def metric_tags(metrics: dict[str, dict[str, float]], split: str = "test") -> dict[str, str]:
    """Version tags for an evaluation: one per (scenario, metric), and the scenario list."""
    tags = {TAG_SCENARIOS: json.dumps(list(metrics))}
    for scenario, values in metrics.items():
        for metric, value in values.items():
            tags[metric_tag(scenario, metric, split)] = repr(float(value))
    return tags


def _client(cfg: Config) -> Any:
    tracking.configure(cfg.mlflow)
    import mlflow

    return mlflow.MlflowClient()


def set_challenger(client: Any, name: str, version: str) -> None:
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    log.info("%s version %s is now @%s", name, version, CHALLENGER)


# Version tags are for reading at a glance and for the promotion rule; the full evaluation is the
# version's ``evaluation/metrics.json`` artifact and the logged model's metrics. A version carries
# at most this many tags in all (the registry UI lists every one of them).
MAX_VERSION_TAGS = 30
# Tags register writes besides the metric tags (scenarios, data hash, commit, model hash, training
# run), the four promotion.* tags promote adds, the two selection.* tags (validation metrics and
# predictions: what promotion decides on) and one spare; metric tags get the rest.
RESERVED_TAGS = 12
# Shown for the primary scenario besides the promotion metric.
HEADLINE_METRICS = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece")
# Value of a model that guesses: the default registration threshold (promote.register_min_metric).
CHANCE_LEVEL = {"qwk": 0.0, "kappa": 0.0, "auc": 0.5}
TAG_MODEL_SHA = "model_sha256"
TAG_DESCRIPTION_DECISION = "Promotion decision"


def headline_tags(
    metrics: dict[str, dict[str, float]], cfg: Config, split: str = "test"
) -> dict[str, str]:
    """The metric tags of a version (``metrics`` of the evaluated ``split``), within
    :data:`MAX_VERSION_TAGS`.

    First the promotion metric under the primary scenario, then the other headline metrics
    there, then the promotion metric under every other scenario (what :func:`compare` checks for
    regressions), named scenarios before sweep points (``...@rate``). Anything past the budget is
    left to the evaluation artifact, and logged.
    """
    p = cfg.promote
    wanted: list[tuple[str, str]] = [(p.scenario, p.metric)]
    wanted += [(p.scenario, m) for m in HEADLINE_METRICS if m != p.metric]
    others = sorted((s for s in metrics if s != p.scenario), key=lambda s: "@" in s)
    wanted += [(s, p.metric) for s in others]
    budget = MAX_VERSION_TAGS - RESERVED_TAGS
    tags: dict[str, str] = {}
    for scenario, metric in wanted:
        value = metrics.get(scenario, {}).get(metric)
        if value is None:
            continue
        if len(tags) == budget:
            log.info("version tag budget reached: %s/%s stays in metrics.json", scenario, metric)
            continue
        tags[metric_tag(scenario, metric, split)] = repr(float(value))
    return {TAG_SCENARIOS: json.dumps(list(metrics)), **tags}


def register_threshold(cfg: Config) -> float | None:
    """The value the promotion metric must beat for a model to be registered (None: no gate)."""
    p = cfg.promote
    if p.register_min_metric is not None:
        return float(p.register_min_metric)
    return CHANCE_LEVEL.get(p.metric)


def registration_gate(metrics: dict[str, dict[str, float]], cfg: Config) -> tuple[bool, str]:
    """(register?, why): a model whose promotion metric is no better than the threshold (its
    chance level by default) or undefined is refused, so smoke runs and collapsed trainings never
    become a version, let alone a challenger."""
    p = cfg.promote
    threshold = register_threshold(cfg)
    value = metrics.get(p.scenario, {}).get(p.metric)
    where = f"{p.metric} under {p.scenario}"
    if threshold is None:
        return True, f"{where}: no registration threshold (promote.register_min_metric is null)"
    if value is None or not math.isfinite(value):
        return False, f"{where} is missing or undefined; a registered model needs it"
    lower = p.metric in LOWER_IS_BETTER
    ok = value < threshold if lower else value > threshold
    relation = ("<" if ok else ">=") if lower else (">" if ok else "<=")
    return ok, f"{where} = {value:.4f} {relation} {threshold:g} (promote.register_min_metric)"


def model_sha256(model_dir: str | Path) -> str:
    """Content hash of the trained weights file: what ties a registry version to its training."""
    import hashlib

    from rima_core.serving import model_file

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

    from rima_core import serving

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
    from rima_core.data.masks import selection_scenarios

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


def version_description(
    metrics: dict[str, dict[str, float]], cfg: Config, data_hash: str | None, model_uri: str
) -> str:
    """Markdown for the version's description: the data, the scenarios, the headline numbers.

    The default; a model card (``register(description=...)``) replaces it. :func:`promote`
    appends its decision either way.
    """
    p = cfg.promote
    primary = metrics.get(p.scenario, {})
    lines = [
        f"**{cfg.model.name}** trained on `{cfg.data.source}`/`{cfg.data.disease}` data "
        f"(store content hash `{(data_hash or 'unknown')[:16]}`), logged as `{model_uri}`.",
        "",
        f"Evaluated on the {cfg.evaluate.split} split under {len(metrics)} missing-modality "
        f"scenarios: {', '.join(metrics)}.",
        "",
        f"Primary scenario `{p.scenario}`: "
        + (
            ", ".join(f"{m} {primary[m]:.4f}" for m in HEADLINE_METRICS if m in primary)
            or "no metrics"
        )
        + ".",
    ]
    return "\n".join(lines)


def _description_limit(text: str) -> str:
    """MLflow keeps at most 5000 characters of a version description."""
    return text if len(text) <= 5000 else text[:4990] + "\n…"


TRAIN_SUMMARY = "train_summary.json"
SELECTION_SPLIT = "val"  # the only split promotion compares on


def check_complete(model_dir: str | Path) -> str:
    """The hash of ``model_dir/model.pt`` when training marked it complete, else RegistryError.

    ``rima train`` writes ``"complete": true`` and the weights' sha256 into ``train_summary.json``
    only after selection and calibration; a ``model.pt`` left by a killed run (an early epoch's
    weights, no temperature) has no such summary, or one of another model file.
    """
    from rima_core.serving import model_file

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
    lock: then promotion relies on its compare-and-set check alone (:func:`promote`).
    """
    uri = tracking.tracking_uri(cfg.mlflow)
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme == "sqlite":
        import fcntl

        db = tracking.sqlite_path(uri)
        if db is None:  # in-memory: one process
            yield "none"
            return
        # in the temp folder (SQLite is one machine's), keyed by the database: no file to ignore
        import tempfile

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


def _alias_version(client: Any, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


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

    from rima_core import serving

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


# --- promotion ----------------------------------------------------------------------------------


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    if key not in tags:
        return None
    try:
        return float(tags[key])
    except ValueError:
        return None


def _improvement(metric: str, challenger: float, champion: float) -> float:
    """How much better the challenger is (positive = better), whatever the metric's direction."""
    diff = challenger - champion
    return -diff if metric in LOWER_IS_BETTER else diff


def _scenarios(tags: dict[str, str]) -> list[str]:
    try:
        names = json.loads(tags.get(TAG_SCENARIOS, "[]"))
    except json.JSONDecodeError:
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


# --- promotion gate: validation metrics, comparability, significance ----------------------------
#
# Promotion decides on the *validation* split (evaluate's ``val/metrics.json``), never on the test
# split: choosing the version that scores best on test would make test a selection set and its
# numbers optimistic. ``register`` stores the validation metrics as one JSON tag (every scenario,
# a few metrics: within the version-tag budget however many scenarios there are) and, for the
# optional significance rule, the validation predictions of the primary scenario as an artifact.

TAG_SELECTION = "selection.metrics"
TAG_SELECTION_PREDICTIONS = "selection.predictions"
SELECTION_TAG_METRICS = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece", "nll")
SELECTION_DIR = "val"  # evaluate's sub-folder for the selection split (rima_core.evaluate)


def selection_metrics_path(metrics_json: str | Path) -> Path:
    """Where evaluate wrote the validation metrics beside the test ``metrics.json``."""
    return Path(metrics_json).parent / SELECTION_DIR / "metrics.json"


def selection_tags(
    selection: dict[str, dict[str, float]], cfg: Config, split: str = "val"
) -> dict[str, str]:
    """The ``selection.metrics`` tag: ``{"split", "metrics": {scenario: {metric: value}}}`` for
    :data:`SELECTION_TAG_METRICS` and the promotion metric; undefined values as JSON null."""
    keep = {*SELECTION_TAG_METRICS, cfg.promote.metric}
    record = {
        "split": split,
        "metrics": {
            scenario: {
                m: (float(v) if math.isfinite(v) else None) for m, v in values.items() if m in keep
            }
            for scenario, values in selection.items()
        },
    }
    return {TAG_SELECTION: json.dumps(record, allow_nan=False, separators=(",", ":"))}


def log_selection(metrics_json: str | Path, cfg: Config) -> dict[str, str]:
    """Version tags of the validation evaluation beside ``metrics_json`` (empty, with a warning,
    when there is none: such a version can be registered but never wins a comparison).

    Inside an active run it also logs evaluate's tables (scores, subgroups, equity, calibration)
    and the primary scenario's validation predictions, which the paired significance test of
    :func:`significance` reads back (``selection.predictions``).
    """
    import mlflow

    path = selection_metrics_path(metrics_json)
    if not path.is_file():
        log.warning(
            "%s: no validation metrics (run `rima evaluate` with evaluate.selection_split): "
            "this version cannot be compared with a champion",
            path,
        )
        return {}
    split = evaluated_selection_split(metrics_json)
    if split is None:
        log.warning(
            "%s: no %s beside it saying which split evaluate scored: this version cannot be "
            "compared with a champion",
            path,
            EVAL_SUMMARY,
        )
        return {}
    tags = selection_tags(read_metrics(path), cfg, split=split)
    preds = path.parent / "predictions" / f"{cfg.promote.scenario}.parquet"
    run = mlflow.active_run()
    for table in ("scores.csv", "subgroups.csv", "equity.csv", "calibration.csv"):
        if run is not None and (path.parent.parent / table).is_file():
            mlflow.log_artifact(str(path.parent.parent / table), artifact_path="evaluation")
    if run is not None and preds.is_file():
        mlflow.log_artifact(str(preds), artifact_path="evaluation/selection")
        # runs:/ resolves against the store's artifact root wherever the workspace lives now
        tags[TAG_SELECTION_PREDICTIONS] = (
            f"runs:/{run.info.run_id}/evaluation/selection/{preds.name}"
        )
    return tags


EVAL_SUMMARY = "eval_summary.json"


def _eval_summary_field(metrics_json: str | Path, key: str) -> str | None:
    """``key`` of the ``eval_summary.json`` evaluate wrote beside ``metrics_json`` (what that
    evaluation did, not this process's config), or None when there is no such record."""
    try:
        summary = json.loads((Path(metrics_json).parent / EVAL_SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    value = summary.get(key) if isinstance(summary, dict) else None
    return value if isinstance(value, str) else None


def evaluated_split(metrics_json: str | Path) -> str | None:
    """The split evaluate scored into ``metrics_json``."""
    return _eval_summary_field(metrics_json, "split")


def evaluated_selection_split(metrics_json: str | Path) -> str | None:
    """The split evaluate actually scored into ``val/metrics.json``."""
    return _eval_summary_field(metrics_json, "selection_split")


def _selection_from_tags(tags: dict[str, str], who: str) -> tuple[dict[str, Any] | None, str]:
    """The validation metrics a version carries, or ``(None, why not)``."""
    raw = tags.get(TAG_SELECTION)
    if raw is None:
        return None, f"{who} has no validation metrics (tag {TAG_SELECTION}; register it again)"
    try:
        record = json.loads(raw)
    except json.JSONDecodeError:
        return None, f"{who}'s {TAG_SELECTION} tag is not valid JSON"
    metrics = record.get("metrics") if isinstance(record, dict) else None
    if not isinstance(metrics, dict) or not all(isinstance(v, dict) for v in metrics.values()):
        return None, f"{who}'s {TAG_SELECTION} tag is not {{scenario: {{metric: value}}}}"
    split = record.get("split")
    if split != SELECTION_SPLIT:
        return None, (
            f"{who}'s metrics were evaluated on the {split!r} split, not {SELECTION_SPLIT!r}: "
            "promotion compares validation with validation only"
        )
    return metrics, ""


def _check_value(metric: str, value: Any) -> str | None:
    """Why ``value`` is not a usable ``metric`` value (None when it is)."""
    from rima_core.metrics import metric_range

    if value is None:
        return "null"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"{value!r} (not a number)"
    if not math.isfinite(value):
        return f"{value} (not finite)"
    low, high = metric_range(metric)
    if not low <= value <= high:
        return f"{value:g} (outside [{low:g}, {high:g}])"
    return None


def comparability_problems(
    challenger: dict[str, Any], champion: dict[str, Any], metric: str, primary: str
) -> list[str]:
    """Every reason the two validation records cannot be compared on ``metric``: a scenario the
    champion has (or the primary one) that the challenger lacks, and any value that is missing,
    null, not a number, not finite or outside the metric's range, on either side."""
    problems: list[str] = []
    needed = list(dict.fromkeys([primary, *champion]))
    for scenario in needed:
        for who, record in (("challenger", challenger), ("champion", champion)):
            values = record.get(scenario)
            if values is None or metric not in values:
                problems.append(f"{who} lacks {metric} under {scenario}")
                continue
            bad = _check_value(metric, values[metric])
            if bad is not None:
                problems.append(f"{who}'s {metric} under {scenario} is {bad}")
    return problems


def compare(
    challenger_tags: dict[str, str], champion_tags: dict[str, str], cfg: Config
) -> tuple[bool, str, list[dict[str, Any]]]:
    """Decide challenger vs champion on their *validation* metrics: (promote?, reason, rows).

    Not comparable means refused: a challenger that lacks a scenario the champion has, or holds
    an unusable value for the promotion metric (:func:`comparability_problems`), is never
    promoted. The reason starts with ``not comparable:`` (tagged as ``promotion.reason``).
    """
    p = cfg.promote
    metric = p.metric
    new_rec, new_err = _selection_from_tags(challenger_tags, "challenger")
    old_rec, old_err = _selection_from_tags(champion_tags, "champion")
    if new_rec is None or old_rec is None:
        return False, "not comparable: " + "; ".join(e for e in (new_err, old_err) if e), []
    order = list(dict.fromkeys([p.scenario, *old_rec, *new_rec]))
    problems = comparability_problems(new_rec, old_rec, metric, p.scenario)
    rows: list[dict[str, Any]] = []
    regressions: list[str] = []
    for scenario in order:
        new = new_rec.get(scenario, {}).get(metric)
        old = old_rec.get(scenario, {}).get(metric)
        usable = _check_value(metric, new) is None and _check_value(metric, old) is None
        row: dict[str, Any] = {
            "scenario": scenario,
            "champion": old if _check_value(metric, old) is None else None,
            "challenger": new if _check_value(metric, new) is None else None,
            "improvement": None,
            "primary": scenario == p.scenario,
        }
        if not usable:
            row["status"] = "new" if scenario not in old_rec else "not comparable"
        else:
            gain = _improvement(metric, float(new), float(old))
            row["improvement"] = gain
            if gain < -p.tolerance:
                row["status"] = "regressed"
                if scenario != p.scenario:
                    regressions.append(f"{scenario} ({_signed(gain)})")
            else:
                row["status"] = "ok"
        rows.append(row)
    if problems:
        return False, "not comparable: " + "; ".join(problems), rows
    head = next(r for r in rows if r["primary"])
    where = f"validation {metric} under {p.scenario}"
    gain = head["improvement"]
    if gain <= 0 or gain < p.margin:
        need = f"at least {p.margin:g}" if p.margin > 0 else "a positive improvement"
        return False, f"{where} changes by {_signed(gain)}; promotion needs {need}", rows
    if head["status"] == "regressed" or regressions:
        return (
            False,
            f"{where} improves by {_signed(gain)} but scenario(s) regress beyond the tolerance "
            f"{p.tolerance:g}: {', '.join(regressions)}",
            rows,
        )
    return (
        True,
        f"{where} improves by {_signed(gain)} (margin {p.margin:g}) and no scenario regresses by "
        f"more than {p.tolerance:g}",
        rows,
    )


def _read_selection_predictions(tags: dict[str, str], who: str, dst: Path) -> Any:
    import mlflow
    import pandas as pd

    uri = tags.get(TAG_SELECTION_PREDICTIONS)
    if not uri:
        raise RegistryError(f"{who} has no validation predictions ({TAG_SELECTION_PREDICTIONS})")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=portable_artifact_uri(uri), dst_path=str(dst / who)
    )
    return pd.read_parquet(local)


_RUN_ARTIFACT = re.compile(r"/(?P<run>[0-9a-f]{32})/artifacts/(?P<path>.+)$")


def portable_artifact_uri(uri: str) -> str:
    """``runs:/RUN/PATH`` for an absolute ``file://.../RUN/artifacts/PATH`` that no longer exists
    (a tag written before the workspace moved); any other URI as it is."""
    if not uri.startswith("file://"):
        return uri
    from urllib.parse import unquote, urlsplit

    if Path(unquote(urlsplit(uri).path)).exists():
        return uri
    m = _RUN_ARTIFACT.search(uri)
    return f"runs:/{m.group('run')}/{m.group('path')}" if m else uri


def significance(
    challenger_tags: dict[str, str], champion_tags: dict[str, str], cfg: Config
) -> tuple[bool, str, dict[str, Any]]:
    """Paired bootstrap of the primary improvement over the same validation eyes.

    Both versions' predictions of the primary scenario are scored on the same resamples
    (``evaluate.bootstrap``, ``evaluate.bootstrap_seed``, ``evaluate.ci_level``); the gain counts
    only when its whole interval is above 0. Different eyes or labels: not comparable.
    """
    import tempfile

    import numpy as np

    from rima_core.metrics import BOOT_METRICS, paired_bootstrap_difference

    p, ev = cfg.promote, cfg.evaluate
    if p.metric not in BOOT_METRICS:
        return False, f"no bootstrap for {p.metric}; choose one of {list(BOOT_METRICS)}", {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            new = _read_selection_predictions(challenger_tags, "challenger", Path(tmp))
            old = _read_selection_predictions(champion_tags, "champion", Path(tmp))
        except Exception as exc:  # a missing tag or an artifact that cannot be fetched
            return False, f"not comparable: significance needs predictions: {exc}", {}
    cols = sorted(c for c in new.columns if c.startswith("proba_"))
    if (
        set(new["case_id"]) != set(old["case_id"])
        or not new["case_id"].is_unique
        or cols != sorted(c for c in old.columns if c.startswith("proba_"))
    ):
        return False, "not comparable: the two versions were validated on different eyes", {}
    old = old.set_index("case_id").loc[new["case_id"]].reset_index()
    if not np.array_equal(new["label"].to_numpy(), old["label"].to_numpy()):
        return False, "not comparable: the validation labels differ between the versions", {}
    diff = paired_bootstrap_difference(
        new["label"].to_numpy(),
        new[cols].to_numpy(dtype=float),
        old[cols].to_numpy(dtype=float),
        p.metric,
        ev.bootstrap,
        ev.bootstrap_seed,
        ev.ci_level,
    )
    lower = p.metric in LOWER_IS_BETTER
    if lower:  # a drop in a lower-is-better metric is the gain: the interval flips
        gain = {"value": -diff["value"], "ci_low": -diff["ci_high"], "ci_high": -diff["ci_low"]}
    else:
        gain = {k: diff[k] for k in ("value", "ci_low", "ci_high")}
    text = (
        f"paired bootstrap over {len(new)} validation eyes: gain {_signed(gain['value'])} "
        f"[{_signed(gain['ci_low'])}, {_signed(gain['ci_high'])}] ({ev.ci_level:.0%} interval)"
    )
    ok = math.isfinite(gain["ci_low"]) and gain["ci_low"] > 0
    return ok, text, {**gain, "n_eyes": len(new), "n_boot": diff["n_boot"]}


def model_card_or_none(
    model_dir: str | Path,
    metrics_json: str | Path,
    cfg: Config,
    data_hash: str | None,
    model_uri: str,
) -> str | None:
    """The version's model card (:mod:`rima_core.model_card`) from the evaluation folder that
    holds ``metrics_json``; None when that folder lacks evaluate's tables (an older evaluation)."""
    from rima_core.model_card import build_model_card, has_card_inputs

    eval_dir = Path(metrics_json).parent
    if not has_card_inputs(eval_dir):
        log.info("%s lacks evaluate's tables: the version gets no model card", eval_dir)
        return None
    return build_model_card(model_dir, eval_dir, cfg, data_hash=data_hash, model_uri=model_uri)


def skipped_promotion(
    cfg: Config, register_summary: dict[str, Any], dry_run: bool
) -> dict[str, Any]:
    """The decision record when ``register`` refused the model: nothing to promote, by design.

    Why a record and not an error: a refused registration (the gate of
    ``promote.register_min_metric``) is the registry working, so the step after it must succeed
    and say why it did nothing, rather than fail with "no challenger" or compare an older
    challenger left from a previous run.
    """
    return {
        "model_name": cfg.mlflow.model_name,
        "challenger": None,
        "champion_before": None,
        "metric": cfg.promote.metric,
        "scenario": cfg.promote.scenario,
        "margin": cfg.promote.margin,
        "tolerance": cfg.promote.tolerance,
        "dry_run": dry_run,
        "table": [],
        "decision": "skip",
        "promoted": False,
        "reason": f"the model was not registered: {register_summary.get('gate') or 'refused'}",
        "champion_after": None,
    }


def verify_version(name: str, mv: Any) -> str | None:
    """Why version ``mv`` of ``name`` could not be served, or None: its files are downloaded
    (as ``models:/NAME@champion`` would be) and, when the version records the weights' sha256,
    its ``model.pt`` must have that hash."""
    import tempfile

    import mlflow

    from rima_core.redact import redact_text

    with tempfile.TemporaryDirectory(prefix="rima-verify-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp
            )
        except Exception as exc:  # missing files, unreachable store: the version is unusable
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            return f"its files cannot be downloaded ({type(exc).__name__}: {redact_text(first)})"
        files = [f for f in Path(local).rglob("*") if f.is_file()]
        if not files:
            return "it has no files (deleted after registration?)"
        expected = (mv.tags or {}).get(TAG_MODEL_SHA)
        if expected:
            weights = [f for f in files if f.name == "model.pt"]
            if not weights:
                return "its model.pt is missing"
            if all(_file_sha256(f) != expected for f in weights):
                return f"its model.pt does not have the registered sha256 {expected[:12]}"
    return None


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PromotionConflict(RegistryError):
    """Another promotion changed ``@champion`` while this one decided: nothing was changed by
    this one (run it again to decide against the new champion)."""


def promote(cfg: Config, dry_run: bool = False, version: str | None = None) -> dict[str, Any]:
    """Move ``@champion`` to the challenger if the evidence says so; record the decision.

    ``version`` is the version to decide on (the one ``register`` just registered); default:
    ``@challenger``. ``dry_run`` computes and returns the same comparison and decision but
    changes nothing.

    Two promotions never interleave: the decision runs under :func:`registry_lock`, reading the
    champion inside it, and the alias is moved by compare-and-set (the champion re-read before
    and after setting it); a promotion that loses a race raises :class:`PromotionConflict` and
    tags nothing. The challenger's files are verified (:func:`verify_version`) before the alias
    moves, so ``models:/NAME@champion`` always loads.
    """
    client = _client(cfg)
    name = cfg.mlflow.model_name
    lock = contextlib.nullcontext("none") if dry_run else registry_lock(cfg, name)
    with lock:
        return _promote(client, cfg, name, dry_run, version)


def _promote(
    client: Any, cfg: Config, name: str, dry_run: bool, version: str | None
) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    from rima_core.redact import redact_text

    def by_alias(alias: str) -> Any:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    challenger = (
        by_alias(CHALLENGER) if version is None else client.get_model_version(name, str(version))
    )
    if challenger is None:
        raise RegistryError(
            f"registered model {name!r} has no @{CHALLENGER} version to promote "
            "(run `rima register` first)"
        )
    champion = by_alias(CHAMPION)
    result: dict[str, Any] = {
        "model_name": name,
        "challenger": str(challenger.version),
        "champion_before": None if champion is None else str(champion.version),
        "metric": cfg.promote.metric,
        "scenario": cfg.promote.scenario,
        "margin": cfg.promote.margin,
        "tolerance": cfg.promote.tolerance,
        "dry_run": dry_run,
        "table": [],
    }
    if champion is None:
        record, why = _selection_from_tags(challenger.tags, "challenger")
        promote_it, reason = (
            (True, "no champion yet") if record else (False, f"not comparable: {why}")
        )
    elif str(champion.version) == str(challenger.version):
        promote_it, reason = False, f"version {challenger.version} is already the champion"
    else:
        promote_it, reason, result["table"] = compare(challenger.tags, champion.tags, cfg)
        if promote_it and cfg.promote.require_significant:
            significant, note, result["significance"] = significance(
                challenger.tags, champion.tags, cfg
            )
            promote_it = significant
            if significant:
                reason = f"{reason}; {note}"
            elif note.startswith("not comparable"):
                reason = note
            else:
                reason = f"{reason}, but not significantly ({note}: the interval is not above 0)"
    if promote_it:
        broken = verify_version(name, challenger)
        if broken is not None:
            promote_it = False
            reason = f"version {challenger.version} cannot be served: {broken}"
    result.update(
        decision="promote" if promote_it else "keep",
        promoted=promote_it and not dry_run,
        reason=reason,
        champion_after=str(challenger.version) if promote_it else result["champion_before"],
    )
    if dry_run:
        result["champion_after"] = result["champion_before"]
        return result
    decision = "promoted" if promote_it else "refused"
    if str(challenger.version) == result["champion_before"]:
        decision = "already_champion"
    if promote_it:
        _move_champion(client, name, str(challenger.version), result["champion_before"])
    tags = {
        TAG_DECISION: decision,
        TAG_REASON: redact_text(reason),
        TAG_COMPARED_TO: result["champion_before"] or "none",
        TAG_DECIDED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(challenger.version), key, value)
    _describe_decision(client, name, str(challenger.version), decision, reason)
    log.info("%s v%s: %s (%s)", name, challenger.version, decision, reason)
    with tracking.start_run(
        cfg, "promote", log_params=False, tags={**tags, "version": challenger.version}
    ):
        import mlflow

        mlflow.log_text(format_table(result), "promotion.txt")
        mlflow.log_dict(result, "promotion.json")
    return result


def _move_champion(client: Any, name: str, version: str, before: str | None) -> None:
    """Compare-and-set of ``@champion``: from ``before`` to ``version``, or PromotionConflict."""

    def conflict(now: str | None, what: str) -> PromotionConflict:
        return PromotionConflict(
            f"{name}: another promotion {what} (@{CHAMPION} is now "
            f"{'v' + now if now else 'unset'}, was {'v' + before if before else 'unset'} when "
            f"v{version} was compared): this promotion changed nothing; run it again to decide "
            "against the current champion"
        )

    now = _alias_version(client, name, CHAMPION)
    if now != before:
        raise conflict(now, "moved the champion while this one decided")
    try:
        client.set_registered_model_alias(name, CHAMPION, version)
    except Exception as exc:  # e.g. a unique-key violation: the same alias inserted twice at once
        now = _alias_version(client, name, CHAMPION)
        raise conflict(now, f"set the champion at the same time ({type(exc).__name__})") from exc
    now = _alias_version(client, name, CHAMPION)
    if now != version:
        raise conflict(now, "set the champion at the same time")


def _describe_decision(client: Any, name: str, version: str, decision: str, reason: str) -> None:
    """Put the latest promotion decision at the end of the version's description (replacing an
    earlier one), so the registry page says what data, which scenarios and what was decided."""
    current = client.get_model_version(name, version).description or ""
    head = current.split(f"\n\n**{TAG_DESCRIPTION_DECISION}**", 1)[0]
    text = f"{head}\n\n**{TAG_DESCRIPTION_DECISION}**: {decision} — {reason}".strip()
    client.update_model_version(name, version, description=_description_limit(text))


def _signed(v: float) -> str:
    """``+0.1234``; a change that rounds to zero prints as ``+0.0000``, never ``-0.0000``."""
    text = f"{v:+.4f}"
    return "+0.0000" if text == "-0.0000" else text


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a plain-text table followed by the decision, for terminals and logs."""

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    if result["decision"] == "skip":
        return f"model {result['model_name']}: decision: SKIP — {result['reason']}"
    lines = [
        f"model {result['model_name']}: challenger v{result['challenger']} vs champion "
        f"{'v' + result['champion_before'] if result['champion_before'] else '(none)'} "
        f"on {result['metric']} (primary scenario {result['scenario']}, margin "
        f"{result['margin']:g}, tolerance {result['tolerance']:g})"
    ]
    if result["table"]:
        width = max(len("scenario"), *(len(r["scenario"]) for r in result["table"]))
        lines.append(
            f"{'scenario':<{width}}  {'champion':>9}  {'challenger':>10}  {'change':>8}  status"
        )
        for r in result["table"]:
            change = "-" if r["improvement"] is None else _signed(r["improvement"])
            mark = " *" if r["primary"] else ""
            lines.append(
                f"{r['scenario']:<{width}}  {num(r['champion']):>9}  {num(r['challenger']):>10}  "
                f"{change:>8}  {r['status']}{mark}"
            )
    verb = "would promote" if result["dry_run"] and result["decision"] == "promote" else None
    if verb is None:
        verb = {"promote": "PROMOTE", "keep": "KEEP champion"}[result["decision"]]
    lines.append(f"decision: {verb} — {result['reason']}")
    return "\n".join(lines)
