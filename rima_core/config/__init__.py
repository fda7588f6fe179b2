"""Typed configuration: the schema and its defaults, loaded with ``params.yaml`` on top.

Where each thing lives:

- :mod:`~rima_core.config.schema`: the one source of every key, its type, default, value check
  and help text (``load_config(None)`` is a complete config).
- :mod:`~rima_core.config.checks`: the value checks, each with its JSON Schema fragment.
- :mod:`~rima_core.config.loading`: params <- profile <- overrides, coercion and validation.
- :mod:`~rima_core.config.scenarios`: the scenario names and the ``family@rate`` parser.
- :mod:`~rima_core.config.reference`: what is rendered from the schema: ``params.yaml``'s
  comments, ``params.schema.json`` and ``docs/parameters.md`` (``python -m
  rima_core.config.reference --write``; a test fails when a checked-in copy differs).
- ``params.yaml`` holds the project's chosen value of every key, written out in full because DVC
  reads its keys for stage invalidation (a key absent from the file cannot rerun a stage) and a
  reader sees every setting in one place.
- Profiles (``configs/*.yaml``, Kubeflow's profile argument) and ``section.key=value``
  overrides name only what they change.
"""

from rima_core.config.checks import Check, ConfigError, did_you_mean
from rima_core.config.loading import (
    CROSS_RULES,
    MOVED,
    StrictLoader,
    config_from_dict,
    deep_merge,
    load_config,
    load_yaml,
    parse_override,
    refuse_moved,
    validate_config,
    with_values,
    yaml_error,
)
from rima_core.config.scenarios import (
    MAIN_SCENARIOS,
    MEAN_SCENARIO,
    SWEPT_FAMILIES,
    Scenario,
    is_sweep,
    scenario_names,
)
from rima_core.config.schema import (
    AUGMENTATIONS,
    DECODINGS,
    ENCODERS_2D,
    ENCODERS_3D,
    FULL_PATHS,
    METRICS,
    OT_TARGETS,
    PLUGIN_SOURCE,
    RULES,
    SOURCE_ENTRY_POINTS,
    SOURCE_NAMES,
    SPLITS,
    Config,
    DataConfig,
    EvaluateConfig,
    MissingConfig,
    MlflowConfig,
    ModelConfig,
    OTConfig,
    PrepareConfig,
    PromoteConfig,
    ReproConfig,
    RuntimeConfig,
    SynthConfig,
    TrainConfig,
    TuneConfig,
    ValidateConfig,
    registered_plugins,
    secret_keys,
    setting,
    source_refusal,
)

__all__ = [
    "AUGMENTATIONS", "CROSS_RULES", "DECODINGS", "ENCODERS_2D", "ENCODERS_3D", "FULL_PATHS",
    "MAIN_SCENARIOS", "MEAN_SCENARIO", "METRICS", "MOVED", "OT_TARGETS", "PLUGIN_SOURCE", "RULES",
    "SOURCE_ENTRY_POINTS", "SOURCE_NAMES", "SPLITS", "SWEPT_FAMILIES", "Check", "Config",
    "ConfigError", "DataConfig", "EvaluateConfig", "MissingConfig", "MlflowConfig", "ModelConfig",
    "OTConfig", "PrepareConfig", "PromoteConfig", "ReproConfig", "RuntimeConfig", "Scenario",
    "StrictLoader", "SynthConfig", "TrainConfig", "TuneConfig", "ValidateConfig",
    "config_from_dict", "deep_merge", "did_you_mean", "is_sweep", "load_config", "load_yaml",
    "parse_override", "refuse_moved", "registered_plugins", "scenario_names", "secret_keys",
    "setting", "source_refusal", "validate_config", "with_values", "yaml_error",
]  # fmt: skip
