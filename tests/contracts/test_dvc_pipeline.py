"""The local pipeline: dvc.yaml against the CLI and the config schema, data.dvc against the
generator, MLproject entry points, and (slow) `dvc repro` end to end in a copy of the repo."""

from __future__ import annotations

import ast
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

from rima_core.config import Config, load_config
from rima_core.pipeline.cli import build_parser
from rima_core.runs.tune import _TRIAL_OVERRIDDEN
from rima_core.tracking.headline import MAX_NUMBERS
from rima_core.tracking.metric_names import not_names
from tests.conftest import mlflow_free_env
from tests.import_graph import closure, imports, module_path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["prepare", "validate", "simulate-missing", "tune", "train", "evaluate", "register"]


def _env() -> dict[str, str]:
    """The venv's `rima` and `dvc` first on PATH; MLflow/Optuna destinations from params only."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return mlflow_free_env(PATH=path, DVC_NO_ANALYTICS="1", GX_ANALYTICS_ENABLED="false")


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
    from rima_core.pipeline.cli import main

    assert main(["params", "overrides", str(ROOT / "configs" / "paper.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert '++model.fundus_encoder="res2net50"' in lines
    assert "++prepare.oct_shape=[96,96,96]" in lines
    assert '++runtime.device="cuda"' in lines


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


def test_mlflow_run_lands_in_the_project_experiment(tmp_path: Path) -> None:
    """`scripts/mlflow_run.sh` = `mlflow run <repo>` against a real MLflow server: the run lands
    in the profile's `mlflow.experiment` (not MLflow's Default), named after the entry point,
    the profile and the seed (not a random name)."""
    import mlflow

    from rima_core.tracking.mlproject import mlflow_run_args
    from tests.servers import mlflow_server

    profile = "configs/tiny.yaml"
    cfg = load_config(ROOT / "params.yaml", ROOT / profile)
    args = ["-e", "synth", "--env-manager", "local", "-P", f"profile={profile}"]
    # what the wrapper adds; options given keep theirs
    assert mlflow_run_args(args)[-4:] == [
        "--experiment-name",
        cfg.mlflow.experiment,
        "--run-name",
        f"synth-tiny-seed{cfg.runtime.seed}",
    ]
    mine = mlflow_run_args([*args, "--experiment-name", "x", "--run-name", "y"])
    assert mine.count("--experiment-name") == 1 and mine.count("--run-name") == 1
    with mlflow_server(tmp_path) as server:
        env = {**_env(), "MLFLOW_TRACKING_URI": server.url}
        out = tmp_path / "raw"
        cmd = [str(ROOT / "scripts" / "mlflow_run.sh"), *args, "-P", f"out={out}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert any(out.iterdir())  # the entry point ran
        client = mlflow.MlflowClient(server.url)
        exp = client.get_experiment_by_name(cfg.mlflow.experiment)
        assert exp is not None, [e.name for e in client.search_experiments()]
        (run,) = client.search_runs([exp.experiment_id])
        assert run.info.run_name == f"synth-tiny-seed{cfg.runtime.seed}"
        assert run.data.tags["mlflow.project.entryPoint"] == "synth"
        assert run.info.status == "FINISHED"
        default = client.get_experiment_by_name("Default")
        assert default is None or not client.search_runs([default.experiment_id])


# --- deps, params and git: complete by construction ------------------------------------------

# The `rima_core` modules each stage's command runs: its `steps` function(s), plus what every
# command loads (the CLI and the config). Imports are followed statically (lazy ones inside
# functions included); the source plug-ins are imported by name at run time.
STAGE_STEPS = {
    "prepare": ["prepare"],
    "validate": ["validate"],
    "simulate-missing": ["simulate_missing"],
    "tune": ["tune"],
    "train": ["train", "apply_best_params"],
    "evaluate": ["evaluate"],
    "register": ["register", "promote"],
}
DYNAMIC_IMPORTS = {"prepare": ["rima_core/core/data/sources"]}

# Config keys that change no stage's outputs: speed, or a path the stage's command names anyway.
NO_EFFECT = {
    "prepare.workers",
    "prepare.store_dir",
    "runtime.num_workers",
    "train.out_dir",
    "tune.out_dir",
    "evaluate.out_dir",
    "missing.masks",
    "validate.report",
    "data.raw_dir",
    # where MLflow runs are logged (tune, train, evaluate log there), not what a stage writes
    "mlflow.tracking_uri",
    "mlflow.experiment",
    "mlflow.artifact_location",
}
# tune: the values a trial sets itself (tune.epochs, the sampled lr, tune's target, no pooling)
OVERRIDDEN = {"tune": {f"train.{key}" for key in _TRIAL_OVERRIDDEN}}


def _stage_modules(stage: str) -> set[str]:
    tree = ast.parse((ROOT / "rima_core" / "pipeline" / "steps.py").read_text())
    functions = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    start = {"rima_core.pipeline.cli", "rima_core.config", "rima_core.pipeline.steps"}
    for name in STAGE_STEPS[stage]:
        start |= imports(functions[name], "rima_core.pipeline.steps")
    return closure(start)


def test_stage_deps_cover_the_code_the_stage_imports() -> None:
    stages = _stages()
    assert set(STAGE_STEPS) == set(stages)
    for name, stage in stages.items():
        deps = [str(d).rstrip("/") for d in stage["deps"]]
        files = [str(module_path(m).relative_to(ROOT)) for m in _stage_modules(name)]
        files += DYNAMIC_IMPORTS.get(name, [])
        missing = [f for f in files if not any(f == d or f.startswith(d + "/") for d in deps)]
        assert not missing, f"stage {name}: deps miss code it runs: {sorted(missing)}"


def test_closure_finds_lazy_imports() -> None:
    """The check above would pass vacuously if lazy imports were missed."""
    modules = _stage_modules("evaluate")
    assert {
        "rima_core.runs.evaluate",
        "rima_core.runs.engine",
        "rima_core.tracking.headline",
    } <= modules
    assert "rima_core.core.data.masks" in _stage_modules("simulate-missing")


def _git_ignored(paths: list[str]) -> set[str]:
    proc = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        cwd=ROOT,
        input="\n".join(paths),
        capture_output=True,
        text=True,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return set(proc.stdout.split())


def test_gitignore_commits_exactly_the_metrics_and_plots() -> None:
    """The `cache: false` metrics/plots files are committed (dvc metrics diff, exp show and plots
    diff read them from git); every other output, and the per-run files beside them, is
    ignored."""
    from rima_core.runs.plots import CONFUSION_FILE, MISSING_RATE_FILE

    cfg = load_config(ROOT / "params.yaml")
    committed, ignored = [], []
    for name, stage in _stages().items():
        for kind in ("outs", "metrics"):
            for entry in stage.get(kind, []):
                path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
                path = _render(path, cfg)
                if opts.get("cache", True):
                    ignored.append(path)
                elif path.endswith("/plots") and name == "evaluate":
                    committed += [f"{path}/{MISSING_RATE_FILE}", f"{path}/{CONFUSION_FILE}"]
                elif kind == "metrics" or path.endswith(".csv"):
                    committed.append(path)
                else:  # uncached, not read by DVC's metrics/plots: e.g. the register receipt
                    ignored.append(path)
    ignored += sorted(NOT_OUTPUTS)
    inside = [f"{p}/file" for p in ignored]  # a folder output: its files (`dir/` patterns)
    hit = _git_ignored(committed + ignored + inside)
    assert not hit & set(committed), f"ignored, but must be committed: {hit & set(committed)}"
    not_ignored = [p for p in ignored if p not in hit and f"{p}/file" not in hit]
    assert not not_ignored, f"must be ignored: {not_ignored}"
    metrics = [p for p in committed if p.endswith("headline.json")]
    assert len(metrics) == 3, committed


def test_plot_definitions_read_committed_files() -> None:
    cfg = load_config(ROOT / "params.yaml")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    files = set()
    for plot in plots:
        assert isinstance(plot, dict), f"{plot}: a PNG drawn by DVC duplicates a CSV chart"
        spec = next(iter(plot.values()))
        files |= {_render(f, cfg) for f in spec["y"]}
    assert not _git_ignored(sorted(files)), files


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


# Files a run writes beside its outputs that are deliberately NOT outputs: they differ between
# two identical runs (wall-clock times, MLflow run ids, registry version records) or only serve
# `rima train --resume`. Any other file a run leaves must be a declared output.
NOT_OUTPUTS = {
    "models/rima/checkpoint.pt",
    "models/rima/timings.csv",
    "models/rima/timings.json",
    "models/rima/mlflow_run.json",
    "reports/tune/timings.csv",
    "reports/register.json",
    "reports/promotion.json",
    # written only by some runs, and DVC has no optional outputs: models with translators,
    # stores with demographic attributes
    "models/rima/alignment.json",
    "reports/eval/equity.png",
}


LONG = 3600  # seconds a whole `dvc repro` may take on a busy 2-core machine


def _declared_outputs(repo: Path) -> set[str]:
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {
            str(Path(out.fs_path).relative_to(repo))
            for stage in dvc_repo.index.stages
            for out in stage.outs
        }


def _undeclared(repo: Path, declared: set[str]) -> list[str]:
    found = []
    for top in ("models", "reports"):
        for path in sorted((repo / top).rglob("*")):
            rel = str(path.relative_to(repo))
            if not path.is_file() or rel in NOT_OUTPUTS:
                continue
            if not any(rel == d or rel.startswith(d + "/") for d in declared):
                found.append(rel)
    return found


def _errors(node: object, where: str = "") -> list[str]:
    """Every non-empty ``error`` entry in DVC's JSON output (a '!' cell in the table)."""
    out: list[str] = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("error", "errors") and value:
                out.append(f"{where}: {value}")
            else:
                out += _errors(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _errors(value, f"{where}[{i}]")
    return out


def _numbers(node: object) -> list[object]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _numbers(v)]
    return [node]


