"""Promotion logic against a real MLflow registry (SQLite file in tmp_path).

Versions here are registered from a plain run artifact with the metric tags ``register`` writes,
so the decision rules are tested without training a model; the real pyfunc path (train ->
register -> promote -> serve) is the end-to-end test in ``test_serving.py``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from rima_core import registry
from rima_core.config import Config
from tests.servers import mlflow_test_config

NAME = "rima-test"


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    c = mlflow_test_config(tmp_path, monkeypatch, "rima-test", NAME)
    c.promote.metric = "qwk"
    c.promote.scenario = "mixed"
    c.promote.margin = 0.01
    c.promote.tolerance = 0.02
    return c


def _metrics(mixed: float, complete: float = 0.8, oct_missing: float = 0.6) -> dict:
    return {
        "complete": {"qwk": complete, "accuracy": 0.7, "ece": 0.05},
        "mixed": {"qwk": mixed, "accuracy": 0.6, "ece": 0.06},
        "oct_missing": {"qwk": oct_missing, "accuracy": 0.5, "ece": 0.07},
        "fundus_missing@0.5": {"qwk": 0.55, "accuracy": 0.5, "ece": 0.08},
    }


def _version(cfg: Config, metrics: dict, tmp_path: Path) -> str:
    """A registered version with ``metrics`` as tags, aliased challenger (as register does)."""
    import mlflow

    client = registry._client(cfg)
    with mlflow.start_run() as run:
        payload = tmp_path / "payload.txt"
        payload.write_text("weights")
        mlflow.log_artifact(str(payload), artifact_path="model")
    with contextlib.suppress(mlflow.exceptions.MlflowException):  # exists after the first
        client.create_registered_model(NAME)
    mv = client.create_model_version(
        NAME,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags=registry.metric_tags(metrics),
    )
    registry.set_challenger(client, NAME, mv.version)
    return str(mv.version)


def _champion(cfg: Config) -> str:
    return str(registry._client(cfg).get_model_version_by_alias(NAME, "champion").version)


def test_metric_tags_roundtrip_and_read_metrics(tmp_path: Path) -> None:
    m = _metrics(0.7)
    tags = registry.metric_tags(m)
    assert tags["metric.fundus_missing_0.5.qwk"] == "0.55"
    assert json.loads(tags["scenarios"]) == list(m)
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"mixed": {"qwk": 0.5, "n": 10, "name": "x", "flag": True}}))
    assert registry.read_metrics(path) == {"mixed": {"qwk": 0.5, "n": 10.0}}
    path.write_text("[1, 2]")
    with pytest.raises(registry.RegistryError, match=r"metrics\.json: expected"):
        registry.read_metrics(path)
    with pytest.raises(FileNotFoundError, match=r"nope\.json"):
        registry.read_metrics(tmp_path / "nope.json")


def test_no_challenger_is_a_clear_error(cfg: Config) -> None:
    with pytest.raises(registry.RegistryError, match="no @challenger"):
        registry.promote(cfg)


def test_first_promotion_then_refusals_then_a_real_win(cfg: Config, tmp_path: Path) -> None:
    import mlflow

    client = registry._client(cfg)
    v1 = _version(cfg, _metrics(0.70), tmp_path)
    first = registry.promote(cfg)
    assert first["promoted"] and first["reason"] == "no champion yet"
    assert _champion(cfg) == v1
    assert client.get_model_version(NAME, v1).tags["promotion.decision"] == "promoted"

    # promoting again without a new challenger changes nothing
    again = registry.promote(cfg)
    assert not again["promoted"] and "already the champion" in again["reason"]

    # better by less than the margin: refused, with the reason on the version
    v2 = _version(cfg, _metrics(0.705), tmp_path)
    small = registry.promote(cfg)
    assert not small["promoted"] and small["decision"] == "keep"
    assert "promotion needs at least 0.01" in small["reason"]
    tags = client.get_model_version(NAME, v2).tags
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.reason"] == small["reason"]
    assert tags["promotion.compared_to"] == v1
    assert _champion(cfg) == v1

    # wins on the primary metric but collapses when OCT is missing: refused
    v3 = _version(cfg, _metrics(0.80, oct_missing=0.50), tmp_path)
    regress = registry.promote(cfg)
    assert not regress["promoted"]
    assert "oct_missing (-0.1000)" in regress["reason"]
    rows = {r["scenario"]: r for r in regress["table"]}
    assert rows["oct_missing"]["status"] == "regressed"
    assert rows["mixed"]["primary"] and rows["mixed"]["improvement"] == pytest.approx(0.10)
    assert _champion(cfg) == v1
    assert client.get_model_version(NAME, v3).tags["promotion.decision"] == "refused"

    # a dry run of a real win reports "promote" but changes nothing and records nothing
    v4 = _version(cfg, _metrics(0.75, oct_missing=0.59), tmp_path)
    dry = registry.promote(cfg, dry_run=True)
    assert dry["decision"] == "promote" and not dry["promoted"]
    assert dry["champion_after"] == v1 and _champion(cfg) == v1
    assert "promotion.decision" not in client.get_model_version(NAME, v4).tags
    text = registry.format_table(dry)
    assert "would promote" in text and "oct_missing" in text and "fundus_missing@0.5" in text

    # the same win for real: champion moves; the loaded alias resolves to the new version
    win = registry.promote(cfg)
    assert win["promoted"] and win["champion_before"] == v1 and win["champion_after"] == v4
    assert _champion(cfg) == v4
    assert str(mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion").version) == v4

    # each real decision is also an MLflow run with the table as an artifact
    runs = mlflow.search_runs(filter_string="tags.step = 'promote'", output_format="list")
    assert len(runs) == 5
    assert {r.data.tags["promotion.decision"] for r in runs} == {
        "promoted",
        "refused",
        "already_champion",
    }


def test_lower_is_better_metric_and_missing_primary(cfg: Config, tmp_path: Path) -> None:
    cfg.promote.metric = "ece"
    cfg.promote.margin = 0.0
    _version(cfg, _metrics(0.7), tmp_path)
    registry.promote(cfg)
    worse_calibrated = _metrics(0.7)
    worse_calibrated["mixed"]["ece"] = 0.10
    _version(cfg, worse_calibrated, tmp_path)
    out = registry.promote(cfg)
    assert not out["promoted"] and "-0.0400" in out["reason"]
    better = _metrics(0.7)
    better["mixed"]["ece"] = 0.03
    v = _version(cfg, better, tmp_path)
    assert registry.promote(cfg)["promoted"] and _champion(cfg) == v

    no_primary = _metrics(0.7)
    del no_primary["mixed"]
    _version(cfg, no_primary, tmp_path)
    out = registry.promote(cfg)
    assert not out["promoted"] and "missing or undefined" in out["reason"]
    assert _champion(cfg) == v
