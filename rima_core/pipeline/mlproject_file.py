"""The ``MLproject`` file, generated from the step table.

Each entry point runs a step's ``rima`` command (:data:`rima_core.pipeline.step_registry.STEPS`: its
``mlproject`` entry, ``mlproject_parameters`` and ``command``), plus the entry points that run no
single step (:data:`rima_core.pipeline.step_registry.MLPROJECT_ONLY_ENTRIES`). Writing the file
from the table means a new step gets its entry point without anyone editing ``MLproject``;
tests/contracts/test_step_registry.py fails when the checked-in file differs from :func:`render`::

    python -m rima_core.pipeline.mlproject_file           # rewrite MLproject
    python -m rima_core.pipeline.mlproject_file --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rima_core.atomic import write_text
from rima_core.pipeline import step_registry

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the project, from rima_core/<layer>/
MLPROJECT = ROOT / "MLproject"

HEADER = """\
# MLflow Projects entry points: the same `rima` CLI the DVC stages and Kubeflow components call.
# Generated from rima_core/pipeline/step_registry.py: do not edit; run
# `python -m rima_core.pipeline.mlproject_file`.
#
#   export MLFLOW_TRACKING_URI=sqlite:///mlflow.db   # params.yaml's mlflow.tracking_uri
#   scripts/mlflow_run.sh -e train --env-manager local -P set=train.epochs=5
#   scripts/mlflow_run.sh -e tune --env-manager local -P profile=configs/tiny.yaml -P n-trials=4
#   scripts/mlflow_run.sh --env-manager local       # main: the whole pipeline (dvc repro)
#
# scripts/mlflow_run.sh is `mlflow run <repo>` plus `--experiment-name <mlflow.experiment>` (of
# params.yaml, -P params/profile/set) and `--run-name <entry>[-<profile>]-seed<seed>` (e.g.
# train-tiny-seed0). `mlflow run` creates its run before the command starts, so a plain
# `mlflow run .` lands in MLflow's Default experiment with a random name, and a step cannot move
# it (it warns); with plain `mlflow run .` pass `--experiment-name` (or set
# MLFLOW_EXPERIMENT_NAME) yourself. A step that tracks names the run the same way.
#
# Every step reads params.yaml (-P params=FILE for another). Parameters not declared below are
# passed to the command as `--NAME VALUE`, so any option of the step works: -P profile=FILE,
# -P set=section.key=value (one per call; use a profile for several), -P store=DIR, -P out=DIR ...
# Under `mlflow run` a step logs into the run MLflow created for it (MLFLOW_RUN_ID).
name: rima

entry_points:
"""


def _step_entry(entry: step_registry.Step) -> list[str]:
    """A step's entry point: ``params`` and its own parameters, each passed as ``--NAME``."""
    parameters = (("params", "params.yaml"), *entry.mlproject_parameters)
    command = " ".join(("rima", *entry.command))
    command += "".join(f" --{name.replace('_', '-')} {{{name}}}" for name, _ in parameters)
    lines = [f"  {entry.mlproject}:", "    parameters:"]
    lines += [f"      {name}: {{type: string, default: {default}}}" for name, default in parameters]
    return [*lines, f'    command: "{command}"']


def _other_entry(name: str, entry: step_registry.MLprojectEntry) -> list[str]:
    lines = [f"  {name}:"]
    if entry.note:
        lines.append(f"    # {entry.note}")
    return [*lines, f'    command: "{entry.command}"']


def render() -> str:
    """The ``MLproject`` text for the current step table."""
    blocks = [_other_entry(n, e) for n, e in step_registry.MLPROJECT_ONLY_ENTRIES.items()]
    blocks += [_step_entry(s) for s in step_registry.STEPS if s.mlproject is not None]
    return HEADER + "\n\n".join("\n".join(block) for block in blocks) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Write :func:`render` to ``--out`` (default: the checkout's ``MLproject``), or with
    ``--check`` only say whether the file is up to date (exit 1 if not)."""
    parser = argparse.ArgumentParser(
        prog="python -m rima_core.pipeline.mlproject_file", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, default=MLPROJECT, help="file to write")
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if it differs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    text = render()
    current = args.out.read_text() if args.out.exists() else None
    if args.check:
        if current != text:
            log.error(
                "%s is out of date: run python -m rima_core.pipeline.mlproject_file", args.out
            )
            return 1
        log.info("%s is up to date", args.out)
        return 0
    if current == text:
        log.info("%s unchanged", args.out)
        return 0

    write_text(args.out, text)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