def _json(args: list[str], cwd: Path) -> object:
    """A DVC command's JSON answer (stdout); what it says on stderr about revisions it could not
    load is an error too."""
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{shlex.join(args)} failed:\n{proc.stderr[-4000:]}"
    assert "failed to load" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def _git_clean(repo: Path, after: str) -> None:
    status = _run(["git", "status", "--porcelain", "--untracked-files=all"], repo)
    assert status.strip() == "", f"after {after}, the git tree is not clean:\n{status}"


def _tiny_repo(tmp_path: Path) -> tuple[Path, Config]:
    """A fresh copy of the working tree as a git + DVC repository on the tiny settings, all
    committed (the baseline an experiment runs from); returns it and its config."""
    repo = tmp_path / "repo"
    _copy_worktree(repo)
    # the tiny profile (2 tuning trials, 1 epoch), written into the copy's params.yaml (DVC
    # tracks params.yaml's values)
    cfg = load_config(
        repo / "params.yaml",
        repo / "configs" / "tiny.yaml",
        # a 1-epoch model may grade at chance: register it anyway (the gate has its own tests)
        [
            "tune.n_trials=2",
            "tune.epochs=1",
            "train.epochs=1",
            # without warm-up, epoch 1 already depends on train.epochs (the lr schedule), so the
            # experiment below yields a new model even when it selects epoch 1 again (an
            # identical model.pt would rightly not rerun evaluate)
            "train.warmup_epochs=0",
            "evaluate.bootstrap=50",
            "promote.register_min_metric=-1",
        ],
    )
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    _run(["git", "init", "-q"], repo)
    # tiny data is not the committed default: record it the way a user swaps in new data
    _run(["rima", "data", "synth", "--out", "data/raw"], repo)
    _run(["dvc", "commit", "-f", "-q", "data.dvc"], repo)
    _git_commit(repo, "tiny")
    return repo, cfg


