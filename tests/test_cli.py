"""The command line's own surface: help text, version, defaults."""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import rima_core
from rima_core.cli import _PlainTextFilter, build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_the_package(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["--version"])
    assert exc.value.code == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out.strip() == f"rima {project['version']}"
    assert rima_core.__version__ == project["version"]


def test_top_level_help_is_plain_text() -> None:
    text = build_parser().format_help()
    assert "``" not in text and ":mod:" not in text and ":func:" not in text
    assert "--version" in text
    assert "rima COMMAND --help" in text


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if a.dest == "command").choices


def test_help_shows_real_defaults_once() -> None:
    from pipelines.cli import build_parser as build_pipelines_parser

    compile_help = _subcommands(build_pipelines_parser())["compile"].format_help()
    compile_help = re.sub(r"\s+", " ", compile_help)
    assert "(default: rima_pipeline.yaml)" in compile_help
    sub = _subcommands(build_parser())
    train_help = sub["train"].format_help()
    assert "(default: None)" not in train_help and "(default: False)" not in train_help
    assert train_help.count("(default: params.yaml)") == 1


def test_colour_codes_are_stripped_from_log_records() -> None:
    record = logging.LogRecord(
        "py.warnings", logging.WARNING, __file__, 1, "%s", ("\x1b[33mAdd type hints\x1b[0m",), None
    )
    assert _PlainTextFilter().filter(record)
    assert record.getMessage() == "Add type hints"


def test_rima_version_from_the_console_script() -> None:
    exe = Path(sys.executable).parent / "rima"
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("rima ")


def test_source_names_come_from_the_source_registry() -> None:
    """`rima prepare --source` takes every registered source and alias, `auto`, and a dotted
    module path (a plug-in format, which prepare imports); anything else exits 2 naming them."""
    from rima_core.data.sources import ALIASES, SOURCES

    prepare = _subcommands(build_parser())["prepare"]
    for name in [*SOURCES, *ALIASES, "auto", "my_lab.sources.export_v2"]:
        assert prepare.parse_args(["--source", name]).source == name
    assert all(name in prepare.format_help() for name in SOURCES)
    with pytest.raises(SystemExit) as exc:
        prepare.parse_args(["--source", "fairvison"])
    assert exc.value.code == 2


def test_a_plug_in_source_module_reaches_prepare(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The dotted path is not only parsed: prepare imports it, and a module without scan/load is
    the user's error (exit 2), not an argparse rejection."""
    from rima_core.cli import main

    argv = ["prepare", "--input", str(tmp_path), "--out", str(tmp_path / "store")]
    with caplog.at_level(logging.ERROR, logger="rima"):
        assert main([*argv, "--source", "json.decoder"]) == 2  # imports; no scan()/load()
    assert "source module 'json.decoder' must define scan() and load()" in caplog.text
    assert not (tmp_path / "store").exists()
