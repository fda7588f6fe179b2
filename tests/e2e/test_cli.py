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
from rima_core.pipeline.cli import _PlainTextFilter, build_parser

ROOT = Path(__file__).resolve().parents[2]


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
    from rima_core.core.data.sources import ALIASES, SOURCES

    prepare = _subcommands(build_parser())["prepare"]
    for name in [*SOURCES, *ALIASES, "auto", "my_lab.sources.export_v2"]:
        assert prepare.parse_args(["--source", name]).source == name
    assert all(name in prepare.format_help() for name in SOURCES)
    with pytest.raises(SystemExit) as exc:
        prepare.parse_args(["--source", "fairvison"])
    assert exc.value.code == 2


def test_a_plug_in_source_module_must_be_registered_before_it_is_imported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dotted path passes argparse, but prepare imports it only when data.plugins lists it
    (or a rima.sources entry point names it); listed but without scan/load is refused before
    any file is read. Each is the user's error: exit 2, one line, no store."""
    from rima_core.pipeline.cli import main

    pkg = tmp_path / "lab_formats"
    pkg.mkdir()
    marker = tmp_path / "IMPORTED"
    (pkg / "__init__.py").write_text("")
    (pkg / "export.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["prepare", "--input", str(tmp_path), "--out", str(tmp_path / "store")]
    argv += ["--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    with caplog.at_level(logging.ERROR, logger="rima"):
        assert main([*argv, "--source", "lab_formats.export"]) == 2
    assert "--source lab_formats.export: plug-in module 'lab_formats.export' is not" in caplog.text
    assert "data.plugins" in caplog.text
    assert not marker.exists() and "lab_formats.export" not in sys.modules
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="rima"):
        rc = main(
            [*argv, "--source", "lab_formats.export", "--set", "data.plugins=[lab_formats.export]"]
        )
    assert rc == 2
    assert "source module 'lab_formats.export' must define scan() and load()" in caplog.text
    assert marker.exists()  # registered: imported, then refused before reading the tree
    assert not (tmp_path / "store").exists()
    sys.modules.pop("lab_formats.export", None)
    sys.modules.pop("lab_formats", None)


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["trian"], "did you mean 'train'?"),
        (["simulate-misisng"], "did you mean 'simulate-missing'?"),
        (["train", "--epochs", "2"], "e.g. --set train.epochs=..."),
        (["tune", "--epochs", "2"], "e.g. --set tune.epochs=..."),
        (["evaluate", "--batch-size", "8"], "e.g. --set train.batch_size=..."),
        (["train", "--zzz"], "settings are changed with --set SECTION.KEY=VALUE"),
    ],
)
def test_a_mistyped_command_or_flag_says_what_was_meant(
    argv: list[str], hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert hint in err and "Traceback" not in err


def test_a_mistyped_config_key_names_the_closest_one(tmp_path: Path) -> None:
    from rima_core.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[2]
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lrr'\] \(did you mean 'lr'\?\)"):
        load_config(str(root / "params.yaml"), overrides=["train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'train'\?"):
        load_config(str(root / "params.yaml"), overrides=["trian.lr=0.1"])
    with pytest.raises(ConfigError) as far:
        load_config(str(root / "params.yaml"), overrides=["train.qqqqq=1"])
    assert "did you mean" not in str(far.value)  # nothing close: no guess


def test_a_step_summary_is_one_log_line_and_json_only_on_request() -> None:
    from rima_core.pipeline.cli import summary_line

    summary = {"n_eyes": 600, "qwk": 0.87654321, "ok": True, "splits": {"train": 360}, "p": None}
    assert summary_line(summary) == "n_eyes=600 qwk=0.8765 ok=True p=None"
    assert summary_line({"nested": {"a": 1}}) == "(see --json)"
    assert len(summary_line({f"k{i}": "x" * 20 for i in range(30)})) == 200


def test_params_overrides_and_json_flag_from_the_console_script(tmp_path: Path) -> None:
    """Without --json a step prints nothing on stdout (its summary is a log line on stderr);
    with --json stdout is exactly the summary's JSON."""
    import json

    out = tmp_path / "raw"
    args = ["data", "synth", "--out", str(out), "--n-eyes", "12", "--set", "synth.fundus_size=16"]
    args += ["--set", "synth.oct_shape=[8,8,8]"]
    exe = str(Path(sys.executable).parent / "rima")
    plain = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stdout == "" and "data done: " in plain.stderr and "n_eyes=12" in plain.stderr
    loud = subprocess.run([exe, "--json", *args], capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and json.loads(loud.stdout)["n_eyes"] == 12


def test_a_warning_is_one_log_line() -> None:
    from rima_core.pipeline.cli import _one_line_warning

    text = _one_line_warning(UserWarning("Hint:\n  two lines"), UserWarning, "f.py", 3, "warn(")
    assert text == "f.py:3: UserWarning: Hint: two lines"