@pytest.mark.slow
def test_dvc_repro_end_to_end(tmp_path: Path) -> None:
    """`dvc repro` on a fresh copy; the tree stays clean when nothing changed (even when stages
    are forced to rerun: no timing or run id in any tracked output); the headline metrics are
    few; an experiment compares with the committed baseline without errors."""
    repo, cfg = _tiny_repo(tmp_path)

    first = _run(["dvc", "repro"], repo, timeout=LONG)
    assert _ran(first) == STAGES
    for rel in [
        "data/store/tensors.arrow",
        "data/store/manifest.parquet",
        "reports/validation.json",
        "data/masks.parquet",
        "reports/tune/best_params.json",
        "reports/tune/study.json",
        "reports/tune/trials.csv",
        "reports/tune/headline.json",
        "models/rima/model.pt",
        "models/rima/history.csv",
        "models/rima/headline.json",
        "reports/eval/metrics.json",
        "reports/eval/headline.json",
        "reports/eval/plots/missing_rate.csv",
        "reports/eval/plots/confusion.csv",
        "reports/register.json",
        "reports/promotion.json",
        "reports/registered_model.json",
        "dvc.lock",
    ]:
        assert (repo / rel).is_file(), rel
    assert _undeclared(repo, _declared_outputs(repo)) == []
    from rima_core.core.data.masks import scenario_names

    metrics = json.loads((repo / "reports/eval/metrics.json").read_text())
    assert set(scenario_names(cfg.missing)) <= set(metrics)
    from rima_core.runs.tune import search_space

    best = json.loads((repo / "reports/tune/best_params.json").read_text())
    assert set(best) == set(search_space(cfg.tune)) and "ot.pairing_mix" in best
    assert json.loads(_run(["dvc", "status", "--json"], repo)) == {}

    # the metrics DVC shows: a few dozen numbers, nothing else
    shown = _json(["dvc", "metrics", "show", "--json"], repo)
    files = shown[""]["data"]  # type: ignore[index]
    assert set(files) == {
        "reports/eval/headline.json",
        "models/rima/headline.json",
        "reports/tune/headline.json",
    }
    values = [x for f in files.values() for x in _numbers(f["data"])]
    assert all(x is None or type(x) in (int, float) for x in values), values
    assert len(values) <= MAX_NUMBERS, f"dvc metrics show has {len(values)} numbers"
    # its columns are the scheme's names (flat keys), as in MLflow, the registry and Kubeflow
    columns = [k for f in files.values() for k in f["data"]]
    assert not not_names(columns), columns
    assert {"test/complete/qwk", "train/best_epoch", "tune/best_value"} <= set(columns)

    # the metrics and plot files are committed; git then has nothing else to add
    _git_commit(repo, "pipeline run")
    tracked = _run(["git", "ls-files", "reports", "models"], repo).split()
    assert "reports/eval/headline.json" in tracked
    assert "models/rima/history.csv" in tracked
    assert not [f for f in tracked if f.endswith((".pt", ".parquet", ".png"))], tracked

    # nothing changed: nothing runs, nothing changes
    assert _ran(_run(["dvc", "repro"], repo, timeout=LONG)) == []
    _git_clean(repo, "a second dvc repro")
    # forced reruns of the stages with wall-clock times or run ids produce identical outputs
    # (tune's reports: tests/e2e/test_tune.py, which reruns a whole study much faster)
    for stage in ["train", "evaluate", "register"]:
        _run(["dvc", "repro", "-f", "-s", stage], repo, timeout=LONG)
    _git_clean(repo, "forced reruns of train, evaluate and register")

    # one training param changed, as an experiment: only train and what follows it rerun
    exp = _run(["dvc", "exp", "run", "-S", "train.epochs=2"], repo, timeout=LONG)
    assert _ran(exp) == ["train", "evaluate", "register"]
    import pandas as pd

    assert len(pd.read_csv(repo / "models/rima/history.csv")) == 2  # trained with epochs=2

    table = _json(["dvc", "exp", "show", "--json"], repo)
    assert isinstance(table, list)
    assert _errors(table) == []
    entries = [*table]  # the workspace and the baseline commit, then the experiments
    for row in table:
        for group in row.get("experiments") or []:
            entries += group.get("revs", [])
    assert len(entries) >= 3, table
    for entry in entries:
        assert "reports/eval/headline.json" in entry["data"]["metrics"], entry
        assert "models/rima/headline.json" in entry["data"]["metrics"], entry
    diff = _json(["dvc", "metrics", "diff", "--json"], repo)
    assert isinstance(diff, dict)
    assert _errors(diff) == []
    diff = diff.get("diff", diff)
    assert not not_names(k for f in diff.values() for k in f), diff
    eval_diff = diff.get("reports/eval/headline.json", {})
    assert all(v.get("old") is not None for v in eval_diff.values()), eval_diff
    plots = _json(["dvc", "plots", "diff", "--json", "HEAD"], repo)
    assert isinstance(plots, dict)
    assert _errors(plots) == []
    assert {
        "qwk vs missing rate (test)",
        "auc vs missing rate (test)",
        "confusion matrix (test, mixed)",
        "training loss",
        "validation metrics",
        "tuning trials",
    } <= set(plots["data"])

    # a temporary experiment runs in a copy under .dvc/tmp/exps: its MLflow runs and registry
    # version land in the workspace's database, tagged with the experiment's name
    import sqlite3

    versions_before = (
        sqlite3.connect(repo / "mlflow.db")
        .execute("SELECT COUNT(*) FROM model_versions")
        .fetchone()[0]
    )
    _run(
        ["dvc", "exp", "run", "--temp", "-n", "temp-exp", "-S", "train.epochs=3"],
        repo,
        timeout=LONG,
    )
    assert "temp-exp" in _tagged_runs(repo)
    versions_after = (
        sqlite3.connect(repo / "mlflow.db")
        .execute("SELECT COUNT(*) FROM model_versions")
        .fetchone()[0]
    )
    assert versions_after == versions_before + 1


