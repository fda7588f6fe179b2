"""The pipeline's steps, once: which function of :mod:`rima_core.steps` each is, and where each
orchestrator runs it.

Three orchestrators call the same :mod:`rima_core.steps` functions: DVC (``dvc.yaml`` stages
running the ``rima`` CLI), MLflow Projects (``MLproject`` entry points running the same CLI) and
Kubeflow (``components/`` tasks). Every place a step's name appears is checked against
:data:`STEPS` by tests/test_step_registry.py, which names what is missing; every deliberate
exception (a step an orchestrator does not run, a task or entry point that is no step) is stated
here with its reason, and nowhere else. Adding a step: its function in ``rima_core.steps``, an
entry here, its CLI command, stage, entry point and component.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One step. ``command`` is the ``rima`` CLI command (words); ``dvc_stage``/``mlproject`` the
    ``dvc.yaml`` stage and ``MLproject`` entry point running it, ``kfp_tasks`` the Kubeflow tasks
    (a fan-out has several); ``None``/``()`` where the orchestrator leaves it out, for ``why``."""

    name: str
    command: tuple[str, ...]
    dvc_stage: str | None
    mlproject: str | None
    kfp_tasks: tuple[str, ...]
    why: str = ""


STEPS: tuple[Step, ...] = (
    Step(
        "synth",
        ("data", "synth"),
        None,
        "synth",
        (),
        why="DVC tracks data/raw as data.dvc (a path cannot be both a .dvc output and a stage "
        "output); on Kubeflow the fetch_raw task writes the phantom when no data is named",
    ),
    Step("prepare", ("prepare",), "prepare", "prepare", ("prepare",)),
    Step("validate", ("validate",), "validate", "validate", ("validate",)),
    Step(
        "simulate_missing",
        ("simulate-missing",),
        "simulate-missing",
        "simulate_missing",
        ("simulate_missing",),
    ),
    Step(
        "tune",
        ("tune",),
        "tune",
        "tune",
        ("tune_worker", "tune_best"),
        why="Kubeflow fans tuning out: tune_worker tasks share one study, tune_best reads it",
    ),
    Step("train", ("train",), "train", "train", ("train",)),
    Step("evaluate", ("evaluate",), "evaluate", "evaluate", ("evaluate",)),
    Step("register", ("register",), "register", "register", ("register",)),
    Step(
        "promote",
        ("promote",),
        "register",
        "promote",
        ("promote",),
        why="DVC runs it as the register stage's second command: promotion only moves a "
        "registry alias, it has no output of its own",
    ),
    Step(
        "predict",
        ("predict",),
        None,
        None,
        (),
        why="serving, not a pipeline step: it grades new eyes with a registered model",
    ),
)

#: Kubeflow tasks that run no step of their own, and why.
KFP_ONLY_TASKS: dict[str, str] = {
    "resolve_config": "turns the run's parameters into the one resolved config every task reads",
    "fetch_raw": "brings the raw data into the pod (DVC remote, S3, a mounted path, or synth)",
}

#: MLproject entry points that are no single step, and why.
MLPROJECT_ONLY_ENTRIES: dict[str, str] = {
    "main": "the whole pipeline (scripts/run_pipeline.sh: dvc repro)",
}

#: Top-level ``rima`` commands that run no step, and why.
NON_STEP_COMMANDS: dict[str, str] = {
    "params": "inspects params and profiles; computes nothing",
    "check-repro": "compares the workspace's results with a commit's; computes nothing",
}


def step(name: str) -> Step:
    """The registered step ``name``; ``KeyError`` listing the steps otherwise."""
    for entry in STEPS:
        if entry.name == name:
            return entry
    raise KeyError(f"no step {name!r}; steps: {[s.name for s in STEPS]}")


def kfp_task_steps() -> dict[str, str | None]:
    """Every Kubeflow task -> the step it runs (``None`` for :data:`KFP_ONLY_TASKS`)."""
    out: dict[str, str | None] = dict.fromkeys(KFP_ONLY_TASKS)
    for entry in STEPS:
        out.update(dict.fromkeys(entry.kfp_tasks, entry.name))
    return out
