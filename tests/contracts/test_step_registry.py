"""The step table (``rima_core.pipeline.step_registry.STEPS``) and what is made from it or checked
against it.

Generated from the table: the ``rima`` step commands, the ``MLproject`` file and the Kubeflow
tasks' settings; checked against it: ``dvc.yaml`` (written by hand), the component functions
and the compiled pipeline. Adding a step touches the table, its function in
``rima_core.pipeline.steps``
and its test; the last test here shows that is enough for the CLI and MLproject. Deliberate
exceptions are stated in the table (``why``, ``KFP_ONLY_TASKS``, ``MLPROJECT_ONLY_ENTRIES``,
``NON_STEP_COMMANDS``), not here.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import EXIT_TASK, STEP_FUNCTIONS, TASK_NAMES
from components.tasks import FUNCTIONS
from rima_core.pipeline import mlproject_file, step_registry, steps
from rima_core.pipeline.cli import HANDLERS, build_parser, main
from rima_core.pipeline.step_registry import (
    NON_STEP_COMMANDS,
    STEPS,
    Option,
    Step,
    kfp_task_names,
    kfp_task_steps,
)

ROOT = Path(__file__).resolve().parents[2]


def _words(cmd: str) -> str:
    return " ".join(cmd.split())


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command(words: tuple[str, ...]) -> argparse.ArgumentParser | None:
    parser: Any = build_parser()
    for word in words:
        parser = _subparsers(parser).get(word)
        if parser is None:
            return None
    return parser


def test_every_step_is_a_function_of_rima_core_steps() -> None:
    names = [s.name for s in STEPS]
    assert len(names) == len(set(names)), "a step is registered twice"
    missing = [s.function for s in STEPS if not callable(getattr(steps, s.function, None))]
    assert not missing, f"registered steps without a rima_core.pipeline.steps function: {missing}"
    for s in STEPS:
        left_out = s.dvc_stage is None or s.mlproject is None or not s.kfp_tasks
        assert s.why or not left_out, f"step {s.name}: an orchestrator leaves it out; say why"
    tasks = kfp_task_names()
    assert len(tasks) == len(set(tasks)), "a Kubeflow task is in the table twice"


def test_cli_has_a_command_per_step_and_no_stray_commands() -> None:
    top = _subparsers(build_parser())
    problems = [
        f"step {s.name}: no `rima {' '.join(s.command)}` command"
        for s in STEPS
        if _command(s.command) is None
    ]
    heads = {s.command[0] for s in STEPS}
    problems += [
        f"`rima {name}` runs no registered step (register it or add it to NON_STEP_COMMANDS)"
        for name in top
        if name not in heads and name not in NON_STEP_COMMANDS
    ]
    stray = sorted(set(HANDLERS) - {s.name for s in STEPS})
    problems += [f"rima_core.pipeline.cli.HANDLERS[{n!r}] is no registered step" for n in stray]
    assert not problems, "\n".join(problems)


def test_dvc_stages_and_commands_are_the_tables() -> None:
    """dvc.yaml is written by hand; its stages and their commands must be the table's: each
    stage runs ``rima <command> <dvc_args>`` of its steps, in the table's order."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    got = {
        name: [_words(c) for c in ([s["cmd"]] if isinstance(s["cmd"], str) else s["cmd"])]
        for name, s in stages.items()
    }
    want: dict[str, list[str]] = {}
    for s in STEPS:
        if s.dvc_stage is not None:
            want.setdefault(s.dvc_stage, []).append(
                _words(" ".join(("rima", *s.command, s.dvc_args)))
            )
    problems = [f"dvc.yaml lacks stage {n!r}: {want[n]}" for n in want if n not in got]
    problems += [f"dvc.yaml stage {n!r} runs no registered step" for n in got if n not in want]
    for name in sorted(set(got) & set(want)):
        if got[name] != want[name]:
            problems.append(f"stage {name}:\n  dvc.yaml: {got[name]}\n  table:    {want[name]}")
    assert not problems, "\n".join(problems)


