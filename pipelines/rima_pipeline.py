"""``rima_pipeline``: the whole RIMA pipeline as a Kubeflow pipeline.

The parameters are ``rima_core.pipeline.remote_config.RUN_PARAMETERS``:
``params_yaml``/``profile_yaml``
carry the files themselves (the compiler fills them in from the checkout, so a compiled package
is self-contained), and the typed parameters are the knobs a run most often changes — data
source, missing-modality scenarios, tuning budget and workers, promotion policy, MLflow. Their
defaults here are the embedded defaults; :func:`pipelines.compile.pipeline_arguments` replaces
them with the values of params.yaml (+ profile) at compile time. Which tasks exist and how each
runs (caching, retries, GPU, secret, resources) is the step table's
(``rima_core.pipeline.step_registry``), paired with the component functions in
``components.tasks.TASKS``.

Every task runs inside one ``dsl.ExitHandler``: its exit task (components/exit_handler.py) runs
after the others whatever became of them and, when the run failed, ends the MLflow runs the
run's tasks left RUNNING (the tasks tag their runs with the KFP run id). KFP allows no pipeline
output from inside an exit handler, so the pipeline returns none (:data:`MODEL_OUTPUT`).

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

from components import (
    EXIT_TASK,
    TASK_NAMES,
    TASKS,
    Components,
    Task,
    TaskResources,
    build_components,
)
from components.tasks import task as task_spec
from rima_core.config import Config
from rima_core.pipeline.remote_config import CONFIG_PARAMETERS
from rima_core.pipeline.step_registry import CREDENTIAL_ENV, RETRY_BACKOFF

# Environment variables filled from the Kubernetes secret: the step table's (each task names the
# ones it gets; every one that gets the secret gets all of these).
SECRET_ENV_KEYS: tuple[str, ...] = CREDENTIAL_ENV

# Derived from components.tasks.TASKS (the step table's tasks and their flags).
RETRIED_TASKS = tuple(t.name for t in TASKS if t.retried)
CACHED_TASKS = tuple(t.name for t in TASKS if t.cached)
GPU_TASKS = tuple(t.name for t in TASKS if t.gpu)
DEFAULT_RESOURCES: dict[str, TaskResources] = {t.name: t.resources for t in TASKS}


#: Where a run's outputs are: (task, output) of the trained model and of the evaluation. The
#: pipeline returns no outputs (KFP refuses outputs from inside ``dsl.ExitHandler``, and every
#: task is inside it), so ``run-local`` finds them by these names.
MODEL_OUTPUT = ("train", "model")
EVALUATION_OUTPUT = ("evaluate", "results")


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
    retries: int | None = None  # None: each retried task's count in the step table
    resources: Mapping[str, TaskResources] = field(default_factory=lambda: dict(DEFAULT_RESOURCES))

    def __post_init__(self) -> None:
        unknown = set(self.resources) - {*TASK_NAMES, EXIT_TASK.name}
        if unknown:
            raise ValueError(f"resources for unknown step(s) {sorted(unknown)}: {TASK_NAMES}")

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


def _row(step: str) -> Task:
    """The row of ``step``: a task of TASKS, or the exit task."""
    return EXIT_TASK if step == EXIT_TASK.name else task_spec(step)


def _task_resources(step: str, opts: ClusterOptions) -> TaskResources:
    """``step``'s resources in ``opts``. The exit task is no row of DEFAULT_RESOURCES (it runs
    no step), so it keeps its row's own unless ``opts`` names it, or ``opts`` sets none at all
    (``run-local``: kfp.local ignores them)."""
    if step == EXIT_TASK.name and opts.resources:
        return opts.resources.get(step, EXIT_TASK.resources)
    return opts.resources.get(step, TaskResources())


def _set_resources(task: dsl.PipelineTask, step: str, opts: ClusterOptions) -> None:
    """CPU/memory requests and limits of ``step`` (GPU tasks: ``gpu_*_request`` win).

    A request above its limit would be rejected by the cluster when the pod starts; it is an
    error here, at compile time, naming the step.
    """
    res = _task_resources(step, opts)
    cpu, memory = res.cpu, res.memory
    if _row(step).gpu and opts.uses_gpu:
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
    """Caching, retries, credentials and accelerators for one task, from its row of the step
    table (TASKS, or :data:`components.EXIT_TASK`)."""
    spec = _row(step)
    task.set_display_name(spec.display_name or step)
    if spec.timeout_s:
        kubernetes.set_timeout(task, spec.timeout_s)
    task.set_caching_options(spec.cached)
    if spec.retried:
        backoff, factor = RETRY_BACKOFF
        retries = spec.retries if opts.retries is None else opts.retries
        task.set_retry(num_retries=retries, backoff_duration=backoff, backoff_factor=factor)
    if spec.secret_env:
        kubernetes.use_secret_as_env(
            task,
            secret_name=opts.secret_name,
            secret_key_to_env={key: key for key in spec.secret_env},
            optional=True,
        )
    if spec.gpu:
        _on_gpu(task, opts)
    _set_resources(task, step, opts)
    return task


class _Data(NamedTuple):
    """What every task after the data steps reads."""

    config: Any
    store: Any
    masks: Any


def _resolve_config(
    c: Components, opts: ClusterOptions, arguments: Mapping[str, Any]
) -> dsl.PipelineTask:
    """The run's one resolved config, from the carried files and the config-setting
    parameters (``CONFIG_PARAMETERS``)."""
    names = ("params_yaml", "profile_yaml", *(p.name for p in CONFIG_PARAMETERS))
    return _configure(
        c.resolve_config(**{name: arguments[name] for name in names}), "resolve_config", opts
    )


def _data_tasks(
    c: Components, opts: ClusterOptions, config: Any, arguments: Mapping[str, Any]
) -> _Data:
    """fetch-raw -> prepare -> validate -> simulate-missing; the masks wait for validation, so
    a store that failed it never reaches the models."""
    raw = _configure(
        c.fetch_raw(
            config=config,
            data_source_uri=arguments["data_source_uri"],
            data_dvc_repo=arguments["data_dvc_repo"],
            data_dvc_rev=arguments["data_dvc_rev"],
        ),
        "fetch_raw",
        opts,
    )
    prepare = _configure(c.prepare(config=config, raw=raw.outputs["raw"]), "prepare", opts)
    store = prepare.outputs["store"]
    validate = _configure(c.validate(config=config, store=store), "validate", opts)
    masks = _configure(c.simulate_missing(config=config, store=store), "simulate_missing", opts)
    masks.after(validate)
    return _Data(config=config, store=store, masks=masks.outputs["masks"])


def _tune_tasks(c: Components, opts: ClusterOptions, data: _Data, workers: Any) -> dsl.PipelineTask:
    """One tune-worker per index of ``workers`` on one shared study, then tune-best over it."""
    with dsl.ParallelFor(
        items=workers, name="tune-workers", parallelism=opts.tune_parallelism
    ) as worker_index:
        worker = _configure(
            c.tune_worker(
                config=data.config,
                store=data.store,
                masks=data.masks,
                worker=worker_index,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            ),
            "tune_worker",
            opts,
        )
    return _configure(
        c.tune_best(
            config=data.config,
            store=data.store,
            masks=data.masks,
            finished=dsl.Collected(worker.outputs["Output"]),
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "tune_best",
        opts,
    )


def _model_tasks(
    c: Components, opts: ClusterOptions, data: _Data, best_params: Any
) -> tuple[Any, Any]:
    """train with the tuned parameters, then evaluate; returns (model, evaluation results)."""
    train = _configure(
        c.train(
            config=data.config,
            store=data.store,
            masks=data.masks,
            best_params=best_params,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "train",
        opts,
    )
    model = train.outputs["model"]
    evaluate = _configure(
        c.evaluate(
            config=data.config,
            model=model,
            store=data.store,
            masks=data.masks,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "evaluate",
        opts,
    )
    return model, evaluate.outputs["results"]


def _registry_tasks(
    c: Components, opts: ClusterOptions, data: _Data, model: Any, results: Any, auto_promote: Any
) -> None:
    """register (it applies the registration gate itself and returns "" when it refused the
    model), then promote only when a version was registered and ``auto_promote`` is on."""
    register = _configure(
        c.register(
            config=data.config,
            model=model,
            results=results,
            store=data.store,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ),
        "register",
        opts,
    )
    with (
        dsl.If(register.outputs["Output"] != "", name="registered"),
        dsl.If(auto_promote == True, name="auto-promote"),  # noqa: E712 (DSL condition)
    ):
        promote = c.promote(
            config=data.config,
            version=register.outputs["Output"],
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        )
        _configure(promote, "promote", opts)


def _exit_task(c: Components, opts: ClusterOptions, arguments: Mapping[str, Any]) -> Any:
    """The ``dsl.ExitHandler`` task: after the run, whatever became of it, it ends the MLflow
    runs a failed run left RUNNING (components/exit_handler.py). It reads only pipeline
    parameters: an exit task cannot consume outputs of the tasks it watches."""
    task = c.end_failed_runs(
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        mlflow_tracking_uri=arguments["mlflow_tracking_uri"],
        mlflow_experiment=arguments["mlflow_experiment"],
    )
    return _configure(task, EXIT_TASK.name, opts)


def build_pipeline(options: ClusterOptions | None = None) -> Callable[..., Any]:
    """The pipeline function for ``options`` (compile it, or call it under ``kfp.local``).

    The signature is ``rima_core.pipeline.remote_config.RUN_PARAMETERS`` written out (KFP reads a
    literal signature; tests/contracts/test_kfp_parameters.py checks the two agree); the embedded
    defaults are the config's, replaced from params.yaml by the compiler.
    """
    opts = options or ClusterOptions()
    c: Components = build_components(opts.image)
    d = Config()

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
    ):
        arguments = dict(locals())  # first statement: exactly the run parameters
        with dsl.ExitHandler(_exit_task(c, opts, arguments), name="rima-run"):
            resolved = _resolve_config(c, opts, arguments)
            data = _data_tasks(c, opts, resolved.outputs["config"], arguments)
            best = _tune_tasks(c, opts, data, resolved.outputs["Output"])
            model, results = _model_tasks(c, opts, data, best.outputs["best_params"])
            _registry_tasks(c, opts, data, model, results, auto_promote)

    return rima_pipeline


#: The pipeline with the default cluster options (image from ``$RIMA_IMAGE``).
rima_pipeline = build_pipeline()
