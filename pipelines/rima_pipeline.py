"""``rima_pipeline``: the whole RIMA pipeline as a Kubeflow pipeline.

Parameters mirror params.yaml: ``params_yaml``/``profile_yaml`` carry the files themselves (the
compiler fills them in from the checkout, so a compiled package is self-contained), and the
typed parameters are the knobs a run most often changes — data source, missing-modality
scenarios, tuning budget and workers, promotion policy, MLflow. Their defaults here are the
embedded defaults; :func:`pipelines.compile.pipeline_arguments` replaces them with the values of
params.yaml (+ profile) at compile time.

Cluster wiring that is deployment, not experiment, comes from :class:`ClusterOptions` at compile
time: the image, the Kubernetes secret with the credentials, the accelerator and its
tolerations/node selectors. (KFP can take accelerator settings from runtime parameters, but
kfp.local cannot resolve them inside a ``ParallelFor``, and older backends ignore them.)

No ``from __future__ import annotations`` here: KFP reads the pipeline function's annotations as
real types.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Model

from components import STEP_FUNCTIONS, Components, build_components
from rima_core.config import Config
from rima_core.kfp_support import OPTUNA_STORAGE_ENV

# Environment variables filled from the Kubernetes secret (key name == variable name). All are
# optional in the secret: an AWS role (IRSA) or an unauthenticated in-cluster MLflow needs none.
SECRET_ENV_KEYS: tuple[str, ...] = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    OPTUNA_STORAGE_ENV,
)

# Tasks that talk to the network and may hit a transient failure (MLflow server, Optuna's RDB).
RETRIED_TASKS = ("tune_worker", "tune_best", "register", "promote")
# Deterministic in their inputs: a rerun with the same inputs may reuse the previous outputs.
CACHED_TASKS = ("resolve_config", "fetch_raw", "prepare", "validate", "simulate_missing")
GPU_TASKS = ("tune_worker", "train")


class RimaOutputs(NamedTuple):
    """The pipeline's outputs (usable when it runs as a sub-pipeline, and by kfp.local)."""

    model: Model
    evaluation: Artifact


@dataclass(frozen=True)
class Toleration:
    key: str
    operator: str = "Exists"  # Exists | Equal
    value: str | None = None
    effect: str | None = "NoSchedule"

    @classmethod
    def parse(cls, text: str) -> "Toleration":
        """``KEY[=VALUE][:EFFECT]``: ``nvidia.com/gpu:NoSchedule``, ``pool=gpu:NoSchedule``."""
        body, _, effect = text.partition(":")
        key, eq, value = body.partition("=")
        if not key:
            raise ValueError(f"toleration {text!r}: expected KEY[=VALUE][:EFFECT]")
        effects = ("NoSchedule", "PreferNoSchedule", "NoExecute")
        if effect and effect not in effects:
            raise ValueError(f"toleration {text!r}: effect must be one of {effects}")
        if eq:
            return cls(key=key, operator="Equal", value=value, effect=effect or None)
        return cls(key=key, operator="Exists", effect=effect or None)


@dataclass(frozen=True)
class TaskResources:
    """CPU/memory of one task's container, in Kubernetes quantities (``"500m"``, ``"2"``,
    ``"8Gi"``). Requests are what the scheduler reserves; limits (None: none) cap the pod."""

    cpu: str | None = None
    memory: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None

    _KEYS = ("cpu", "memory", "cpu_limit", "memory_limit")

    @classmethod
    def parse(cls, text: str) -> tuple[str, dict[str, str]]:
        """``STEP:cpu=2,memory=8Gi[,cpu_limit=4,memory_limit=16Gi]`` -> (step, changes)."""
        step, sep, body = text.partition(":")
        if not sep or not step or not body:
            raise ValueError(f"task resources {text!r}: expected STEP:cpu=2,memory=8Gi,...")
        if step not in STEP_FUNCTIONS:
            raise ValueError(f"task resources {text!r}: no step {step!r}; steps: {STEP_NAMES}")
        changes = {}
        for pair in body.split(","):
            key, eq, value = pair.strip().partition("=")
            if not eq or key not in cls._KEYS or not value:
                raise ValueError(f"task resources {text!r}: {pair!r} is not one of {cls._KEYS}=V")
            changes[key] = value
        return step, changes


STEP_NAMES = tuple(STEP_FUNCTIONS)

