"""Typed configuration loaded from ``params.yaml`` (plus optional profile overrides).

``params.yaml`` is the single source of hyperparameters: DVC reads its keys for stage
invalidation, the CLI reads the same file through :func:`load_config`, and Kubeflow passes a
profile path. Unknown keys are errors, so a typo in a profile never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file or override that does not fit the schema."""


@dataclass
class DataConfig:
    raw_dir: str = "data/raw"
    source: str = "auto"  # fairvision | gamma | rima | auto
    disease: str = "auto"  # FairVision only: amd | dr | glaucoma | synthetic | auto


@dataclass
class SynthConfig:
    n_eyes: int = 600
    seed: int = 0
    n_classes: int = 3
    fundus_size: int = 64
    oct_shape: list[int] = field(default_factory=lambda: [32, 32, 32])
    class_weights: list[float] | None = None  # None: balanced
    missing_fundus_fraction: float = 0.05
    missing_oct_fraction: float = 0.05
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    # Signal strength of each modality's view of the severity: its independent noise std is
    # MODALITY_NOISE / signal (synthetic.py). 1.0 = the default phantom (where the OCT is the
    # easier modality to read); fundus_signal > oct_signal makes the fundus the stronger one.
    fundus_signal: float = 1.0
    oct_signal: float = 1.0


@dataclass
class PrepareConfig:
    store_dir: str = "data/store"
    fundus_size: int = 64
    oct_shape: list[int] = field(default_factory=lambda: [32, 32, 32])
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    seed: int = 0
    workers: int = 2
    skip_bad: bool = False
    # Limits on untrusted source files (rima_core.data.types.ReadLimits has the same names and
    # defaults; tests/test_security_data.py fails if they disagree). Sizes are refused, not
    # truncated: the case is reported (or quarantined with --skip-bad).
    max_file_bytes: int = 1 << 30  # decompressed bytes of one npz / NIfTI file
    max_image_pixels: int = 1 << 26  # one 2-D image (fundus, B-scan)
    max_volume_voxels: int = 1 << 28  # one OCT volume
    min_fundus_size: int = 8  # smallest fundus side, pixels
    min_oct_size: int = 2  # smallest OCT axis (a 1×1×1 volume is not an eye)


@dataclass
class ValidateConfig:
    report: str = "reports/validation.json"
    # minimum fraction of eyes in each split
    min_split_fraction: dict[str, float] = field(
        default_factory=lambda: {"train": 0.3, "val": 0.05, "test": 0.05}
    )
    # a modality image whose pixel std is below this is "constant"
    min_pixel_std: float = 1.0
    # mean intensity must lie in this range (uint8 scale)
    mean_intensity_range: list[float] = field(default_factory=lambda: [2.0, 253.0])


@dataclass
class MissingConfig:
    masks: str = "data/masks.parquet"
    seed: int = 0
    rate: float = 1.0  # rate of the fundus_missing / oct_missing scenarios
    mixed: list[float] = field(default_factory=lambda: [0.3, 0.3])  # r_f, r_o
    sweep: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    train_scenario: str = "complete"  # scenario applied to the train split for training


@dataclass
class ModelConfig:
    name: str = "rima"
    fundus_encoder: str = "small_cnn2d"  # small_cnn2d | res2net50
    oct_encoder: str = "small_cnn3d"  # small_cnn3d | resnet10_3d
    fundus_dim: int = 128
    oct_dim: int = 192
    hidden_dim: int = 128
    heads: int = 4
    dropout: float = 0.1
    modality_dropout: float = 0.2
    fundus_weights: str | None = None  # local path to pretrained weights; never downloaded
    oct_weights: str | None = None


@dataclass
class OTConfig:
    gw_epsilon: float = 5e-3
    feature_epsilon: float = 5e-3
    loss_weight: float = 0.5
    feature_momentum: float = 0.9  # running estimate of the feature-wise coupling
    target: str = "barycentric"  # barycentric | sample


@dataclass
class TrainConfig:
    out_dir: str = "models/rima"
    epochs: int = 15
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-2
    warmup_epochs: int = 1
    grad_clip: float = 1.0
    patience: int = 5
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # only used on CUDA
    num_workers: int = 0
    selection_metric: str = "qwk"
    selection_scenario: str = "mixed"  # validation scenario used for model selection


@dataclass
class TuneConfig:
    out_dir: str = "reports/tune"
    storage: str = "sqlite:///optuna.db"
    study_name: str = "rima"
    n_trials: int = 8
    timeout_s: float | None = None
    epochs: int = 3
    workers: int = 1
    seed: int = 0
    scenario: str = "mixed"
    metric: str = "qwk"
    # MedianPruner: no pruning until this many trials completed / before this many epochs
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int = 1
    # search ranges [low, high], sampled on a log scale
    gw_epsilon: list[float] = field(default_factory=lambda: [1e-3, 5e-2])
    feature_epsilon: list[float] = field(default_factory=lambda: [1e-3, 5e-2])
    loss_weight: list[float] = field(default_factory=lambda: [0.05, 2.0])
    lr: list[float] = field(default_factory=lambda: [2e-4, 3e-3])


@dataclass
class EvaluateConfig:
    out_dir: str = "reports/eval"
    split: str = "test"
    batch_size: int = 64


@dataclass
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "rima-synthetic"
    model_name: str = "rima"
    # where a new experiment stores artifacts: "s3://bucket/prefix" for direct S3 (the client then
    # needs MLFLOW_S3_ENDPOINT_URL off AWS); null = `mlartifacts/` beside a SQLite file, or the
    # server's choice for an http(s) tracking URI
    artifact_location: str | None = None


@dataclass
class PromoteConfig:
    metric: str = "qwk"
    scenario: str = "mixed"
    margin: float = 0.0
    tolerance: float = 0.02


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    missing: MissingConfig = field(default_factory=MissingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ot: OTConfig = field(default_factory=OTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value``: the form MLflow params and DVC ``-S`` overrides use."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


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
        raise ConfigError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(names)}")
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


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``train.lr=3e-4`` -> ``{"train": {"lr": 3e-4}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key")
    return {parts[0]: {parts[1]: yaml.safe_load(raw)}}


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such params file") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
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
        merged = _merge(merged, _read_yaml(Path(profile)))
    for text in overrides or []:
        merged = _merge(merged, parse_override(text))
    return _build(Config, merged, "params")


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. stored with a model)."""
    return _build(Config, values, "config")
