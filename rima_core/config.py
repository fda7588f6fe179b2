"""Typed configuration: the schema and its defaults, loaded with ``params.yaml`` on top.

Where each thing lives:

- The dataclasses below are the one source of the keys, their types and their defaults
  (``load_config(None)`` is a complete config).
- ``params.yaml`` holds the project's chosen value of every key, written out in full because DVC
  reads its keys for stage invalidation (a key absent from the file cannot rerun a stage) and a
  reader sees every setting in one place. tests/test_dvc_pipeline.py fails when its keys and the
  dataclasses' differ, so the two never drift apart silently.
- Profiles (``configs/*.yaml``, Kubeflow's profile argument) and ``section.key=value``
  overrides name only what they change.

Unknown keys are errors, so a typo in a profile never silently falls back to a default; a key
that was renamed is refused with its new name (:data:`MOVED`).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A params file or override that does not fit the schema."""


# Field metadata of a setting that can carry a credential (a URL with ``user:password@``, a
# presigned query): every serialisation of a config (MLflow params, the logged model's
# config.json, `rima params show`) masks it by construction through rima_core.redact, and
# `python -m pipelines compile` refuses it. See secret_keys().
SECRET = {"secret": True}


@dataclass
class DataConfig:
    raw_dir: str = field(default="data/raw", metadata=SECRET)  # may be a presigned URL
    source: str = "auto"  # fairvision | gamma | rima | auto | a registered plug-in
    disease: str = "auto"  # FairVision only: amd | dr | glaucoma | synthetic | auto
    # Plug-in source formats (dotted module paths with scan()/load()) that data.source may name;
    # a module listed nowhere (here or as a `rima.sources` entry point) is never imported.
    plugins: list[str] = field(default_factory=list)


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
    # Phantom regimes, all off by default (synthetic.py's docstring says which clinical property
    # each stands for; rima_core/data/oracle.py gives each one's Bayes ceiling):
    anatomy: str = "none"  # none | shared: a lesion-focus location both modalities see
    private_latent: str = "none"  # none | oct | fundus: a graded latent one modality sees best
    site_shift: str = "none"  # none | fundus | oct: the test split's acquisition style differs


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


# The scenarios every split has; ``mean`` (model selection, tuning) averages a metric over them.
# Beside them, the missing-rate sweep's ``<family>@<rate>`` (scenario_names). Defined here, with
# the missing section they derive from, so every scenario key is checked when a config loads.
MAIN_SCENARIOS = ("complete", "fundus_missing", "oct_missing", "mixed")
MEAN_SCENARIO = "mean"
SWEPT_FAMILIES = ("fundus_missing", "oct_missing")


def scenario_names(cfg: MissingConfig) -> list[str]:
    """All scenarios in evaluation order (sweep duplicates dropped)."""
    names = list(MAIN_SCENARIOS)
    for family in SWEPT_FAMILIES:
        for rate in cfg.sweep:
            name = f"{family}@{float(rate):g}"
            if name not in names:
                names.append(name)
    return names


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
    # RIMA: weight of the cross-entropy of the fundus-only / OCT-only paths of complete eyes, and
    # of their consistency (KL) with the full prediction (see models/rima.py)
    missing_path_weight: float = 1.0
    consistency_weight: float = 0.5
    # RIMA: a complete eye's full path: "head" = the fused head alone (the paper's fusion);
    # "product" = the fused head's logits plus the (fixed) log-probabilities of its fundus-only
    # and OCT-only paths, so the head learns what the product of the two predictions misses
    full_path: str = "head"
    # distillation: the students' loss on eyes with both modalities is
    # (1 - alpha) * CE + alpha * T^2 * KL(student_T || teacher_T) (models/baselines.py); a
    # benchmark sweeps them (e.g. alpha in {0.3, 0.7}, T in {1, 3}) and selects on validation
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    fundus_weights: str | None = None  # local path to pretrained weights; never downloaded
    oct_weights: str | None = None


