"""Each DVC stage lists every config key it reads under ``params:``, found by running it.

A stage whose code starts reading a key its ``params:`` do not list would not rerun when that
key changes: its outputs go silently stale. Rather than a hand-kept list of what each stage
reads, this test runs every stage's own ``cmd`` from dvc.yaml (in process, on the tiny profile)
while every read of a config field is recorded, and compares the recording with the stage's
``params:``. Reads that decide nothing about outputs are not dependencies: whole-config
serialisation (MLflow params, the copy of the config saved beside a model) and the load-time
value checks, which read every key of every stage alike.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from rima_core.config import Config, deep_merge, load_config
from rima_core.config import loading as config_loading
from rima_core.config.schema import sections
from rima_core.pipeline import cli
from tests.conftest import clear_mlflow_env
from tests.contracts.test_dvc_pipeline import NO_EFFECT, OVERRIDDEN, _render, _stages

ROOT = Path(__file__).resolve().parents[2]


class Recorder:
    """Which ``section.key`` each stage read (``stage`` is the one running now)."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.paused = 0
        self.reads: dict[str, set[str]] = defaultdict(set)


@contextmanager
def recording(monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """Record reads of config fields on every instance of every section class (also those a
    stage builds itself, e.g. with tuned values on top), except inside :data:`PAUSED`."""
    rec = Recorder()
    for name, cls in sections():
        fields = {f.name for f in dataclasses.fields(cls)}

        def getattribute(
            self: Any, attr: str, _fields: set[str] = fields, _name: str = name
        ) -> Any:
            if attr in _fields and rec.stage and not rec.paused:
                rec.reads[rec.stage].add(f"{_name}.{attr}")
            return object.__getattribute__(self, attr)

        monkeypatch.setattr(cls, "__getattribute__", getattribute)

    def paused(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            rec.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                rec.paused -= 1

        return call

    monkeypatch.setattr(Config, "to_dict", paused(Config.to_dict))
    monkeypatch.setattr(config_loading, "validate_config", paused(config_loading.validate_config))
    yield rec


def _commands(stage: dict[str, Any], cfg: Config) -> list[list[str]]:
    cmds = stage["cmd"] if isinstance(stage["cmd"], list) else [stage["cmd"]]
    out = []
    for cmd in cmds:
        words = shlex.split(_render(cmd, cfg))
        assert words[0] == "rima", cmd
        out.append(words[1:])
    return out


def _listed(stage: dict[str, Any]) -> set[str]:
    return {str(p) for p in stage.get("params", [])}


@pytest.mark.slow  # every stage on the tiny profile, in process (~1 min)
def test_every_stage_lists_the_params_it_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clear_mlflow_env(monkeypatch)
    params = deep_merge(
        yaml.safe_load((ROOT / "params.yaml").read_text()),
        yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text()),
    )
    params["tune"]["n_trials"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    cfg = load_config("params.yaml")
    assert cli.main(["data", "synth", "--out", cfg.data.raw_dir]) == 0

    stages = _stages()
    with recording(monkeypatch) as rec:
        for name, stage in stages.items():
            for argv in _commands(stage, cfg):
                rec.stage = name
                code = cli.main(argv)
                rec.stage = None
                assert code == 0, f"stage {name}: `rima {' '.join(argv)}` exited {code}"

    assert {"train.epochs", "model.name", "ot.gw_epsilon"} <= rec.reads["train"]  # it records
    unlisted = {}
    for name, stage in stages.items():
        listed = _listed(stage)
        keys = rec.reads[name] - NO_EFFECT - OVERRIDDEN.get(name, set())
        missing = sorted(k for k in keys if k not in listed and k.split(".")[0] not in listed)
        if missing:
            unlisted[name] = missing
    assert not unlisted, f"dvc.yaml stages: add to params: {unlisted}"
