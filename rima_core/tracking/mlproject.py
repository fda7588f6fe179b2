"""``mlflow run`` into the project's experiment, under a name that says what ran.

``mlflow run`` creates its run before the entry point's command starts, in the experiment named
on its own command line (``--experiment-name``, or ``MLFLOW_EXPERIMENT_NAME`` / ``_ID``) and
otherwise in MLflow's ``Default`` experiment, with a random name; the step then has to log into
that run (a run cannot move between experiments). So the experiment must be chosen before
``mlflow run`` starts: ``scripts/mlflow_run.sh`` (this module) reads the effective
``mlflow.experiment`` (params.yaml, ``-P params=``, ``-P profile=``, ``-P set=``) and passes it as
``--experiment-name``, with ``--run-name <entry point>[-<profile>]-seed<runtime.seed>`` (e.g.
``train-tiny-seed0``), unless the command line names either itself::

    scripts/mlflow_run.sh -e train --env-manager local -P profile=configs/tiny.yaml

A step that tracks (train, tune, evaluate, register, promote) names the project's run the same
way (:func:`run_name`, from the run's ``profile`` parameter) and warns when the run is not in the
configured experiment (a plain ``mlflow run`` without the experiment).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rima_core.config import load_config

ROOT = Path(__file__).resolve().parents[2]  # the project, from rima_core/<layer>/


def run_name(step: str, profile: str | None, seed: int) -> str:
    """``train-tiny-seed0``: the step (entry point), the profile's file stem, the seed."""
    parts = [step.replace("_", "-")]
    if profile:
        parts.append(Path(profile).stem)
    parts.append(f"seed{seed}")
    return "-".join(parts)


def _parameters(argv: Sequence[str]) -> tuple[str, dict[str, list[str]], set[str]]:
    """(entry point, ``-P`` values by name, long options present) of ``mlflow run`` args."""
    entry, params, options = "main", {}, set()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        value = args[i + 1] if i + 1 < len(args) else ""
        if arg in ("-e", "--entry-point"):
            entry, i = value, i + 2
            continue
        if arg.startswith("--entry-point="):
            entry = arg.split("=", 1)[1]
        elif arg in ("-P", "--param-list"):
            name, _, val = value.partition("=")
            params.setdefault(name, []).append(val)
            i += 2
            continue
        elif arg.startswith("--"):
            options.add(arg.split("=", 1)[0])
        i += 1
    return entry, params, options


def mlflow_run_args(argv: Sequence[str], project: str | Path = ROOT) -> list[str]:
    """The ``mlflow run`` command for ``argv`` (its options and ``-P`` parameters), with the
    experiment and run name of the effective configuration added where not given."""

    entry, params, options = _parameters(argv)
    project = Path(project)
    # the entry point's command runs in the project folder: relative paths are relative to it
    params_file = project / (params.get("params") or ["params.yaml"])[-1]
    profile = (params.get("profile") or [None])[-1]
    profile_file = None if profile is None else project / profile
    cfg = load_config(params_file, profile_file, (params.get("set") or [])[-1:])
    mlflow = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "run", str(project), *argv]
    chosen = options & {"--experiment-name", "--experiment-id"} or any(
        os.environ.get(k) for k in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")
    )
    if not chosen:
        cmd += ["--experiment-name", cfg.mlflow.experiment]
    if "--run-name" not in options:
        cmd += ["--run-name", run_name(entry, profile, cfg.runtime.seed)]
    return cmd


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    cmd = mlflow_run_args(argv)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
