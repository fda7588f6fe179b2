"""One naming scheme for every reported number (rima_core/tracking/metric_names.py): the helpers,
the names older versions wrote, and every producer of a tiny tracked run checked against the
scheme."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest

from rima_core.core.data.masks import MAIN_SCENARIOS
from rima_core.tracking.headline import HEADLINE_FILE, MAX_NUMBERS, count_numbers
from rima_core.tracking.metric_names import (
    epoch_metrics,
    epoch_row,
    is_name,
    legacy_history,
    legacy_history_column,
    legacy_version_tag,
    not_names,
    scored,
    train_stat,
    tune_stat,
    validation_numbers,
)
from tests.conftest import TinyData


def test_names_follow_the_scheme() -> None:
    assert scored("test", "complete", "qwk") == "test/complete/qwk"
    assert scored("val", "fundus_missing@0.5", "sensitivity/DR Mild") == (
        "val/fundus_missing_at_0.5/sensitivity/dr_mild"
    )
    assert train_stat("loss") == "train/loss" and tune_stat("best_value") == "tune/best_value"
    for good in (
        "test/complete/qwk",
        "val/mean/qwk",
        "val/oct_missing/ece",
        "test/mixed/es_auc_min",
        "test/fundus_missing_at_0.5/sensitivity/early",
        "train/loss",
        "train/path_weight/full",
        "tune/n_complete",
        "data/mixed/oct_missing_rate",
        "teacher/val/complete/qwk",
    ):
        assert is_name(good), good
    for bad in (
        "val_qwk",
        "train_loss",
        "complete.qwk",
        "metric.mixed.qwk",
        "Test/complete/qwk",
        "test/complete",
        "val/fundus_missing@0.5/qwk",
        "best_val/qwk",
        "epoch",
    ):
        assert not is_name(bad), bad


def test_validation_numbers_and_epoch_rows() -> None:
    val = {"qwk": 0.5, "ece": 0.1, "complete_qwk": 0.6, "fundus_missing_qwk": 0.4}
    val["oct_missing_qwk"], val["mixed_ece"] = 0.3, 0.2
    names = validation_numbers(val, MAIN_SCENARIOS)
    assert names == {
        "val/mean/qwk": 0.5,
        "val/mean/ece": 0.1,
        "val/complete/qwk": 0.6,
        "val/fundus_missing/qwk": 0.4,
        "val/oct_missing/qwk": 0.3,
        "val/mixed/ece": 0.2,
    }
    # a single selection scenario: the plain names are that scenario's
    assert validation_numbers({"qwk": 0.5}, ["mixed"]) == {"val/mixed/qwk": 0.5}
    stats = {"loss": 1.0, "ce": 0.9, "aux": 0.1, "gw_iterations": 7}
    row = epoch_row(3, 1e-3, stats, val, list(MAIN_SCENARIOS), 2)
    assert list(row)[:3] == ["epoch", "train/lr", "train/loss"]
    assert row["train/best_epoch"] == 2 and row["train/gw_iterations"] == 7
    assert not not_names(k for k in row if k != "epoch")
    logged = epoch_metrics(row, "qwk", "mean", MAIN_SCENARIOS)
    assert set(logged) == {
        "train/loss",
        "train/ce",
        "train/aux",
        "val/mean/qwk",
        "val/complete/qwk",
        "val/fundus_missing/qwk",
        "val/oct_missing/qwk",
        "val/mixed/ece",
    }


def test_older_names_are_read() -> None:
    scenarios = list(MAIN_SCENARIOS)
    assert legacy_history_column("train_loss", scenarios) == "train/loss"
    assert legacy_history_column("val_qwk", scenarios) == "val/mean/qwk"
    assert legacy_history_column("val_complete_qwk", scenarios) == "val/complete/qwk"
    assert legacy_history_column("val_fundus_missing_sensitivity/early", scenarios) == (
        "val/fundus_missing/sensitivity/early"
    )
    assert legacy_history_column("val_qwk", ["mixed"]) == "val/mixed/qwk"
    assert legacy_history_column("lr", scenarios) == "train/lr"
    assert legacy_history_column("best_epoch", scenarios) == "train/best_epoch"
    # timing columns (timings.csv) and current names stay as they are
    for same in ("epoch", "train_seconds", "val_seconds", "ot_share", "val/mean/qwk"):
        assert legacy_history_column(same, scenarios) == same
    rows = legacy_history([{"epoch": 1, "train_loss": 1.0, "val_qwk": 0.5}], scenarios)
    assert rows == [{"epoch": 1, "train/loss": 1.0, "val/mean/qwk": 0.5}]
    assert legacy_version_tag("fundus_missing@0.5", "qwk") == "metric.fundus_missing_0.5.qwk"


def test_backfill_reads_a_history_of_an_older_version(cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`rima train --resume` logs the epochs MLflow lacks from history.csv; one written by an
    older version (old column names) is logged under the current names, and only what
    training logs per epoch."""
    import mlflow

    from rima_core.pipeline.steps import _backfill_epochs
    from rima_core.tracking import mlflow_runs as tracking

    history = tmp_path / "history.csv"
    pd.DataFrame(
        {
            "epoch": [1, 2],
            "lr": [1e-3, 1e-3],
            "train_loss": [1.0, 0.8],
            "train_gw_iterations": [5, 6],
            "val_qwk": [0.3, 0.4],
            "val_complete_qwk": [0.5, 0.6],
            "val_mixed_ece": [0.2, 0.1],
            "val_mixed_auc": [0.7, 0.8],
            "best_epoch": [1, 2],
        }
    ).to_csv(history, index=False)
    with tracking.start_run(cfg, "train", log_params=False) as run:
        tracking.log_metrics({"train/loss": 1.0}, step=1)  # epoch 1 made it to MLflow
        _backfill_epochs(history, run.info.run_id, cfg)
    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    got = client.get_run(run.info.run_id).data.metrics
    assert set(got) == {"train/loss", "val/mean/qwk", "val/complete/qwk", "val/mixed/ece"}
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == [1, 2]  # epoch 1 was not logged twice