@dataclass
class OTConfig:
    gw_epsilon: float = 5e-3
    feature_epsilon: float = 5e-3
    loss_weight: float = 0.5
    feature_momentum: float = 0.9  # running estimate of the feature-wise coupling
    target: str = "barycentric"  # barycentric | sample
    # the class-wise coupling also reaches the detached features (with labels) of the last
    # bank_size eyes of each modality from earlier batches of the epoch, so that every class has
    # several eyes on both sides (models/rima.py, _with_bank); 0: the batch alone, as the paper
    bank_size: int = 128
    # share of the translators' coupling that pairs each eye's own two modalities (the
    # paired-regression coupling of rima_no_class_ot) rather than the class-wise GW one:
    # 0 = the paper's class-wise OT alone, 1 = pairing alone; tune may search it
    # (tune.pairing_mix_range) so validation can turn the class-wise OT down where it does not help
    pairing_mix: float = 0.0


@dataclass
class RuntimeConfig:
    """How the steps that run the network (tune, train, evaluate) run it. Shared so the three
    cannot disagree, e.g. evaluate scoring on another device than training selected on."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: bool = True  # mixed precision, only used on CUDA (engine.amp_dtype)
    num_workers: int = 0  # DataLoader worker processes; speed only (loaders are seeded)
    # model initialisation and data order of training (and of every tuning trial)
    seed: int = 0
    # batch size of the no-grad passes: training's validation, every trial's, evaluate's
    eval_batch_size: int = 64


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
    selection_metric: str = "qwk"
    # validation scenario used for model selection; "mean" = the mean over the main scenarios
    selection_scenario: str = "mean"
    # after selection, fit how a complete eye's prediction pools the full / fundus-only /
    # OCT-only paths, on the validation split (RIMA; models/rima.py); false = the full path alone
    pool_paths: bool = True
    # the grade the shipped model gives: argmax (most probable grade) or ordinal (the grade of
    # least expected quadratic cost under the calibrated probabilities); both are reported
    decoding: str = "argmax"
    # training-time augmentation (rima_core/augment.py): any of "flip", "intensity"
    augment: list[str] = field(default_factory=list)


@dataclass
class TuneConfig:
    out_dir: str = "reports/tune"
    storage: str = field(default="sqlite:///optuna.db", metadata=SECRET)
    study_name: str = "rima"
    n_trials: int = 8
    timeout_s: float | None = None
    epochs: int = 3
    workers: int = 1
    seed: int = 0
    scenario: str = "mean"
    metric: str = "qwk"
    # MedianPruner: no pruning until this many trials completed / before this many epochs
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int = 1
    # search ranges [low, high] of ot.gw_epsilon, ot.feature_epsilon, ot.loss_weight and
    # train.lr (rima_core.tune.TUNED), sampled on a log scale
    gw_epsilon_range: list[float] = field(default_factory=lambda: [1e-3, 5e-2])
    feature_epsilon_range: list[float] = field(default_factory=lambda: [1e-3, 5e-2])
    loss_weight_range: list[float] = field(default_factory=lambda: [0.05, 2.0])
    lr_range: list[float] = field(default_factory=lambda: [2e-4, 3e-3])
    # ot.pairing_mix, on a linear scale; null = not searched (ot.pairing_mix as set)
    pairing_mix_range: list[float] | None = field(default_factory=lambda: [0.0, 1.0])


@dataclass
class EvaluateConfig:
    out_dir: str = "reports/eval"
    split: str = "test"
    # also scored: the split promotion decides on (the test split is reported, never selected on)
    selection_split: str = "val"
    bootstrap: int = 1000  # percentile-bootstrap resamples over eyes for scores.csv intervals
    bootstrap_seed: int = 0
    ci_level: float = 0.95
    # attributes whose ES-AUC (promote.scenario, test split) goes to metrics.json; subgroups.csv
    # and equity.csv hold every source_* attribute of the store
    equity_attributes: list[str] = field(default_factory=lambda: ["race", "gender", "ethnicity"])
    max_groups: int = 12  # a numeric attribute with more distinct values is cut into quartiles


@dataclass
class MlflowConfig:
    tracking_uri: str = field(default="sqlite:///mlflow.db", metadata=SECRET)
    experiment: str = "rima-synthetic"
    model_name: str = "rima"
    # where a new experiment stores artifacts: "s3://bucket/prefix" for direct S3 (the client then
    # needs MLFLOW_S3_ENDPOINT_URL off AWS); null = `mlartifacts/` beside a SQLite file, or the
    # server's choice for an http(s) tracking URI
    artifact_location: str | None = field(default=None, metadata=SECRET)


@dataclass
class PromoteConfig:
    metric: str = "qwk"
    scenario: str = "mixed"
    margin: float = 0.0
    tolerance: float = 0.02
    # also require the paired-bootstrap interval of the primary improvement (validation eyes)
    # to exclude 0; needs both versions registered with their validation predictions
    require_significant: bool = False
    # a model is registered only if `metric` under `scenario` beats this (higher-is-better
    # metrics: strictly above; ece/nll: strictly below); null = the metric's chance level
    # (qwk/kappa 0, auc 0.5), so a useless model never reaches the registry
    register_min_metric: float | None = None


@dataclass
class ReproConfig:
    """``rima check-repro`` (rima_core/repro.py): how far a rerun's numbers may move from the
    committed ones before they count as different."""

    # a float of the metrics files without a bootstrap interval in scores.csv (training's
    # validation numbers, the tuning objective, ES-AUC): within tolerance when
    # |now - committed| <= this
    abs_tolerance: float = 0.05
    # metrics keys listed but not judged (glob patterns, e.g. "tune/*"); counts and epochs
    # (integers) are always only listed: rounding may move the selected epoch by one
    informational: list[str] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    missing: MissingConfig = field(default_factory=MissingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    ot: OTConfig = field(default_factory=OTConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    promote: PromoteConfig = field(default_factory=PromoteConfig)
    repro: ReproConfig = field(default_factory=ReproConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``section.key -> value``: the form MLflow params and DVC ``-S`` overrides use."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def secret_keys() -> frozenset[str]:
    """``section.key`` of every setting declared :data:`SECRET` in the schema."""
    return _SECRET_KEYS


_SECRET_KEYS = frozenset(
    f"{section.name}.{f.name}"
    for section in dataclasses.fields(Config)
    for f in dataclasses.fields(section.default_factory())  # type: ignore[misc]
    if f.metadata.get("secret")
)


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


def did_you_mean(wrong: list[str], known: Any) -> str:
    """`` (did you mean 'lr'?)`` for the closest known name of each wrong one, or ``""``."""
    import difflib

    pairs = []
    for w in wrong:
        close = difflib.get_close_matches(str(w), sorted(map(str, known)), n=1, cutoff=0.6)
        if close:
            pairs.append(f"{w!r} -> {close[0]!r}" if len(wrong) > 1 else repr(close[0]))
    return f" (did you mean {', '.join(pairs)}?)" if pairs else ""


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


# --- value checks --------------------------------------------------------------------------------
#
# Types are checked while building (``_coerce``); the *values* are checked here, once, at load
# time, so ``train.epochs: 0`` or ``ot.gw_epsilon: -1`` stops the CLI with one line naming the key
# instead of a traceback after the data is loaded. The rules are a table, ``section.key -> check``:
# a new key gets its rule by adding one line to RULES (tests/test_config_validation.py fails for a
# numeric key without one, and for a rule whose key no longer exists). A check returns the reason
# a value is wrong, or None. Checks that span keys go in CROSS_RULES.

Check = typing.Callable[[Any], "str | None"]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(low: int, high: int | None = None) -> Check:
    """An integer in ``[low, high]``."""
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"

    def check(v: Any) -> str | None:
        if not isinstance(v, int) or isinstance(v, bool):
            return f"must be an integer {bound}"
        if v < low or (high is not None and v > high):
            return f"must be an integer {bound}"
        return None

    return check


def number(
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> Check:
    """A finite number between ``low`` and ``high`` (each bound open or closed, or absent)."""
    if low is not None and high is not None:
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        bound = f"{'>' if low_open else '>='} {low:g}"
    elif high is not None:
        bound = f"{'<' if high_open else '<='} {high:g}"
    else:
        bound = ""
    reason = f"must be a finite number {bound}".rstrip()

    def check(v: Any) -> str | None:
        if not _is_number(v) or not math.isfinite(v):
            return reason
        if low is not None and (v <= low if low_open else v < low):
            return reason
        if high is not None and (v >= high if high_open else v > high):
            return reason
        return None

    return check


POSITIVE = number(0.0, low_open=True)
NON_NEGATIVE = number(0.0)
PROBABILITY = number(0.0, 1.0, high_open=True)  # a dropout / momentum: 1 would be degenerate
FRACTION = number(0.0, 1.0)
SEED = integer(0, 2**32 - 1)


def one_of(*choices: str) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {list(choices)}"

    return check


def matches(pattern: str, what: str) -> Check:
    regex = re.compile(pattern)

    def check(v: Any) -> str | None:
        return None if isinstance(v, str) and regex.fullmatch(v) else f"must be {what}"

    return check


def optional(inner: Check) -> Check:
    """``None`` (the setting is off) or a value ``inner`` accepts."""

    def check(v: Any) -> str | None:
        return None if v is None else inner(v)

    return check


def each(inner: Check, length: int | None = None, min_length: int = 0) -> Check:
    """A list whose items all pass ``inner`` (of exactly ``length`` items when given)."""

    def check(v: Any) -> str | None:
        if not isinstance(v, list):
            return "must be a list"
        if length is not None and len(v) != length:
            return f"must have {length} items"
        if len(v) < min_length:
            return f"must have at least {min_length} item(s)"
        for i, item in enumerate(v):
            reason = inner(item)
            if reason:
                return f"item {i}: {reason}"
        return None

    return check


def each_value(inner: Check) -> Check:
    """A mapping whose values all pass ``inner``."""

    def check(v: Any) -> str | None:
        for key, item in v.items():
            reason = inner(item)
            if reason:
                return f"{key!r}: {reason}"
        return None

    return check


def both(*checks: Check) -> Check:
    """Every check in turn; the first reason wins."""

    def check(v: Any) -> str | None:
        for c in checks:
            reason = c(v)
            if reason:
                return reason
        return None

    return check


def increasing_pair(inner: Check) -> Check:
    """``[low, high]`` with ``low < high``, both passing ``inner`` (a search or value range)."""

    def order(v: list[Any]) -> str | None:
        return None if v[0] < v[1] else "must be [low, high] with low < high"

    return both(each(inner, length=2), order)


def sums_to_one(v: list[float]) -> str | None:
    return None if abs(sum(v) - 1.0) <= 1e-6 else "must sum to 1"


SPLIT_FRACTIONS = both(each(FRACTION, length=3), sums_to_one)  # train, val, test
SHAPE_3D = each(integer(1), length=3)  # D, H, W
NON_EMPTY = matches(r"\S.*", "a non-empty string")
URL = matches(r"[A-Za-z][A-Za-z0-9+.\-]*://.*", "a URL (scheme://...)")
# Names whose source of truth lives in a heavier module (torch models, sklearn metrics): the
# copies here are checked against it by tests/test_config_validation.py.
ENCODERS_2D = ("small_cnn2d", "res2net50")
ENCODERS_3D = ("small_cnn3d", "resnet10_3d")
OT_TARGETS = ("barycentric", "sample")
# registered source formats and their aliases (rima_core.data.sources.SOURCES / ALIASES)
SOURCE_NAMES = ("rima", "gamma", "fairvision", "rima_folders", "harvard", "synthetic")
# a plug-in format: the dotted path of a module with scan()/load() (data/prepare.resolve_source)
PLUGIN_SOURCE = matches(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", "a dotted module path"
)


# Installed packages register plug-in formats under this entry-point group (name = module path)
SOURCE_ENTRY_POINTS = "rima.sources"


def registered_plugins() -> dict[str, str]:
    """Plug-in formats installed packages register: entry-point name -> module path. Read from
    package metadata only; nothing is imported."""
    import importlib.metadata

    try:
        eps = importlib.metadata.entry_points(group=SOURCE_ENTRY_POINTS)
    except Exception:  # broken metadata of some installed package: no plug-ins from it
        return {}
    return {ep.name: ep.value.split(":", 1)[0].strip() for ep in eps}


def model_name(v: Any) -> str | None:
    """A name the model registry builds (``BUILDERS`` in rima_core/models/__init__.py).

    Checked here, at load, because otherwise a typo in ``model.name`` only fails when
    :class:`~rima_core.models.spec.ModelSpec` is built, after the data steps have run (or, in a
    cluster, hours into the pipeline). The names are read from the registry itself, never copied,
    so a newly registered model is valid at once; the import is lazy because the registry needs
    torch and imports this module.
    """
    from rima_core.models.spec import model_names

    names = model_names()
    if v in names:
        return None
    hint = did_you_mean([str(v)], names) if isinstance(v, str) else ""
    return f"must be one of {list(names)}{hint}"


def source_name(v: Any) -> str | None:
    if v == "auto" or v in SOURCE_NAMES or PLUGIN_SOURCE(v) is None:
        return None
    if isinstance(v, str) and v in registered_plugins():
        return None
    return f"must be one of {['auto', *SOURCE_NAMES]} or a dotted module path (a plug-in format)"


def _source_registered(cfg: Config) -> tuple[str, str] | None:
    """A dotted ``data.source`` must be registered: listed in data.plugins or an entry point."""
    source = cfg.data.source
    if PLUGIN_SOURCE(source) is not None or source in SOURCE_NAMES:
        return None
    if source in cfg.data.plugins or source in registered_plugins().values():
        return None
    return (
        "data.source",
        f"plug-in module {source!r} is not registered (not imported): list it under "
        f"data.plugins, or register it as a {SOURCE_ENTRY_POINTS!r} entry point",
    )


METRICS = (
    "accuracy", "auc", "balanced_accuracy", "ece", "f1_macro", "f1_weighted", "kappa", "nll", "qwk",
    "qwk_ordinal",
)  # fmt: skip
METRIC = one_of(*METRICS)
DECODINGS = ("argmax", "ordinal")  # rima_core.metrics.decode
AUGMENTATIONS = ("flip", "intensity")  # rima_core.augment.augment_batch
FULL_PATHS = ("product", "head")  # rima_core.models.rima.RIMA.full_logits
SPLITS = ("train", "val", "test")

RULES: dict[str, Check] = {
    "data.source": source_name,
    "data.plugins": each(PLUGIN_SOURCE),
    "data.disease": one_of("amd", "dr", "glaucoma", "synthetic", "auto"),
    "synth.n_eyes": integer(1),
    "synth.seed": SEED,
    "synth.n_classes": integer(2),
    "synth.fundus_size": integer(1),
    "synth.oct_shape": SHAPE_3D,
    "synth.class_weights": optional(each(NON_NEGATIVE, min_length=2)),
    "synth.missing_fundus_fraction": FRACTION,
    "synth.missing_oct_fraction": FRACTION,
    "synth.split_fractions": SPLIT_FRACTIONS,
    "synth.fundus_signal": POSITIVE,
    "synth.oct_signal": POSITIVE,
    "synth.anatomy": one_of("none", "shared"),
    "synth.private_latent": one_of("none", "oct", "fundus"),
    "synth.site_shift": one_of("none", "fundus", "oct"),
    "prepare.fundus_size": integer(1),
    "prepare.oct_shape": SHAPE_3D,
    "prepare.split_fractions": SPLIT_FRACTIONS,
    "prepare.seed": SEED,
    "prepare.workers": integer(1),
    "prepare.max_file_bytes": integer(1),
    "prepare.max_image_pixels": integer(1),
    "prepare.max_volume_voxels": integer(1),
    "prepare.min_fundus_size": integer(1),
    "prepare.min_oct_size": integer(1),
    "validate.min_split_fraction": each_value(FRACTION),
    "validate.min_pixel_std": NON_NEGATIVE,
    "validate.mean_intensity_range": increasing_pair(number(0.0, 255.0)),
    "missing.seed": SEED,
    "missing.rate": FRACTION,
    "missing.mixed": each(FRACTION, length=2),
    "missing.sweep": each(FRACTION, min_length=1),
    "missing.train_scenario": NON_EMPTY,
    "model.name": model_name,  # the model registry's names
    "model.fundus_encoder": one_of(*ENCODERS_2D),
    "model.oct_encoder": one_of(*ENCODERS_3D),
    "model.fundus_dim": integer(1),
    "model.oct_dim": integer(1),
    "model.hidden_dim": integer(1),
    "model.heads": integer(1),
    "model.dropout": PROBABILITY,
    "model.modality_dropout": PROBABILITY,
    "model.missing_path_weight": NON_NEGATIVE,
    "model.full_path": one_of(*FULL_PATHS),
    "model.consistency_weight": NON_NEGATIVE,
    "model.distill_alpha": FRACTION,
    "model.distill_temperature": POSITIVE,
    "ot.gw_epsilon": POSITIVE,
    "ot.feature_epsilon": POSITIVE,
    "ot.loss_weight": NON_NEGATIVE,
    "ot.feature_momentum": PROBABILITY,
    "ot.target": one_of(*OT_TARGETS),
    "ot.bank_size": integer(0),  # 0 = the batch alone
    "ot.pairing_mix": FRACTION,
    "train.out_dir": NON_EMPTY,
    "train.epochs": integer(1),
    "train.batch_size": integer(1),
    "train.lr": POSITIVE,
    "train.weight_decay": NON_NEGATIVE,
    "train.warmup_epochs": integer(0),
    "train.grad_clip": NON_NEGATIVE,  # 0 = no clipping
    "train.patience": integer(0),  # 0 = no early stopping
    "runtime.device": matches(r"auto|cpu|cuda(:\d+)?|mps", "auto, cpu, cuda, cuda:N or mps"),
    "runtime.num_workers": integer(0),
    "runtime.seed": SEED,
    "runtime.eval_batch_size": integer(1),
    "train.selection_metric": METRIC,
    "train.selection_scenario": NON_EMPTY,
    "train.decoding": one_of(*DECODINGS),
    "train.augment": each(one_of(*AUGMENTATIONS)),
    "tune.out_dir": NON_EMPTY,
    "tune.storage": URL,
    "tune.study_name": NON_EMPTY,
    "tune.n_trials": integer(0),  # 0 = no tuning
    "tune.timeout_s": optional(POSITIVE),
    "tune.epochs": integer(1),
    "tune.workers": integer(1),
    "tune.seed": SEED,
    "tune.scenario": NON_EMPTY,
    "tune.metric": METRIC,
    "tune.pruner_startup_trials": integer(0),
    "tune.pruner_warmup_epochs": integer(0),
    # search ranges, sampled on a log scale: positive bounds
    "tune.gw_epsilon_range": increasing_pair(POSITIVE),
    "tune.feature_epsilon_range": increasing_pair(POSITIVE),
    "tune.loss_weight_range": increasing_pair(POSITIVE),
    "tune.lr_range": increasing_pair(POSITIVE),
    "tune.pairing_mix_range": optional(increasing_pair(FRACTION)),
    "evaluate.out_dir": NON_EMPTY,
    "evaluate.split": one_of(*SPLITS),
    "evaluate.selection_split": one_of(*SPLITS),
    "evaluate.bootstrap": integer(1),
    "evaluate.bootstrap_seed": SEED,
    "evaluate.ci_level": number(0.0, 1.0, low_open=True, high_open=True),
    "evaluate.max_groups": integer(1),
    "mlflow.tracking_uri": NON_EMPTY,
    "mlflow.experiment": NON_EMPTY,
    "mlflow.model_name": NON_EMPTY,
    "promote.metric": METRIC,
    "promote.scenario": NON_EMPTY,
    "promote.margin": NON_NEGATIVE,
    "promote.tolerance": NON_NEGATIVE,
    "promote.register_min_metric": optional(number()),  # null = the metric's chance level
    "repro.abs_tolerance": NON_NEGATIVE,
    "repro.informational": each(NON_EMPTY),
}


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
