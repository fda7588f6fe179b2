"""One list of run parameters: ``rima_core.pipeline.remote_config.RUN_PARAMETERS``.

KFP reads literal Python signatures (the pipeline function, the ``resolve-config`` component), so
those stay written out; these tests fail naming the parameter where a signature, the compiler's
arguments, the compiled package or the documented table (docs/kubernetes.md) disagree with
the list.
"""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path
from typing import Any

import pytest

from components import STEP_FUNCTIONS
from pipelines.cli import parameters_markdown
from pipelines.compile import pipeline_arguments
from pipelines.rima_pipeline import build_pipeline
from rima_core.config import Config, ConfigError
from rima_core.pipeline.remote_config import (
    CONFIG_PARAMETERS,
    RUN_PARAMETERS,
    overrides_from_parameters,
)

ROOT = Path(__file__).resolve().parents[2]
CARRIED = ("params_yaml", "profile_yaml")
KFP_TYPES = {
    str: "STRING",
    int: "NUMBER_INTEGER",
    float: "NUMBER_DOUBLE",
    bool: "BOOLEAN",
    list: "LIST",
}


def _differences(got: dict[str, Any], want: dict[str, Any], what: str) -> list[str]:
    out = [f"{what}: {n} is not in RUN_PARAMETERS" for n in got if n not in want]
    out += [f"{what}: lacks {n}" for n in want if n not in got]
    out += [
        f"{what}: {n} is {got[n]!r}, RUN_PARAMETERS says {want[n]!r}"
        for n in got
        if n in want and got[n] != want[n]
    ]
    return out


def test_every_config_key_exists() -> None:
    cfg = Config()
    for p in CONFIG_PARAMETERS:
        section, key = p.config_key.split(".")
        assert hasattr(getattr(cfg, section, None), key), f"{p.name}: no config key {p.config_key}"
    names = [p.name for p in RUN_PARAMETERS]
    assert len(names) == len(set(names)), "a run parameter is listed twice"


def test_pipeline_signature_is_the_table() -> None:
    func = build_pipeline().pipeline_func
    params = inspect.signature(func).parameters
    assert list(params) == [p.name for p in RUN_PARAMETERS], "order or names differ"
    got = {n: (a.annotation, a.default) for n, a in params.items()}
    want = {p.name: (p.type, p.embedded_default()) for p in RUN_PARAMETERS}
    assert not _differences(got, want, "rima_pipeline signature")


def test_resolve_config_signature_is_the_config_rows() -> None:
    params = inspect.signature(STEP_FUNCTIONS["resolve_config"]).parameters
    got = {n: a.annotation for n, a in params.items() if n != "config"}
    want = {n: str for n in CARRIED} | {p.name: p.type for p in CONFIG_PARAMETERS}
    assert not _differences(got, want, "components.config.resolve_config signature")
    assert list(got) == list(want), "order differs from RUN_PARAMETERS"


def test_overrides_name_a_parameter_the_component_did_not_pass() -> None:
    values = {p.name: p.embedded_default() for p in CONFIG_PARAMETERS}
    assert overrides_from_parameters(values)["tune.n_trials"] == values["tune_trials"]
    del values["tune_trials"]
    with pytest.raises(ConfigError, match="tune_trials"):
        overrides_from_parameters(values)


def test_compiler_arguments_follow_the_table() -> None:
    args = pipeline_arguments(None, None, ["tune.n_trials=5", "missing.mixed=[0.1, 0.2]"])
    assert list(args) == [*CARRIED, *(p.name for p in CONFIG_PARAMETERS)]
    assert args["tune_trials"] == 5 and args["missing_mixed"] == [0.1, 0.2]
    for p in CONFIG_PARAMETERS:
        assert isinstance(args[p.name], p.type), f"{p.name}: {args[p.name]!r} is no {p.type}"


def test_compiled_package_inputs_are_the_table(tmp_path: Path) -> None:
    from kfp import compiler

    from pipelines.submit import package_parameters

    package = tmp_path / "p.yaml"
    compiler.Compiler().compile(pipeline_func=build_pipeline(), package_path=str(package))
    got = package_parameters(package)
    want = {p.name: KFP_TYPES[p.type] for p in RUN_PARAMETERS}
    assert not _differences(got, want, "compiled package inputs")


def test_docs_table_is_generated_from_the_table() -> None:
    page = (ROOT / "docs" / "kubernetes.md").read_text()
    found = re.search(r"<!-- run-parameters -->\n(.*?)<!-- /run-parameters -->", page, re.S)
    assert found, (
        "docs/kubernetes.md lacks the <!-- run-parameters --> ... <!-- /run-parameters --> block"
    )
    assert found.group(1) == parameters_markdown(), (
        "docs/kubernetes.md's run-parameter table is stale: replace the block with the output of "
        "`python -m pipelines parameters`"
    )


def test_config_parameters_take_type_and_help_from_the_schema() -> None:
    """A config-setting run parameter is declared by its name and key alone: its help (the
    docs/kubernetes.md table) and KFP type are the schema's, so they cannot drift apart."""
    from rima_core.config.schema import key_field

    for p in CONFIG_PARAMETERS:
        field, tp = key_field(p.config_key)  # type: ignore[arg-type]
        assert p.help.startswith(field.metadata["help"]), p.name
        assert p.type in (list, str, int, float, bool), p.name
        assert p.type is list or p.type in typing.get_args(tp) or p.type is tp, (p.name, tp)
