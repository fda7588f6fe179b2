"""Shared fixtures and test settings.

- The tiny settings: ``configs/tiny.yaml`` (the smoke-run profile) plus a few test-only values,
  as ``section.key=value`` overrides (:data:`TINY_OVERRIDES`) so subprocesses take them too.
- A tiny dataset built through the real data flow (synth -> prepare -> masks), once per test
  session (a few seconds) and read-only; a test that changes a config takes :func:`tiny_cfg`.
- MLflow isolation: :func:`clear_mlflow_env` / :func:`mlflow_free_env` (the one place that
  decides which variables a test must not inherit), and the ``cfg`` fixture, a config on a
  fresh MLflow store (``tests.servers.mlflow_test_config`` for other scopes).
- Tiers, one folder each, the folder's name its marker: ``unit`` (one module's behaviour on
  small data it makes itself), ``contracts`` (files, orchestrators and docs agree with the code
  and with each other), ``e2e`` (steps, servers and pipelines run for real); so
  ``pytest tests/unit`` or ``-m unit`` runs one tier. ``slow`` is written on each heavy test.
- Markers derived from the code (:func:`pytest_collection_modifyitems`): ``servers`` on a test
  that starts a server, itself or through a fixture, ``kfp`` on the Kubeflow tests; so
  ``pytest -m "not slow and not servers and not kfp"`` runs the fast core; ``trains`` on a
  test that trains or tunes a model, so ``-m "not slow and not servers and not kfp and not
  trains"`` is the core without training (data, OT, models' forward, config, metrics).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from rima_core.config import Config, load_config

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

TINY_PROFILE = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def profile_overrides(path: Path) -> list[str]:
    """A profile file as ``section.key=value`` overrides (values as JSON, which YAML reads)."""
    data = yaml.safe_load(path.read_text()) or {}
    return [f"{s}.{k}={json.dumps(v)}" for s, values in data.items() for k, v in values.items()]


TINY_OVERRIDES = [
    *profile_overrides(TINY_PROFILE),
    # never a GPU by chance: tests compare numbers across runs bit for bit
    "runtime.device=cpu",
    # 90 eyes, not 60: every grade appears several times in the val and test splits
    "synth.n_eyes=90",
    # two rates keep each evaluation short (rate 0 is the complete scenario, scored anyway)
    "missing.sweep=[0.5, 1.0]",
]


# --- markers ----------------------------------------------------------------------------------

# Calls that start a server process (tests/servers.py) or compile/run the Kubeflow pipeline.
SERVER_CALLS = ("moto_server(", "mlflow_server(", "model_server(")
KFP_CALLS = ("local.init(", "compile_pipeline(", "compiler.Compiler(", "run_local(")
# Calls that train or tune a model (the engine's epochs dominate the fast suite's time); the CLI
# forms are the argument lists a test hands to `rima` or `cli.main`.
TRAIN_CALLS = (
    " train(",
    "(train(",
    " tune(",
    "steps.train(",
    "steps.tune(",
    "steps._train_run(",
    "train_eval_register(",
    "_trained(",
    "_train_cmd(",
    '"train",',
    '"tune",',
)


@functools.cache
def _source(func: Callable[..., Any]) -> str:
    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return ""


def _calls(item: pytest.Item, calls: tuple[str, ...]) -> bool:
    """Whether the test function or any fixture it uses (directly or not) makes one of
    ``calls``."""
    funcs = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        funcs += [d.func for defs in info.name2fixturedefs.values() for d in defs]
    return any(c in _source(f) for f in funcs if f is not None for c in calls)


TIERS = ("unit", "contracts", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: a test lives in one of tests/{TIERS}")
        item.add_marker(getattr(pytest.mark, tier))
        if _calls(item, SERVER_CALLS):
            item.add_marker(pytest.mark.servers)
        if item.module.__name__.rpartition(".")[2].startswith("test_kfp") or _calls(
            item, KFP_CALLS
        ):
            item.add_marker(pytest.mark.kfp)
        if _calls(item, TRAIN_CALLS):
            item.add_marker(pytest.mark.trains)


# --- MLflow isolation ----------------------------------------------------------------------------


def mlflow_free_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """An environment for a subprocess: ``base`` (default ``os.environ``) without any
    ``MLFLOW_*`` variable (a store, run or experiment an earlier test or the user chose), with
    telemetry off and ``extra`` on top."""
    env = {k: v for k, v in (os.environ if base is None else base).items()}
    env = {k: v for k, v in env.items() if not k.startswith("MLFLOW_")}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def clear_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's environment as :func:`mlflow_free_env` (restored after the test)."""
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    """The MLflow test config: defaults on a fresh SQLite store in ``tmp_path``, experiment and
    registered model both ``rima-test``, no MLflow environment left from outside. (A module that
    needs more settings overrides it, requesting this one.)"""
    from tests.servers import mlflow_test_config

    return mlflow_test_config(tmp_path, monkeypatch, "rima-test", "rima-test")


@pytest.fixture(autouse=True)
def _mlflow_isolation() -> Iterator[None]:
    """Each test starts from the MLflow environment the session started with and leaves no run
    open: a run left active would swallow the next test's runs as nested ones in the wrong store,
    and ``MLFLOW_*`` variables set by a test (or by MLflow) would steer every later one."""
    before = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    yield
    if "mlflow" in sys.modules:  # never import mlflow (~7 s) just to check
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run("KILLED")
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        if key not in before:
            del os.environ[key]
    os.environ.update(before)


@dataclass(frozen=True)
class TinyData:
    root: Path
    raw: Path
    store: Path
    masks: Path
    cfg: Config


def tiny_config(extra: list[str] | None = None) -> Config:
    """Embedded defaults with the tiny settings (params.yaml of the checkout is ignored)."""
    return load_config(None, overrides=[*TINY_OVERRIDES, *(extra or [])])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """90 synthetic eyes (32² fundus, 16³ OCT), prepared into a store, with masks."""
    from rima_core.pipeline import steps

    root = tmp_path_factory.mktemp("tiny_data")
    cfg = tiny_config()
    raw, store, masks = root / "raw", root / "store", root / "masks.parquet"
    steps.synth(raw, cfg)
    steps.prepare(raw, store, cfg)
    steps.simulate_missing(store, masks, cfg)
    return TinyData(root=root, raw=raw, store=store, masks=masks, cfg=cfg)


@pytest.fixture
def tiny_cfg(tiny_data: TinyData) -> Config:
    """A private copy of the tiny config, free to modify."""
    return copy.deepcopy(tiny_data.cfg)
