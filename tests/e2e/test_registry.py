"""Promotion logic against a real MLflow registry (SQLite file in tmp_path).

Versions here are registered from a plain run artifact with the metric tags ``register`` writes,
so the decision rules are tested without training a model; the real pyfunc path (train ->
register -> promote -> serve) is the end-to-end test in ``test_serving.py``.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rima_core.config import Config
from rima_core.ops import registry
from rima_core.pipeline import steps

NAME = "rima-test"


@pytest.fixture
def cfg(cfg: Config) -> Config:
    c = cfg
    assert c.mlflow.model_name == NAME
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
        # register tags test metrics (test/*) and the validation metrics promotion decides on
        tags={**registry.metric_tags(metrics), **registry.selection_tags(metrics, cfg)},
    )
    registry.set_challenger(client, NAME, mv.version)
    return str(mv.version)


def _champion(cfg: Config) -> str:
    return str(registry._client(cfg).get_model_version_by_alias(NAME, "champion").version)


def test_metric_tags_roundtrip_and_read_metrics(tmp_path: Path) -> None:
    m = _metrics(0.7)
    tags = registry.metric_tags(m)
    assert tags["test/fundus_missing_at_0.5/qwk"] == "0.55"
    assert registry.version_metric(tags, "fundus_missing@0.5", "qwk") == 0.55
    # a version registered by an older release: its metric.<scenario>.<metric> tags still read
    old = {"metric.fundus_missing_0.5.qwk": "0.5", "metric.mixed.qwk": "nan?"}
    assert registry.version_metric(old, "fundus_missing@0.5", "qwk") == 0.5
    assert registry.version_metric(old, "mixed", "qwk") is None
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
    assert not out["promoted"]
    assert "not comparable: challenger lacks ece under mixed" in out["reason"]
    assert _champion(cfg) == v


# --- lineage, tags and the registration gate (real pyfunc, real SQLite store) -------------------


def _eval_metrics(qwk: float) -> dict:
    """An evaluation as wide as the real one: 14 scenarios x 18 metrics."""
    scenarios = ["complete", "fundus_missing", "oct_missing", "mixed"]
    rates = (0.0, 0.25, 0.5, 0.75, 1.0)
    scenarios += [f"{m}_missing@{r}" for m in ("fundus", "oct") for r in rates]
    names = ["qwk", "auc", "accuracy", "balanced_accuracy", "ece", "nll", "kappa", "f1_macro"]
    names += [f"extra_{i}" for i in range(10)]
    return {
        s: {m: (qwk if m == "qwk" else 0.5 + 0.01 * i) for i, m in enumerate(names)}
        for s in scenarios
    }


def _manifest_store(tmp_path: Path, content_hash: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = tmp_path / "store"
    store.mkdir()
    table = pa.table(
        {
            "case_id": ["a", "b", "c"],
            "label": [0, 1, 2],
            "split": ["train", "val", "test"],
            "has_fundus": [True, True, False],
            "has_oct": [True, False, True],
        }
    )
    meta = {"rima": json.dumps({"content_hash": content_hash})}
    pq.write_table(table.replace_schema_metadata(meta), store / "manifest.parquet")
    return store


def _mark_complete(model_dir: Path) -> None:
    """The end of a finished `rima train`: the summary marking these weights complete."""
    summary = {
        "complete": True,
        "model_sha256": registry.model_sha256(model_dir),
        "best_val_metrics": {"qwk": 0.4, "mixed_qwk": 0.3},  # the selection: mean over the main
        "selection_scenario": "mean",
    }
    (model_dir / "train_summary.json").write_text(json.dumps(summary))


def _evaluation(tmp_path: Path, test: dict, selection: dict | None = None,
                split: str = "val", name: str = "eval") -> Path:  # fmt: skip
    """An evaluation folder as evaluate writes it: test ``metrics.json``, the selection split's
    ``val/metrics.json`` and ``eval_summary.json`` saying which split that was; returns the
    test ``metrics.json``."""
    out = tmp_path / name
    (out / "val").mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps(test))
    (out / "val" / "metrics.json").write_text(json.dumps(selection or test))
    summary = {"split": "test", "selection_split": split}
    (out / "eval_summary.json").write_text(json.dumps(summary))
    return out / "metrics.json"


def _trained(cfg: Config, tmp_path: Path, store: Path, seed: int = 0) -> tuple[Path, str]:
    """What steps.train does around the training loop: a training run that logs the model."""
    from rima_core.tracking import mlflow_runs as tracking
    from tests.e2e.test_serving import tiny_model

    model_dir = tmp_path / f"model-{seed}"
    model_dir.mkdir()
    tiny_model(model_dir / "model.pt", seed=seed)
    _mark_complete(model_dir)
    with tracking.start_run(cfg, "train", store=store, dataset_context="training") as run:
        registry.log_trained_model(model_dir, cfg, {"best_val_metrics": {"qwk": 0.4}})
    return model_dir, run.info.run_id


def test_registered_version_comes_from_the_training_run(cfg: Config, tmp_path: Path) -> None:
    import mlflow

    store = _manifest_store(tmp_path, "f" * 64)
    model_dir, train_run = _trained(cfg, tmp_path, store)
    metrics_json = _evaluation(tmp_path, _eval_metrics(0.6))

    out = registry.register(model_dir, metrics_json, cfg, store=store)
    assert out["registered"] and out["source_run_id"] == train_run
    client = mlflow.MlflowClient()
    version = client.get_model_version(NAME, out["version"])
    # lineage: the version's source run is the training run, which holds the logged model,
    # its dataset input (digest = the store's content hash) and the git commit
    assert version.run_id == train_run
    run = client.get_run(train_run)
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert run.data.tags["mlflow.source.git.commit"] == version.tags["git_commit"]
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == ("f" * 64)[:36]
    assert dataset_input.dataset.name == "store"
    assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
    logged = mlflow.search_logged_models(
        filter_string=f"source_run_id = '{train_run}'", output_format="list"
    )
    assert [m.model_id for m in logged] == [out["logged_model"].split("/")[-1]]
    # what it was selected on (training's names) and its evaluation, linked to the model
    keys = {m.key for m in logged[0].metrics}
    assert keys >= {"val/mean/qwk", "val/mixed/qwk", "test/mixed/qwk"}
    # a handful of tags, the promotion metric for every scenario, a readable description
    assert len(version.tags) <= registry.MAX_VERSION_TAGS
    assert version.tags["test/mixed/qwk"] == "0.6"
    assert version.tags["test/fundus_missing_at_0.5/qwk"] == "0.6"
    assert version.tags["data_hash"] == "f" * 64
    assert "mixed" in version.description and "14 missing-modality" in version.description
    # the promotion decision lands in the description; still within the tag budget
    registry.promote(cfg)
    version = client.get_model_version(NAME, out["version"])
    assert len(version.tags) <= registry.MAX_VERSION_TAGS
    assert "Promotion decision**: promoted — no champion yet" in version.description
    assert version.description.count("Promotion decision") == 1
    # the model loads from the registry
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert model.metadata.model_id == out["logged_model"].split("/")[-1]


def test_gate_refuses_a_useless_model(cfg: Config, tmp_path: Path) -> None:
    import mlflow

    store = _manifest_store(tmp_path, "e" * 64)
    model_dir, _ = _trained(cfg, tmp_path, store)
    metrics_json = tmp_path / "metrics.json"
    metrics_json.write_text(json.dumps(_eval_metrics(0.0)))
    out = registry.register(model_dir, metrics_json, cfg, store=store)
    assert not out["registered"] and out["version"] is None
    assert "qwk under mixed = 0.0000 <= 0" in out["gate"]
    assert mlflow.MlflowClient().search_model_versions(f"name = '{NAME}'") == []
    # promote after a refused registration records a skip instead of failing on "no challenger"
    summary, decision = tmp_path / "register.json", tmp_path / "promotion.json"
    summary.write_text(json.dumps(out))
    skipped = steps.promote(cfg, out=decision, after=summary)
    assert skipped["decision"] == "skip" and not skipped["promoted"]
    assert "not registered" in skipped["reason"] and "<= 0" in skipped["reason"]
    assert json.loads(decision.read_text())["decision"] == "skip"
    assert "SKIP" in registry.format_table(skipped)
    # ... also when an older challenger is left from an earlier run: it is not compared again
    _version(cfg, _metrics(0.9), tmp_path)
    assert steps.promote(cfg, after=summary)["decision"] == "skip"
    assert registry.promote(cfg, dry_run=True)["decision"] == "promote"  # without --after
    # an explicit threshold overrides the chance level; lower-is-better metrics gate from below
    cfg.promote.register_min_metric = -0.5
    assert registry.registration_gate(_eval_metrics(0.0), cfg)[0]
    cfg.promote.metric, cfg.promote.register_min_metric = "ece", 0.2
    ok, why = registry.registration_gate({"mixed": {"ece": 0.3}}, cfg)
    assert not ok and "ece under mixed = 0.3000 >= 0.2" in why
    cfg.promote.register_min_metric = None
    assert registry.registration_gate({"mixed": {"ece": 0.3}}, cfg)[0]  # no chance level


def test_untracked_training_is_registered_from_the_register_run(
    cfg: Config, tmp_path: Path
) -> None:
    import mlflow

    from tests.e2e.test_serving import tiny_model

    model_dir = tmp_path / "untracked"
    model_dir.mkdir()
    tiny_model(model_dir / "model.pt", seed=3)
    _mark_complete(model_dir)
    metrics_json = tmp_path / "metrics.json"
    metrics_json.write_text(json.dumps(_eval_metrics(0.3)))
    out = registry.register(model_dir, metrics_json, cfg)
    version = mlflow.MlflowClient().get_model_version(NAME, out["version"])
    assert version.run_id == out["run_id"]  # no training run to point at
    assert mlflow.MlflowClient().get_run(out["run_id"]).data.tags["step"] == "register"


# --- the promotion gate: validation metrics, comparability (issue 10 item 7), significance -------


def _selection_version(cfg: Config, tmp_path: Path, selection: dict, test: dict | None = None,
                       predictions: Path | None = None) -> str:  # fmt: skip
    """A challenger with a hand-made ``selection.metrics`` tag (any JSON, NaN included), optional
    test-split tags and validation predictions logged as the run artifact register logs."""
    import mlflow

    client = registry._client(cfg)
    with mlflow.start_run() as run:
        payload = tmp_path / "payload.txt"
        payload.write_text("weights")
        mlflow.log_artifact(str(payload), artifact_path="model")
        tags = {registry.TAG_SELECTION: json.dumps({"split": "val", "metrics": selection})}
        if predictions is not None:
            mlflow.log_artifact(str(predictions), artifact_path="evaluation/selection")
            tags[registry.TAG_SELECTION_PREDICTIONS] = (
                f"{run.info.artifact_uri}/evaluation/selection/{predictions.name}"
            )
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.create_registered_model(NAME)
    mv = client.create_model_version(
        NAME,
        source=f"{run.info.artifact_uri}/model",
        run_id=run.info.run_id,
        tags={**registry.metric_tags(test or {}), **tags},
    )
    registry.set_challenger(client, NAME, mv.version)
    return str(mv.version)


def _sel(mixed: float = 0.7, **others: object) -> dict:
    base: dict = {"complete": {"qwk": 0.8, "auc": 0.9}, "mixed": {"qwk": mixed, "auc": 0.85},
                  "oct_missing": {"qwk": 0.6, "auc": 0.8}}  # fmt: skip
    for scenario, value in others.items():
        base[scenario] = {"qwk": value, "auc": 0.8}
    return base


@pytest.mark.parametrize(
    ("challenger", "why"),
    [
        ({k: v for k, v in _sel(0.9).items() if k != "oct_missing"},
         "challenger lacks qwk under oct_missing"),
        (_sel(0.9, oct_missing=float("nan")), "challenger's qwk under oct_missing is nan"),
        (_sel(0.9, oct_missing=None), "challenger's qwk under oct_missing is null"),
        (_sel(0.9, oct_missing="0.9"), "qwk under oct_missing is '0.9' (not a number)"),
        (_sel(0.9, oct_missing=True), "(not a number)"),
        (_sel(1.5), "challenger's qwk under mixed is 1.5 (outside [-1, 1])"),
        (_sel(0.9, oct_missing=-1.2), "qwk under oct_missing is -1.2 (outside [-1, 1])"),
    ],
)  # fmt: skip
def test_not_comparable_means_refused(
    cfg: Config, tmp_path: Path, challenger: dict, why: str
) -> None:
    """Every challenger here wins the primary scenario by far (or claims to): the old gate
    promoted it with "not comparable, not checked"; now it is refused with the reason tagged."""
    v1 = _selection_version(cfg, tmp_path, _sel(0.7))
    assert registry.promote(cfg)["promoted"]
    v2 = _selection_version(cfg, tmp_path, challenger)
    out = registry.promote(cfg)
    assert not out["promoted"] and out["decision"] == "keep"
    assert out["reason"].startswith("not comparable: ") and why in out["reason"]
    tags = registry._client(cfg).get_model_version(NAME, v2).tags
    assert tags["promotion.decision"] == "refused"
    assert tags["promotion.reason"] == out["reason"]
    assert _champion(cfg) == v1


def test_auc_outside_unit_interval_and_missing_validation_record(
    cfg: Config, tmp_path: Path
) -> None:
    cfg.promote.metric = "auc"
    v1 = _selection_version(cfg, tmp_path, _sel())
    registry.promote(cfg)
    bad = _sel()
    bad["mixed"]["auc"] = 1.2
    _selection_version(cfg, tmp_path, bad)
    out = registry.promote(cfg)
    assert (
        not out["promoted"]
        and "challenger's auc under mixed is 1.2 (outside [0, 1])" in out["reason"]
    )
    # a version registered without validation metrics cannot be compared at all
    _version_without_selection = _selection_version(cfg, tmp_path, _sel())
    client = registry._client(cfg)
    client.delete_model_version_tag(NAME, _version_without_selection, registry.TAG_SELECTION)
    out = registry.promote(cfg)
    assert not out["promoted"] and "challenger has no validation metrics" in out["reason"]
    assert _champion(cfg) == v1


def test_promotion_decides_on_validation_not_test(cfg: Config, tmp_path: Path) -> None:
    v1 = _selection_version(cfg, tmp_path, _sel(0.70), test=_metrics(0.70))
    registry.promote(cfg)
    # far better on test, worse on validation: refused (test is never a selection set)
    _selection_version(cfg, tmp_path, _sel(0.65), test=_metrics(0.95))
    out = registry.promote(cfg)
    assert not out["promoted"] and "validation qwk under mixed changes by -0.0500" in out["reason"]
    assert _champion(cfg) == v1
    # worse on test, better on validation: promoted
    v3 = _selection_version(cfg, tmp_path, _sel(0.80), test=_metrics(0.50))
    out = registry.promote(cfg)
    assert out["promoted"] and "validation qwk under mixed improves by +0.1000" in out["reason"]
    assert _champion(cfg) == v3


def _predictions(tmp_path: Path, name: str, y: np.ndarray, right: np.ndarray) -> Path:
    """Validation predictions as evaluate writes them: right eyes get 0.8 on the true class."""
    k = 3
    wrong = (y + 1) % k
    pred = np.where(right, y, wrong)
    proba = np.full((len(y), k), 0.1)
    proba[np.arange(len(y)), pred] = 0.8
    frame = pd.DataFrame({"case_id": [f"e{i:03d}" for i in range(len(y))], "label": y,
                          "pred": pred})  # fmt: skip
    for c in range(k):
        frame[f"proba_c{c}"] = proba[:, c]
    path = tmp_path / name / "mixed.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.iloc[::-1].to_parquet(path, index=False)  # order differs: aligned by case_id
    return path


def test_require_significant_uses_a_paired_bootstrap(cfg: Config, tmp_path: Path) -> None:
    from rima_core.core.metrics import classification_metrics

    cfg.promote.margin = 0.0
    cfg.promote.require_significant = True
    cfg.evaluate.bootstrap = 500
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    base = rng.uniform(size=200) < 0.6

    def version(name: str, right: np.ndarray) -> str:
        path = _predictions(tmp_path, name, y, right)
        frame = pd.read_parquet(path)
        proba = frame[[f"proba_c{c}" for c in range(3)]].to_numpy()
        m = classification_metrics(frame["label"].to_numpy(), proba)
        sel = {s: {"qwk": m["qwk"], "auc": m["auc"]} for s in ("complete", "mixed")}
        return _selection_version(cfg, tmp_path, sel, predictions=path)

    v1 = version("champion", base)
    registry.promote(cfg)
    # right on 3 more eyes out of 200: a real but tiny gain, well inside the noise
    slightly = base.copy()
    slightly[np.flatnonzero(~base)[:3]] = True
    version("slightly", slightly)
    out = registry.promote(cfg)
    assert not out["promoted"], out["reason"]
    assert "but not significantly (paired bootstrap over 200 validation eyes" in out["reason"]
    assert out["significance"]["ci_low"] <= 0 < out["significance"]["value"]
    assert _champion(cfg) == v1
    # right on 60 more eyes: the paired interval is far above 0
    much = base.copy()
    much[np.flatnonzero(~base)[:60]] = True
    v3 = version("much", much)
    out = registry.promote(cfg)
    assert out["promoted"] and "paired bootstrap over 200 validation eyes" in out["reason"]
    assert out["significance"]["ci_low"] > 0
    assert _champion(cfg) == v3
    # validated on other eyes: not comparable
    other = _predictions(tmp_path, "other", y[:150], much[:150])
    frame = pd.read_parquet(other)
    _selection_version(cfg, tmp_path, _sel(0.99), predictions=other)
    out = registry.promote(cfg)
    assert not out["promoted"] and "validated on different eyes" in out["reason"]
    assert len(frame) == 150