def test_registry_reads_old_and_new_version_tags() -> None:
    from rima_core.ops.registry import metric_tags, version_metric

    new = metric_tags({"mixed": {"qwk": 0.6}, "fundus_missing@0.5": {"qwk": 0.55}})
    assert new["test/fundus_missing_at_0.5/qwk"] == "0.55"
    assert version_metric(new, "mixed", "qwk") == 0.6
    old = {"metric.mixed.qwk": "0.4", "metric.fundus_missing_0.5.qwk": "0.3"}
    assert version_metric(old, "mixed", "qwk") == 0.4
    assert version_metric(old, "fundus_missing@0.5", "qwk") == 0.3
    assert version_metric(old, "mixed", "auc") is None


def test_kfp_metrics_follow_the_scheme() -> None:
    from rima_core.pipeline import reports

    metrics = {
        s: {"qwk": 0.5, "auc": 0.7, "ece": 0.1, "sensitivity/early": 0.4, "nll": float("nan")}
        for s in [*MAIN_SCENARIOS, "oct_missing@0.5"]
    }
    metrics["mixed"]["es_auc/sex"] = 0.6
    metrics["mixed"]["es_auc/site"] = None  # metrics.json writes an undefined ES-AUC as null
    kfp_eval = reports.eval_metrics(metrics, "test", "mixed")
    assert kfp_eval["test/mixed/es_auc_min"] == 0.6 and "test/complete/nll" not in kfp_eval
    assert not any("oct_missing_at" in k for k in kfp_eval)
    summary = {
        "best_epoch": 2,
        "epochs_run": 3,
        "selection_metric": "qwk",
        "selection_scenario": "mean",
        "best_val_metrics": {"qwk": 0.5, "complete_qwk": 0.6},
    }
    kfp_train = reports.train_metrics(summary)
    assert kfp_train == {
        "train/best_epoch": 2.0,
        "val/mean/qwk": 0.5,
        "train/epochs_run": 3.0,
        "val/complete/qwk": 0.6,
    }
    kfp_tune = reports.tune_metrics({"best_value": 0.5, "n_complete": 2, "best_params": {}})
    masks = {"n_rows": 10, "rates": {"oct_missing@0.5": {"oct_missing_rate": 0.5}}}
    kfp_masks = reports.mask_metrics(masks)
    assert kfp_masks == {"data/n_rows": 10.0, "data/oct_missing_at_0.5/oct_missing_rate": 0.5}
    assert not not_names([*kfp_eval, *kfp_train, *kfp_tune, *kfp_masks])


