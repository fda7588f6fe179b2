"""Every place a pipeline step is named agrees with ``rima_core.step_registry.STEPS``.

Adding a step means its function in ``rima_core.steps``, one registry entry, and its command,
``dvc.yaml`` stage, ``MLproject`` entry point, component and task: each test below names what is
missing. Deliberate exceptions are stated in the registry (``why``, ``KFP_ONLY_TASKS``,
``MLPROJECT_ONLY_ENTRIES``, ``NON_STEP_COMMANDS``), not here.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

from components import EXIT_TASK, STEP_FUNCTIONS, TASK_NAMES
from rima_core import steps
from rima_core.cli import build_parser
from rima_core.step_registry import (
    KFP_ONLY_TASKS,
    MLPROJECT_ONLY_ENTRIES,
    NON_STEP_COMMANDS,
    STEPS,
    kfp_task_steps,
)

ROOT = Path(__file__).resolve().parents[1]


def _commands(cmd: str | list[str]) -> list[str]:
    return [" ".join(c.split()) for c in ([cmd] if isinstance(cmd, str) else cmd)]


def _runs(commands: list[str], words: tuple[str, ...]) -> bool:
    prefix = " ".join(("rima", *words))
    return any(c == prefix or c.startswith(prefix + " ") for c in commands)


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_step_is_a_function_of_rima_core_steps() -> None:
    names = [s.name for s in STEPS]
    assert len(names) == len(set(names)), "a step is registered twice"
    missing = [n for n in names if not callable(getattr(steps, n, None))]
    assert not missing, f"registered steps without a rima_core.steps function: {missing}"
    for s in STEPS:
        left_out = s.dvc_stage is None or s.mlproject is None or not s.kfp_tasks
        assert s.why or not left_out, f"step {s.name}: an orchestrator leaves it out; say why"


def test_cli_has_a_command_per_step_and_no_stray_commands() -> None:
    top = _subparsers(build_parser())
    problems = []
    for s in STEPS:
        parser: Any = None
        choices = top
        for word in s.command:
            parser = choices.get(word)
            if parser is None:
                problems.append(f"step {s.name}: no `rima {' '.join(s.command)}` command")
                break
            choices = _subparsers(parser)
    heads = {s.command[0] for s in STEPS}
    problems += [
        f"`rima {name}` runs no registered step (register it or add it to NON_STEP_COMMANDS)"
        for name in top
        if name not in heads and name not in NON_STEP_COMMANDS
    ]
    for head in heads:  # a command group ("rima data ..."): each of its commands is a step
        group = {s.command[1] for s in STEPS if s.command[0] == head and len(s.command) > 1}
        if group and head in top:
            stray = set(_subparsers(top[head])) - group
            problems += [f"`rima {head} {n}` runs no registered step" for n in sorted(stray)]
    assert not problems, "\n".join(problems)


def test_dvc_stages_run_the_registered_steps() -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    problems = []
    for s in STEPS:
        if s.dvc_stage is None:
            continue
        stage = stages.get(s.dvc_stage)
        if stage is None:
            problems.append(f"step {s.name}: dvc.yaml has no stage {s.dvc_stage!r}")
        elif not _runs(_commands(stage["cmd"]), s.command):
            problems.append(
                f"stage {s.dvc_stage}: its cmd does not run `rima {' '.join(s.command)}`"
            )
    registered = {s.dvc_stage for s in STEPS}
    problems += [
        f"dvc.yaml stage {n!r} runs no registered step" for n in stages if n not in registered
    ]
    for name, stage in stages.items():  # deps complete by construction: the whole package
        if "rima_core" not in stage.get("deps", []):
            problems.append(f"stage {name}: deps must include the rima_core package")
    assert not problems, "\n".join(problems)


def test_mlproject_entry_points_run_the_registered_steps() -> None:
    entries = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]
    problems = []
    for s in STEPS:
        if s.mlproject is None:
            continue
        entry = entries.get(s.mlproject)
        if entry is None:
            problems.append(f"step {s.name}: MLproject has no entry point {s.mlproject!r}")
        elif not _runs(_commands(entry["command"]), s.command):
            problems.append(f"entry {s.mlproject}: does not run `rima {' '.join(s.command)}`")
    registered = {s.mlproject for s in STEPS} | set(MLPROJECT_ONLY_ENTRIES)
    problems += [
        f"MLproject entry {n!r} runs no registered step" for n in entries if n not in registered
    ]
    assert not problems, "\n".join(problems)


def test_components_are_the_registered_tasks() -> None:
    want = kfp_task_steps()
    assert set(TASK_NAMES) == set(want), (
        f"components.tasks.TASKS lacks {sorted(set(want) - set(TASK_NAMES))}; "
        f"registers no step for {sorted(set(TASK_NAMES) - set(want))}"
    )
    for task, step in want.items():
        if step is None:
            assert task in KFP_ONLY_TASKS
            continue
        source = inspect.getsource(STEP_FUNCTIONS[task])
        assert f"steps.{step}(" in source, f"component {task} must call rima_core.steps.{step}"


@pytest.fixture(scope="module")
def compiled_tasks(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    from kfp import compiler

    from pipelines.rima_pipeline import build_pipeline

    package = tmp_path_factory.mktemp("registry") / "p.yaml"
    compiler.Compiler().compile(pipeline_func=build_pipeline(), package_path=str(package))
    spec = next(yaml.safe_load_all(package.read_text()))
    names = set(spec["root"]["dag"]["tasks"])
    for comp in spec["components"].values():
        names |= set(comp.get("dag", {}).get("tasks", {}))
    # loops, conditions and the exit handler's group are DAG plumbing, not tasks of a step; the
    # exit handler's task runs no step (components.EXIT_TASK, outside TASKS)
    plumbing = {n for n in names if n.startswith(("for-loop-", "condition-", "exit-handler-"))}
    return names - plumbing - {EXIT_TASK.name.replace("_", "-")}


def test_compiled_pipeline_runs_every_task_once(compiled_tasks: set[str]) -> None:
    want = {t.replace("_", "-") for t in TASK_NAMES}
    assert compiled_tasks == want, (
        f"the pipeline lacks tasks {sorted(want - compiled_tasks)}; "
        f"has unregistered tasks {sorted(compiled_tasks - want)}"
    )
