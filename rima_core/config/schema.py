"""The config schema: every key's type, default, value check and help text, in one place.

Each key is a dataclass field declared with :func:`setting`, which puts its check (a
:class:`~rima_core.config.checks.Check`) and its help text in the field's metadata. Everything
else is derived from these fields: the load-time value rules (:data:`RULES`), the comments of
``params.yaml``, the JSON Schema ``params.schema.json`` and the docs' parameter reference
(:mod:`rima_core.config.reference` renders them; a test fails when a rendered file differs). A
section's help is its class docstring. Comments beside a field say why a default is what it is;
what a key means is its ``help``.

Why one module: it is the list of every key, read top to bottom in the order of ``params.yaml``;
split by section, the one source would be scattered over fourteen files.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from rima_core.config.checks import (
    FRACTION,
    NON_EMPTY,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SEED,
    SHAPE_3D,
    SPLIT_FRACTIONS,
    URL,
    Check,
    did_you_mean,
    each,
    each_value,
    increasing_pair,
    integer,
    matches,
    number,
    one_of,
    optional,
)
from rima_core.config.scenarios import MAIN_SCENARIOS, MEAN_SCENARIO, SWEPT_FAMILIES


def setting(
    default: Any,
    check: Check | None = None,
    help: str = "",
    *,
    secret: bool = False,
    tunes: str | None = None,
    scale: str = "log",
) -> Any:
    """A config key: its default, the check its value must pass at load (``None``: the type
    alone), its help text, and whether it can carry a credential (a URL with
    ``user:password@``, a presigned query): every serialisation of a config (MLflow params, the
    logged model's config.json, ``rima params show``) masks a secret key by construction through
    :mod:`rima_core.redact`, and ``python -m pipelines compile`` refuses it. ``tunes`` marks a
    search range: the ``section.key`` tuning samples in it, on a ``log`` or ``linear`` scale
    (rima_core.runs.tune_study reads the tuned parameters from here)."""
    meta = {"check": check, "help": help, "secret": secret, "tunes": tunes, "scale": scale}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# --- names checked here that other modules own -----------------------------------------------
# Copies of names whose source of truth lives in a heavier module (torch models, sklearn
# metrics): tests/unit/test_config_validation.py checks them against it.
ENCODERS_2D = ("small_cnn2d", "res2net50")
ENCODERS_3D = ("small_cnn3d", "resnet10_3d")
OT_TARGETS = ("barycentric", "sample")
METRICS = (
    "accuracy", "auc", "balanced_accuracy", "ece", "f1_macro", "f1_weighted", "kappa", "nll", "qwk",
    "qwk_ordinal",
)  # fmt: skip
METRIC = one_of(*METRICS)
DECODINGS = ("argmax", "ordinal")  # rima_core.core.metrics.decode
AUGMENTATIONS = ("flip", "intensity")  # rima_core.core.augment.augment_batch
FULL_PATHS = ("product", "head")  # rima_core.core.models.rima.RIMA.full_logits
SPLITS = ("train", "val", "test")
# registered source formats and their aliases (rima_core.core.data.sources.SOURCES / ALIASES)
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
    try:
        eps = importlib.metadata.entry_points(group=SOURCE_ENTRY_POINTS)
    except Exception:  # broken metadata of some installed package: no plug-ins from it
        return {}
    return {ep.name: ep.value.split(":", 1)[0].strip() for ep in eps}


def _model_names() -> tuple[str, ...]:
    # lazy: the registry needs torch and imports this package
    from rima_core.core.models.spec import model_names

    return tuple(model_names())


def _model_name(v: Any) -> str | None:
    # Checked at load because otherwise a typo only fails when the ModelSpec is built, after the
    # data steps have run (in a cluster, hours into the pipeline). The names are read from the
    # registry itself, never copied, so a newly registered model is valid at once.
    names = _model_names()
    if v in names:
        return None
    hint = did_you_mean([str(v)], names) if isinstance(v, str) else ""
    return f"must be one of {list(names)}{hint}"


MODEL_NAME = Check(_model_name, lambda: {"enum": list(_model_names())})


def source_refusal(name: Any, plugins: Collection[str] | None) -> str | None:
    """Why ``name`` may not name a source format, or None: the one plug-in rule, applied to
    ``data.source`` at load, to ``--source`` on the command line and by the source loader
    before it imports anything.

    A source is ``auto``, a built-in format or alias (any case), a ``rima.sources`` entry-point
    name, or the dotted path of a module with ``scan()``/``load()`` that is registered: listed in
    ``plugins`` (``data.plugins``) or the module of an entry point. A module named nowhere is
    never imported (importing is running: a module such as ``venv.__main__`` acts on import).
    ``plugins=None`` judges the shape only: where the allow-list is not known yet (the command
    line, before params are read) or the caller's own Python code chose the module.
    """
    if not isinstance(name, str):
        return "must be a source name (a string)"
    if name == "auto" or name.lower() in SOURCE_NAMES:
        return None
    entry_points = registered_plugins()
    if name in entry_points:
        return None
    if PLUGIN_SOURCE(name) is not None:
        return (
            f"must be one of {['auto', *SOURCE_NAMES]}, a {SOURCE_ENTRY_POINTS!r} entry-point "
            "name, or a dotted module path (a plug-in format)"
        )
    if plugins is None or name in plugins or name in entry_points.values():
        return None
    return (
        f"plug-in module {name!r} is not registered (not imported): list it under "
        f"data.plugins, or register it as a {SOURCE_ENTRY_POINTS!r} entry point"
    )


SOURCE_NAME = Check(
    lambda v: source_refusal(v, None),
    lambda: {
        "anyOf": [
            {"enum": ["auto", *SOURCE_NAMES]},
            {
                "type": "string",
                "description": "a plug-in format: a dotted module path listed in data.plugins, "
                "or a registered rima.sources entry point",
            },
        ]
    },
)


# A scenario key's JSON Schema gives its shape (editors flag a misspelt name); at load the key
# only has to be non-empty here, because the cross-key rule (loading._scenario_keys) then checks
# it against the scenarios the missing: section defines, suggesting the nearest name.
_SCENARIO = rf"{'|'.join(MAIN_SCENARIOS)}|({'|'.join(SWEPT_FAMILIES)})@[0-9.]+"
_SCENARIO_WORDS = "a scenario: " + ", ".join(MAIN_SCENARIOS) + " or <family>@<rate>"
SCENARIO = Check(NON_EMPTY.test, matches(_SCENARIO, _SCENARIO_WORDS).make_schema)
SCENARIO_OR_MEAN = Check(
    NON_EMPTY.test,
    matches(
        rf"{MEAN_SCENARIO}|{_SCENARIO}",
        f"{MEAN_SCENARIO} (the mean over the main scenarios) or {_SCENARIO_WORDS}",
    ).make_schema,
)


# --- the sections ------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """Where the raw data is and which format it has."""

    raw_dir: str = setting(
        "data/raw",
        help="DVC-tracked raw data (data.dvc): a folder, s3:// URL or presigned URL; the "
        "synthetic phantom by default",
        secret=True,  # may be a presigned URL
    )
    source: str = setting(
        "auto", SOURCE_NAME, "source format: fairvision, gamma, rima, auto or a plug-in module"
    )
    disease: str = setting(
        "auto",
        one_of("amd", "dr", "glaucoma", "synthetic", "auto"),
        "FairVision only: amd, dr, glaucoma, synthetic or auto",
    )
    plugins: list[str] = setting(
        [],
        each(PLUGIN_SOURCE),
        "plug-in source modules (dotted paths with scan()/load()) data.source may name; a "
        "module listed nowhere (here or as a rima.sources entry point) is never imported",
    )


@dataclass
class SynthConfig:
    """The embedded default dataset: a synthetic phantom in the FairVision npz layout."""

    n_eyes: int = setting(600, integer(1), "eyes the phantom generates")
    seed: int = setting(0, SEED, "seed of the phantom's generator")
    n_classes: int = setting(3, integer(2), "number of grades")
    fundus_size: int = setting(64, integer(1), "fundus side, pixels")
    oct_shape: list[int] = setting([32, 32, 32], SHAPE_3D, "OCT volume, D x H x W")
    class_weights: list[float] | None = setting(
        None,
        optional(each(NON_NEGATIVE, min_length=2)),
        "relative grade frequencies, one per grade; null = balanced",
    )
    missing_fundus_fraction: float = setting(
        0.05, FRACTION, "eyes generated without a fundus image"
    )
    missing_oct_fraction: float = setting(0.05, FRACTION, "eyes generated without an OCT volume")
    split_fractions: list[float] = setting(
        [0.6, 0.2, 0.2], SPLIT_FRACTIONS, "train, val, test fractions of patients"
    )
    # 1.0 = the default phantom; fundus_signal > oct_signal makes the fundus the stronger one
    fundus_signal: float = setting(
        1.0, POSITIVE, "the fundus view's signal strength: its severity noise = 0.12 / signal"
    )
    oct_signal: float = setting(
        1.0, POSITIVE, "the OCT view's signal strength: its severity noise = 0.12 / signal"
    )
    # Phantom regimes, all off by default (synthetic.py's docstring says which clinical property
    # each stands for; rima_core/core/data/oracle.py gives each one's Bayes ceiling)
    anatomy: str = setting(
        "none",
        one_of("none", "shared"),
        "none, or shared: the grade also depends on a lesion focus both modalities see",
    )
    private_latent: str = setting(
        "none",
        one_of("none", "oct", "fundus"),
        "none, oct or fundus: a graded latent (fluid) that modality sees best",
    )
    site_shift: str = setting(
        "none",
        one_of("none", "fundus", "oct"),
        "none, fundus or oct: that modality's test split has another device style",
    )


@dataclass
class PrepareConfig:
    """Raw data into the Arrow store, and the limits on untrusted source files."""

    store_dir: str = setting("data/store", NON_EMPTY, "the Arrow store prepare writes")
    fundus_size: int = setting(64, integer(1), "fundus side the store holds, pixels")
    oct_shape: list[int] = setting([32, 32, 32], SHAPE_3D, "OCT volume the store holds, D x H x W")
    split_fractions: list[float] = setting(
        [0.6, 0.2, 0.2],
        SPLIT_FRACTIONS,
        "train, val, test fractions of patients; only when the source has no split of its own",
    )
    seed: int = setting(0, SEED, "seed of the patient-level split")
    workers: int = setting(2, integer(1), "processes reading source files")
    skip_bad: bool = setting(
        False, help="quarantine unreadable cases (listed in the report) instead of stopping"
    )
    # rima_core.core.data.types.ReadLimits has the same names and defaults
    # (tests/e2e/test_security_data.py fails if they disagree). Sizes are refused, not truncated.
    max_file_bytes: int = setting(
        1 << 30, integer(1), "decompressed bytes of one npz / NIfTI file (zip bombs)"
    )
    max_image_pixels: int = setting(
        1 << 26, integer(1), "pixels of one 2-D image (fundus, B-scan): decompression bombs"
    )
    max_volume_voxels: int = setting(1 << 28, integer(1), "voxels of one OCT volume")
    min_fundus_size: int = setting(8, integer(1), "smallest fundus side, pixels")
    min_oct_size: int = setting(
        2, integer(1), "smallest OCT axis (a 1 x 1 x 1 volume is not an eye)"
    )


@dataclass
class ValidateConfig:
    """Great Expectations checks of the store."""

    report: str = setting("reports/validation.json", NON_EMPTY, "the validation report")
    min_split_fraction: dict[str, float] = setting(
        {"train": 0.3, "val": 0.05, "test": 0.05},
        each_value(FRACTION),
        "minimum fraction of eyes in each split",
    )
    min_pixel_std: float = setting(
        1.0, NON_NEGATIVE, "a modality image whose pixel std is below this is constant"
    )
    mean_intensity_range: list[float] = setting(
        [2.0, 253.0],
        increasing_pair(number(0.0, 255.0)),
        "a modality image's mean intensity must lie in this range (uint8 scale)",
    )


@dataclass
class MissingConfig:
    """The missing-modality scenarios every split is scored under."""

    masks: str = setting("data/masks.parquet", NON_EMPTY, "the masks file simulate-missing writes")
    seed: int = setting(0, SEED, "seed of the masks")
    rate: float = setting(
        1.0, FRACTION, "missing rate of the fundus_missing / oct_missing scenarios"
    )
    mixed: list[float] = setting(
        [0.3, 0.3], each(FRACTION, length=2), "fundus, OCT missing rates of the mixed scenario"
    )
    sweep: list[float] = setting(
        [0.0, 0.25, 0.5, 0.75, 1.0],
        each(FRACTION, min_length=1),
        "missing rates of the fundus_missing@rate / oct_missing@rate sweep",
    )
    train_scenario: str = setting(
        "complete", NON_EMPTY, "the masks the training split is trained under"
    )


@dataclass
class ModelConfig:
    """The network: which model, its encoders and the weights of its losses."""

    name: str = setting("rima", MODEL_NAME, "the model registry's name (rima, a baseline, ...)")
    fundus_encoder: str = setting("small_cnn2d", one_of(*ENCODERS_2D), "fundus encoder")
    oct_encoder: str = setting("small_cnn3d", one_of(*ENCODERS_3D), "OCT encoder")
    fundus_dim: int = setting(128, integer(1), "fundus feature size")
    oct_dim: int = setting(192, integer(1), "OCT feature size")
    hidden_dim: int = setting(128, integer(1), "width of the fusion and the translators")
    heads: int = setting(4, integer(1), "attention heads of the asymmetric fusion")
    dropout: float = setting(0.1, PROBABILITY, "dropout of the heads")
    modality_dropout: float = setting(
        0.2, PROBABILITY, "share of complete training eyes shown with one modality dropped"
    )
    missing_path_weight: float = setting(
        1.0,
        NON_NEGATIVE,
        "RIMA: cross-entropy of the fundus-only / OCT-only paths of complete eyes",
    )
    consistency_weight: float = setting(
        0.5, NON_NEGATIVE, "RIMA: KL of those paths towards the full prediction"
    )
    full_path: str = setting(
        "head",
        one_of(*FULL_PATHS),
        "a complete eye's full path: head = the fused head alone (the paper's fusion); product "
        "= the head's logits plus the fixed log-probabilities of the two single paths",
    )
    # a benchmark sweeps them (e.g. alpha in {0.3, 0.7}, T in {1, 3}) and selects on validation
    distill_alpha: float = setting(
        0.5,
        FRACTION,
        "distillation: the students' loss is (1 - alpha) * CE + alpha * T^2 * KL to the teacher",
    )
    distill_temperature: float = setting(
        2.0, POSITIVE, "distillation: softmax temperature T of that KL"
    )
    fundus_weights: str | None = setting(
        None, help="local path to pretrained fundus encoder weights; never downloaded"
    )
    oct_weights: str | None = setting(
        None, help="local path to pretrained OCT encoder weights; never downloaded"
    )


@dataclass
class OTConfig:
    """RIMA's optimal transport: the class-wise (Gromov-Wasserstein) and feature-wise couplings."""

    gw_epsilon: float = setting(5e-3, POSITIVE, "entropic regularisation of the class-wise GW OT")
    feature_epsilon: float = setting(
        5e-3, POSITIVE, "entropic regularisation of the feature-wise OT"
    )
    loss_weight: float = setting(0.5, NON_NEGATIVE, "weight of the alignment losses")
    feature_momentum: float = setting(
        0.9, PROBABILITY, "running estimate of the feature-wise coupling"
    )
    target: str = setting(
        "barycentric", one_of(*OT_TARGETS), "translators' target: barycentric or sample"
    )
    # models/rima.py, _with_bank: every class gets several eyes on both sides of the coupling
    bank_size: int = setting(
        128,
        integer(0),
        "earlier eyes of the epoch (detached, with labels) the class-wise coupling also "
        "reaches; 0 = the batch alone, as the paper",
    )
    pairing_mix: float = setting(
        0.0,
        FRACTION,
        "share of the translators' coupling that pairs each eye's own two modalities: 0 = the "
        "class-wise OT alone (the paper), 1 = pairing alone (rima_no_class_ot)",
    )


@dataclass
class RuntimeConfig:
    """How tune, train and evaluate run the network (shared, so they cannot disagree)."""

    device: str = setting(
        "auto",
        matches(r"auto|cpu|cuda(:\d+)?|mps", "auto, cpu, cuda, cuda:N or mps"),
        "where the network runs: auto, cpu, cuda, cuda:N or mps",
    )
    amp: bool = setting(True, help="mixed precision, CUDA only")
    num_workers: int = setting(
        0, integer(0), "DataLoader worker processes (speed only: loaders are seeded)"
    )
    seed: int = setting(0, SEED, "model initialisation and data order (training, every trial)")
    eval_batch_size: int = setting(
        64, integer(1), "batch size of the no-grad passes: training's validation, trials, evaluate"
    )


@dataclass
class TrainConfig:
    """Training, model selection and the fitted post-processing."""

    out_dir: str = setting("models/rima", NON_EMPTY, "where the trained model goes")
    epochs: int = setting(15, integer(1), "training epochs")
    batch_size: int = setting(32, integer(1), "training batch size")
    lr: float = setting(1e-3, POSITIVE, "AdamW learning rate")
    weight_decay: float = setting(1e-2, NON_NEGATIVE, "AdamW weight decay")
    warmup_epochs: int = setting(1, integer(0), "linear learning-rate warm-up epochs")
    grad_clip: float = setting(1.0, NON_NEGATIVE, "gradient norm clip; 0 = no clipping")
    patience: int = setting(5, integer(0), "early-stopping patience, epochs; 0 = none")
    selection_metric: str = setting("qwk", METRIC, "validation metric of model selection")
    selection_scenario: str = setting(
        "mean",
        SCENARIO_OR_MEAN,
        "validation scenario of model selection; mean = the mean over complete, "
        "fundus_missing, oct_missing, mixed",
    )
    pool_paths: bool = setting(
        True,
        help="RIMA: fit on validation how a complete eye pools its full / fundus-only / "
        "OCT-only paths; false = the full path alone",
    )
    decoding: str = setting(
        "argmax",
        one_of(*DECODINGS),
        "the shipped grade: argmax, or ordinal (least expected quadratic cost); both reported",
    )
    augment: list[str] = setting(
        [],
        each(one_of(*AUGMENTATIONS)),
        "training-time augmentation: any of flip (mirror both modalities together), intensity "
        "(fundus contrast/brightness)",
    )


@dataclass
class TuneConfig:
    """Optuna search of the OT regularisation, loss weight, learning rate and pairing mix."""

    out_dir: str = setting("reports/tune", NON_EMPTY, "tuning reports and best_params.json")
    storage: str = setting("sqlite:///optuna.db", URL, "Optuna storage URL", secret=True)
    study_name: str = setting("rima", NON_EMPTY, "Optuna study name")
    n_trials: int = setting(
        8, integer(0), "budget: finished (completed or pruned) trials, resumable; 0 = no tuning"
    )
    timeout_s: float | None = setting(
        None,
        optional(POSITIVE),
        "wall-clock budget in seconds, with or instead of n_trials; null = none",
    )
    epochs: int = setting(3, integer(1), "epochs per trial (the pruner stops the weak ones)")
    workers: int = setting(1, integer(1), "trials run in parallel")
    seed: int = setting(0, SEED, "seed of the sampler")
    scenario: str = setting(
        "mean", SCENARIO_OR_MEAN, "the objective's scenario, as train.selection_scenario"
    )
    metric: str = setting("qwk", METRIC, "the objective's metric")
    pruner_startup_trials: int = setting(
        3, integer(0), "MedianPruner: no pruning until this many trials completed"
    )
    pruner_warmup_epochs: int = setting(
        1, integer(0), "MedianPruner: nor before a trial has trained this many epochs"
    )
    # The search ranges, in the order trials sample them (changing it changes the sampled
    # values). Named *_range so tune.lr_range (where to search) is never mistaken for train.lr.
    gw_epsilon_range: list[float] = setting(
        [1e-3, 5e-2],
        increasing_pair(POSITIVE),
        "search range of ot.gw_epsilon, log scale",
        tunes="ot.gw_epsilon",
    )
    feature_epsilon_range: list[float] = setting(
        [1e-3, 5e-2],
        increasing_pair(POSITIVE),
        "search range of ot.feature_epsilon, log scale",
        tunes="ot.feature_epsilon",
    )
    loss_weight_range: list[float] = setting(
        [0.05, 2.0],
        increasing_pair(POSITIVE),
        "search range of ot.loss_weight, log scale",
        tunes="ot.loss_weight",
    )
    lr_range: list[float] = setting(
        [2e-4, 3e-3],
        increasing_pair(POSITIVE),
        "search range of train.lr, log scale",
        tunes="train.lr",
    )
    # a share in [0, 1] where 0 itself is a setting (the paper's coupling): linear; null = off
    pairing_mix_range: list[float] | None = setting(
        [0.0, 1.0],
        optional(increasing_pair(FRACTION)),
        "search range of ot.pairing_mix, linear scale; null = not searched",
        tunes="ot.pairing_mix",
        scale="linear",
    )


@dataclass
class EvaluateConfig:
    """Scoring under every missing scenario, with bootstrap intervals and equity numbers."""

    out_dir: str = setting("reports/eval", NON_EMPTY, "evaluation reports")
    split: str = setting("test", one_of(*SPLITS), "the split reported")
    selection_split: str = setting(
        "val",
        one_of(*SPLITS),
        "also scored: the split promotion decides on (the test split is never selected on)",
    )
    bootstrap: int = setting(
        1000, integer(1), "percentile-bootstrap resamples over eyes (scores.csv intervals)"
    )
    bootstrap_seed: int = setting(0, SEED, "seed of the bootstrap")
    ci_level: float = setting(
        0.95, number(0.0, 1.0, low_open=True, high_open=True), "interval level"
    )
    equity_attributes: list[str] = setting(
        ["race", "gender", "ethnicity"],
        help="attributes whose ES-AUC goes to metrics.json (subgroups.csv and equity.csv hold "
        "every source_* attribute)",
    )
    max_groups: int = setting(
        12, integer(1), "a numeric attribute with more distinct values is cut into quartiles"
    )


@dataclass
class MlflowConfig:
    """Tracking and the model registry."""

    tracking_uri: str = setting(
        "sqlite:///mlflow.db", NON_EMPTY, "MLflow tracking URI", secret=True
    )
    experiment: str = setting("rima-synthetic", NON_EMPTY, "MLflow experiment")
    model_name: str = setting("rima", NON_EMPTY, "registered model name")
    artifact_location: str | None = setting(
        None,
        help="where a new experiment stores artifacts: s3://bucket/prefix for direct S3 (off "
        "AWS the client needs MLFLOW_S3_ENDPOINT_URL); null = mlartifacts/ beside a SQLite "
        "file, or the server's choice",
        secret=True,
    )


@dataclass
class PromoteConfig:
    """When a new model version is registered and promoted."""

    metric: str = setting("qwk", METRIC, "the metric promotion compares")
    scenario: str = setting("mixed", SCENARIO, "the scenario promotion compares")
    margin: float = setting(0.0, NON_NEGATIVE, "gain over the champion a challenger needs")
    tolerance: float = setting(
        0.02, NON_NEGATIVE, "largest loss a challenger may have in any other scenario"
    )
    require_significant: bool = setting(
        False,
        help="also need the paired-bootstrap interval of the gain (validation eyes) to exclude 0",
    )
    register_min_metric: float | None = setting(
        None,
        optional(number()),
        "register only when promote.metric beats this (ece/nll: below it); null = chance level "
        "(QWK 0, AUC 0.5)",
    )


@dataclass
class ReproConfig:
    """``rima check-repro``: how far a rerun's numbers may move from the committed ones."""

    abs_tolerance: float = setting(
        0.05,
        NON_NEGATIVE,
        "floats without a bootstrap interval in scores.csv: |now - committed| <= this",
    )
    # counts and epochs (integers) are always only listed: rounding may move an epoch by one
    informational: list[str] = setting(
        [], each(NON_EMPTY), 'metrics keys (globs, e.g. "tune/*") listed but not judged'
    )


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


def sections() -> list[tuple[str, type]]:
    """``(name, dataclass)`` of every section, in file order."""
    return [(f.name, type(f.default_factory())) for f in dataclasses.fields(Config)]  # type: ignore[misc]


def keys() -> list[tuple[str, dataclasses.Field[Any]]]:
    """``(section.key, field)`` of every key, in file order."""
    return [(f"{name}.{f.name}", f) for name, cls in sections() for f in dataclasses.fields(cls)]


def key_field(dotted: str) -> tuple[dataclasses.Field[Any], Any]:
    """The field of ``section.key`` and its resolved type: for what else is built from a key
    (a Kubeflow run parameter takes its type and help from here)."""
    section, _, key = dotted.partition(".")
    cls = dict(sections()).get(section)
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    if key not in fields:
        raise KeyError(f"{dotted!r} is not a section.key of the config schema")
    return fields[key], typing.get_type_hints(cls)[key]


def tuned_parameters() -> dict[str, tuple[str, str]]:
    """``section.key`` tuning searches -> (its range key in ``tune:``, ``log``/``linear``), in
    the order trials sample them."""
    return {
        f.metadata["tunes"]: (dotted.split(".")[1], f.metadata["scale"])
        for dotted, f in keys()
        if f.metadata.get("tunes")
    }


# The load-time value rules, section.key -> check, derived from the fields.
RULES: dict[str, Check] = {
    dotted: f.metadata["check"] for dotted, f in keys() if f.metadata.get("check") is not None
}

_SECRET_KEYS = frozenset(dotted for dotted, f in keys() if f.metadata.get("secret"))


def secret_keys() -> frozenset[str]:
    """``section.key`` of every setting declared secret in the schema."""
    return _SECRET_KEYS
