"""The schema is the one written source of each key: params.yaml's comments, the JSON Schema and
the docs' parameter reference are rendered from it, and the JSON Schema refuses what load-time
validation refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from rima_core.config import RULES, ConfigError, Scenario, load_config, parse_override
from rima_core.config import reference as ref
from rima_core.config.schema import keys

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rel", [ref.PARAMS, ref.JSON_SCHEMA, ref.DOCS])
def test_rendered_files_are_what_the_schema_renders(rel: str) -> None:
    text = ref.rendered(ROOT)[rel]
    assert (ROOT / rel).read_text(encoding="utf-8") == text, (
        f"{rel} differs from the schema; run `python -m rima_core.config.reference --write`"
    )


def test_check_mode_names_a_hand_edited_comment(tmp_path: Path) -> None:
    for rel in (ref.PARAMS, ref.JSON_SCHEMA, ref.DOCS):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((ROOT / rel).read_text())
    params = tmp_path / ref.PARAMS
    params.write_text(params.read_text().replace("# training epochs", "# epochs (edited)"))
    assert ref.stale(tmp_path) == [ref.PARAMS]
    done = subprocess.run(
        [sys.executable, "-m", "rima_core.config.reference", "--check", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 1
    assert "params.yaml" in done.stderr
    # --write restores it, keeping the values the file holds
    params.write_text(params.read_text().replace("epochs: 15 ", "epochs: 9  "))
    assert ref.write(tmp_path) == [ref.PARAMS]
    assert ref.stale(tmp_path) == []
    assert load_config(params).train.epochs == 9
    assert "# training epochs" in params.read_text()


def test_params_yaml_rendering_keeps_every_value() -> None:
    cfg = load_config(ROOT / "params.yaml")
    again = yaml.safe_load(ref.render_params(cfg))
    assert again == cfg.to_dict()


def test_every_key_has_help_and_every_valued_key_a_check() -> None:
    for dotted, f in keys():
        assert f.metadata.get("help"), f"{dotted}: no help text in the schema"
        tp = str(f.type)
        if any(t in tp for t in ("int", "float")) and "str" not in tp:
            assert dotted in RULES, f"{dotted}: a number without a value check"


def _validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / ref.JSON_SCHEMA).read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def test_params_and_profiles_satisfy_the_json_schema() -> None:
    validator = _validator()
    for path in [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text()) or {}))
        assert not errors, f"{path.name}: {errors[0].message}"


# values load-time validation refuses; the JSON Schema (an editor's check) must refuse them too
REFUSED = [
    "train.epochs=0",
    "train.lr=-0.001",
    "train.augment=[rotate]",
    "ot.gw_epsilon=0",
    "ot.pairing_mix=1.5",
    "ot.target=nearest",
    "model.dropout=1.0",
    "model.name=rimma",
    "model.fundus_encoder=vgg",
    "runtime.device=gpu",
    "tune.lr_range=[0.001]",
    "tune.storage=optuna.db",
    "prepare.oct_shape=[16, 0, 16]",
    "missing.mixed=[0.3]",
    "validate.min_split_fraction={train: 1.5}",
    "promote.scenario=mixd",
    "train.selection_scenario=average",
    "evaluate.split=holdout",
    "synth.anatomy=left",
    "train.bogus=1",
]


@pytest.mark.parametrize("override", REFUSED)
def test_json_schema_refuses_what_loading_refuses(override: str) -> None:
    with pytest.raises(ConfigError):
        load_config(ROOT / "params.yaml", overrides=[override])
    assert list(_validator().iter_errors(parse_override(override))), override


def test_reference_lists_every_key_with_its_allowed_values() -> None:
    docs = (ROOT / ref.DOCS).read_text()
    for dotted, _ in keys():
        section, key = dotted.split(".")
        assert f"## `{section}`" in docs
        assert f"| `{key}` |" in docs
    assert "integer ≥ 1" in docs  # train.epochs' check, in words
    row = next(line for line in docs.splitlines() if line.startswith("| `pairing_mix` |"))
    assert "number ≥ 0, ≤ 1" in row


def test_a_changed_range_changes_loading_docs_and_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    from rima_core.config import checks, schema

    f = next(f for d, f in keys() if d == "train.epochs")
    meta = dict(f.metadata)
    meta["check"] = checks.integer(2)
    monkeypatch.setattr(f, "metadata", meta)
    monkeypatch.setitem(schema.RULES, "train.epochs", meta["check"])
    assert "integer ≥ 2" in ref.render_docs()
    assert json.loads(ref.render_json_schema())["properties"]["train"]["properties"]["epochs"][
        "allOf"
    ][1] == {"type": "integer", "minimum": 2}
    with pytest.raises(ConfigError, match=r"train\.epochs: must be an integer >= 2"):
        load_config(ROOT / "params.yaml", overrides=["train.epochs=1"])


@pytest.mark.parametrize(
    ("name", "family", "rate"),
    [("mixed", "mixed", None), ("oct_missing@0.25", "oct_missing", 0.25)],
)
def test_scenario_parses_once(name: str, family: str, rate: float | None) -> None:
    s = Scenario.parse(name)
    assert (s.family, s.rate, s.name, s.is_sweep) == (family, rate, name, rate is not None)


@pytest.mark.parametrize("name", ["mixed@0.5", "oct_missing@x", "oct_missing@1.5"])
def test_a_malformed_sweep_scenario_is_refused_naming_it(name: str) -> None:
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        Scenario.parse(name)


def test_every_search_range_says_what_it_tunes() -> None:
    """The tuned parameters are read from the schema: each ``tune.*_range`` key names the key it
    searches and the scale, and tuning samples exactly those."""
    from rima_core.config.schema import key_field, tuned_parameters
    from rima_core.runs.tune_study import LINEAR, TUNED

    ranges = [d for d, _ in keys() if d.startswith("tune.") and d.endswith("_range")]
    tuned = tuned_parameters()
    assert sorted(f"tune.{key}" for key, _ in tuned.values()) == sorted(ranges)
    for name, (key, scale) in tuned.items():
        key_field(name)  # a real key
        assert key.removesuffix("_range") == name.split(".")[1]
        assert scale in ("log", "linear")
    assert list(TUNED) == list(tuned) and set(LINEAR) == {
        n for n, (_, s) in tuned.items() if s == "linear"
    }
