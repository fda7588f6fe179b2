"""The files DVC reads: headline metrics (few, numbers only) and the plot tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rima_core.config import Config
from rima_core.core.data.masks import MAIN_SCENARIOS, scenario_names
from rima_core.runs.evaluate import rate_curve
from rima_core.runs.plots import confusion_table, grade_labels, missing_rate_table
from rima_core.tracking.headline import (
    HEADLINE_METRICS,
    MAX_NUMBERS,
    count_numbers,
    eval_headline,
    train_headline,
    tune_headline,
    write_headline,
)
from rima_core.tracking.metric_names import not_names


def _full_metrics(scenarios: list[str]) -> dict[str, dict[str, float]]:
    """Every scenario with many metrics and a few non-headline values, as evaluate writes."""
    rng = np.random.default_rng(0)
    names = [*HEADLINE_METRICS, "auc", "f1_macro", "kappa", "nll", "sensitivity/normal"]
    return {s: {m: float(rng.random()) for m in [*names, "n_samples"]} for s in scenarios}


def test_eval_headline_keeps_main_scenarios_and_headline_metrics() -> None:
    scenarios = scenario_names(Config().missing)
    metrics = _full_metrics(scenarios)
    metrics["mixed"]["es_auc/race"] = 0.7
    metrics["mixed"]["es_auc/sex"] = 0.6
    metrics["complete"]["qwk"] = float("nan")
    head = eval_headline(metrics, "mixed")
    expected = [f"test/{s}/{m}" for s in MAIN_SCENARIOS for m in HEADLINE_METRICS]
    assert list(head) == [*expected, "test/mixed/auc", "test/mixed/es_auc_min"]
    assert head["test/mixed/es_auc_min"] == 0.6  # the lowest over the attributes
    assert head["test/complete/qwk"] is None  # NaN is not JSON
    assert head["test/oct_missing/ece"] == metrics["oct_missing"]["ece"]
    assert not not_names(head)
    # another split and promotion scenario; no attributes: no equity number
    head = eval_headline(_full_metrics(list(MAIN_SCENARIOS)), "complete", split="val")
    assert "val/complete/auc" in head and not any(k.endswith("es_auc_min") for k in head)


def test_eval_headline_does_not_grow_with_attributes_or_classes() -> None:
    metrics = _full_metrics(scenario_names(Config().missing))
    small = eval_headline(metrics, "mixed")
    for i in range(20):
        metrics["mixed"][f"es_auc/attribute_{i}"] = 0.5 + i / 100
        metrics["mixed"][f"sensitivity/class_{i}"] = 0.5
    assert len(eval_headline(metrics, "mixed")) == len(small) + 1  # + the equity number


def test_headline_budget_across_all_files() -> None:
    """The most numbers the three headline files hold with the default config stays within
    what `dvc metrics show` may print (tests/contracts/test_dvc_pipeline.py counts the real
    output)."""
    cfg = Config()
    metrics = _full_metrics(scenario_names(cfg.missing))
    for attribute in [*cfg.evaluate.equity_attributes, "a", "b", "c"]:
        metrics[cfg.promote.scenario][f"es_auc/{attribute}"] = 0.5
    best = {**metrics["complete"], **{f"mixed_{k}": v for k, v in metrics["mixed"].items()}}
    summary = {
        "best_epoch": 3,
        "epochs_run": 5,
        "best_val_metrics": best,
        "selection_metric": "qwk",
        "selection_scenario": "mean",
        "model": "rima",
    }
    study = {
        "best_value": 0.5,
        "n_complete": 5,
        "n_pruned": 2,
        "n_failed": 1,
        "best_params": {"ot.gw_epsilon": 0.01, "train.lr": 0.001},
        "storage": "sqlite:///optuna.db",
        "study_name": "rima-abc",
    }
    docs = [
        eval_headline(metrics, cfg.promote.scenario),
        train_headline(summary),
        tune_headline(study),
    ]
    total = sum(count_numbers(d) for d in docs)
    assert total == 14 <= MAX_NUMBERS == 15
    assert train_headline(summary) == {"train/best_epoch": 3, "val/mean/qwk": best["qwk"]}
    assert tune_headline(study) == {"tune/best_value": 0.5, "tune/n_complete": 5}
    assert not not_names(k for d in docs for k in d)
    summary["selection_scenario"], summary["selection_metric"] = "mixed", "ece"
    assert list(train_headline(summary)) == ["train/best_epoch", "val/mixed/ece"]


def test_write_headline_refuses_text(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"storage is 'sqlite"):
        write_headline(tmp_path / "h.json", {"n": 1, "storage": "sqlite:///x"})
    with pytest.raises(TypeError, match="numbers only"):
        write_headline(tmp_path / "h.json", {"a": {"stopped_early": True}})
    assert not (tmp_path / "h.json").exists()
    write_headline(tmp_path / "h.json", {"a": {"b": 1.5, "c": None}, "n": 2})
    assert json.loads((tmp_path / "h.json").read_text()) == {"a": {"b": 1.5, "c": None}, "n": 2}


def test_missing_rate_table_has_one_column_per_kind() -> None:
    metrics = {
        "complete": {"qwk": 0.9, "auc": 0.95, "accuracy": 0.8},
        "fundus_missing@0.5": {"qwk": 0.7, "auc": 0.9, "accuracy": 0.7},
        "fundus_missing@1.0": {"qwk": 0.5, "auc": 0.8, "accuracy": 0.6},
        "oct_missing@0.5": {"qwk": 0.6, "auc": 0.85, "accuracy": 0.65},
        "oct_missing@1.0": {"qwk": 0.3, "auc": 0.7, "accuracy": 0.5},
        "mixed": {"qwk": 0.1, "auc": 0.1, "accuracy": 0.1},  # not a sweep point
    }
    table = missing_rate_table(rate_curve(metrics))
    assert table["missing_rate"].tolist() == [0.0, 0.5, 1.0]
    # rate 0 of both kinds is the complete data
    assert table["test/fundus_missing/qwk"].tolist() == [0.9, 0.7, 0.5]
    assert table["test/oct_missing/qwk"].tolist() == [0.9, 0.6, 0.3]
    assert table["test/oct_missing/auc"].tolist() == [0.95, 0.85, 0.7]


def test_missing_rate_table_when_a_kind_has_no_point_at_a_rate() -> None:
    curve = rate_curve({"fundus_missing@0.5": {"qwk": 0.4}, "oct_missing@1.0": {"qwk": 0.2}})
    table = missing_rate_table(curve)
    assert table["missing_rate"].tolist() == [0.5, 1.0]
    assert table["test/fundus_missing/qwk"].tolist()[0] == 0.4
    assert np.isnan(table["test/fundus_missing/qwk"].tolist()[1])
    assert missing_rate_table(rate_curve({})).empty


def test_confusion_labels_sort_in_grade_order() -> None:
    names = ["normal", "early", "advanced"]
    labels = grade_labels(names)
    assert sorted(labels) == labels == ["0 normal", "1 early", "2 advanced"]
    twelve = grade_labels([f"g{i}" for i in range(12)])
    assert sorted(twelve) == twelve  # zero-padded: "02" sorts before "10"
    table = confusion_table(np.array([0, 2, 1]), np.array([1, 2, 1]), names)
    assert table.to_dict("list") == {
        "actual": ["0 normal", "2 advanced", "1 early"],
        "predicted": ["1 early", "2 advanced", "1 early"],
    }
    assert isinstance(table, pd.DataFrame)