# --- every producer of a tiny tracked run ---------------------------------------------------------


def _mlflow_names(uri: str, experiment: str) -> dict[str, set[str]]:
    """Metric names of every run and logged model of ``experiment``, and the registry's
    version tags that hold numbers (``scenarios`` and the record tags excluded)."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    names: dict[str, set[str]] = {}
    for run in client.search_runs([exp.experiment_id]):
        names[f"run {run.info.run_name}"] = set(run.data.metrics)
    for model in mlflow.search_logged_models(
        experiment_ids=[exp.experiment_id], output_format="list"
    ):
        names[f"logged model {model.model_id}"] = {m.key for m in model.metrics or []}
    for version in client.search_model_versions():
        names[f"version {version.version}"] = {k for k in version.tags if "/" in k}
    return names


@pytest.mark.slow
def test_every_producer_names_numbers_by_the_scheme(tiny_data: TinyData, tmp_path: Path) -> None:
    """A tiny tune -> train -> evaluate -> register run, tracked: history.csv, the headline files
    (at most MAX_NUMBERS numbers in all), the MLflow runs' and the logged model's metrics and the
    version's metric tags all use the scheme's names, nothing else."""
    from rima_core.pipeline import steps

    cfg = copy.deepcopy(tiny_data.cfg)
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.mlflow.artifact_location = (tmp_path / "artifacts").as_uri()
    cfg.tune.storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg.tune.n_trials, cfg.tune.epochs = 1, 1
    cfg.train.epochs = 2
    cfg.promote.register_min_metric = -1.0  # register whatever a 2-epoch model scores
    tune_dir, model_dir, eval_dir = tmp_path / "tune", tmp_path / "model", tmp_path / "eval"
    steps.tune(tiny_data.store, tiny_data.masks, tune_dir, cfg)
    steps.train(tiny_data.store, tiny_data.masks, model_dir, cfg)
    steps.evaluate(model_dir / "model.pt", tiny_data.store, tiny_data.masks, eval_dir, cfg)
    steps.register(model_dir, eval_dir / "metrics.json", cfg, store=tiny_data.store)

    found: dict[str, set[str]] = {}
    history = pd.read_csv(model_dir / "history.csv")
    found["history.csv"] = {c for c in history.columns if c != "epoch"}
    assert {"train/loss", "val/mean/qwk", "val/oct_missing/ece"} <= found["history.csv"]
    headlines = {
        d: json.loads((d / HEADLINE_FILE).read_text()) for d in (tune_dir, model_dir, eval_dir)
    }
    for folder, doc in headlines.items():
        found[f"{folder.name}/{HEADLINE_FILE}"] = set(doc)
        assert all(not isinstance(v, dict) for v in doc.values()), doc  # flat: DVC's columns
    total = sum(count_numbers(doc) for doc in headlines.values())
    assert total <= MAX_NUMBERS, headlines
    main = {f"test/{s}/{m}" for s in MAIN_SCENARIOS for m in ("qwk", "ece")}
    main.add(f"test/{cfg.promote.scenario}/auc")
    equity = f"test/{cfg.promote.scenario}/es_auc_min"  # when the store has attributes
    assert main <= set(headlines[eval_dir]) <= main | {equity}
    assert set(headlines[model_dir]) == {"train/best_epoch", "val/mean/qwk"}
    assert set(headlines[tune_dir]) == {"tune/best_value", "tune/n_complete"}
    mlflow_names = _mlflow_names(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    assert any(n.startswith("logged model") and v for n, v in mlflow_names.items())
    assert any(n.startswith("version") and v for n, v in mlflow_names.items())
    found.update(mlflow_names)
    bad = {where: not_names(names) for where, names in found.items() if not_names(names)}
    assert not bad, f"names outside the scheme: {bad}"