# Requests for every task, by step (the keys are exactly the steps of components.STEP_FUNCTIONS,
# checked at import below). Sized for the tiny/synthetic profiles' data and the paper's models on
# one GPU; override per step with ClusterOptions.resources or `--task-resources`.
DEFAULT_RESOURCES: dict[str, TaskResources] = {
    "resolve_config": TaskResources("100m", "256Mi", None, "512Mi"),
    "fetch_raw": TaskResources("1", "2Gi", None, "4Gi"),
    "prepare": TaskResources("2", "4Gi", None, "8Gi"),
    "validate": TaskResources("1", "4Gi", None, "8Gi"),
    "simulate_missing": TaskResources("500m", "1Gi", None, "2Gi"),
    "tune_worker": TaskResources("4", "16Gi", None, "32Gi"),
    "tune_best": TaskResources("1", "2Gi", None, "4Gi"),
    "train": TaskResources("4", "16Gi", None, "32Gi"),
    "evaluate": TaskResources("2", "8Gi", None, "16Gi"),
    "register": TaskResources("1", "4Gi", None, "8Gi"),
    "promote": TaskResources("500m", "1Gi", None, "2Gi"),
}
if set(DEFAULT_RESOURCES) != set(STEP_FUNCTIONS):  # one table of steps: fail at import
    raise RuntimeError(
        "DEFAULT_RESOURCES and components.STEP_FUNCTIONS disagree: "
        f"{sorted(set(DEFAULT_RESOURCES) ^ set(STEP_FUNCTIONS))}"
    )


def with_resources(
    base: Mapping[str, TaskResources], overrides: list[str]
) -> dict[str, TaskResources]:
    """``base`` with ``STEP:key=value,...`` overrides applied (see :meth:`TaskResources.parse`)."""
    out = dict(base)
    for text in overrides:
        step, changes = TaskResources.parse(text)
        out[step] = replace(out.get(step, TaskResources()), **changes)
    return out


@dataclass(frozen=True)
class ClusterOptions:
    """Compile-time cluster settings (see the module docstring for why they are not parameters).

    ``gpu_type`` is the Kubernetes extended resource of the accelerator; an empty ``gpu_type`` or
    ``gpu_count=0`` compiles a CPU-only pipeline (no accelerator, no GPU tolerations).
    """

    image: str | None = None  # None: $RIMA_IMAGE, else components.image.DEFAULT_IMAGE
    secret_name: str = "rima-credentials"
    gpu_type: str = "nvidia.com/gpu"
    gpu_count: int = 1
    gpu_tolerations: tuple[Toleration, ...] = (Toleration("nvidia.com/gpu"),)
    gpu_node_selector: dict[str, str] = field(default_factory=dict)
    gpu_cpu_request: str | None = None  # e.g. "4": overrides `resources` for the GPU tasks
    gpu_memory_request: str | None = None  # e.g. "16Gi"
    tune_parallelism: int | None = None  # cap on simultaneous tune workers; None = all at once
    retries: int = 3
    resources: Mapping[str, TaskResources] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))

    def __post_init__(self) -> None:
        unknown = set(self.resources) - set(STEP_FUNCTIONS)
        if unknown:
            raise ValueError(f"resources for unknown step(s) {sorted(unknown)}: {STEP_NAMES}")

    @property
    def uses_gpu(self) -> bool:
        return bool(self.gpu_type) and self.gpu_count > 0


def _on_gpu(task: dsl.PipelineTask, opts: ClusterOptions) -> None:
    if not opts.uses_gpu:
        return
    task.set_accelerator_type(opts.gpu_type).set_accelerator_limit(opts.gpu_count)
    for tol in opts.gpu_tolerations:
        kubernetes.add_toleration(
            task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect
        )
    for key, value in sorted(opts.gpu_node_selector.items()):
        kubernetes.add_node_selector(task, label_key=key, label_value=value)


