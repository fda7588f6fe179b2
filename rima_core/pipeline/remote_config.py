"""A pipeline run's config: the run-parameter table, and params text + parameters -> ``Config``.

A Kubeflow run carries ``params.yaml`` and the profile as text (the pod has no checkout) and the
knobs a run most often changes as typed parameters. :data:`RUN_PARAMETERS` is the one list of
those parameters: the pipeline's signature, the ``resolve-config`` component's signature, the
compiler's argument values and the table in docs/kubernetes.md follow it (the literal
signatures KFP reads are checked against it by tests/contracts/test_kfp_parameters.py). The
``resolve-config`` task turns them into one resolved config file that every later task reads,
so a typo fails in the first task with the schema's message. Imports neither kfp nor mlflow
(it runs in every pod).
"""

from __future__ import annotations

import json
import os
import tempfile
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rima_core.atomic import write_text
from rima_core.config import Config, ConfigError, load_config
from rima_core.config.schema import key_field

# Environment variable (filled from the Kubernetes secret) holding the shared Optuna storage URL.
# A PostgreSQL URL carries a password, so it never travels as a pipeline parameter or artifact.
OPTUNA_STORAGE_ENV = "RIMA_OPTUNA_STORAGE"


@dataclass(frozen=True)
class RunParameter:
    """One typed parameter of the Kubeflow pipeline.

    ``config_key`` (``section.key``) is the config value the parameter sets in the run's
    resolved config; ``None`` for the pipeline's own parameters (where the data comes from,
    whether to promote, the carried files), whose embedded default is ``default``.
    """

    name: str
    type: type
    help: str
    config_key: str | None = None
    default: Any = None

    def embedded_default(self) -> Any:
        """The default compiled in when no params.yaml is given: the config's own default,
        else ``default`` (also where the config's default is None, which KFP cannot type)."""
        if self.config_key is None:
            return self.default
        section, key = self.config_key.split(".")
        value = getattr(getattr(Config(), section), key)
        return self.default if value is None else value

    def config_value(self, cfg: Config) -> Any:
        """This parameter's value in a resolved config (lists as lists, for KFP)."""
        if self.config_key is None:
            raise ValueError(f"run parameter {self.name!r} sets no config key")
        section, key = self.config_key.split(".")
        value = getattr(getattr(cfg, section), key)
        return list(value) if isinstance(value, list | tuple) else value


def config_parameter(
    name: str, config_key: str, default: Any = None, note: str = ""
) -> RunParameter:
    """A run parameter that sets ``config_key``: its type and help text are the schema's
    (:mod:`rima_core.config.schema`), so the two cannot drift apart; ``note`` adds what only
    the pipeline needs said."""
    field, tp = key_field(config_key)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: KFP types the X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    kfp_type = list if typing.get_origin(tp) is list else tp
    help_text = field.metadata["help"] + (f" ({note})" if note else "")
    return RunParameter(name, kfp_type, help_text, config_key, default)


