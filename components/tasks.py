"""The pipeline's tasks, once: each component function with how the cluster runs it.

One row per task: the function (KFP reads its source), whether a rerun with the same inputs may
reuse the outputs (``cached``), whether a transient failure is retried (``retried``), whether it
gets the accelerator (``gpu``), whether it gets the Kubernetes secret's keys as environment
(``secrets``), and its default CPU/memory. :data:`components.STEP_FUNCTIONS`,
:class:`components.Components` and the pipeline's task settings are derived from it; which
library step each task runs is :func:`rima_core.step_registry.kfp_task_steps`
(tests/test_step_registry.py checks the two agree).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components import config, data, exit_handler, registry, training, tuning


@dataclass(frozen=True)
class TaskResources:
    """CPU/memory of one task's container, in Kubernetes quantities (``"500m"``, ``"2"``,
    ``"8Gi"``). Requests are what the scheduler reserves; limits (None: none) cap the pod."""

    cpu: str | None = None
    memory: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None

    KEYS = ("cpu", "memory", "cpu_limit", "memory_limit")

    @classmethod
    def parse(cls, text: str) -> tuple[str, dict[str, str]]:
        """``STEP:cpu=2,memory=8Gi[,cpu_limit=4,memory_limit=16Gi]`` -> (step, changes)."""
        step, sep, body = text.partition(":")
        if not sep or not step or not body:
            raise ValueError(f"task resources {text!r}: expected STEP:cpu=2,memory=8Gi,...")
        if step not in TASK_NAMES:
            raise ValueError(f"task resources {text!r}: no step {step!r}; steps: {TASK_NAMES}")
        changes = {}
        for pair in body.split(","):
            key, eq, value = pair.strip().partition("=")
            if not eq or key not in cls.KEYS or not value:
                raise ValueError(f"task resources {text!r}: {pair!r} is not one of {cls.KEYS}=V")
            changes[key] = value
        return step, changes


@dataclass(frozen=True)
class Task:
    """One task of the pipeline (see the module docstring for the flags)."""

    name: str
    func: Callable[..., Any]
    resources: TaskResources
    cached: bool = False
    retried: bool = False
    gpu: bool = False
    secrets: bool = True
    display_name: str = ""  # what the KFP UI shows (default: the name)
    # the pod's deadline in seconds (Kubernetes activeDeadlineSeconds; 0: none): a task that
    # hangs (a stuck storage lock, a dead NFS mount) fails instead of holding its GPU forever
    timeout_s: int = 0


# Why the flags: data tasks are deterministic in their inputs (cached; fetch_raw keyed on its
# URI); tasks talking to MLflow or Optuna's RDB retry transient network failures; train and
# evaluate are not cached (GPU kernels are not bit-reproducible, and each run should leave its
# own MLflow run); register is never cached (a cached register would skip the version the run is
# about); resolve_config touches no storage or tracking server, so it gets no secret.
# Resources are sized for the tiny/synthetic profiles' data and the paper's models on one GPU.
HOUR = 3600
TASKS: tuple[Task, ...] = (
    Task(
        "resolve_config",
        config.resolve_config,
        TaskResources("100m", "256Mi", None, "512Mi"),
        cached=True,
        secrets=False,
        display_name="Resolve the config",
        timeout_s=600,
    ),
    Task(
        "fetch_raw",
        data.fetch_raw,
        TaskResources("1", "2Gi", None, "4Gi"),
        cached=True,
        display_name="Fetch the raw data (DVC)",
        timeout_s=4 * HOUR,
    ),
    Task(
        "prepare",
        data.prepare,
        TaskResources("2", "4Gi", None, "8Gi"),
        cached=True,
        display_name="Prepare the Arrow store",
        timeout_s=6 * HOUR,
    ),
    Task(
        "validate",
        data.validate,
        TaskResources("1", "4Gi", None, "8Gi"),
        cached=True,
        display_name="Validate the data (Great Expectations)",
        timeout_s=2 * HOUR,
    ),
    Task(
        "simulate_missing",
        data.simulate_missing,
        TaskResources("500m", "1Gi", None, "2Gi"),
        cached=True,
        display_name="Simulate missing modalities",
        timeout_s=HOUR,
    ),
    Task(
        "tune_worker",
        tuning.tune_worker,
        TaskResources("4", "16Gi", None, "32Gi"),
        retried=True,
        gpu=True,
        display_name="Tune (Optuna worker)",
        timeout_s=24 * HOUR,
    ),
    Task(
        "tune_best",
        tuning.tune_best,
        TaskResources("1", "2Gi", None, "4Gi"),
        retried=True,
        display_name="Pick the best trial",
        timeout_s=HOUR,
    ),
    Task(
        "train",
        training.train,
        TaskResources("4", "16Gi", None, "32Gi"),
        gpu=True,
        display_name="Train",
        timeout_s=24 * HOUR,
    ),
    Task(
        "evaluate",
        training.evaluate,
        TaskResources("2", "8Gi", None, "16Gi"),
        display_name="Evaluate every missing-modality scenario",
        timeout_s=6 * HOUR,
    ),
    Task(
        "register",
        registry.register,
        TaskResources("1", "4Gi", None, "8Gi"),
        retried=True,
        display_name="Register the model (MLflow)",
        timeout_s=2 * HOUR,
    ),
    Task(
        "promote",
        registry.promote,
        TaskResources("500m", "1Gi", None, "2Gi"),
        retried=True,
        display_name="Promote if it beats the champion",
        timeout_s=HOUR,
    ),
)

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)

# The exit task (``dsl.ExitHandler``): it runs after the others whatever became of them, and runs
# no step, so it is no row of TASKS (whose rows are the registered steps' tasks). It talks to the
# MLflow server (secret, retried) and must be able to run when everything else failed: small and
# never cached (a cached report of another run would end nothing).
EXIT_TASK = Task(
    "end_failed_runs",
    exit_handler.end_failed_runs,
    TaskResources("100m", "256Mi", None, "512Mi"),
    retried=True,
    display_name="End the failed run's MLflow runs",
    timeout_s=600,
)


def task(name: str) -> Task:
    """The task ``name``; ``KeyError`` listing the tasks otherwise."""
    for entry in TASKS:
        if entry.name == name:
            return entry
    raise KeyError(f"no task {name!r}; tasks: {TASK_NAMES}")
