"""Step results as the Kubeflow UI shows them (metadata, metrics, Markdown, HTML, confusion)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from rima_core.pipeline import reports


def test_artifact_metadata_is_json(tmp_path: Path) -> None:
    meta = reports.artifact_metadata({"store": tmp_path, "classes": ["a", "b"], "n": 3})
    assert meta == {"store": str(tmp_path), "classes": ["a", "b"], "n": 3}


def test_flat_metrics_drops_non_finite_and_flattens() -> None:
    flat = reports.flat_metrics(
        {"mixed": {"qwk": 0.5, "auc": float("nan"), "per_class": {"a": 1}, "note": "x"}, "n": 3}
    )
    assert flat == {"mixed/qwk": 0.5, "mixed/per_class/a": 1.0, "n": 3.0}


def test_primary_metric_names_what_is_missing() -> None:
    metrics = {"mixed": {"qwk": 0.4, "auc": None}}
    assert reports.primary_metric(metrics, "mixed", "qwk") == 0.4
    with pytest.raises(KeyError, match="no scenario 'complete'"):
        reports.primary_metric(metrics, "complete", "qwk")
    with pytest.raises(KeyError, match="no metric 'f1'"):
        reports.primary_metric(metrics, "mixed", "f1")
    with pytest.raises(ValueError, match="cannot gate"):
        reports.primary_metric(metrics, "mixed", "auc")


def test_confusion_matrix_from_the_evaluation_csv(tmp_path: Path) -> None:
    path = tmp_path / "confusion.csv"
    path.write_text("actual,predicted\na,a\na,b\nb,b\nc,a\nc,a\n")
    assert reports.confusion_matrix(path, ["a", "b", "c"]) == [[1, 1, 0], [0, 1, 0], [2, 0, 0]]
    with pytest.raises(ValueError, match=r"confusion.csv:2: class 'a' is not one of"):
        reports.confusion_matrix(path, ["b", "c"])
    bad = tmp_path / "bad.csv"
    bad.write_text("label,pred\n0,1\n")
    with pytest.raises(ValueError, match="actual,predicted"):
        reports.confusion_matrix(bad, ["a"])


def test_reports_render_tables_and_embed_plots(tmp_path: Path) -> None:
    md = reports.summary_markdown(
        "Data validation", {"success": False, "n": 2, "failures": ["x|y"]}
    )
    assert "**FAILED**" in md and "| n | 2 |" in md and "## failures (1)" in md and "- x|y" in md
    png = tmp_path / "curve.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\nfake")
    page = reports.html_report(
        "Eval <1>",
        {"scenario": {"mixed": {"qwk": 0.5}, "complete": {"qwk": 0.7, "auc": 0.9}}, "kv": {"a": 1}},
        [png],
    )
    assert "Eval &lt;1&gt;" in page
    assert "<th>mixed</th><td>0.5</td><td></td>" in page  # missing cells stay empty
    assert base64.b64encode(png.read_bytes()).decode() in page


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
    md = reports.promotion_markdown(result)
    assert "**KEPT the champion** — oct_missing | regresses" in md
    assert "Champion before: v6; after: v6" in md
    assert "| **mixed** (primary) | 0.5 | 0.7 | +0.2000 | ok |" in md
    assert "| oct_missing | 0.6 | 0.3 | -0.3000 | regressed |" in md
    assert "| fundus_missing@0.5 | 0.4 | - | - | not comparable |" in md
    assert "| tolerance | 0.02 |" in md and "| decision | keep |" in md
    assert "{" not in md and "[" not in md  # no JSON
    result.update(dry_run=True, decision="promote", promoted=False, table=[])
    assert "**dry run: would promote**" in reports.promotion_markdown(result)
