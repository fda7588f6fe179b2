"""The pipeline's tasks: each Kubeflow task of the step table with its component function.

How the cluster runs each task (caching, retries, accelerator, credentials, resources, display
name, deadline) is written once, in the step table
(:func:`rima_core.pipeline.step_registry.kfp_tasks`,
:data:`rima_core.pipeline.step_registry.KFP_EXIT_TASK`); this module adds only what the library
cannot hold, the component function KFP reads the source of. :data:`components.STEP_FUNCTIONS`,
:class:`components.Components` and the pipeline's task settings are derived from :data:`TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from components import config, data, exit_handler, registry, training, tuning
from rima_core.pipeline.step_registry import KFP_EXIT_TASK, KfpTask, TaskResources, kfp_tasks

__all__ = ["EXIT_TASK", "FUNCTIONS", "TASKS", "TASK_NAMES", "Task", "TaskResources", "task"]


@dataclass(frozen=True)
class Task(KfpTask):
    """A task of the step table (see :class:`rima_core.pipeline.step_registry.KfpTask`) and the
    component function that runs it."""

    func: Callable[..., Any] = field(kw_only=True)

    @classmethod
    def of(cls, spec: KfpTask, func: Callable[..., Any]) -> Task:
        """``spec`` with its component function."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(spec)}, func=func)


#: Task name -> the component function running it (each calls its step in rima_core.pipeline.steps).
FUNCTIONS: dict[str, Callable[..., Any]] = {
    "resolve_config": config.resolve_config,
    "fetch_raw": data.fetch_raw,
    "prepare": data.prepare,
    "validate": data.validate,
    "simulate_missing": data.simulate_missing,
    "tune_worker": tuning.tune_worker,
    "tune_best": tuning.tune_best,
    "train": training.train,
    "evaluate": training.evaluate,
    "register": registry.register,
    "promote": registry.promote,
    KFP_EXIT_TASK.name: exit_handler.end_failed_runs,
}


def _with_function(spec: KfpTask) -> Task:
    if spec.name not in FUNCTIONS:
        raise KeyError(f"the step table's Kubeflow task {spec.name!r} has no component function")
    return Task.of(spec, FUNCTIONS[spec.name])


#: Every task of the step table, in pipeline order.
TASKS: tuple[Task, ...] = tuple(_with_function(spec) for spec in kfp_tasks())

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)

#: The exit task (``dsl.ExitHandler``): no row of TASKS, whose rows are the steps' tasks.
EXIT_TASK: Task = _with_function(KFP_EXIT_TASK)


def task(name: str) -> Task:
    """The task ``name``; ``KeyError`` listing the tasks otherwise."""
    for entry in TASKS:
        if entry.name == name:
            return entry
    raise KeyError(f"no task {name!r}; tasks: {TASK_NAMES}")
