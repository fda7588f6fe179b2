"""Shared fixtures: a tiny dataset built through the real data flow (synth -> prepare -> masks).

Built once per test session (a few seconds) and treated as read-only by the tests; a test that
needs to change a config gets its own copy from :func:`tiny_cfg`.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rima_core.config import Config, load_config

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

TINY_OVERRIDES = [
    "synth.n_eyes=90",
    "synth.fundus_size=32",
    "synth.oct_shape=[16, 16, 16]",
    "prepare.fundus_size=32",
    "prepare.oct_shape=[16, 16, 16]",
    "prepare.workers=1",
    "missing.sweep=[0.5, 1.0]",
    # a small model so a training epoch takes well under a second
    "model.fundus_dim=32",
    "model.oct_dim=48",
    "model.hidden_dim=32",
    "model.heads=2",
    "train.epochs=2",
    "train.batch_size=16",
    "runtime.device=cpu",
    "runtime.eval_batch_size=32",
]


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
    """Embedded defaults with the tiny-data overrides (params.yaml of the checkout is ignored)."""
    return load_config(None, overrides=[*TINY_OVERRIDES, *(extra or [])])


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> TinyData:
    """90 synthetic eyes (32² fundus, 16³ OCT), prepared into a store, with masks."""
    from rima_core import steps

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