_UNITS = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_UNITS.update({"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40})


def quantity(text: str) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``8Gi``, ``1G``) as a number, for comparisons."""
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if text.endswith(suffix):
            number, scale = text[: -len(suffix)], _UNITS[suffix]
            break
    else:
        number, scale = text, 1.0
    try:
        return float(number) * scale
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a Kubernetes quantity (e.g. 500m, 2, 8Gi)") from exc


def _set_resources(task: dsl.PipelineTask, step: str, opts: ClusterOptions) -> None:
    """CPU/memory requests and limits of ``step`` (GPU tasks: ``gpu_*_request`` win).

    A request above its limit would be rejected by the cluster when the pod starts; it is an
    error here, at compile time, naming the step.
    """
    res = opts.resources.get(step, TaskResources())
    cpu, memory = res.cpu, res.memory
    if step in GPU_TASKS and opts.uses_gpu:
        cpu, memory = opts.gpu_cpu_request or cpu, opts.gpu_memory_request or memory
    for what, request, limit in (("cpu", cpu, res.cpu_limit), ("memory", memory, res.memory_limit)):
        if request and limit and quantity(request) > quantity(limit):
            raise ValueError(
                f"step {step}: {what} request {request} exceeds its limit {limit} "
                f"(raise it with --task-resources {step}:{what}_limit=...)"
            )
    if cpu:
        task.set_cpu_request(cpu)
    if memory:
        task.set_memory_request(memory)
    if res.cpu_limit:
        task.set_cpu_limit(res.cpu_limit)
    if res.memory_limit:
        task.set_memory_limit(res.memory_limit)


def _configure(task: dsl.PipelineTask, step: str, opts: ClusterOptions) -> dsl.PipelineTask:
    """Caching, retries, credentials and accelerators for one task, by its step name."""
    task.set_caching_options(step in CACHED_TASKS)
    if step in RETRIED_TASKS:
        task.set_retry(num_retries=opts.retries, backoff_duration="30s", backoff_factor=2.0)
    if step != "resolve_config":  # the only task that touches no storage or tracking server
        kubernetes.use_secret_as_env(
            task,
            secret_name=opts.secret_name,
            secret_key_to_env={key: key for key in SECRET_ENV_KEYS},
            optional=True,
        )
    if step in GPU_TASKS:
        _on_gpu(task, opts)
    _set_resources(task, step, opts)
    return task


def build_pipeline(options: ClusterOptions | None = None) -> Callable[..., Any]:
    """The pipeline function for ``options`` (compile it, or call it under ``kfp.local``)."""
    opts = options or ClusterOptions()
    c: Components = build_components(opts.image)
    d = Config()  # embedded defaults; the compiler overrides them from params.yaml

    @dsl.pipeline(
        name="rima",
        description="RIMA: multimodal ophthalmic grading robust to missing modalities "
        "(prepare, validate, simulate-missing, tune, train, evaluate, register, promote).",
    )
    def rima_pipeline(
        params_yaml: str = "",
        profile_yaml: str = "",
        data_source_uri: str = "",
        data_source: str = d.data.source,
        disease: str = d.data.disease,
        missing_rate: float = d.missing.rate,
        missing_mixed: list = d.missing.mixed,
        missing_sweep: list = d.missing.sweep,
        tune_trials: int = d.tune.n_trials,
        tune_workers: int = d.tune.workers,
        promote_metric: str = d.promote.metric,
        promote_scenario: str = d.promote.scenario,
        promote_margin: float = d.promote.margin,
        promote_tolerance: float = d.promote.tolerance,
        register_min_metric: float = 0.0,
        data_dvc_repo: str = "",
        data_dvc_rev: str = "",
        auto_promote: bool = True,
        mlflow_tracking_uri: str = d.mlflow.tracking_uri,
        mlflow_experiment: str = d.mlflow.experiment,
        model_name: str = d.mlflow.model_name,
    ) -> RimaOutputs:
        resolved = _configure(
            c.resolve_config(
                params_yaml=params_yaml,
                profile_yaml=profile_yaml,
                data_source=data_source,
                disease=disease,
                missing_rate=missing_rate,
                missing_mixed=missing_mixed,
                missing_sweep=missing_sweep,
                tune_trials=tune_trials,
                tune_workers=tune_workers,
                promote_metric=promote_metric,
                promote_scenario=promote_scenario,
                promote_margin=promote_margin,
                promote_tolerance=promote_tolerance,
                register_min_metric=register_min_metric,
                mlflow_tracking_uri=mlflow_tracking_uri,
                mlflow_experiment=mlflow_experiment,
                model_name=model_name,
            ),
            "resolve_config",
            opts,
        )
        config = resolved.outputs["config"]

        raw = _configure(
            c.fetch_raw(
                config=config,
                data_source_uri=data_source_uri,
                data_dvc_repo=data_dvc_repo,
                data_dvc_rev=data_dvc_rev,
            ),
            "fetch_raw",
            opts,
        )
        prepare = _configure(c.prepare(config=config, raw=raw.outputs["raw"]), "prepare", opts)
        store = prepare.outputs["store"]
        validate = _configure(c.validate(config=config, store=store), "validate", opts)
        masks_task = _configure(
            c.simulate_missing(config=config, store=store), "simulate_missing", opts
        )
        # a store that failed validation never reaches the models
        masks_task.after(validate)
        masks = masks_task.outputs["masks"]

        with dsl.ParallelFor(
            items=resolved.outputs["Output"], name="tune-workers", parallelism=opts.tune_parallelism
        ) as worker_index:
            worker = _configure(
                c.tune_worker(
                    config=config,
                    store=store,
                    masks=masks,
                    worker=worker_index,
                    run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                ),
                "tune_worker",
                opts,
            )
        best = _configure(
            c.tune_best(
                config=config,
                store=store,
                masks=masks,
                finished=dsl.Collected(worker.outputs["Output"]),
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ),
            "tune_best",
            opts,
        )
        train = _configure(
            c.train(
                config=config, store=store, masks=masks, best_params=best.outputs["best_params"]
            ),
            "train",
            opts,
        )
        model = train.outputs["model"]
        evaluate = _configure(
            c.evaluate(config=config, model=model, store=store, masks=masks), "evaluate", opts
        )

        # register applies the gate itself (promote.register_min_metric, direction-aware) and
        # says why in its Markdown; it returns "" when the model was not registered
        register = _configure(
            c.register(
                config=config, model=model, results=evaluate.outputs["results"], store=store
            ),
            "register",
            opts,
        )
        with (
            dsl.If(register.outputs["Output"] != "", name="registered"),
            dsl.If(auto_promote == True, name="auto-promote"),  # noqa: E712 (DSL condition)
        ):
            _configure(
                c.promote(config=config, version=register.outputs["Output"]), "promote", opts
            )

        return RimaOutputs(model=model, evaluation=evaluate.outputs["results"])

    return rima_pipeline


#: The pipeline with the default cluster options (image from ``$RIMA_IMAGE``).
rima_pipeline = build_pipeline()
