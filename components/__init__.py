"""Kubeflow Pipelines components: one lightweight component per pipeline step.

Each component is a plain function in this package (KFP reads its source with ``inspect``, so it
must live in a file) that loads the run's resolved config and calls :mod:`rima_core.pipeline.steps`
with its artifacts' paths — no step logic here. :data:`TASKS` pairs them with how the cluster runs
each (caching, retries, GPU, resources: the step table's, :mod:`rima_core.pipeline.step_registry`);
:func:`build_components` turns the functions into components bound to the project's image
(:mod:`components.image`): the image is chosen once, at build time, for all of them;
``packages_to_install`` stays empty and kfp is not pip-installed at run time, because the image
already holds ``rima_core`` and every pinned dependency.

This package and :mod:`pipelines` are used at compile time from a checkout of the repository;
the image needs only ``rima_core`` (the components' source travels inside the compiled YAML).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kfp import dsl

from components.image import DEFAULT_IMAGE, IMAGE_ENV, rima_image
from components.tasks import EXIT_TASK, TASK_NAMES, TASKS, Task, TaskResources

__all__ = [
    "DEFAULT_IMAGE",
    "EXIT_TASK",
    "IMAGE_ENV",
    "STEP_FUNCTIONS",
    "TASKS",
    "TASK_NAMES",
    "Components",
    "Task",
    "TaskResources",
    "build_components",
]

#: task name -> component function, in pipeline order (from :data:`components.tasks.TASKS`).
STEP_FUNCTIONS: dict[str, Callable[..., Any]] = {t.name: t.func for t in TASKS}


@dataclass(frozen=True)
class Components:
    """The pipeline's components, all on one image; ``components.<task name>`` is the task's
    component (``components.prepare(...)``), for every task of :data:`TASKS`."""

    image: str
    by_task: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "by_task":  # copy/pickle probe dunders first
            raise AttributeError(name)
        try:
            return self.by_task[name]
        except KeyError:
            raise AttributeError(f"no component {name!r}; tasks: {TASK_NAMES}") from None


def build_components(image: str | None = None) -> Components:
    """Every task, and the exit task (:data:`EXIT_TASK`), as a ``@dsl.component`` on ``image``
    (default: :func:`rima_image`)."""
    chosen = rima_image(image)
    built = {
        name: dsl.component(
            func, base_image=chosen, packages_to_install=[], install_kfp_package=False
        )
        for name, func in {**STEP_FUNCTIONS, EXIT_TASK.name: EXIT_TASK.func}.items()
    }
    return Components(image=chosen, by_task=built)
