"""The local pipeline: dvc.yaml against the CLI and the config schema, data.dvc against the
generator, MLproject entry points, and (slow) `dvc repro` end to end in a copy of the repo."""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rima_core.cli import build_parser
from rima_core.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "validate", "simulate-missing", "tune", "train", "evaluate", "register"]


def _env() -> dict[str, str]:
    """The venv's `rima` and `dvc` first on PATH; MLflow/Optuna destinations from params only."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(DVC_NO_ANALYTICS="1", GX_ANALYTICS_ENABLED="false")
    for key in [k for k in env if k.startswith("MLFLOW_")]:  # e.g. an experiment id set by
        env.pop(key)  # an earlier test's MLflow run would point at another store
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


def _run(args: list[str], cwd: Path, timeout: float = 900) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{shlex.join(args)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _render(text: str, cfg: Config) -> str:
    """DVC's ${section.key} templating, from the config."""
    flat = cfg.flat()
    return re.sub(r"\$\{([a-z_]+\.[a-z_]+)\}", lambda m: str(flat[m.group(1)]), text)


# --- fast: the files agree with the code ---------------------------------------------------------


def test_dvc_stages_form_the_pipeline_in_order() -> None:
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph
        edges = {(a.addressing, b.addressing) for a, b in graph.edges()}
    assert list(_stages()) == STAGES
    chain = ["data.dvc", *STAGES]
    for upstream, downstream in itertools.pairwise(chain):
        assert (downstream, upstream) in edges, f"{downstream} does not depend on {upstream}"


def test_every_stage_command_parses_with_the_cli() -> None:
    cfg = load_config(ROOT / "params.yaml")
    parser = build_parser()
    for name, stage in _stages().items():
        cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
        for cmd in cmds:
            argv = shlex.split(_render(cmd, cfg))
            assert argv[0] == "rima", f"{name}: stages call the rima CLI"
            parser.parse_args(argv[1:])  # SystemExit on an unknown option


def test_stage_params_exist_in_the_schema() -> None:
    cfg = load_config(ROOT / "params.yaml")
    keys = set(cfg.flat()) | set(cfg.to_dict())
    for name, stage in _stages().items():
        unknown = [p for p in stage.get("params", []) if p not in keys]
        assert not unknown, f"stage {name}: params {unknown} are not in the config schema"


