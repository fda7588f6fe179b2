"""Value checks at config load: a bad value stops the CLI with exit 2 and one line naming the key,
before any data is read (issue 10, item 8)."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from rima_core.config import (
    ENCODERS_2D,
    ENCODERS_3D,
    METRICS,
    MOVED,
    OT_TARGETS,
    RULES,
    SOURCE_NAMES,
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    validate_config,
    with_values,
)
from rima_core.pipeline import cli

ROOT = Path(__file__).resolve().parents[2]

# (override, key the message must name)
BAD_VALUES = [
    ("train.epochs=0", "train.epochs"),
    ("train.epochs=-3", "train.epochs"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.lr=.nan", "train.lr"),
    ("train.lr=-0.001", "train.lr"),
    ("train.lr=0", "train.lr"),
    ("train.weight_decay=-1", "train.weight_decay"),
    ("train.patience=-1", "train.patience"),
    ("train.warmup_epochs=99", "train.warmup_epochs"),
    ("runtime.device=gpu", "runtime.device"),
    ("runtime.num_workers=-1", "runtime.num_workers"),
    ("runtime.seed=-1", "runtime.seed"),
    ("train.selection_metric=speed", "train.selection_metric"),
    ("ot.gw_epsilon=0", "ot.gw_epsilon"),
    ("ot.gw_epsilon=-0.005", "ot.gw_epsilon"),
    ("ot.feature_epsilon=.inf", "ot.feature_epsilon"),
    ("ot.feature_momentum=1.0", "ot.feature_momentum"),
    ("ot.target=nearest", "ot.target"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.heads=0", "model.heads"),
    ("model.fundus_encoder=vgg", "model.fundus_encoder"),
    ("model.name=rimma", "model.name"),  # the registry's names, checked at load
    ("tune.lr_range=[0.003, 0.0002]", "tune.lr_range"),
    ("tune.gw_epsilon_range=[0, 0.05]", "tune.gw_epsilon_range"),
    ("tune.loss_weight_range=[0.5]", "tune.loss_weight_range"),
    ("tune.n_trials=-1", "tune.n_trials"),
    ("tune.workers=0", "tune.workers"),
    ("tune.timeout_s=0", "tune.timeout_s"),
    ("tune.storage=optuna.db", "tune.storage"),
    ("prepare.split_fractions=[0.5, 0.2, 0.2]", "prepare.split_fractions"),
    ("prepare.split_fractions=[1.2, -0.1, -0.1]", "prepare.split_fractions"),
    ("prepare.oct_shape=[16, 0, 16]", "prepare.oct_shape"),
    ("synth.split_fractions=[0.6, 0.4]", "synth.split_fractions"),
    ("synth.n_classes=1", "synth.n_classes"),
    ("synth.class_weights=[1.0, 2.0]", "synth.class_weights"),
    ("missing.rate=1.5", "missing.rate"),
    ("missing.mixed=[0.3]", "missing.mixed"),
    ("validate.mean_intensity_range=[200, 100]", "validate.mean_intensity_range"),
    ("evaluate.split=holdout", "evaluate.split"),
    ("runtime.eval_batch_size=0", "runtime.eval_batch_size"),
    ("promote.tolerance=-0.1", "promote.tolerance"),
    ("data.source=kaggle", "data.source"),
    ("data.source=my_formats.", "data.source"),
]


@pytest.mark.parametrize(("override", "key"), BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_value_exits_2_naming_the_key(
    override: str, key: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # `rima train` itself, in process: the value must be refused before any data is touched
    # (the store and masks named here do not exist, so reaching them would be another error).
    argv = [
        "train",
        "--params",
        os.devnull,
        "--store",
        str(tmp_path / "no-store"),
        "--masks",
        str(tmp_path / "no-masks.parquet"),
        "--out",
        str(tmp_path / "out"),
        "--no-mlflow",
        "--set",
        override,
    ]
    with caplog.at_level(logging.ERROR, logger="rima"):
        code = cli.main(argv)
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    message = errors[0]
    assert "\n" not in message
    assert message.startswith(f"params.{key}:"), message
    assert "no-store" not in message  # refused at load, not when the data was opened
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # four interpreters importing torch: ~40 s here
@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["train", "--no-mlflow", "--set", "train.epochs=0"], "train.epochs"),
        (["tune", "--no-mlflow", "--set", "tune.lr_range=[0.01, 0.001]"], "tune.lr_range"),
        (["evaluate", "--no-mlflow", "--set", "ot.gw_epsilon=-1"], "ot.gw_epsilon"),
        (
            ["prepare", "--set", "prepare.split_fractions=[0.9, 0.2, 0.1]"],
            "prepare.split_fractions",
        ),
    ],
    ids=["train", "tune", "evaluate", "prepare"],
)
def test_cli_process_prints_one_line_no_traceback(
    argv: list[str], key: str, tmp_path: Path
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("runtime:\n  device: cpu\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rima_core.pipeline.cli", *argv, "--params", str(params)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"params.{key}:" in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_shipped_params_and_profiles_are_valid() -> None:
    load_config(None)
    load_config(ROOT / "params.yaml")
    for profile in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(ROOT / "params.yaml", profile)


def test_config_from_dict_checks_values_too() -> None:
    values = Config().to_dict()
    values["train"]["batch_size"] = 0
    with pytest.raises(ConfigError, match=r"^config\.train\.batch_size: "):
        config_from_dict(values)


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()), ids=sorted(MOVED))
def test_renamed_key_is_refused_naming_the_new_one(old: str, new: str, tmp_path: Path) -> None:
    """An old name in an override, a params file, a stored config or a best-params mapping is
    an error that says what to write instead; never ignored, never the default silently."""
    section, key = old.split(".")
    value = Config().flat()[new]
    text = f"{old}={value}".replace("True", "true")
    with pytest.raises(ConfigError, match=rf"^params\.{old}: renamed; set {new} instead$"):
        load_config(None, overrides=[text])
    params = tmp_path / "params.yaml"
    params.write_text(f"{section}:\n  {key}: {value!r}\n".replace("True", "true"))
    with pytest.raises(ConfigError, match=rf"^params\.{old}: renamed; set {new} instead$"):
        load_config(params)
    stored = Config().to_dict()
    stored[section][key] = value
    with pytest.raises(ConfigError, match=rf"set {new} instead"):
        config_from_dict(stored)
    with pytest.raises(ConfigError, match=rf"^best\.{old}: renamed; set {new} instead$"):
        with_values(Config(), {old: value}, "best")


def test_trials_must_outlast_the_warm_up() -> None:
    with pytest.raises(ConfigError, match=r"^params\.tune\.epochs: must be >= train\.warmup"):
        load_config(None, overrides=["train.warmup_epochs=2", "tune.epochs=1"])


def test_moved_keys_point_at_keys_that_exist() -> None:
    keys = set(Config().flat())
    assert not set(MOVED) & keys, "a MOVED key that exists would be refused although valid"
    assert set(MOVED.values()) <= keys, set(MOVED.values()) - keys


def test_with_values_sets_checks_and_copies() -> None:
    cfg = Config()
    out = with_values(cfg, {"train.lr": "0.01", "ot.gw_epsilon": 1}, "best")
    assert out.train.lr == 0.01 and out.ot.gw_epsilon == 1.0  # coerced to the field types
    assert isinstance(out.ot.gw_epsilon, float)
    assert cfg.train.lr == Config().train.lr  # the input is left as it was
    with pytest.raises(ConfigError, match=r"^best: 'train\.nope' is not a section\.key"):
        with_values(cfg, {"train.nope": 1}, "best")
    with pytest.raises(ConfigError, match=r"^best\.train\.lr: must be"):
        with_values(cfg, {"train.lr": -1}, "best")


def test_boundaries_that_are_allowed() -> None:
    # zero where zero means "off", and the closed ends of the ranges
    load_config(
        None,
        overrides=[
            "tune.n_trials=0",
            "train.patience=0",
            "train.grad_clip=0",
            "train.warmup_epochs=0",
            "model.dropout=0",
            "missing.rate=1.0",
            "ot.loss_weight=0",
            "tune.timeout_s=null",
            "runtime.device=cuda:1",
            "synth.class_weights=[1, 0, 2]",
        ],
    )


def _numeric(tp: typing.Any) -> bool:
    """int/float fields, lists of them and optional ones (bool is not numeric)."""
    args = typing.get_args(tp)
    if tp in (int, float):
        return True
    return any(_numeric(a) for a in args if a is not type(None))


def test_every_numeric_key_has_a_rule_and_every_rule_a_key() -> None:
    """A new numeric setting needs one line in config.RULES (its domain); a renamed one must
    take its rule along."""
    keys = set(Config().flat())
    assert not set(RULES) - keys, f"rules for keys that do not exist: {set(RULES) - keys}"
    missing = []
    sections = typing.get_type_hints(Config)
    for section in dataclasses.fields(Config):
        cls = sections[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _numeric(hints[f.name]) and f"{section.name}.{f.name}" not in RULES:
                missing.append(f"{section.name}.{f.name}")
    assert not missing, f"numeric keys without a value rule in config.RULES: {missing}"


def test_name_lists_agree_with_their_sources() -> None:
    """config keeps light copies of names owned by torch/sklearn modules; they must agree."""
    import numpy as np

    from rima_core.core.data.sources import ALIASES, SOURCES
    from rima_core.core.metrics import classification_metrics
    from rima_core.core.models.encoders import FUNDUS_ENCODERS, OCT_ENCODERS
    from rima_core.core.models.rima import OT_TARGETS as MODEL_OT_TARGETS

    assert tuple(ENCODERS_2D) == tuple(FUNDUS_ENCODERS)
    assert tuple(ENCODERS_3D) == tuple(OCT_ENCODERS)
    assert tuple(OT_TARGETS) == tuple(MODEL_OT_TARGETS)
    assert set(SOURCE_NAMES) == set(SOURCES) | set(ALIASES)
    names = classification_metrics(np.arange(3), np.eye(3), ["a", "b", "c"])
    plain = {k for k in names if "/" not in k and k != "n_samples"}
    assert set(METRICS) == plain


def test_unknown_model_name_is_refused_at_load_listing_the_registry(tmp_path: Path) -> None:
    """A typo in model.name used to surface only when the model was built (after the data
    steps); now loading stops, naming every registered model and the closest one."""
    from rima_core.core.models import BUILDERS

    params = tmp_path / "params.yaml"
    params.write_text("model:\n  name: late_fusion\n")
    with pytest.raises(ConfigError) as err:
        load_config(params)
    message = str(err.value)
    assert message.startswith("params.model.name: must be one of ")
    assert all(repr(name) in message for name in BUILDERS)  # every name, from the registry
    assert "(did you mean 'late_fusion_zero'?)" in message
    assert message.endswith("got 'late_fusion'")
    # the same through --set, and with nothing close: no suggestion, still the list
    with pytest.raises(ConfigError, match=r"^params\.model\.name: .*got 'rimma'$") as err:
        load_config(None, overrides=["model.name=rimma"])
    assert "did you mean 'rima'?" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=["model.name=xyz123"])
    assert "did you mean" not in str(err.value) and "'distillation'" in str(err.value)
    # a stored config (a model's config.json) is checked the same way
    values = Config().to_dict()
    values["model"]["name"] = "rima_no_ot"
    with pytest.raises(ConfigError, match=r"^config\.model\.name: "):
        config_from_dict(values)


def test_every_registered_model_name_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The valid names are the registry's, not a copy: each loads, and a name added to the
    registry is valid without touching the config module."""
    import rima_core.core.models

    for name in rima_core.core.models.MODEL_NAMES:
        assert load_config(None, overrides=[f"model.name={name}"]).model.name == name
    monkeypatch.setattr(
        rima_core.core.models, "MODEL_NAMES", (*rima_core.core.models.MODEL_NAMES, "my_new_model")
    )
    assert load_config(None, overrides=["model.name=my_new_model"]).model.name == "my_new_model"


