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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Artifact, Model

from components import Components, build_components
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
    gpu_cpu_request: str | None = None  # e.g. "4"
    gpu_memory_request: str | None = None  # e.g. "16Gi"
    tune_parallelism: int | None = None  # cap on simultaneous tune workers; None = all at once
    retries: int = 3

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
    if opts.gpu_cpu_request:
        task.set_cpu_request(opts.gpu_cpu_request)
    if opts.gpu_memory_request:
        task.set_memory_request(opts.gpu_memory_request)


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
                mlflow_tracking_uri=mlflow_tracking_uri,
                mlflow_experiment=mlflow_experiment,
                model_name=model_name,
            ),
            "resolve_config",
            opts,
        )
        config = resolved.outputs["config"]

        raw = _configure(
            c.fetch_raw(config=config, data_source_uri=data_source_uri), "fetch_raw", opts
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

        with dsl.If(evaluate.outputs["Output"] >= register_min_metric, name="good-enough"):
            register = _configure(
                c.register(
                    config=config, model=model, results=evaluate.outputs["results"], store=store
                ),
                "register",
                opts,
            )
            with dsl.If(auto_promote == True, name="auto-promote"):  # noqa: E712 (DSL condition)
                _configure(
                    c.promote(config=config, version=register.outputs["Output"]), "promote", opts
                )

        return RimaOutputs(model=model, evaluation=evaluate.outputs["results"])

    return rima_pipeline


#: The pipeline with the default cluster options (image from ``$RIMA_IMAGE``).
rima_pipeline = build_pipeline()
