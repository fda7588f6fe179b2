"""The GPU check runs end to end on a CPU at tiny sizes, without the packages the GPU machine lacks.

``benchmarks/gpu_check.py`` is prepared here and run on a borrowed GPU only now and then; this
test keeps it from rotting while the model, OT, engine and evaluation change under it. Its own
timings mean nothing here; what is checked is that every part runs to ``ok`` through the project's
public functions (the same code path the GPU run takes, AMP's bf16 autocast included), writes its
results, and passes its own quality checks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.contracts.test_import_isolation import ROOT, blocked_env


@pytest.mark.slow  # ~1-2 min on 2 idle cores: Res2Net-50 + ResNet-10 steps, 3 tiny trainings
def test_gpu_check_runs_on_cpu_at_tiny_sizes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = blocked_env(tmp_path)
    env.pop("OUT", None)
    # a generous budget: a loaded shared machine must not turn a working check into a timeout
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--tiny",
           "--out", str(out), "--budget", "3000"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3300)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + log[-5000:]

    res = json.loads((out / "gpu_check.json").read_text())
    md = (out / "gpu_check.md").read_text()
    assert res["status"] == "ok"
    parts = res["parts"]
    assert set(parts) == {"paper_train", "ot", "engine", "compile"}
    for name, part in parts.items():
        assert part["status"] == "ok", (name, part.get("error"), part.get("failed_checks"))
        assert f"## {name}" in md
        # the blocker reached the part's own process: none of the absent packages was importable
        assert not any(part["absent_packages_importable"].values()), name
    assert not any(res["machine"]["absent_packages_importable"].values())

    train = parts["paper_train"]
    assert train["model"]["fundus_encoder"] == "res2net50"
    assert train["model"]["oct_encoder"] == "resnet10_3d"
    for variant, dtype in (("amp", "bfloat16"), ("fp32", None)):
        v = train["variants"][variant]
        assert v["amp_dtype"] == dtype
        assert v["eyes_per_s"] > 0 and v["loss_finite"] and v["peak_rss_mb"] > 0

    ot = parts["ot"]
    assert ot["checks"]["zero_cross_label_mass"] and ot["checks"]["gw_marginals"]
    assert ot["quality"]["gw_fundus_to_oct"]["cross_label_mass"] == 0.0

    engine = parts["engine"]
    assert engine["checks"]["resume_continued_at_epoch_3"]
    assert engine["checks"]["every_scenario_evaluated"]
    assert engine["train_summary"]["device"] == "cpu"
    # the engine promises bit-identical CPU runs across an interrupt + resume
    assert engine["checks"].get("resume_identical_on_cpu") is True, engine["resume_comparison"]

    compiled = parts["compile"]["variants"]
    assert compiled["eager"]["eyes_per_s"] > 0
    for name in ("compiled_encoders", "compiled_model"):
        # either measured or skipped with the reason: never silently missing
        assert "eyes_per_s" in compiled[name] or compiled[name].get("skipped"), compiled[name]


def test_gpu_check_help_and_default_output(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import gpu_check

    monkeypatch.delenv("OUT", raising=False)
    assert gpu_check.parse_args([]).out == ROOT / "benchmarks" / "results" / "gpu_check"
    monkeypatch.setenv("OUT", "/tmp/elsewhere")
    args = gpu_check.parse_args(["--device", "cpu"])
    assert args.out == Path("/tmp/elsewhere") and args.device == "cpu"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "tpu"])
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "--tiny" in proc.stdout
