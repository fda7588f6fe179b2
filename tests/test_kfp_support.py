"""The glue the Kubeflow components share (config from parameters, data fetch, UI reports)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from rima_core import kfp_support as ks
from rima_core.config import Config, ConfigError, load_config
from tests.servers import S3_ENV, moto_server


def test_resolve_config_layers_params_profile_and_overrides() -> None:
    params = yaml.safe_dump({"train": {"epochs": 7, "lr": 0.01}, "tune": {"n_trials": 5}})
    profile = yaml.safe_dump({"train": {"epochs": 3}})
    cfg = ks.resolve_config(
        params, profile, {"tune.n_trials": 9, "missing.mixed": [0.1, 0.2], "data.disease": "dr"}
    )
    assert cfg.train.epochs == 3  # profile over params
    assert cfg.train.lr == 0.01  # params over defaults
    assert cfg.tune.n_trials == 9  # overrides over both
    assert cfg.missing.mixed == [0.1, 0.2]
    assert cfg.data.disease == "dr"
    # empty texts mean "embedded defaults"
    assert ks.resolve_config("", "").to_dict() == Config().to_dict()


def test_resolve_config_rejects_typos_with_the_schema_message() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        ks.resolve_config(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"section\.key"):
        ks.resolve_config("", "", {"epochs": 3})
    with pytest.raises(ConfigError, match="expected an integer"):
        ks.resolve_config("", "", {"tune.n_trials": "many"})


def test_config_file_round_trips_and_the_secret_storage_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ks.resolve_config("", "", {"tune.storage": "sqlite:///optuna.db", "ot.gw_epsilon": 1e-5})
    path = tmp_path / "config.yaml"
    ks.write_config(cfg, path)
    monkeypatch.delenv(ks.OPTUNA_STORAGE_ENV, raising=False)
    assert load_config(path).to_dict() == cfg.to_dict()
    url = "postgresql://rima:pw@db:5432/optuna"
    monkeypatch.setenv(ks.OPTUNA_STORAGE_ENV, url)
    assert ks.load_task_config(path).tune.storage == url
    assert "pw" not in path.read_text()  # the secret never lands in the artifact


def test_study_name_and_worker_seeds() -> None:
    cfg = Config()
    assert ks.study_name_for_run(cfg, "abc") == f"{cfg.tune.study_name}-abc"
    with pytest.raises(ValueError, match="run id"):
        ks.study_name_for_run(cfg, "")
    seeds = {ks.worker_config(Config(), w).tune.seed for w in range(3)}
    assert len(seeds) == 3
    with pytest.raises(ValueError):
        ks.worker_config(Config(), -1)


def test_artifact_metadata_is_json(tmp_path: Path) -> None:
    meta = ks.artifact_metadata({"store": tmp_path, "classes": ["a", "b"], "n": 3})
    assert meta == {"store": str(tmp_path), "classes": ["a", "b"], "n": 3}


def test_flat_metrics_drops_non_finite_and_flattens() -> None:
    flat = ks.flat_metrics(
        {"mixed": {"qwk": 0.5, "auc": float("nan"), "per_class": {"a": 1}, "note": "x"}, "n": 3}
    )
    assert flat == {"mixed/qwk": 0.5, "mixed/per_class/a": 1.0, "n": 3.0}


def test_primary_metric_names_what_is_missing() -> None:
    metrics = {"mixed": {"qwk": 0.4, "auc": None}}
    assert ks.primary_metric(metrics, "mixed", "qwk") == 0.4
    with pytest.raises(KeyError, match="no scenario 'complete'"):
        ks.primary_metric(metrics, "complete", "qwk")
    with pytest.raises(KeyError, match="no metric 'f1'"):
        ks.primary_metric(metrics, "mixed", "f1")
    with pytest.raises(ValueError, match="cannot gate"):
        ks.primary_metric(metrics, "mixed", "auc")


def test_confusion_matrix_from_the_evaluation_csv(tmp_path: Path) -> None:
    path = tmp_path / "confusion.csv"
    path.write_text("actual,predicted\na,a\na,b\nb,b\nc,a\nc,a\n")
    assert ks.confusion_matrix(path, ["a", "b", "c"]) == [[1, 1, 0], [0, 1, 0], [2, 0, 0]]
    with pytest.raises(ValueError, match=r"confusion.csv:2: class 'a' is not one of"):
        ks.confusion_matrix(path, ["b", "c"])
    bad = tmp_path / "bad.csv"
    bad.write_text("label,pred\n0,1\n")
    with pytest.raises(ValueError, match="actual,predicted"):
        ks.confusion_matrix(bad, ["a"])


def test_reports_render_tables_and_embed_plots(tmp_path: Path) -> None:
    md = ks.summary_markdown("Data validation", {"success": False, "n": 2, "failures": ["x|y"]})
    assert "**FAILED**" in md and "| n | 2 |" in md and "## failures (1)" in md and "- x|y" in md
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    page = ks.html_report(
        "Eval <1>",
        {"scenario": {"mixed": {"qwk": 0.5}, "complete": {"qwk": 0.7, "auc": 0.9}}, "kv": {"a": 1}},
        [png],
    )
    assert "Eval &lt;1&gt;" in page
    assert "<th>mixed</th><td>0.5</td><td></td>" in page  # missing cells stay empty
    assert base64.b64encode(png.read_bytes()).decode() in page


def test_fetch_tree_copies_a_local_directory(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "x.npz").write_bytes(b"123")
    out = tmp_path / "raw"
    summary = ks.fetch_tree(str(src), out)
    assert summary["files"] == 1 and (out / "a" / "x.npz").read_bytes() == b"123"
    assert ks.fetch_tree(src.as_uri(), tmp_path / "raw2")["bytes"] == 3
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ks.fetch_tree(str(tmp_path / "nope"), tmp_path / "raw3")
    with pytest.raises(ConfigError, match="unsupported scheme 'gs'"):
        ks.fetch_tree("gs://bucket/x", tmp_path / "raw4")
    assert not (tmp_path / "raw3").exists()


def test_fetch_tree_downloads_an_s3_prefix_over_http(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    with moto_server(tmp_path / "moto") as server:
        for key, value in S3_ENV.items():
            monkeypatch.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(key, raising=False)
        # the endpoint as a cluster secret gives it to MLflow: MLFLOW_S3_ENDPOINT_URL
        monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", server.url)
        client = boto3.client("s3", endpoint_url=server.url)
        client.create_bucket(Bucket="data")
        client.put_object(Bucket="data", Key="fv/v1/Synthetic/a.npz", Body=b"abc")
        client.put_object(Bucket="data", Key="fv/v1/ReadMe/info.json", Body=json.dumps({}))
        client.put_object(Bucket="data", Key="fv/v10/other.npz", Body=b"not this one")
        out = tmp_path / "raw"
        summary = ks.fetch_tree("s3://data/fv/v1", out)
        assert summary["files"] == 2
        assert (out / "Synthetic" / "a.npz").read_bytes() == b"abc"
        assert not (out / "other.npz").exists()  # prefix v1 does not match v10
        with pytest.raises(FileNotFoundError, match="no objects"):
            ks.fetch_tree("s3://data/missing", tmp_path / "none")
        assert not (tmp_path / "none").exists()


def test_promotion_markdown_is_a_table_not_json() -> None:
    def row(scenario: str, old: float | None, new: float | None, status: str) -> dict:
        gain = None if old is None or new is None else new - old
        return {
            "scenario": scenario,
            "champion": old,
            "challenger": new,
            "improvement": gain,
            "primary": scenario == "mixed",
            "status": status,
        }

    result = {
        "model_name": "rima",
        "challenger": "7",
        "champion_before": "6",
        "metric": "qwk",
        "scenario": "mixed",
        "margin": 0.0,
        "tolerance": 0.02,
        "dry_run": False,
        "table": [
            row("mixed", 0.5, 0.7, "ok"),
            row("oct_missing", 0.6, 0.3, "regressed"),
            row("fundus_missing@0.5", 0.4, None, "not comparable"),
        ],
        "decision": "keep",
        "promoted": False,
        "reason": "oct_missing | regresses",
        "champion_after": "6",
    }
    md = ks.promotion_markdown(result)
    assert "**KEPT the champion** — oct_missing | regresses" in md
    assert "Champion before: v6; after: v6" in md
    assert "| **mixed** (primary) | 0.5 | 0.7 | +0.2000 | ok |" in md
    assert "| oct_missing | 0.6 | 0.3 | -0.3000 | regressed |" in md
    assert "| fundus_missing@0.5 | 0.4 | - | - | not comparable |" in md
    assert "| tolerance | 0.02 |" in md and "| decision | keep |" in md
    assert "{" not in md and "[" not in md  # no JSON
    result.update(dry_run=True, decision="promote", promoted=False, table=[])
    assert "**dry run: would promote**" in ks.promotion_markdown(result)
