"""What a registry version carries: its metric tags, the registration gate and its description.

The pieces of :mod:`rima_core.ops.registry` that only read or compute a version's metadata, with no
registry call of their own: the tag names and the tag budget (:data:`MAX_VERSION_TAGS`), the
metric tags of an evaluation (:func:`headline_tags`, :func:`version_metric`, which also reads the
tags of versions registered by older releases), the gate a model must pass to be registered at
all (:func:`registration_gate`) and the default version description. Kept apart so that
registration, promotion and the comparison all read the same names from one place.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from rima_core.config import Config, is_sweep
from rima_core.core.metrics import LOWER_IS_BETTER
from rima_core.tracking.metric_names import legacy_version_tag, scored

# the registry's logger: these lines are the registry's, as before this module was split from it
log = logging.getLogger("rima_core.ops.registry")

# the aliases: the newest registered version, and the one serving loads
CHALLENGER = "challenger"
CHAMPION = "champion"

TAG_SCENARIOS = "scenarios"


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


def headline_tags(
    metrics: dict[str, dict[str, float]], cfg: Config, split: str = "test"
) -> dict[str, str]:
    """The metric tags of a version (``metrics`` of the evaluated ``split``), within
    :data:`MAX_VERSION_TAGS`.

    First the promotion metric under the primary scenario, then the other headline metrics
    there, then the promotion metric under every other scenario (what
    :func:`rima_core.ops.registry_compare.compare` checks for regressions), named scenarios before
    sweep points (``...@rate``). Anything past the budget is left to the evaluation artifact, and
    logged.
    """
    p = cfg.promote
    wanted: list[tuple[str, str]] = [(p.scenario, p.metric)]
    wanted += [(p.scenario, m) for m in HEADLINE_METRICS if m != p.metric]
    others = sorted((s for s in metrics if s != p.scenario), key=is_sweep)
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


def version_description(
    metrics: dict[str, dict[str, float]], cfg: Config, data_hash: str | None, model_uri: str
) -> str:
    """Markdown for the version's description: the data, the scenarios, the headline numbers.

    The default; a model card (``register(description=...)``) replaces it.
    :func:`rima_core.ops.registry.promote` appends its decision either way.
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


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    if key not in tags:
        return None
    try:
        return float(tags[key])
    except ValueError:
        return None


def _scenarios(tags: dict[str, str]) -> list[str]:
    try:
        names = json.loads(tags.get(TAG_SCENARIOS, "[]"))
    except json.JSONDecodeError:
        return []
    return [str(n) for n in names] if isinstance(names, list) else []
