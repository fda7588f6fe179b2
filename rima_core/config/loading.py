"""Loading a config: defaults <- ``params.yaml`` <- profile <- ``section.key=value`` overrides,
types coerced while building and every value checked (the schema's :data:`RULES`, then the
checks that span keys, :data:`CROSS_RULES`), so a bad value stops the CLI with one line naming
the key before any data is read.

Unknown keys are errors, so a typo in a profile never silently falls back to a default; a key
that was renamed is refused with its new name (:data:`MOVED`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rima_core.config.checks import ConfigError, did_you_mean
from rima_core.config.scenarios import MEAN_SCENARIO, scenario_names
from rima_core.config.schema import RULES, Config, source_refusal


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not fit {tp}")
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): _coerce(v, val_tp, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from exc
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from exc
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        hints = did_you_mean(sorted(unknown), names)
        raise ConfigError(
            f"{where}: unknown key(s) {sorted(unknown)}{hints}; known: {sorted(names)}"
        )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{name}: expected a mapping")
            kwargs[name] = _build(tp, value, f"{where}.{name}")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    return cls(**kwargs)


# Keys that were renamed or moved -> their name now. A file or override that still sets the old
# name is refused with the new one (never silently ignored, never silently translated: the old
# name in a profile would otherwise hide which section a setting belongs to).
MOVED: dict[str, str] = {
    "train.device": "runtime.device",
    "train.amp": "runtime.amp",
    "train.num_workers": "runtime.num_workers",
    "train.seed": "runtime.seed",
    "evaluate.batch_size": "runtime.eval_batch_size",
    "tune.gw_epsilon": "tune.gw_epsilon_range",
    "tune.feature_epsilon": "tune.feature_epsilon_range",
    "tune.loss_weight": "tune.loss_weight_range",
    "tune.lr": "tune.lr_range",
}


def refuse_moved(values: dict[str, Any], where: str) -> None:
    """Raise a :class:`ConfigError` naming the new key for any :data:`MOVED` key in ``values``
    (``{"section": {"key": ...}}``) or a ``section.key`` mapping (``best_params.json``)."""
    for section, keys in values.items():
        dotted = [f"{section}.{k}" for k in keys] if isinstance(keys, dict) else [str(section)]
        for old in dotted:
            if old in MOVED:
                raise ConfigError(f"{where}.{old}: renamed; set {MOVED[old]} instead")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` layered over ``base``: nested mappings merge key by key, anything else in
    ``update`` replaces. The layering rule of params <- profile <- overrides, public so callers
    that carry a layer as text (the pipeline compiler) stack layers exactly as here."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader (no Python tags) that also refuses a key given twice in one mapping
    (PyYAML keeps the last silently; DVC refuses the file), naming the key and both lines."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` merges may repeat keys
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} on line {key_node.start_mark.line + 1} "
                    f"(first on line {first + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``text`` parsed by :class:`StrictLoader`."""
    return yaml.load(text, Loader=StrictLoader)


def yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error as one line (PyYAML's messages span several, with a code excerpt)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        if exc.problem.startswith("duplicate key"):
            where = ""
        context = f"{exc.context}: " if exc.context else ""
        return " ".join(f"{context}{exc.problem}{where}".split())
    return " ".join(str(exc).split())


def parse_override(text: str) -> dict[str, Any]:
    """``train.lr=3e-4`` -> ``{"train": {"lr": 3e-4}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"override {dotted.strip()}: not a valid value: {yaml_error(exc)}"
        ) from None
    return {parts[0]: {parts[1]: value}}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml(path.read_bytes().decode("utf-8")) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such params file") from exc
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a params file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error(exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def load_config(
    params: str | Path | None = "params.yaml",
    profile: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Defaults <- params.yaml <- profile file <- ``section.key=value`` overrides.

    A missing ``params.yaml`` at the default path means "embedded defaults"; an explicitly named
    file that is missing is an error.
    """
    merged: dict[str, Any] = {}
    if params is not None:
        path = Path(params)
        if path.exists() or str(params) != "params.yaml":
            merged = _read_yaml(path)
    if profile is not None:
        merged = deep_merge(merged, _read_yaml(Path(profile)))
    for text in overrides or []:
        merged = deep_merge(merged, parse_override(text))
    refuse_moved(merged, "params")
    return validate_config(_build(Config, merged, "params"))


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. stored with a model)."""
    refuse_moved(values, "config")
    return validate_config(_build(Config, values, "config"), "config")


def with_values(cfg: Config, values: dict[str, Any], where: str) -> Config:
    """A checked copy of ``cfg`` with ``section.key -> value`` set: the one way tuned values
    (a trial's sample, ``best_params.json``) get into a config. Types are coerced and values
    checked as for a params file; an unknown or renamed key is an error naming ``where``."""
    refuse_moved(values, where)
    merged = cfg.to_dict()
    for dotted, value in values.items():
        section, _, key = str(dotted).partition(".")
        if not key or section not in merged or key not in merged[section]:
            raise ConfigError(f"{where}: {dotted!r} is not a section.key parameter")
        merged[section][key] = value
    return validate_config(_build(Config, merged, where), where)


def _source_registered(cfg: Config) -> tuple[str, str] | None:
    """A dotted ``data.source`` must be registered: listed in data.plugins or an entry point."""
    reason = source_refusal(cfg.data.source, cfg.data.plugins)
    return ("data.source", reason) if reason else None


def _class_weights_match(cfg: Config) -> tuple[str, str] | None:
    w = cfg.synth.class_weights
    if w is not None and len(w) != cfg.synth.n_classes:
        return "synth.class_weights", f"must have synth.n_classes={cfg.synth.n_classes} items"
    if w is not None and sum(w) <= 0:
        return "synth.class_weights", "must have a positive sum"
    return None


def _missing_fractions(cfg: Config) -> tuple[str, str] | None:
    s = cfg.synth
    if s.missing_fundus_fraction + s.missing_oct_fraction > 1:
        return "synth.missing_oct_fraction", "plus synth.missing_fundus_fraction must be <= 1"
    return None


def _one_graded_latent(cfg: Config) -> tuple[str, str] | None:
    # the grade's score has one extra latent at most (synthetic.py: GRADE_SCORES)
    if cfg.synth.anatomy != "none" and cfg.synth.private_latent != "none":
        return "synth.private_latent", "must be 'none' when synth.anatomy is on (one at a time)"
    return None


def _warmup_within_epochs(cfg: Config) -> tuple[str, str] | None:
    if cfg.train.warmup_epochs > cfg.train.epochs:
        return "train.warmup_epochs", f"must be <= train.epochs ({cfg.train.epochs})"
    return None


def _warmup_within_trials(cfg: Config) -> tuple[str, str] | None:
    # a trial trains tune.epochs with train's warm-up: a longer warm-up never reaches the
    # sampled lr, so the trial would measure another lr than the final training uses
    if cfg.train.warmup_epochs > cfg.tune.epochs:
        return "tune.epochs", f"must be >= train.warmup_epochs ({cfg.train.warmup_epochs})"
    return None


def _scenario_keys(cfg: Config) -> tuple[str, str] | None:
    # a misspelt scenario would otherwise surface only when a stage looks it up (or, for
    # promote.scenario, be replaced by another scenario's numbers)
    names = scenario_names(cfg.missing)
    for key, value, allowed in (
        ("train.selection_scenario", cfg.train.selection_scenario, [MEAN_SCENARIO, *names]),
        ("tune.scenario", cfg.tune.scenario, [MEAN_SCENARIO, *names]),
        ("promote.scenario", cfg.promote.scenario, names),
    ):
        if value not in allowed:
            hint = did_you_mean([value], allowed) or f" (one of {allowed})"
            return key, f"{value!r} is not a scenario of the missing: section{hint}"
    return None


# Checks over several keys: each returns (the key to name, the reason) or None.
CROSS_RULES: list[typing.Callable[[Config], tuple[str, str] | None]] = [
    _scenario_keys,
    _source_registered,
    _class_weights_match,
    _missing_fractions,
    _one_graded_latent,
    _warmup_within_epochs,
    _warmup_within_trials,
]


def validate_config(cfg: Config, where: str = "params") -> Config:
    """Check every value against :data:`RULES` and :data:`CROSS_RULES`; raise a one-line
    :class:`ConfigError` naming the first bad key (``params.train.epochs: must be ...``)."""
    flat = cfg.flat()
    for key, check in RULES.items():
        if key not in flat:  # a rule for a key this schema lacks is a bug, found by the tests
            continue
        value = flat[key]
        reason = check(value)
        if reason:
            raise ConfigError(f"{where}.{key}: {reason}, got {value!r}")
    for rule in CROSS_RULES:
        found = rule(cfg)
        if found:
            key, reason = found
            raise ConfigError(f"{where}.{key}: {reason}, got {flat[key]!r}")
    return cfg
