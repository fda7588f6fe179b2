"""Promotion decides on what it says it decides on, against a real MLflow registry (SQLite here;
tests/e2e/test_postgres.py repeats the concurrent cases on PostgreSQL):

- only validation metrics, recorded with the split evaluate actually scored, are compared;
- only a model that training marked complete is registered;
- a version whose files are gone is never made champion;
- two promotions at once never leave the weaker model serving, nor crash on the alias;
- a retried ``register`` reuses the version it made;
- ``require_significant`` reads its predictions after the workspace moved.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rima_core.config import Config
from rima_core.ops import registry
from rima_core.pipeline import steps
from tests.e2e.test_registry import (
    NAME,
    _eval_metrics,
    _evaluation,
    _manifest_store,
    _metrics,
    _predictions,
    _sel,
    _selection_version,
    _trained,
    _version,
)
from tests.servers import mlflow_test_config


@pytest.fixture
def cfg(cfg: Config) -> Config:
    assert cfg.mlflow.model_name == NAME
    cfg.promote.margin = 0.01
    cfg.promote.tolerance = 0.02
    return cfg


def _champion(cfg: Config) -> str | None:
    return registry._alias_version(registry._client(cfg), NAME, registry.CHAMPION)


def _tags(cfg: Config, version: str) -> dict[str, str]:
    return registry._client(cfg).get_model_version(NAME, version).tags


# --- the split ----------------------------------------------------------------------------------


def test_selection_split_is_the_one_evaluate_scored(cfg: Config, tmp_path: Path) -> None:
    """evaluate run with selection_split=train, register run with the default config (val): the
    version says "train" and is never promoted, not even as the first champion."""
    store = _manifest_store(tmp_path, "a" * 64)
    assert cfg.evaluate.selection_split == "val"  # what register's own config claims
    on_train, _ = _trained(cfg, tmp_path, store, seed=0)
    metrics = _evaluation(tmp_path, _eval_metrics(0.9), split="train", name="eval-train")
    v1 = registry.register(on_train, metrics, cfg, store=store)["version"]
    record = json.loads(_tags(cfg, v1)[registry.TAG_SELECTION])
    assert record["split"] == "train"
    out = registry.promote(cfg)
    assert not out["promoted"] and _champion(cfg) is None
    assert "evaluated on the 'train' split" in out["reason"]
    assert _tags(cfg, v1)["promotion.decision"] == "refused"

    honest, _ = _trained(cfg, tmp_path, store, seed=1)
    v2 = registry.register(honest, _evaluation(tmp_path, _eval_metrics(0.5)), cfg, store=store)
    assert registry.promote(cfg)["promoted"] and _champion(cfg) == v2["version"]


def test_a_tag_on_the_test_split_is_never_compared(cfg: Config, tmp_path: Path) -> None:
    v1 = _version(cfg, _metrics(0.70), tmp_path)
    assert registry.promote(cfg)["promoted"]
    record = {"split": "test", "metrics": _sel(0.95)}
    v2 = _version(cfg, _metrics(0.95), tmp_path)
    client = registry._client(cfg)
    client.set_model_version_tag(NAME, v2, registry.TAG_SELECTION, json.dumps(record))
    out = registry.promote(cfg)
    assert not out["promoted"] and out["reason"].startswith("not comparable: ")
    assert "'test' split" in out["reason"] and _champion(cfg) == v1
    # and a champion whose record is not validation cannot be compared against either
    ok, why, _ = registry.compare(_tags(cfg, v1), _tags(cfg, v2), cfg)
    assert not ok and "champion's metrics were evaluated on the 'test' split" in why


# --- complete training --------------------------------------------------------------------------


def test_a_killed_training_is_not_registered(
    cfg: Config, tmp_path: Path, tiny_data: Any, tiny_cfg: Config
) -> None:
    """A real training killed after epoch 1 leaves model.pt (epoch-1 weights, no calibration):
    register refuses it; the same run resumed to the end is marked complete and registers."""
    from rima_core.runs.train import train

    tc = tiny_cfg  # a private copy
    tc.train.epochs = 2
    out = tmp_path / "model"

    def kill(epoch: int, _metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise KeyboardInterrupt  # what a SIGINT/SIGKILL leaves: the checkpoint and model.pt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_data.store, tiny_data.masks, out, tc, epoch_callback=kill)
    assert (out / "model.pt").is_file() and not (out / "train_summary.json").exists()
    metrics = _evaluation(tmp_path, _eval_metrics(0.9))
    with pytest.raises(registry.RegistryError, match="training did not finish"):
        registry.register(out, metrics, cfg)
    assert registry._client(cfg).search_model_versions(f"name = '{NAME}'") == []

    summary = train(tiny_data.store, tiny_data.masks, out, tc, resume=True)
    assert summary["complete"] is True
    assert summary["model_sha256"] == registry.model_sha256(out)
    assert registry.check_complete(out) == summary["model_sha256"]
    # the weights replaced after training finished: refused too
    shutil.copyfile(out / "checkpoint.pt", out / "model.pt")
    with pytest.raises(registry.RegistryError, match="sha256"):
        registry.register(out, metrics, cfg)


# --- files gone ---------------------------------------------------------------------------------


def test_a_version_whose_files_are_gone_is_not_promoted(cfg: Config, tmp_path: Path) -> None:
    import mlflow

    store = _manifest_store(tmp_path, "b" * 64)
    first, _ = _trained(cfg, tmp_path, store, seed=0)
    v1 = registry.register(first, _evaluation(tmp_path, _eval_metrics(0.5), name="e1"), cfg)
    assert registry.promote(cfg)["promoted"]
    better, _ = _trained(cfg, tmp_path, store, seed=1)
    out = registry.register(better, _evaluation(tmp_path, _eval_metrics(0.8), name="e2"), cfg)
    model_id = out["logged_model"].split("/")[-1]
    location = mlflow.MlflowClient().get_logged_model(model_id).artifact_location
    shutil.rmtree(location.removeprefix("file://"))  # deleted after registration

    dry = registry.promote(cfg, dry_run=True)
    assert dry["decision"] == "keep" and "cannot be served" in dry["reason"]
    decision = registry.promote(cfg)
    assert not decision["promoted"] and "cannot be served" in decision["reason"]
    assert _champion(cfg) == v1["version"]
    assert _tags(cfg, out["version"])["promotion.decision"] == "refused"
    assert mlflow.pyfunc.load_model(f"models:/{NAME}@champion") is not None

    # the files are there but are not the registered weights: refused as well
    third, _ = _trained(cfg, tmp_path, store, seed=2)
    v3 = registry.register(third, _evaluation(tmp_path, _eval_metrics(0.9), name="e3"), cfg)
    registry._client(cfg).set_model_version_tag(
        NAME, v3["version"], registry.TAG_MODEL_SHA, "0" * 64
    )
    decision = registry.promote(cfg)
    assert not decision["promoted"] and "registered sha256" in decision["reason"]
    assert _champion(cfg) == v1["version"]


# --- concurrency --------------------------------------------------------------------------------


def _slow_decisions(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.6) -> None:
    """Every comparison takes ``seconds``: two promotions started together overlap for sure."""
    compare = registry.compare

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return compare(*args, **kwargs)

    monkeypatch.setattr(registry, "compare", slow)


def _at_once(*calls: Any) -> list[Any]:
    """Run the calls in threads released together; their results (or exceptions)."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:  # collected and asserted on by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def check_concurrent_promotions(cfg: Config, tmp_path: Path, monkeypatch: Any) -> None:
    """Shared with tests/e2e/test_postgres.py: v2 (0.80) and v3 (0.75) promoted at once over v1
    (0.70) leave v2 serving; two identical promotions give one "promoted" and one
    "already_champion", no error."""
    v1 = _version(cfg, _metrics(0.70), tmp_path)
    registry.promote(cfg)
    v2 = _version(cfg, _metrics(0.80), tmp_path)
    v3 = _version(cfg, _metrics(0.75), tmp_path)
    _slow_decisions(monkeypatch)
    results = _at_once(
        lambda: registry.promote(cfg, version=v2), lambda: registry.promote(cfg, version=v3)
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert _champion(cfg) == v2, results
    tags2, tags3 = _tags(cfg, v2), _tags(cfg, v3)
    assert tags2["promotion.decision"] == "promoted"
    # whichever went first, each decision was taken against the champion of its time
    if tags3["promotion.decision"] == "promoted":
        assert tags3["promotion.compared_to"] == v1 and tags2["promotion.compared_to"] == v3
    else:
        assert tags3["promotion.compared_to"] == v2 and tags2["promotion.compared_to"] == v1

    v4 = _version(cfg, _metrics(0.90), tmp_path)
    results = _at_once(lambda: registry.promote(cfg, version=v4),
                       lambda: registry.promote(cfg, version=v4))  # fmt: skip
    assert not [r for r in results if isinstance(r, Exception)], results
    assert sorted(r["promoted"] for r in results) == [False, True]
    assert any("already the champion" in r["reason"] for r in results)
    assert _champion(cfg) == v4 and _tags(cfg, v4)["promotion.decision"] in (
        "promoted",
        "already_champion",
    )


def test_two_promotions_at_once(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_concurrent_promotions(cfg, tmp_path, monkeypatch)


def test_a_promotion_that_loses_the_race_changes_nothing(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the store offers no lock (an MLflow server), the alias is still moved by
    compare-and-set: a champion moved while this promotion decided wins, and this one fails
    with one clear message, tagging nothing."""
    import contextlib

    v1 = _version(cfg, _metrics(0.70), tmp_path)
    registry.promote(cfg)
    v2 = _version(cfg, _metrics(0.80), tmp_path)
    v3 = _version(cfg, _metrics(0.75), tmp_path)
    monkeypatch.setattr(registry, "registry_lock", lambda *a: contextlib.nullcontext("none"))
    compare = registry.compare

    def meanwhile(*args: Any, **kwargs: Any) -> Any:  # another promotion lands v2 meanwhile
        registry._client(cfg).set_registered_model_alias(NAME, registry.CHAMPION, v2)
        return compare(*args, **kwargs)

    monkeypatch.setattr(registry, "compare", meanwhile)
    with pytest.raises(registry.PromotionConflict, match="changed nothing; run it again"):
        registry.promote(cfg, version=v3)
    assert _champion(cfg) == v2 and "promotion.decision" not in _tags(cfg, v3)
    assert v1 != v2


def check_register_retried(cfg: Config, tmp_path: Path) -> None:
    """Shared with tests/e2e/test_postgres.py: register retried (in sequence and twice at once)
    makes one version."""
    import mlflow

    store = _manifest_store(tmp_path, "c" * 64)
    model_dir, train_run = _trained(cfg, tmp_path, store)
    metrics = _evaluation(tmp_path, _eval_metrics(0.6))
    first = registry.register(model_dir, metrics, cfg, store=store)
    again = registry.register(model_dir, metrics, cfg, store=store)
    assert again["version"] == first["version"] and again["existing"]
    other, _ = _trained(cfg, tmp_path, store, seed=1)
    results = _at_once(
        lambda: steps.register(other, metrics, cfg, store=store),
        lambda: steps.register(other, metrics, cfg, store=store),
    )
    assert not [r for r in results if isinstance(r, Exception)], results
    assert results[0]["version"] == results[1]["version"] != first["version"]
    versions = mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'")
    assert len(versions) == 2
    assert {v.tags["train_run_id"] for v in versions} >= {train_run}


def test_register_retried_makes_one_version(cfg: Config, tmp_path: Path) -> None:
    check_register_retried(cfg, tmp_path)


# --- a moved workspace --------------------------------------------------------------------------


def test_require_significant_after_the_workspace_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    cfg = mlflow_test_config(old, monkeypatch, "rima-test", NAME)
    cfg.promote.margin = 0.0
    cfg.promote.require_significant = True
    cfg.evaluate.bootstrap = 300
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    base = rng.uniform(size=200) < 0.6
    much = base.copy()
    much[np.flatnonzero(~base)[:60]] = True
    sel_old, sel_new = _sel(0.6), _sel(0.8)
    _selection_version(cfg, old, sel_old, predictions=_predictions(old, "a", y, base))
    registry.promote(cfg)
    v2 = _selection_version(cfg, old, sel_new, predictions=_predictions(old, "b", y, much))
    shutil.move(old, new)  # the workspace is moved (or copied and the original removed)
    cfg.mlflow.tracking_uri = f"sqlite:///{new / 'mlflow.db'}"
    out = registry.promote(cfg)
    assert out["promoted"], out["reason"]
    assert "paired bootstrap over 200 validation eyes" in out["reason"]
    assert _champion(cfg) == v2