def _tagged_runs(repo: Path) -> set[str]:
    """The DVC experiment names the MLflow runs in the workspace's database are tagged with."""
    import sqlite3

    if not (repo / "mlflow.db").is_file():
        return set()
    con = sqlite3.connect(repo / "mlflow.db")
    try:
        rows = con.execute("SELECT value FROM tags WHERE key = 'dvc.exp_name'").fetchall()
    finally:
        con.close()
    return {r[0] for r in rows}


@pytest.mark.slow
def test_dvc_queued_experiment_end_to_end(tmp_path: Path) -> None:
    """`dvc exp run --queue` + `dvc queue start`: the experiment runs later, in a Celery worker
    DVC starts, in a copy under .dvc/tmp/exps; like a --temp one (test_dvc_repro_end_to_end),
    its MLflow runs must land in the workspace's database tagged with its name, not in the copy
    that is deleted afterwards."""
    import time

    repo, _ = _tiny_repo(tmp_path)
    name = "queued-exp"
    _run(["dvc", "exp", "run", "--queue", "-n", name, "-S", "train.epochs=1"], repo)
    assert name in _run(["dvc", "queue", "status"], repo)  # queued, nothing ran yet
    assert _tagged_runs(repo) == set()
    try:
        _run(["dvc", "queue", "start", "-j", "1"], repo)
        deadline = time.monotonic() + LONG
        while True:
            status = _run(["dvc", "queue", "status"], repo)
            task = next((line for line in status.splitlines() if f" {name} " in line), "")
            if not any(s in task for s in ("Queued", "Running")):
                break
            assert time.monotonic() < deadline, f"the queued experiment did not finish:\n{status}"
            time.sleep(5)
        logs = subprocess.run(
            ["dvc", "queue", "logs", name], cwd=repo, env=_env(), capture_output=True, text=True
        )
        assert "Success" in task, f"{status}\n{(logs.stdout + logs.stderr)[-4000:]}"
    finally:  # never leave a worker behind, also when the test fails
        subprocess.run(
            ["dvc", "queue", "stop", "--kill"], cwd=repo, env=_env(), capture_output=True
        )
    assert _ran(logs.stdout) == STAGES  # the whole pipeline, from the committed baseline
    assert name in _tagged_runs(repo)
    import sqlite3

    con = sqlite3.connect(repo / "mlflow.db")
    try:
        versions = con.execute("SELECT COUNT(*) FROM model_versions").fetchone()[0]
    finally:
        con.close()
    assert versions == 1  # its registry version too
    # and the experiment is a DVC experiment of the baseline, with its parameter
    table = _json(["dvc", "exp", "show", "--json"], repo)
    assert _errors(table) == []
    assert name in json.dumps(table)
