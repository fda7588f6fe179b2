"""A pipeline run's config: pipeline parameters + carried params text -> one resolved config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rima_core.config import Config, ConfigError, load_config
from rima_core.pipeline import remote_config as rc


def test_resolve_config_layers_params_profile_and_overrides() -> None:
    params = yaml.safe_dump({"train": {"epochs": 7, "lr": 0.01}, "tune": {"n_trials": 5}})
    profile = yaml.safe_dump({"train": {"epochs": 3}})
    cfg = rc.resolve_config(
        params, profile, {"tune.n_trials": 9, "missing.mixed": [0.1, 0.2], "data.disease": "dr"}
    )
    assert cfg.train.epochs == 3  # profile over params
    assert cfg.train.lr == 0.01  # params over defaults
    assert cfg.tune.n_trials == 9  # overrides over both
    assert cfg.missing.mixed == [0.1, 0.2]
    assert cfg.data.disease == "dr"
    # empty texts mean "embedded defaults"
    assert rc.resolve_config("", "").to_dict() == Config().to_dict()


def test_resolve_config_rejects_typos_with_the_schema_message() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        rc.resolve_config(yaml.safe_dump({"train": {"epoch": 3}}))
    with pytest.raises(ConfigError, match=r"section\.key"):
        rc.resolve_config("", "", {"epochs": 3})
    with pytest.raises(ConfigError, match="expected an integer"):
        rc.resolve_config("", "", {"tune.n_trials": "many"})


def test_config_file_round_trips_and_the_secret_storage_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = rc.resolve_config("", "", {"tune.storage": "sqlite:///optuna.db", "ot.gw_epsilon": 1e-5})
    path = tmp_path / "config.yaml"
    rc.write_config(cfg, path)
    monkeypatch.delenv(rc.OPTUNA_STORAGE_ENV, raising=False)
    assert load_config(path).to_dict() == cfg.to_dict()
    url = "postgresql://rima:pw@db:5432/optuna"
    monkeypatch.setenv(rc.OPTUNA_STORAGE_ENV, url)
    assert rc.load_task_config(path).tune.storage == url
    assert "pw" not in path.read_text()  # the secret never lands in the artifact
