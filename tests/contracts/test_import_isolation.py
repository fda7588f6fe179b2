"""The GPU check's code path imports without the packages the GPU machine lacks.

The borrowed GPU machine has torch, numpy, pandas, pyarrow, scipy, scikit-learn, PyYAML, tqdm,
matplotlib and Pillow, but no MLflow, DVC, KFP, Optuna, Great Expectations, POT, nibabel, ...;
MONAI travels as a wheel (``benchmarks/gpu_wheels.txt``). A module-level ``import mlflow`` slipping
into the model, OT, data or engine modules would only show up there, in a run that cannot be
repeated cheaply, so these tests import that path here in a subprocess whose import system
refuses those packages (a ``sys.meta_path`` finder installed by a ``sitecustomize`` module on
``PYTHONPATH``, so the check's own child processes inherit it).

``blocked_env`` is shared with ``tests/e2e/test_gpu_check.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_check import ABSENT_ON_GPU_MACHINE, ON_GPU_MACHINE  # noqa: E402

WHEELS_FILE = ROOT / "benchmarks" / "gpu_wheels.txt"

# Everything benchmarks/gpu_check.py imports from the project, directly or when it runs.
CHECK_MODULES = (
    "benchmarks.gpu_check",
    "benchmarks.speed",
    "rima_core.config",
    "rima_core.core.models",
    "rima_core.core.models.rima",
    "rima_core.core.models.baselines",
    "rima_core.core.models.encoders",
    "rima_core.core.models.res2net",
    "rima_core.core.ot",
    "rima_core.runs.engine",
    "rima_core.runs.train",
    "rima_core.runs.evaluate",
    "rima_core.core.metrics",
    "rima_core.tracking.mlflow_runs",
    "rima_core.core.data",
    "rima_core.core.data.store",
    "rima_core.core.data.dataset",
    "rima_core.core.data.synthetic",
    "rima_core.core.data.prepare",
    "rima_core.core.data.masks",
    "rima_core.core.data.sources",
    "rima_core.core.data.sources.fairvision",
    "monai.networks.nets",  # the wheel that travels: must import beside the blocker
)

_SITECUSTOMIZE = '''\
"""Test-only: refuse to import the packages the GPU machine lacks (tests/test_import_isolation)."""
import importlib.abc
import os
import sys

_BLOCKED = frozenset(filter(None, os.environ.get("RIMA_BLOCK_IMPORTS", "").split(",")))


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(
                f"No module named {name!r} (blocked: the GPU machine does not have it)",
                name=name,
            )
        return None


sys.meta_path.insert(0, _Blocker())
'''


def blocked_names() -> list[str]:
    return sorted(set(ABSENT_ON_GPU_MACHINE.values()))


def blocked_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python processes (and their children) cannot import any package in
    ``ABSENT_ON_GPU_MACHINE``; the repository root is on ``PYTHONPATH`` as on the GPU machine,
    where the project is not installed."""
    site = tmp_path / "block_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
    env["RIMA_BLOCK_IMPORTS"] = ",".join(blocked_names())
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def _run(code: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _requirement_name(req: str) -> str:
    return re.split(r"[\s=<>!~\[;]", req.strip(), maxsplit=1)[0]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_pins() -> dict[str, str]:
    """``benchmarks/gpu_wheels.txt``: name -> pinned version."""
    pins = {}
    for line in WHEELS_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{WHEELS_FILE}: {line!r} is not pinned with =="
            pins[_norm(name)] = version.strip()
    return pins


def test_the_blocker_refuses_the_absent_packages(tmp_path: Path) -> None:
    """Without this, the isolation tests below would pass vacuously."""
    env = blocked_env(tmp_path)
    for name in ("mlflow", "ot", "optuna.trial"):
        proc = _run(f"import {name}", env)
        assert proc.returncode != 0, f"{name} imported despite the blocker"
        assert "blocked: the GPU machine does not have it" in proc.stderr


@pytest.mark.slow  # one subprocess importing torch, pandas, pyarrow and MONAI (~10-20 s)
def test_gpu_check_path_imports_without_the_absent_packages(tmp_path: Path) -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {CHECK_MODULES!r}:\n"
        "    importlib.import_module(m)\n"
        f"leaked = sorted(m for m in sys.modules if m.partition('.')[0] in {blocked_names()!r})\n"
        "assert not leaked, leaked\n"
        "print('imported', len(sys.modules), 'modules')\n"
    )
    proc = _run(code, blocked_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported" in proc.stdout


def test_every_dependency_is_on_the_gpu_machine_travels_or_is_not_needed() -> None:
    """A new dependency must be placed: on the GPU image, a travelling wheel, or blocked in the
    isolation tests (so the check is proven not to need it)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {_norm(_requirement_name(d)) for d in deps}
    present = {_norm(n) for n in ON_GPU_MACHINE}
    wheels = set(wheel_pins())
    absent = {_norm(n) for n in ABSENT_ON_GPU_MACHINE}
    groups = {"on the GPU machine": present, "as a wheel": wheels, "blocked": absent}
    for dep in sorted(names):
        where = [g for g, members in groups.items() if dep in members]
        assert len(where) == 1, f"pyproject dependency {dep!r} is placed {where or 'nowhere'}"
    for group, members in groups.items():
        assert members <= names, f"{group}: {sorted(members - names)} are not dependencies"


def test_wheel_pins_match_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {}
    for d in deps:
        name, _, version = d.partition("==")
        pinned[_norm(name.strip())] = version.strip()
    for name, version in wheel_pins().items():
        assert pinned.get(name) == version, (
            f"{WHEELS_FILE.name}: {name}=={version}, pyproject.toml pins {pinned.get(name)!r}"
        )
