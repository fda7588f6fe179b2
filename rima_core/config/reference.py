"""What is rendered from the schema: ``params.yaml`` (values kept, comments from the help text),
``params.schema.json`` (a JSON Schema for editor completion and checking) and
``docs/parameters.md`` (the parameter reference).

``python -m rima_core.config.reference --write`` rewrites the three files; ``--check`` exits 1
naming the ones that differ (tests/contracts/test_config_reference.py runs the same comparison), so
a help text, range or default is written once, in :mod:`rima_core.config.schema`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rima_core.atomic import write_text
from rima_core.config.checks import JsonSchema
from rima_core.config.loading import load_config
from rima_core.config.schema import Config, sections

log = logging.getLogger("rima.config")

ROOT = Path(__file__).resolve().parents[2]
PARAMS = "params.yaml"
JSON_SCHEMA = "params.schema.json"
DOCS = "docs/parameters.md"
COMMENT_COLUMN = 29  # where a trailing comment starts (as DVC's example params files align)
WIDTH = 100

PARAMS_HEADER = f"""\
# yaml-language-server: $schema={JSON_SCHEMA}
# The project's chosen value of every config key. DVC stages list the keys they read under
# `params:`; the `rima` CLI loads this file (and an optional --profile on top, e.g.
# configs/paper.yaml). Keys, defaults, checks and these comments come from the schema in
# rima_core/config/schema.py: edit a value here, a comment there, then run
# `python -m rima_core.config.reference --write`.
"""


def _help(obj: Any) -> str:
    return " ".join((obj or "").split())


def section_help(cls: type) -> str:
    """A section's help: its docstring, on one line."""
    return _help(cls.__doc__)


def _yaml_value(value: Any) -> str:
    """``value`` as one line of YAML that PyYAML and DVC read back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9)
    return text.removesuffix("\n...\n").strip()


def _commented(line: str, help_text: str, indent: str) -> list[str]:
    """``line`` with its help as a trailing comment, or above it when the two do not fit."""
    if not help_text:
        return [line]
    trailing = f"{line}{' ' * max(COMMENT_COLUMN - 1 - len(line), 2)}# {help_text}"
    if len(trailing) <= WIDTH:
        return [trailing]
    wrapped = textwrap.wrap(help_text, WIDTH - len(indent) - 2)
    return [f"{indent}# {w}" for w in wrapped] + [line]


def render_params(cfg: Config) -> str:
    """``params.yaml`` holding ``cfg``'s values, commented from the schema."""
    values = cfg.to_dict()
    lines = [PARAMS_HEADER.rstrip("\n")]
    for name, cls in sections():
        lines += _commented(f"{name}:", section_help(cls), "")
        for f in dataclasses.fields(cls):
            line = f"  {f.name}: {_yaml_value(values[name][f.name])}"
            lines += _commented(line, _help(f.metadata.get("help")), "  ")
    return "\n".join(lines) + "\n"