# In the pipeline signature's order. The help texts are the table in docs/kubernetes.md; those
# of config-setting parameters are the schema's.
RUN_PARAMETERS: tuple[RunParameter, ...] = (
    RunParameter(
        "params_yaml",
        str,
        "params.yaml itself as one-line YAML (the compiler fills it in)",
        None,
        "",
    ),
    RunParameter(
        "profile_yaml",
        str,
        "the profile and `--set` overrides as one-line YAML (empty: none)",
        None,
        "",
    ),
    RunParameter(
        "data_source_uri",
        str,
        "raw data when `data_dvc_repo` is empty: `s3://bucket/prefix` (s3fs, concurrent) or a "
        "path mounted in the pods; both empty: the synthetic phantom",
        None,
        "",
    ),
    config_parameter("data_source", "data.source"),
    config_parameter("disease", "data.disease"),
    config_parameter("missing_rate", "missing.rate"),
    config_parameter("missing_mixed", "missing.mixed"),
    config_parameter("missing_sweep", "missing.sweep"),
    config_parameter("tune_trials", "tune.n_trials"),
    config_parameter("tune_workers", "tune.workers"),
    config_parameter("promote_metric", "promote.metric"),
    config_parameter("promote_scenario", "promote.scenario"),
    config_parameter("promote_margin", "promote.margin"),
    config_parameter("promote_tolerance", "promote.tolerance"),
    config_parameter(
        "register_min_metric",
        "promote.register_min_metric",
        default=0.0,
        note="compiled default: `promote.register_min_metric`, else the metric's chance level",
    ),
    RunParameter(
        "data_dvc_repo",
        str,
        "Git URL of this project: `fetch-raw` downloads `data.raw_dir` from its DVC remote "
        "(the data `dvc repro` reads there; credentials from the secret)",
        None,
        "",
    ),
    RunParameter(
        "data_dvc_rev",
        str,
        "commit/tag/branch of `data_dvc_repo` (empty: its default branch)",
        None,
        "",
    ),
    RunParameter(
        "auto_promote",
        bool,
        "promote a registered model that wins (false: decide by hand)",
        None,
        True,
    ),
    config_parameter("mlflow_tracking_uri", "mlflow.tracking_uri"),
    config_parameter("mlflow_experiment", "mlflow.experiment"),
    config_parameter("model_name", "mlflow.model_name"),
)

#: The parameters that set config values: the inputs of the ``resolve-config`` task (with the
#: two carried files).
CONFIG_PARAMETERS: tuple[RunParameter, ...] = tuple(p for p in RUN_PARAMETERS if p.config_key)


def overrides_from_parameters(values: Mapping[str, Any]) -> dict[str, Any]:
    """``section.key -> value`` for every config-setting run parameter, taken from ``values``
    (the ``resolve-config`` component's arguments); a parameter it lacks is an error naming it."""
    missing = [p.name for p in CONFIG_PARAMETERS if p.name not in values]
    if missing:
        raise ConfigError(f"run parameters {missing} were not passed to resolve-config")
    return {p.config_key: values[p.name] for p in CONFIG_PARAMETERS if p.config_key}


def resolve_config(
    params_yaml: str,
    profile_yaml: str = "",
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the run's config exactly as the CLI would: params <- profile <- overrides.

    The pipeline carries params.yaml and the profile as text (the pod has no checkout), and its
    typed parameters as ``section.key -> value`` overrides; all three go through
    :func:`~rima_core.config.load_config` so a typo fails here, in the first task, with the
    schema's message.
    """
    override_texts = []
    for key, value in (overrides or {}).items():
        if key.count(".") != 1:
            raise ConfigError(f"pipeline override {key!r}: the key must be section.key")
        # JSON is a subset of YAML flow syntax, so parse_override reads the value back unchanged.
        override_texts.append(f"{key}={json.dumps(value)}")
    with tempfile.TemporaryDirectory(prefix="rima-config-") as tmp:
        params = Path(tmp) / "params_yaml.yaml"
        params.write_text(params_yaml if params_yaml.strip() else "{}\n")
        profile = None
        if profile_yaml.strip():
            profile = Path(tmp) / "profile_yaml.yaml"
            profile.write_text(profile_yaml)
        return load_config(params, profile, override_texts)


def config_yaml(cfg: Config) -> str:
    """The resolved config as params.yaml-shaped YAML (re-loadable with ``load_config``)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def write_config(cfg: Config, path: str | Path) -> None:
    write_text(path, config_yaml(cfg))


def load_task_config(path: str | Path) -> Config:
    """A task's config: the resolved file, plus what only the pod's environment may hold.

    The Optuna storage URL of a cluster run (PostgreSQL with a password) comes from the secret
    as ``RIMA_OPTUNA_STORAGE``; MLflow reads ``MLFLOW_TRACKING_*``/AWS variables itself.
    """
    cfg = load_config(path)
    storage = os.environ.get(OPTUNA_STORAGE_ENV)
    if storage:
        cfg.tune.storage = storage
    return cfg
