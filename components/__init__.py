"""Kubeflow Pipelines components: one lightweight component per pipeline step.

Each component is a plain function in this package (KFP reads its source with ``inspect``, so it
must live in a file) that loads the run's resolved config and calls :mod:`rima_core.steps` with
its artifacts' paths — no step logic here. :func:`build_components` turns the functions into
components bound to the project's image (:mod:`components.image`): the image is chosen once,
at build time, for all of them; ``packages_to_install`` stays empty and kfp is not pip-installed
at run time, because the image already holds ``rima_core`` and every pinned dependency.

This package and :mod:`pipelines` are used at compile time from a checkout of the repository;
the image needs only ``rima_core`` (the components' source travels inside the compiled YAML).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kfp import dsl

from components import config, data, registry, training, tuning
from components.image import DEFAULT_IMAGE, IMAGE_ENV, rima_image

__all__ = ["DEFAULT_IMAGE", "IMAGE_ENV", "STEP_FUNCTIONS", "Components", "build_components"]


@dataclass(frozen=True)
class Components:
    """The pipeline's components, all on one image."""

    image: str
    resolve_config: Any
    fetch_raw: Any
    prepare: Any
    validate: Any
    simulate_missing: Any
    tune_worker: Any
    tune_best: Any
    train: Any
    evaluate: Any
    register: Any
    promote: Any


STEP_FUNCTIONS: dict[str, Callable[..., Any]] = {
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
}


def build_components(image: str | None = None) -> Components:
    """Every step as a ``@dsl.component`` on ``image`` (default: :func:`rima_image`)."""
    chosen = rima_image(image)
    built = {
        name: dsl.component(
            func, base_image=chosen, packages_to_install=[], install_kfp_package=False
        )
        for name, func in STEP_FUNCTIONS.items()
    }
    return Components(image=chosen, **built)