def type_schema(tp: Any) -> JsonSchema:
    """The JSON Schema of a field's Python type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = (
            type_schema(args[0]) if len(args) == 1 else {"anyOf": [type_schema(a) for a in args]}
        )
        return {"anyOf": [inner, {"type": "null"}]}
    if origin is list:
        (item,) = typing.get_args(tp)
        return {"type": "array", "items": type_schema(item)}
    if origin is dict:
        return {"type": "object", "additionalProperties": type_schema(typing.get_args(tp)[1])}
    simple = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return {"type": simple[tp]}


def key_schema(f: dataclasses.Field[Any], tp: Any, default: Any) -> JsonSchema:
    """One key: its type and value check (both must hold), help and default."""
    check = f.metadata.get("check")
    parts = [type_schema(tp)] + ([check.schema] if check is not None else [])
    out: JsonSchema = parts[0] if len(parts) == 1 else {"allOf": parts}
    return {**out, "description": _help(f.metadata.get("help")), "default": default}


def json_schema() -> JsonSchema:
    """The JSON Schema of a params file. No key is required: a profile names only what it
    changes; unknown keys are refused, as at load."""
    defaults = Config().to_dict()
    properties: dict[str, Any] = {}
    for name, cls in sections():
        hints = typing.get_type_hints(cls)
        properties[name] = {
            "type": "object",
            "description": section_help(cls),
            "additionalProperties": False,
            "properties": {
                f.name: key_schema(f, hints[f.name], defaults[name][f.name])
                for f in dataclasses.fields(cls)
            },
        }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "RIMA pipeline parameters (params.yaml, configs/*.yaml)",
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }


def render_json_schema() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"


def _number(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


_PLURAL = {"integer": "integers", "number": "numbers", "string": "strings"}


def describe(schema: JsonSchema) -> str:
    """A value check's JSON Schema fragment in words, for the reference table."""
    note = schema.get("description", "")
    if "allOf" in schema:
        text = " and ".join(describe(s) for s in schema["allOf"])
    elif "anyOf" in schema:
        text = " or ".join(describe(s) for s in schema["anyOf"])
    elif "enum" in schema:
        text = "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    elif schema.get("type") == "array":
        n = schema.get("minItems")
        exact = n is not None and n == schema.get("maxItems")
        first, _, rest = describe(schema["items"]).partition(" ")
        if first in _PLURAL:
            items = " ".join(filter(None, [_PLURAL[first], rest]))
            text = f"list of {n} {items}" if exact else f"list of {items}"
        else:
            text = f"list of {n}, each {first} {rest}" if exact else f"list, each {first} {rest}"
        if n and not exact:
            text += f" (at least {n})"
    elif schema.get("type") == "object":
        text = f"mapping to {describe(schema.get('additionalProperties', {}))}"
    elif note and set(schema) <= {"type", "pattern", "description"}:
        return note  # a kind of string, in the words of its check
    else:
        kind = schema.get("type", "any value")
        text = {"null": "null", "boolean": "true/false"}.get(kind, kind)
        bounds = [
            f"{sign} {_number(schema[k])}"
            for k, sign in (
                ("minimum", "≥"),
                ("exclusiveMinimum", ">"),
                ("maximum", "≤"),
                ("exclusiveMaximum", "<"),
            )
            if k in schema
        ]
        if bounds:
            text += " " + ", ".join(bounds)
        if "pattern" in schema:
            text += f" matching `{schema['pattern']}`"
    return f"{text} ({note})" if note else text


def _cell(text: str) -> str:
    """``text`` safe in a Markdown table cell (no column break, no HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render_docs() -> str:
    """``docs/parameters.md``: every key with its default, allowed values and help."""
    defaults = Config().to_dict()
    out = [
        "# Parameter reference",
        "",
        "Every key of `params.yaml`, generated from the schema in `rima_core/config/schema.py`",
        "(`python -m rima_core.config.reference --write`). Profiles (`configs/*.yaml`) and",
        "`--set section.key=value` overrides use the same keys; a value outside its range stops",
        "the command that loads it, naming the key. Editors that read JSON Schema complete and",
        f"check `params.yaml` from `{JSON_SCHEMA}`. See [Configuration](configuration.md) for how",
        "the layers stack.",
    ]
    for name, cls in sections():
        hints = typing.get_type_hints(cls)
        out += [
            "",
            f"## `{name}`",
            "",
            section_help(cls),
            "",
            "| key | default | allowed | meaning |",
        ]
        out.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            allowed = describe(check.schema if check else type_schema(hints[f.name]))
            default = _yaml_value(defaults[name][f.name])
            meaning = _help(f.metadata.get("help"))
            allowed, default, meaning = (_cell(t) for t in (allowed, default, meaning))
            out.append(f"| `{f.name}` | `{default}` | {allowed} | {meaning} |")
    return "\n".join(out) + "\n"


def rendered(root: Path = ROOT) -> dict[str, str]:
    """Each rendered file's path (relative to ``root``) -> its text now; ``params.yaml`` keeps
    the values it holds."""
    return {
        PARAMS: render_params(load_config(root / PARAMS)),
        JSON_SCHEMA: render_json_schema(),
        DOCS: render_docs(),
    }


def stale(root: Path = ROOT) -> list[str]:
    """The rendered files whose checked-in text differs from what the schema renders."""
    out = []
    for rel, text in rendered(root).items():
        path = root / rel
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            out.append(rel)
    return out


def write(root: Path = ROOT) -> list[str]:
    """Rewrite the rendered files that differ (each atomically); returns their paths."""

    changed = stale(root)
    texts = rendered(root)
    for rel in changed:
        write_text(root / rel, texts[rel])
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rima_core.config.reference", description=__doc__
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if a rendered file is stale")
    mode.add_argument("--write", action="store_true", help="rewrite the stale rendered files")
    parser.add_argument("--root", type=Path, default=ROOT, help="the project folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.write:
        for rel in write(args.root):
            log.info("rewrote %s", rel)
        return 0
    bad = stale(args.root)
    for rel in bad:
        log.error("%s differs from what rima_core/config/schema.py renders; run with --write", rel)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
