"""Model registry: register a trained model as a new version, and promote it only on evidence.

Aliases, not stages (stages are deprecated in MLflow 3): the newest registered version is
``@challenger``; ``@champion`` is what serving loads (``models:/NAME@champion``). A challenger
becomes champion only if it beats the champion on the primary metric (``cfg.promote.metric``
under ``cfg.promote.scenario``) by at least ``cfg.promote.margin`` *and* regresses no other
evaluated scenario by more than ``cfg.promote.tolerance`` — a model that wins the headline number
by collapsing when the OCT is missing must not reach the clinic. Every decision and its reason is
written as tags on the challenger version (and as an MLflow run), so "why is v7 not serving?" has
an answer in the registry itself.

Evaluation metrics travel as version tags ``metric.<scenario>.<metric>`` (scenario names made
key-safe: ``fundus_missing@0.5`` -> ``fundus_missing_0.5``), plus ``scenarios`` (JSON list of the
original names) so comparisons never have to parse keys.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from rima_core import tracking
from rima_core.config import Config
from rima_core.metrics import LOWER_IS_BETTER, metric_key

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


def metric_tag(scenario: str, metric: str) -> str:
    """The version tag key holding ``metric`` under ``scenario``."""
    return f"metric.{metric_key(scenario)}.{metric}"


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


def metric_tags(metrics: dict[str, dict[str, float]]) -> dict[str, str]:
    """Version tags for an evaluation: one per (scenario, metric), and the scenario list."""
    tags = {TAG_SCENARIOS: json.dumps(list(metrics))}
    for scenario, values in metrics.items():
        for metric, value in values.items():
            tags[metric_tag(scenario, metric)] = repr(float(value))
    return tags


def _client(cfg: Config) -> Any:
    tracking.configure(cfg.mlflow)
    import mlflow

    return mlflow.MlflowClient()


def set_challenger(client: Any, name: str, version: str) -> None:
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    log.info("%s version %s is now @%s", name, version, CHALLENGER)


def register(
    model_dir: str | Path,
    metrics_json: str | Path,
    cfg: Config,
    store: str | Path | None = None,
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log the trained model as a pyfunc, register a new version tagged with its evaluation,
    and point ``@challenger`` at it. Runs as the ``register`` step's MLflow run; ``tags`` (e.g.
    the training run id) go on both the run and the version."""
    import mlflow

    from rima_core import serving

    metrics = read_metrics(metrics_json)
    primary = metrics.get(cfg.promote.scenario, {}).get(cfg.promote.metric)
    if primary is None:
        log.warning(
            "%s has no %s under scenario %s: this version can be registered but never promoted",
            metrics_json,
            cfg.promote.metric,
            cfg.promote.scenario,
        )
    name = cfg.mlflow.model_name
    with tracking.start_run(cfg, "register", store=store, tags=tags) as run:
        tracking.log_metrics(
            {
                f"{metric_key(s)}/{m}": v
                for s, values in metrics.items()
                for m, v in values.items()
                if math.isfinite(v)
            }
        )
        tracking.log_artifacts(metrics_json, artifact_path="evaluation")
        info = serving.log_pyfunc(model_dir, cfg)
        run_tags = mlflow.MlflowClient().get_run(run.info.run_id).data.tags
        tags = {
            **metric_tags(metrics),
            "run_id": run.info.run_id,
            **(tags or {}),
            **{
                k: run_tags[k]
                for k in (tracking.TAG_GIT_COMMIT, tracking.TAG_DATA_HASH)
                if k in run_tags
            },
        }
        version = mlflow.register_model(info.model_uri, name, tags=tags)
        client = mlflow.MlflowClient()
        set_challenger(client, name, version.version)
        tracking.set_tags({"registered_version": version.version})
    return {
        "model_name": name,
        "version": str(version.version),
        "alias": CHALLENGER,
        "model_uri": f"models:/{name}/{version.version}",
        "run_id": run.info.run_id,
        "primary_metric": primary,
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


def compare(
    challenger_tags: dict[str, str], champion_tags: dict[str, str], cfg: Config
) -> tuple[bool, str, list[dict[str, Any]]]:
    """Decide challenger vs champion from their metric tags: (promote?, reason, table rows)."""
    p = cfg.promote
    metric = p.metric
    order = _scenarios(champion_tags)
    order += [s for s in _scenarios(challenger_tags) if s not in order]
    if p.scenario not in order:
        order.insert(0, p.scenario)
    rows: list[dict[str, Any]] = []
    regressions: list[str] = []
    for scenario in order:
        key = metric_tag(scenario, metric)
        new, old = _tag_float(challenger_tags, key), _tag_float(champion_tags, key)
        row: dict[str, Any] = {
            "scenario": scenario,
            "champion": old,
            "challenger": new,
            "improvement": None,
            "primary": scenario == p.scenario,
        }
        if new is None or old is None or not (math.isfinite(new) and math.isfinite(old)):
            row["status"] = "not comparable"
        else:
            gain = _improvement(metric, new, old)
            row["improvement"] = gain
            if gain < -p.tolerance:
                row["status"] = "regressed"
                if scenario != p.scenario:
                    regressions.append(f"{scenario} ({_signed(gain)})")
            else:
                row["status"] = "ok"
        rows.append(row)
    head = next(r for r in rows if r["primary"])
    where = f"{metric} under {p.scenario}"
    if head["improvement"] is None:
        return False, f"{where} is missing or undefined for one of the two versions", rows
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
    skipped = [r["scenario"] for r in rows if r["status"] == "not comparable"]
    note = f" (not comparable, not checked: {', '.join(skipped)})" if skipped else ""
    return (
        True,
        f"{where} improves by {_signed(gain)} (margin {p.margin:g}) and no scenario regresses by "
        f"more than {p.tolerance:g}{note}",
        rows,
    )


def promote(cfg: Config, dry_run: bool = False) -> dict[str, Any]:
    """Move ``@champion`` to ``@challenger`` if the evidence says so; record the decision.

    ``dry_run`` computes and returns the same comparison and decision but changes nothing.
    """
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    name = cfg.mlflow.model_name

    def by_alias(alias: str) -> Any:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    challenger = by_alias(CHALLENGER)
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
        promote_it, reason = True, "no champion yet"
    elif str(champion.version) == str(challenger.version):
        promote_it, reason = False, f"version {challenger.version} is already the champion"
    else:
        promote_it, reason, result["table"] = compare(challenger.tags, champion.tags, cfg)
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
    tags = {
        TAG_DECISION: decision,
        TAG_REASON: reason,
        TAG_COMPARED_TO: result["champion_before"] or "none",
        TAG_DECIDED_AT: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(challenger.version), key, value)
    if promote_it:
        client.set_registered_model_alias(name, CHAMPION, str(challenger.version))
    log.info("%s v%s: %s (%s)", name, challenger.version, decision, reason)
    with tracking.start_run(
        cfg, "promote", log_params=False, tags={**tags, "version": challenger.version}
    ):
        import mlflow

        mlflow.log_text(format_table(result), "promotion.txt")
        mlflow.log_dict(result, "promotion.json")
    return result


def _signed(v: float) -> str:
    """``+0.1234``; a change that rounds to zero prints as ``+0.0000``, never ``-0.0000``."""
    text = f"{v:+.4f}"
    return "+0.0000" if text == "-0.0000" else text


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a plain-text table followed by the decision, for terminals and logs."""

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

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