def test_params_yaml_holds_every_key_and_profiles_are_valid() -> None:
    """params.yaml is the single source: it spells out every key the schema has."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    flat_file = {f"{s}.{k}" for s, values in raw.items() for k in values}
    assert flat_file == set(Config().flat())
    for profile in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(ROOT / "params.yaml", profile)  # unknown keys raise


def test_profile_overrides_for_dvc_exp_run(capsys: pytest.CaptureFixture[str]) -> None:
    from rima_core.cli import main

    assert main(["params", "overrides", str(ROOT / "configs" / "paper.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert '++model.fundus_encoder="res2net50"' in lines
    assert "++prepare.oct_shape=[96,96,96]" in lines
    assert '++train.device="cuda"' in lines


def test_mlproject_entry_points_call_the_cli() -> None:
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    parser = build_parser()
    points = spec["entry_points"]
    assert {
        "main",
        "prepare",
        "validate",
        "simulate_missing",
        "tune",
        "train",
        "evaluate",
        "register",
    } <= set(points)
    assert "scripts/run_pipeline.sh" in points["main"]["command"]
    for name, point in points.items():
        if name == "main":
            continue
        defaults = {k: v["default"] for k, v in point.get("parameters", {}).items()}
        argv = shlex.split(point["command"].format(**defaults))
        assert argv[0] == "rima", name
        parser.parse_args(argv[1:])


def test_data_dvc_matches_the_generator(tmp_path: Path) -> None:
    """The committed data.dvc hash is the default synthetic data's: a fresh clone regenerates
    exactly what data.dvc records (the README's main command checks the same)."""
    recorded = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    assert recorded["path"] == load_config(ROOT / "params.yaml").data.raw_dir
    _run(["dvc", "init", "--no-scm", "-q"], tmp_path)
    shutil.copy(ROOT / "data.dvc", tmp_path / "data.dvc")
    _run(
        ["rima", "data", "synth", "--params", str(ROOT / "params.yaml"), "--out", "data/raw"],
        tmp_path,
    )
    _run(["dvc", "commit", "-f", "-q", "data.dvc"], tmp_path)
    found = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    assert found["md5"] == recorded["md5"], (
        "data.dvc is stale: the synthetic generator's default output changed. Record the new "
        "version: rm -rf data/raw && rima data synth --out data/raw && dvc commit -f data.dvc"
    )


def test_mlflow_run_entry_point(tiny_data, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`mlflow run . -e <step> --env-manager local` runs the step inside the project's run."""
    env = _env()
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "masks.parquet"
    args = [
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "simulate_missing",
        "--env-manager",
        "local",
        "-P",
        f"store={tiny_data.store}",
        "-P",
        f"out={out}",
        "-P",
        "set=missing.seed=3",
    ]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--set missing.seed=3" in proc.stderr
    import pandas as pd

    assert len(pd.read_parquet(out)) > 0


# --- slow: dvc repro end to end ------------------------------------------------------------------


def _copy_worktree(dest: Path) -> None:
    """What a clone of the current working tree would hold: tracked and not-ignored files."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _git_commit(repo: Path, message: str) -> None:
    _run(["git", "add", "-A"], repo)
    _run(
        [
            "git",
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.com",
            "commit",
            "-q",
            "-m",
            message,
        ],
        repo,
    )


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _copy_worktree(repo)
    # the tiny profile, written into the copy's params.yaml (DVC tracks params.yaml's values)
    cfg = load_config(repo / "params.yaml", repo / "configs" / "tiny.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    # tiny data is not the committed default: record it the way a user swaps in new data
    _run(["rima", "data", "synth", "--out", "data/raw"], repo)
    _run(["dvc", "commit", "-f", "-q", "data.dvc"], repo)
    _git_commit(repo, "tiny")

    first = _run(["dvc", "repro"], repo)
    assert _ran(first) == STAGES
    for rel in [
        "data/store/tensors.arrow",
        "data/store/manifest.parquet",
        "reports/validation.json",
        "data/masks.parquet",
        "reports/tune/best_params.json",
        "reports/tune/study.json",
        "reports/tune/trials.csv",
        "models/rima/model.pt",
        "models/rima/history.csv",
        "reports/eval/metrics.json",
        "reports/eval/rate_curve.csv",
        "reports/eval/confusion.csv",
        "reports/register.json",
        "reports/promotion.json",
        "dvc.lock",
    ]:
        assert (repo / rel).is_file(), rel
    from rima_core.data.masks import scenario_names

    metrics = json.loads((repo / "reports/eval/metrics.json").read_text())
    assert set(metrics) == set(scenario_names(cfg.missing))
    assert set(json.loads((repo / "reports/tune/best_params.json").read_text())) == {
        "ot.gw_epsilon",
        "ot.feature_epsilon",
        "ot.loss_weight",
        "train.lr",
    }
    assert json.loads(_run(["dvc", "status", "--json"], repo)) == {}

    # nothing changed: nothing runs
    assert _ran(_run(["dvc", "repro"], repo)) == []
    _git_commit(repo, "lock")

    # one training param changed, as an experiment: only train and what follows it rerun
    exp = _run(["dvc", "exp", "run", "-S", "train.epochs=1"], repo)
    assert _ran(exp) == ["train", "evaluate", "register"]
    import pandas as pd

    assert len(pd.read_csv(repo / "models/rima/history.csv")) == 1  # trained with epochs=1

    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo))
    files = next(iter(shown.values()))["data"]
    assert {
        "reports/eval/metrics.json",
        "reports/validation.json",
        "reports/tune/study.json",
    } <= set(files)
    plots = json.loads(_run(["dvc", "plots", "show", "--json"], repo))["data"]
    assert {
        "metric vs missing rate (test)",
        "confusion matrix (test, mixed)",
        "training loss",
        "validation metrics",
    } <= set(plots)
