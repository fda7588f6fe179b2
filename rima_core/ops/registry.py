"""Model registry: register a trained model as a new version, and promote it only on evidence.

Aliases, not stages (stages are deprecated in MLflow 3): the newest registered version is
``@challenger``; ``@champion`` is what serving loads (``models:/NAME@champion``). A challenger
becomes champion only if it beats the champion on the primary metric (``cfg.promote.metric``
under ``cfg.promote.scenario``) by at least ``cfg.promote.margin`` *and* regresses no other
evaluated scenario by more than ``cfg.promote.tolerance`` — a model that wins the headline number
by collapsing when the OCT is missing must not reach the clinic. Every decision and its reason is
written as tags on the challenger version (and as an MLflow run), so "why is v7 not serving?" has
an answer in the registry itself.

Evaluation metrics travel as version tags named as everywhere else
(:mod:`rima_core.tracking.metric_names`:
``test/mixed/qwk``, ``test/fundus_missing_at_0.5/qwk``), plus ``scenarios`` (JSON list of the
original names) so comparisons never have to parse keys — a headline subset only
(:func:`headline_tags`, at most :data:`MAX_VERSION_TAGS` tags per version); the full evaluation
is the version's ``evaluation/metrics.json`` and the logged model's metrics (same names).
Versions registered by older releases carry ``metric.<scenario>.<metric>`` tags instead;
:func:`version_metric` reads either.

Lineage: the model is logged from the training run (:func:`log_trained_model`) and that logged
model is what :func:`register` registers, so a version's source run is the run that trained it.

This module promotes; the rest lives beside it, each name still importable from here:
registration in :mod:`rima_core.ops.registry_register`, what a version carries (aliases, metric
tags, the registration gate, descriptions) in :mod:`rima_core.ops.registry_tags`, the comparison on
validation metrics and its significance test in :mod:`rima_core.ops.registry_compare`, and the
client, alias and lock primitives in :mod:`rima_core.ops.registry_client`. :func:`promote` looks
:func:`compare`, :func:`significance` and :func:`registry_lock` up here when it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from rima_core.config import Config

# Registration, version metadata, the promotion gate and the registry client have modules of
# their own; every public name stays importable from here (re-exported: hence the noqa).
from rima_core.ops.registry_client import (  # noqa: F401
    _alias_version,
    _client,
    registry_lock,
    set_challenger,
)
from rima_core.ops.registry_compare import (  # noqa: F401
    EVAL_SUMMARY,
    SELECTION_DIR,
    SELECTION_SPLIT,
    SELECTION_TAG_METRICS,
    TAG_SELECTION,
    TAG_SELECTION_PREDICTIONS,
    _selection_from_tags,
    _signed,
    comparability_problems,
    compare,
    evaluated_selection_split,
    evaluated_split,
    log_selection,
    portable_artifact_uri,
    selection_metrics_path,
    selection_tags,
    significance,
)
from rima_core.ops.registry_register import (  # noqa: F401
    TRAIN_SUMMARY,
    check_complete,
    find_logged_model,
    log_trained_model,
    model_card_or_none,
    model_sha256,
    register,
    selected_validation_numbers,
)
from rima_core.ops.registry_tags import (  # noqa: F401
    CHALLENGER,
    CHAMPION,
    CHANCE_LEVEL,
    HEADLINE_METRICS,
    MAX_VERSION_TAGS,
    RESERVED_TAGS,
    TAG_MODEL_SHA,
    TAG_SCENARIOS,
    RegistryError,
    _description_limit,
    headline_tags,
    metric_tag,
    metric_tags,
    read_metrics,
    register_threshold,
    registration_gate,
    version_description,
    version_metric,
)
from rima_core.redact import redact_text
from rima_core.tracking import mlflow_runs as tracking

log = logging.getLogger(__name__)

TAG_DECISION = "promotion.decision"
TAG_REASON = "promotion.reason"
TAG_COMPARED_TO = "promotion.compared_to"
TAG_DECIDED_AT = "promotion.decided_at"
TAG_DESCRIPTION_DECISION = "Promotion decision"


# --- promotion ----------------------------------------------------------------------------------


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

    import mlflow

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


def _by_alias(client: Any, name: str, alias: str) -> Any:
    """The version ``@alias`` points at, or None when the alias (or the model) does not exist:
    a first promotion has no champion, and that is not an error."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _decide(
    challenger: Any, champion: Any, cfg: Config, result: dict[str, Any]
) -> tuple[bool, str]:
    """(promote?, reason) for ``challenger`` against ``champion`` (None: there is none yet);
    fills ``result``'s comparison table (and significance) as the decision is taken.

    The comparison and the significance test are looked up in this module when called, so that
    a test can slow them down to make two promotions overlap.
    """
    if champion is None:
        record, why = _selection_from_tags(challenger.tags, "challenger")
        return (True, "no champion yet") if record else (False, f"not comparable: {why}")
    if str(champion.version) == str(challenger.version):
        return False, f"version {challenger.version} is already the champion"
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
    return promote_it, reason


def _record_decision(
    client: Any, cfg: Config, name: str, challenger: Any, result: dict[str, Any]
) -> None:
    """Act on a decided (not dry-run) ``result``: move ``@champion`` when it says promote, then
    tag the challenger with the decision, put it in the version's description and log it as a
    ``promote`` run, so the registry itself says why a version serves or does not."""

    promote_it, reason = result["decision"] == "promote", result["reason"]
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


def _promote(
    client: Any, cfg: Config, name: str, dry_run: bool, version: str | None
) -> dict[str, Any]:
    """The decision of :func:`promote`, taken under its lock: find the challenger and the
    champion, decide, verify the challenger can be served, then (unless ``dry_run``) act."""
    challenger = (
        _by_alias(client, name, CHALLENGER)
        if version is None
        else client.get_model_version(name, str(version))
    )
    if challenger is None:
        raise RegistryError(
            f"registered model {name!r} has no @{CHALLENGER} version to promote "
            "(run `rima register` first)"
        )
    champion = _by_alias(client, name, CHAMPION)
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
    promote_it, reason = _decide(challenger, champion, cfg, result)
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
    _record_decision(client, cfg, name, challenger, result)
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