@pytest.mark.parametrize("source", ["auto", "gamma", "harvard", "my_group.formats.export_v2"])
def test_data_source_accepts_registered_names_aliases_and_plugin_modules(source: str) -> None:
    # a plug-in module must be registered (data.plugins) to be named; see test_security_data
    plugins = [f"data.plugins=[{source}]"] if "." in source else []
    validate_config(load_config(None, overrides=[f"data.source={source}", *plugins]))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("promote.scenario", "mixd"),
        ("promote.scenario", "mean"),  # metrics have no "mean" scenario to promote on
        ("promote.scenario", "oct_missing@0.3"),  # not a rate of missing.sweep
        ("train.selection_scenario", "oct_misssing"),
        ("tune.scenario", "fundus@1"),
    ],
)
def test_a_misspelt_scenario_fails_at_load_naming_the_key(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides=[f"{key}={value}"])
    assert str(err.value).startswith(f"params.{key}: '{value}' is not a scenario")


def test_scenario_keys_accept_every_scenario_the_masks_will_have() -> None:
    from rima_core.core.data.masks import scenario_names

    sweep = ["missing.sweep=[0.3, 1.0]"]
    cfg = load_config(None, overrides=[*sweep, "promote.scenario=oct_missing@0.3"])
    assert "oct_missing@0.3" in scenario_names(cfg.missing)
    for name in ("mean", "complete", "mixed", "fundus_missing@0.3"):
        load_config(
            None, overrides=[*sweep, f"train.selection_scenario={name}", f"tune.scenario={name}"]
        )
    with pytest.raises(ConfigError, match="did you mean 'mixed'"):
        load_config(None, overrides=["promote.scenario=mixd"])
