"""Which commit ran, and whether the checkout held uncommitted *code*: the facts behind a run's
``git_commit`` / ``git_dirty`` tags (:func:`rima_core.tracking.mlflow_runs.git_tags` names the
tags).

Apart from :mod:`rima_core.tracking.mlflow_runs` (which re-exports these names) because deciding
what counts as code is a question about the checkout, not about MLflow: DVC rewrites its lock file,
``.dvc`` files and declared stage outputs during every ``dvc repro``, and the parameters are
recorded as params, so none of them may mark a run dirty; that rule needs ``dvc.yaml`` and
``params.yaml``, never MLflow.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml


def _git(*args: str, cwd: Path | None = None) -> str | None:
    """git's output (leading spaces kept: they are part of ``status --porcelain``), or None."""
    here = cwd or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.rstrip()


# Modified tracked files that are not code: DVC writes them while `dvc repro`/`dvc exp run` runs
# (the lock file, `.dvc` files, committed metrics/plots outputs) or they are the experiment's
# parameters, which every run already records as MLflow params. They must not mark a run dirty.
_NOT_CODE_FILES = ("dvc.lock", "params.yaml", ".dvcignore")


def _dvc_outputs(root: Path) -> set[str]:
    """Paths ``dvc.yaml`` declares as stage outputs (outs/metrics/plots) or draws in its top-level
    ``plots:``, relative to ``root``; ``${section.key}`` resolved from ``params.yaml``."""

    def load(name: str) -> dict[str, Any]:
        try:
            data = yaml.safe_load((root / name).read_text()) or {}
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    data, params = load("dvc.yaml"), load("params.yaml")

    def resolve(path: Any) -> str | None:
        if not isinstance(path, str):
            return None

        def value(match: re.Match[str]) -> str:
            node: Any = params
            for part in match.group(1).strip().split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is None:
                raise KeyError(match.group(1))
            return str(node)

        try:
            return re.sub(r"\$\{([^}]+)\}", value, path).strip("/")
        except KeyError:
            return None

    def keys(entries: Any) -> list[Any]:
        if isinstance(entries, str):
            return [entries]
        if isinstance(entries, dict):
            return list(entries)
        out = []
        for entry in entries or []:
            out += list(entry) if isinstance(entry, dict) else [entry]
        return out

    found: list[Any] = []
    for stage in (data.get("stages") or {}).values():
        if isinstance(stage, dict):
            for kind in ("outs", "metrics", "plots"):
                found += keys(stage.get(kind))
    for plot in data.get("plots") or []:
        if isinstance(plot, dict):
            for spec in plot.values():
                if isinstance(spec, dict):
                    y, x = spec.get("y"), spec.get("x")  # a plain x is a column name
                    found += keys(y) + (keys(x) if isinstance(x, dict) else [])
        else:
            found.append(plot)
    return {p for p in map(resolve, found) if p}


def dirty_code_files(root: Path, porcelain: str) -> list[str]:
    """The modified tracked files of ``git status --porcelain`` that are code.

    Untracked and ignored files never count (run outputs); neither do the files DVC itself
    writes or manages (``dvc.lock``, ``*.dvc``, ``.dvc/``, declared stage outputs) nor the
    parameter file (recorded as params). What is left is uncommitted code or configuration.
    """
    outputs = _dvc_outputs(root)
    dirty = []
    for line in porcelain.splitlines():
        if len(line) < 4 or line.startswith("??") or line.startswith("!!"):
            continue
        path = line[3:].split(" -> ")[-1].strip().strip('"')
        if (
            path in _NOT_CODE_FILES
            or path.endswith(".dvc")
            or path.startswith(".dvc/")
            or any(path == o or path.startswith(o + "/") for o in outputs)
        ):
            continue
        dirty.append(path)
    return dirty
