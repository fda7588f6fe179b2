"""One plug-in rule for what may name a source format: params loading, the ``--source`` option
and the source loader all ask :func:`rima_core.config.source_refusal`, so they cannot disagree."""

from __future__ import annotations

import argparse
import sys

import pytest

from rima_core.config import ConfigError, load_config, source_refusal
from rima_core.core.data.sources import load_plugin
from rima_core.core.data.types import SourceError
from rima_core.pipeline.step_registry import source_name

NAMES = ["auto", "FairVision", "gamma", "rima_folders", "kaggle", "my_formats.reader"]


@pytest.mark.parametrize("name", NAMES)
def test_loading_and_the_command_line_follow_the_rule(name: str) -> None:
    registered = source_refusal(name, []) is None
    try:
        load_config(None, overrides=[f"data.source={name}"])
        loaded = True
    except ConfigError as exc:
        loaded = False
        assert str(source_refusal(name, [])) in str(exc)
    assert loaded == registered, name
    shaped = source_refusal(name, None) is None
    try:
        source_name(name)
        accepted = True
    except argparse.ArgumentTypeError:
        accepted = False
    assert accepted == shaped, name


def test_a_listed_module_is_accepted_and_an_unlisted_one_never_imported() -> None:
    assert source_refusal("my_formats.reader", ["my_formats.reader"]) is None
    load_config(
        None, overrides=["data.source=my_formats.reader", "data.plugins=[my_formats.reader]"]
    )
    assert "venv.__main__" not in sys.modules
    with pytest.raises(SourceError, match="not registered") as err:
        load_plugin("venv.__main__", plugins=[])
    assert str(source_refusal("venv.__main__", [])) in str(err.value)
    assert "venv.__main__" not in sys.modules  # refused before the import
