"""The missing-modality benchmark end to end on a tiny grid: data, the oracle, a sweep of two
learning rates, selection, the report files, and resumption from the committed state."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks.missing_modality import STATE_FILE

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> None:
    """The benchmark's command line in its own process: it sets torch's thread count and the
    logging levels of the process it runs in, which must not leak into other tests."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "missing_modality.py"), *argv],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_tiny_grid_runs_reports_and_resumes(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "out"
    argv = [
        "--smoke",
        "--grid", "quick",
        "--training", "complete",
        "--methods", "rima", "fundus_only",
        "--lr-factors", "0.5", "1",
        "--jobs", "1",
        "--work", str(work),
        "--out", str(out),
    ]  # fmt: skip
    main(argv)
    long = pd.read_csv(out / "missing_modality_long.csv")
    assert set(long["method"]) == {"oracle", "rima", "fundus_only"}
    assert list(long.columns) == [
        "regime", "training", "setting", "method", "seed", "scenario", "metric", "value",
    ]  # fmt: skip
    oracle = long[(long["method"] == "oracle") & (long["metric"] == "qwk")]
    assert set(oracle["scenario"]) >= {"complete", "fundus_missing", "oct_missing", "mixed"}
    assert oracle["value"].between(-1, 1).all()
    assert {"ece", "ece_lo", "ece_hi", "nll", "qwk_ordinal"} <= set(long["metric"])
    runs = pd.read_csv(out / "missing_modality_runs.csv")
    # every candidate of the sweep ran; one per (method, seed) is kept
    from benchmarks.bench_grid import variants

    for method, g in runs.groupby("method"):  # rima's own knob (ot.pairing_mix) besides the lr
        assert set(g["variant"]) == {v.name for v in variants(method, 1e-3, (0.5, 1.0))}
    assert set(runs[runs["method"] == "rima"]["variant"]) > {"lr0.5", "lr1"}
    assert runs.groupby(["method", "seed"])["selected"].sum().eq(1).all()
    report = (out / "missing_modality.md").read_text()
    assert "How far from the ceiling" in report and "oracle" in report
    state = [json.loads(line) for line in (out / STATE_FILE).read_text().splitlines()]
    assert len(state) == 1 + len(runs) == 1 + 4 + 2 and len({r["protocol"] for r in state}) == 1

    # a new machine: the work folder is gone, the committed state is not -> nothing re-runs
    fresh = tmp_path / "work2"
    main([*argv[:-4], "--work", str(fresh), "--out", str(out)])
    results = next(fresh.rglob("results.jsonl")).read_text().splitlines()
    assert len(results) == len(state)
    assert not list(fresh.rglob("model.pt"))  # no training run started