def test_dvc_stages_depend_on_the_library() -> None:
    """Deps complete by construction: every stage depends on the whole package."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    lacking = [name for name, stage in stages.items() if "rima_core" not in stage.get("deps", [])]
    assert not lacking, f"stages whose deps lack the rima_core package: {lacking}"


def test_checked_in_mlproject_is_the_generated_one() -> None:
    text = (ROOT / "MLproject").read_text()
    assert text == mlproject_file.render(), (
        "MLproject differs from the step table: run `python -m rima_core.pipeline.mlproject_file`"
    )


def test_mlproject_writer_checks_and_writes(tmp_path: Path) -> None:
    target = tmp_path / "MLproject"
    assert mlproject_file.main(["--out", str(target), "--check"]) == 1  # missing
    assert mlproject_file.main(["--out", str(target)]) == 0
    assert target.read_text() == mlproject_file.render()
    assert mlproject_file.main(["--out", str(target), "--check"]) == 0
    target.write_text(target.read_text().replace("rima train", "rima trian"))
    assert mlproject_file.main(["--out", str(target), "--check"]) == 1


def test_components_are_the_registered_tasks() -> None:
    """Every task of the table has a component function calling its step, and no component
    function is left over from a task the table no longer has."""
    want = kfp_task_steps()
    stale = set(FUNCTIONS) - set(want) - {EXIT_TASK.name}
    assert not stale, f"components.tasks.FUNCTIONS has functions of no task: {sorted(stale)}"
    for task, step_name in want.items():
        if step_name is None:
            continue
        function = step_registry.step(step_name).function
        source = inspect.getsource(STEP_FUNCTIONS[task])
        assert f"steps.{function}(" in source, f"component {task} must call steps.{function}"


def test_task_settings_come_from_the_table() -> None:
    """components.tasks adds only the function to each row of the step table."""
    from components.tasks import TASKS

    table = {t.name: t for t in step_registry.kfp_tasks()}
    for task in TASKS:
        spec = table[task.name]
        assert (task.cached, task.retries, task.gpu, task.secret_env, task.resources) == (
            spec.cached,
            spec.retries,
            spec.gpu,
            spec.secret_env,
            spec.resources,
        ), task.name
    assert EXIT_TASK.timeout_s == step_registry.KFP_EXIT_TASK.timeout_s


@pytest.fixture(scope="module")
def compiled_tasks(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    from kfp import compiler

    from pipelines.rima_pipeline import build_pipeline

    package = tmp_path_factory.mktemp("registry") / "p.yaml"
    compiler.Compiler().compile(pipeline_func=build_pipeline(), package_path=str(package))
    spec = next(yaml.safe_load_all(package.read_text()))
    found = set(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        found |= set(comp.get("dag", {}).get("tasks", {}))
    # loops, conditions and the exit handler's group are DAG plumbing, not tasks of a step; the
    # exit handler's task runs no step (components.EXIT_TASK, outside TASKS)
    plumbing = {n for n in found if n.startswith(("for-loop-", "condition-", "exit-handler-"))}
    return found - plumbing - {EXIT_TASK.name.replace("_", "-")}


def test_compiled_pipeline_runs_every_task_once(compiled_tasks: set[str]) -> None:
    want = {t.replace("_", "-") for t in TASK_NAMES}
    assert compiled_tasks == want, (
        f"the pipeline lacks tasks {sorted(want - compiled_tasks)}; "
        f"has unregistered tasks {sorted(compiled_tasks - want)}"
    )


def test_a_new_step_needs_only_its_row_and_its_function(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Adding a step: a row of the table and a function of rima_core.pipeline.steps (here patched
    in) give it a ``rima`` command that runs the function, and an MLproject entry point; no other
    file changes."""
    calls: list[dict[str, Any]] = []

    def count_eyes(cfg: Any, *, store: str | None, min_eyes: int) -> dict[str, Any]:
        calls.append({"seed": cfg.runtime.seed, "store": store, "min_eyes": min_eyes})
        return {"eyes": 3}

    new = Step(
        name="count_eyes",
        function="count_eyes",
        command=("count-eyes",),
        help="count the eyes of a store",
        options=(Option(("--store",)), Option(("--min-eyes",), "fail below", 1, type=int)),
        dvc_stage=None,
        dvc_args="",
        mlproject="count_eyes",
        mlproject_parameters=(("store", "data/store"),),
        kfp_tasks=(),
        why="a throwaway step of this test",
    )
    before = mlproject_file.render()
    assert _command(new.command) is None
    monkeypatch.setattr(steps, "count_eyes", count_eyes, raising=False)
    monkeypatch.setattr(step_registry, "STEPS", (*STEPS, new))

    parser = _command(new.command)
    assert parser is not None and "count the eyes of a store" in build_parser().format_help()
    assert "fail below (default: 1)" in parser.format_help()
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")  # every value the embedded default
    argv = ["count-eyes", "--params", str(params), "--min-eyes", "2", "--set", "runtime.seed=7"]
    assert main(argv) == 0
    assert calls == [{"seed": 7, "store": None, "min_eyes": 2}]

    text = mlproject_file.render()
    assert text.startswith(before.rstrip("\n"))  # the other entry points unchanged
    entry = yaml.safe_load(text)["entry_points"]["count_eyes"]
    assert entry["command"] == "rima count-eyes --params {params} --store {store}"
    assert entry["parameters"]["store"] == {"type": "string", "default": "data/store"}
