"""Evaluation under every scenario, and the real data flow through the ``rima`` CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from rima_core.core.data import open_store
from rima_core.core.data.masks import scenario_names
from rima_core.core.models import load_model
from rima_core.pipeline.cli import main
from rima_core.runs.engine import EngineError
from rima_core.runs.evaluate import evaluate, parse_sweep, rate_curve
from rima_core.runs.train import train
from rima_core.tracking.metric_names import scored
from tests.conftest import TinyData


@pytest.fixture(scope="module")
def trained(tiny_data: TinyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = copy.deepcopy(tiny_data.cfg)
    cfg.train.epochs = 1
    out = tmp_path_factory.mktemp("trained")
    train(tiny_data.store, tiny_data.masks, out, cfg)
    return out / "model.pt"


@pytest.fixture(scope="module")
def evaluated(trained: Path, tiny_data: TinyData, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("eval") / "eval"
    result = evaluate(trained, tiny_data.store, tiny_data.masks, out, tiny_data.cfg)
    return out, result


def test_every_scenario_is_scored(evaluated, tiny_data: TinyData) -> None:
    out, result = evaluated
    expected = scenario_names(tiny_data.cfg.missing)
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == expected
    assert list(result["metrics"]) == expected
    for scenario, m in metrics.items():
        for key, value in m.items():
            assert value is None or isinstance(value, int | float), (scenario, key)
        assert m["n_samples"] == 18
        assert 0.0 <= m["accuracy"] <= 1.0
    # the scenarios really remove modalities from the scored eyes
    assert metrics["fundus_missing@1"]["fundus_missing_rate"] > 0.8
    assert metrics["oct_missing@1"]["oct_missing_rate"] > 0.8
    assert metrics["complete"]["fundus_missing_rate"] < 0.2


def test_predictions_match_metrics(evaluated, tiny_data: TinyData) -> None:
    out, _ = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    for scenario in metrics:
        frame = pd.read_parquet(out / "predictions" / f"{scenario}.parquet")
        assert len(frame) == 18 and frame["case_id"].is_unique
        proba = frame[[c for c in frame.columns if c.startswith("proba_")]].to_numpy()
        assert np.allclose(proba.sum(axis=1), 1.0)
        assert (proba.argmax(axis=1) == frame["pred"]).all()
        accuracy = float((frame["pred"] == frame["label"]).mean())
        assert metrics[scenario]["accuracy"] == pytest.approx(accuracy)
        assert not (~frame["has_fundus"] & ~frame["has_oct"]).any()
    frame = pd.read_parquet(out / "predictions" / "fundus_missing@1.parquet")
    assert frame["has_fundus"].sum() <= 3  # only eyes whose source lacks the OCT keep a fundus


def test_dvc_files(evaluated, tiny_data: TinyData) -> None:
    out, _ = evaluated
    curve = pd.read_csv(out / "rate_curve.csv")
    assert list(curve.columns[:2]) == ["scenario_kind", "missing_rate"]
    sweep = tiny_data.cfg.missing.sweep
    assert sorted(curve.loc[curve["scenario_kind"] == "fundus_missing", "missing_rate"]) == sweep
    assert sorted(curve.loc[curve["scenario_kind"] == "oct_missing", "missing_rate"]) == sweep
    assert curve.loc[curve["scenario_kind"] == "complete", "missing_rate"].tolist() == [0.0]
    metrics = json.loads((out / "metrics.json").read_text())
    row = curve[(curve["scenario_kind"] == "oct_missing") & (curve["missing_rate"] == 0.5)]
    assert row["accuracy"].iloc[0] == pytest.approx(metrics["oct_missing@0.5"]["accuracy"])

    confusion = pd.read_csv(out / "confusion.csv")
    assert list(confusion.columns) == ["actual", "predicted"]
    mixed = pd.read_parquet(out / "predictions" / "mixed.parquet")
    names = open_store(tiny_data.store).class_names
    assert len(confusion) == len(mixed)
    assert confusion["actual"].tolist() == [names[i] for i in mixed["label"]]
    assert confusion["predicted"].tolist() == [names[i] for i in mixed["pred"]]
    for png in ("rate_curve.png", "confusion.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_model_and_wrong_split(trained: Path, tiny_data: TinyData, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="rima train"):
        evaluate(
            tmp_path / "none.pt", tiny_data.store, tiny_data.masks, tmp_path / "e", tiny_data.cfg
        )
    masks = pd.read_parquet(tiny_data.masks)
    masks = masks[masks["split"] != "test"]
    with pytest.raises(EngineError, match="'test'"):
        evaluate(trained, tiny_data.store, masks, tmp_path / "e", tiny_data.cfg)
    assert not (tmp_path / "e").exists()
    # masks without the promotion scenario: refused before any prediction, nothing written
    masks = pd.read_parquet(tiny_data.masks)
    masks = masks[masks["scenario"] != tiny_data.cfg.promote.scenario]
    with pytest.raises(EngineError, match=r"promote\.scenario"):
        evaluate(trained, tiny_data.store, masks, tmp_path / "e", tiny_data.cfg)
    assert not (tmp_path / "e").exists()


def test_rate_curve_and_names() -> None:
    assert parse_sweep("oct_missing@0.25") == ("oct_missing", 0.25)
    assert parse_sweep("mixed") is None
    assert scored("test", "fundus_missing@0.5", "sensitivity/Early") == (
        "test/fundus_missing_at_0.5/sensitivity/early"
    )
    curve = rate_curve(
        {
            "complete": {"qwk": 0.9},
            "mixed": {"qwk": 0.5},
            "oct_missing@1": {"qwk": 0.6},
            "oct_missing@0": {"qwk": 0.85},
        }
    )
    assert curve[["scenario_kind", "missing_rate"]].values.tolist() == [
        ["complete", 0.0],
        ["oct_missing", 0.0],
        ["oct_missing", 1.0],
    ]
    assert curve["qwk"].tolist() == [0.9, 0.85, 0.6]
    assert math.isnan(curve["auc"].iloc[0])


def _write_params(tiny_data: TinyData, path: Path) -> Path:
    path.write_text(yaml.safe_dump(tiny_data.cfg.to_dict()))
    return path


def test_cli_train_then_evaluate(tiny_data: TinyData, tmp_path: Path, capsys) -> None:
    """The real flow through ``rima``: tuned params on top, a named model, then evaluation."""
    params = _write_params(tiny_data, tmp_path / "params.yaml")
    best = tmp_path / "best_params.json"
    best.write_text(json.dumps({"ot.gw_epsilon": 0.01, "train.lr": 0.002}))
    common = [
        "--params",
        str(params),
        "--store",
        str(tiny_data.store),
        "--masks",
        str(tiny_data.masks),
        "--no-mlflow",
    ]
    model_dir = tmp_path / "model"
    rc = main(
        [
            "--json",
            "train",
            *common,
            "--out",
            str(model_dir),
            "--best-params",
            str(best),
            "--set",
            "train.epochs=1",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs_run"] == 1
    _, spec = load_model(model_dir / "model.pt")
    assert spec.name == "rima" and spec.config.gw_epsilon == 0.01

    rc = main(
        [
            "--json",
            "evaluate",
            *common,
            "--model",
            str(model_dir / "model.pt"),
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["metrics"]) == set(scenario_names(tiny_data.cfg.missing))
    assert (tmp_path / "eval" / "metrics.json").is_file()

    # a baseline by name; a bad scenario is one clear error, not a traceback
    rc = main(
        [
            "--json",
            "train",
            *common,
            "--model-name",
            "late_fusion_zero",
            "--set",
            "train.epochs=1",
            "--set",
            f"train.out_dir={tmp_path / 'models' / 'rima'}",
        ]
    )
    assert rc == 0
    # without --out a named model goes beside the main one, never over it
    lf = tmp_path / "models" / "late_fusion_zero" / "model.pt"
    assert load_model(lf)[1].name == "late_fusion_zero"
    assert not (tmp_path / "models" / "rima").exists()
    rc = main(
        ["train", *common, "--out", str(tmp_path / "bad"), "--set", "missing.train_scenario=nope"]
    )
    assert rc == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"ot.no_such_key": 1}))
    rc = main(["train", *common, "--out", str(tmp_path / "bad"), "--best-params", str(bad)])
    assert rc == 2


@pytest.mark.slow
def test_cli_logs_to_mlflow(tiny_data: TinyData, tmp_path: Path, capsys) -> None:
    params = _write_params(tiny_data, tmp_path / "params.yaml")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = [
        "--params",
        str(params),
        "--store",
        str(tiny_data.store),
        "--masks",
        str(tiny_data.masks),
        "--set",
        f"mlflow.tracking_uri={uri}",
    ]
    assert (
        main(["--json", "train", *common, "--out", str(tmp_path / "m"), "--set", "train.epochs=2"])
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert (
        main(
            [
                "--json",
                "evaluate",
                *common,
                "--model",
                str(tmp_path / "m" / "model.pt"),
                "--out",
                str(tmp_path / "e"),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(summary["mlflow_run_id"], "val/mean/qwk")
    assert [m.step for m in history] == [1, 2]
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.tags["train_run_id"] == summary["mlflow_run_id"]
    # the headline numbers of both splits, not one metric per sweep scenario x metric
    assert {"test/complete/qwk", "val/mixed/ece", "test/mixed/balanced_accuracy"} <= set(
        run.data.metrics
    )
    assert "test/fundus_missing_at_1/qwk" not in run.data.metrics
    assert len(run.data.metrics) <= 2 * 4 * 6 + 1
    artifacts = {a.path for a in client.list_artifacts(result["mlflow_run_id"], "eval")}
    assert {"eval/metrics.json", "eval/scenarios.json"} <= artifacts
    local = client.download_artifacts(result["mlflow_run_id"], "eval/scenarios.json", str(tmp_path))
    table = json.loads(Path(local).read_text())  # every scenario x every metric, both splits
    assert "fundus_missing@1" in {row[table["columns"].index("scenario")] for row in table["data"]}


# --- what a clinical team asks for: intervals, subgroups, calibration, validation, model card ----


def test_scores_have_bootstrap_intervals(evaluated, tiny_data: TinyData) -> None:
    from rima_core.core.metrics import BOOT_METRICS

    out, _ = evaluated
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores.columns[:7]) == [
        "split", "scenario", "metric", "value", "ci_low", "ci_high", "n_boot"
    ]  # fmt: skip
    scenarios = scenario_names(tiny_data.cfg.missing)
    assert set(scores["split"]) == {"val", "test"}
    assert len(scores) == 2 * len(scenarios) * len(BOOT_METRICS)
    defined = scores.dropna(subset=["value", "ci_low", "ci_high"])
    assert len(defined) >= 0.9 * len(scores)
    # a percentile interval holds its point estimate, except for ECE: binned over resampled
    # eyes it is biased upward (duplicated eyes fill bins unevenly), so a well-calibrated
    # point estimate can lie below the whole interval
    unbiased = defined[defined["metric"] != "ece"]
    assert (unbiased["ci_low"] <= unbiased["value"] + 1e-12).all()
    assert (unbiased["value"] <= unbiased["ci_high"] + 1e-12).all()
    assert (defined["ci_low"] <= defined["ci_high"]).all()
    assert (scores["n_boot"] <= tiny_data.cfg.evaluate.bootstrap).all()
    metrics = json.loads((out / "metrics.json").read_text())
    val_metrics = json.loads((out / "val" / "metrics.json").read_text())
    for split, ref in (("test", metrics), ("val", val_metrics)):
        qwk = scores[(scores["split"] == split) & (scores["metric"] == "qwk")]
        for row in qwk.itertuples():
            expected = ref[row.scenario]["qwk"]
            assert (expected is None and math.isnan(row.value)) or row.value == pytest.approx(
                expected
            )


def test_subgroups_and_equity(evaluated, tiny_data: TinyData) -> None:
    from rima_core.core.metrics import es_auc

    out, _ = evaluated
    sub = pd.read_csv(out / "subgroups.csv", keep_default_na=False, na_values=[""])
    assert list(sub.columns[:7]) == ["scenario", "attribute", "group", "n", "n_classes_present",
                                     "qwk", "auc"]  # fmt: skip
    assert {"race", "gender", "ethnicity"} <= set(sub["attribute"])
    scenarios = scenario_names(tiny_data.cfg.missing)
    assert set(sub["scenario"]) == set(scenarios)
    # every eye in exactly one group of each attribute; small groups kept with their n
    assert (sub.groupby(["scenario", "attribute"])["n"].sum() == 18).all()
    assert (sub["n"] < 5).any()
    equity = pd.read_csv(out / "equity.csv")
    for row in equity.itertuples():
        groups = sub[(sub["scenario"] == row.scenario) & (sub["attribute"] == row.attribute)]
        assert row.n_groups == len(groups)
        expected = es_auc(row.auc, groups["auc"].tolist())
        assert (math.isnan(expected) and math.isnan(row.es_auc)) or row.es_auc == pytest.approx(
            expected
        )
    metrics = json.loads((out / "metrics.json").read_text())
    headline = tiny_data.cfg.promote.scenario
    for attribute in ("race", "gender", "ethnicity"):
        value = equity[(equity["scenario"] == headline) & (equity["attribute"] == attribute)]
        assert metrics[headline][f"es_auc/{attribute}"] == pytest.approx(value["es_auc"].iloc[0])
    assert not any(k.startswith("es_auc/") for k in metrics["complete"])  # headline only
    assert (out / "equity.png").stat().st_size > 0


def test_calibration_before_and_after(evaluated, trained: Path, tiny_data: TinyData) -> None:
    out, _ = evaluated
    _, spec = load_model(trained)
    summary = json.loads((trained.parent / "train_summary.json").read_text())
    assert summary["temperature"] == pytest.approx(spec.temperature)
    assert spec.temperature != 1.0  # fitted on validation at the end of training
    calib = pd.read_csv(out / "calibration.csv")
    assert {"ece_before", "ece_after", "nll_before", "nll_after"} <= set(calib.columns)
    # each scenario's eyes are scaled by their availability pattern's temperature
    assert set(spec.temperatures) == {"complete", "fundus_only", "oct_only"}
    for row in calib.itertuples():
        masks = pd.read_parquet(tiny_data.masks)
        eyes = masks[(masks["split"] == row.split) & (masks["scenario"] == row.scenario)]
        eyes = eyes[eyes["has_fundus"] | eyes["has_oct"]]
        pattern = np.where(
            eyes["has_fundus"] & eyes["has_oct"],
            "complete",
            np.where(eyes["has_fundus"], "fundus_only", "oct_only"),
        )
        expected = np.mean([spec.temperatures[p] for p in pattern])
        assert row.temperature == pytest.approx(expected), row.scenario
    metrics = json.loads((out / "metrics.json").read_text())
    for row in calib[calib["split"] == "test"].itertuples():
        # metrics.json scores the calibrated probabilities
        assert row.ece_after == pytest.approx(metrics[row.scenario]["ece"])
        assert row.nll_after == pytest.approx(metrics[row.scenario]["nll"])
    # the fit minimises NLL over the pooled validation eyes of the selection scenarios
    val = calib[calib["split"] == "val"]
    assert (val["n"] * val["nll_after"]).sum() <= (val["n"] * val["nll_before"]).sum() + 1e-9
    for scenario in scenario_names(tiny_data.cfg.missing):
        assert (out / "reliability" / f"{scenario}.png").stat().st_size > 0


def test_temperature_changes_no_prediction(trained: Path, tiny_data: TinyData) -> None:
    import torch

    from rima_core.core.data.dataset import EyeDataset, make_loader
    from rima_core.core.metrics import classification_metrics
    from rima_core.runs.engine import predict

    model, _ = load_model(trained)
    ds = EyeDataset(tiny_data.store, pd.read_parquet(tiny_data.masks), "val", "mixed")
    loader = make_loader(ds, batch_size=32, shuffle=False, num_workers=0, seed=0)
    cpu = torch.device("cpu")
    calibrated = predict(model, loader, cpu, progress=False)
    raw = predict(model, loader, cpu, progress=False, temperature=1.0)
    assert (calibrated.y_pred == raw.y_pred).all()
    assert not np.allclose(calibrated.proba, raw.proba)
    q = [classification_metrics(p.y_true, p.proba)["qwk"] for p in (calibrated, raw)]
    assert q[0] == q[1] or (math.isnan(q[0]) and math.isnan(q[1]))


@pytest.mark.slow
def test_registered_version_carries_the_model_card(
    evaluated, trained: Path, tiny_data: TinyData, tmp_path: Path, monkeypatch
) -> None:
    import mlflow

    from rima_core.ops import registry
    from tests.servers import mlflow_test_config

    out, _ = evaluated
    cfg = mlflow_test_config(tmp_path, monkeypatch, "rima-card", "rima-card")
    cfg.promote.register_min_metric = -1.0  # a one-epoch model: the card is what is tested
    result = registry.register(trained.parent, out / "metrics.json", cfg, store=tiny_data.store)
    client = mlflow.MlflowClient()
    version = client.get_model_version("rima-card", result["version"])
    card = version.description
    for text in ("# Model card", "store content hash", "normal, early, advanced", "ES-AUC",
                 "| mixed |", "one temperature per availability pattern", "Intended use",
                 "Missing modalities", "no patients", "| grade | n | sensitivity | specificity |",
                 "How to read: QWK"):  # fmt: skip
        assert text in card, text
    assert len(card) <= 5000
    logged = mlflow.artifacts.download_artifacts(
        run_id=result["run_id"], artifact_path="model_card.md", dst_path=str(tmp_path / "dl")
    )
    logged = Path(logged)
    assert logged.read_text().startswith(card.split("\n\n**Promotion")[0][:200])
    # the validation metrics promotion decides on travel with the version
    selection = json.loads(version.tags[registry.TAG_SELECTION])
    val_metrics = json.loads((out / "val" / "metrics.json").read_text())
    assert selection["split"] == "val"
    assert selection["metrics"]["mixed"]["qwk"] == pytest.approx(val_metrics["mixed"]["qwk"])
    assert len(version.tags) <= registry.MAX_VERSION_TAGS
    preds = mlflow.artifacts.download_artifacts(
        artifact_uri=version.tags[registry.TAG_SELECTION_PREDICTIONS],
        dst_path=str(tmp_path / "preds"),
    )
    assert len(pd.read_parquet(preds)) == 18
