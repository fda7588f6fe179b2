"""The benchmark's protocol id covers every library module a run executes that can change its
numbers (benchmarks/missing_modality.py, ``CODE``): a module added to the training path without
being hashed would let results of different code mix in one results file."""

from __future__ import annotations

from pathlib import Path

from benchmarks.missing_modality import CODE
from tests.import_graph import ROOT, closure, module_path

# What a benchmark run starts from: training, the phantom, the oracle, preparation, the
# diagnostics and the benchmark's own scoring.
ENTRY = {
    "rima_core.runs.train",
    "rima_core.core.data.synthetic",
    "rima_core.core.data.oracle",
    "rima_core.core.data.prepare",
    "rima_core.runs.diagnostics",
    "benchmarks.bench_scoring",
}
# Reached from there but unable to change a number, each for its reason.
NO_NUMBERS = {
    "rima_core": "package marker",
    "rima_core.core.data": "package marker",
    "rima_core.core": "package marker",
    "rima_core.runs": "package marker",
    "rima_core.tracking": "package marker",
    # the config's resolved values are hashed into the protocol id (protocol_id: config)
    "rima_core.config": "the config package: resolved values hashed",
    "rima_core.config.schema": "keys and defaults: resolved values hashed",
    "rima_core.config.checks": "value checks: refuse a value, never change one",
    "rima_core.config.loading": "layering and coercion: resolved values hashed",
    "rima_core.config.scenarios": "scenario names: which scenarios are scored, not their numbers",
    "rima_core.atomic": "writes files through a temporary name",
    "rima_core.progress": "progress bars",
    "rima_core.tracking.metric_names": "the names numbers are logged under",
    "rima_core.tracking.headline": "which numbers are headline numbers",
    "rima_core.tracking.mlflow_runs": "MLflow logging",
    "rima_core.tracking.git_provenance": "which commit ran (run tags), never a number",
    "rima_core.tracking.mlproject": "MLflow Projects run names",
    "rima_core.redact": "secrets kept out of logs",
}


def _covered(module: str) -> bool:
    rel = module_path(module).relative_to(ROOT)  # type: ignore[union-attr]
    return any(rel == Path(c) or Path(c) in rel.parents for c in CODE)


def test_every_module_a_run_executes_is_hashed_or_cannot_change_a_number() -> None:
    modules = closure(ENTRY)
    assert {"rima_core.runs.train", "rima_core.core.models.rima", "rima_core.core.ot"} <= modules
    unhashed = sorted(m for m in modules if not _covered(m) and m not in NO_NUMBERS)
    assert unhashed == [], f"add to benchmarks/missing_modality.py CODE: {unhashed}"
    stale = sorted(set(NO_NUMBERS) - modules)
    assert stale == [], f"no longer reached, drop from NO_NUMBERS: {stale}"
