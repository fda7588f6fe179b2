"""The pipeline's steps, once: which function of :mod:`rima_core.pipeline.steps` each runs, its
command line, and how each orchestrator runs it.

Three orchestrators call the same :mod:`rima_core.pipeline.steps` functions: DVC (``dvc.yaml``
stages running the ``rima`` CLI), MLflow Projects (``MLproject`` entry points running the same CLI)
and Kubeflow (``components/`` tasks). This table is the one written source of what they share, and
the others are made from it rather than written beside it:

- the ``rima`` step commands, their options and help (:func:`rima_core.pipeline.cli.build_parser`);
- the ``MLproject`` file (:mod:`rima_core.pipeline.mlproject_file` writes it; a test fails when the
  checked-in file differs);
- each Kubeflow task's caching, retries, resources, accelerator, credentials, display name and
  deadline (:mod:`components.tasks` pairs them with the component functions).

``dvc.yaml`` stays written by hand, so DVC users read a plain file;
tests/contracts/test_step_registry.py diffs its stage names and commands against
:attr:`Step.dvc_stage` and :attr:`Step.dvc_args`. Every deliberate exception (a step an orchestrator
does not run, a task or entry point that is no step) is stated here with its reason, and nowhere
else. Adding a step: its function in ``rima_core.pipeline.steps``, an entry in :data:`STEPS`, and
its test (docs/pipeline.md, "Adding a step").
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rima_core.config import source_refusal
from rima_core.core.data.sources import SOURCES
from rima_core.core.data.sources.fairvision import DISEASES
from rima_core.pipeline.remote_config import OPTUNA_STORAGE_ENV

# --- the command line ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of a step's ``rima`` command, in ``argparse.add_argument`` terms. Fields left
    at ``None``/``False`` are not passed, so argparse's own defaults hold (a ``store_true``
    option defaults to ``False``, not ``None``)."""

    flags: tuple[str, ...]
    help: str | None = None
    default: Any = None
    type: Callable[[str], Any] | None = None
    action: str | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    required: bool = False

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value under (``--n-eyes`` -> ``n_eyes``)."""
        return self.flags[0].lstrip("-").replace("-", "_")

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``add_argument`` for this option."""
        values = {
            "help": self.help,
            "default": self.default,
            "type": self.type,
            "action": self.action,
            "choices": self.choices,
            "metavar": self.metavar,
            "required": self.required or None,
        }
        return {key: value for key, value in values.items() if value is not None}


def source_name(text: str) -> str:
    """``--source``: checked by the one plug-in rule (:func:`rima_core.config.source_refusal`);
    whether a dotted module is registered is judged once params (``data.plugins``) are read."""
    reason = source_refusal(text, None)
    if reason:
        raise argparse.ArgumentTypeError(f"unknown source {text!r}: {reason}")
    return text


def _flag(name: str, help: str | None = None, **more: Any) -> Option:
    """An option taking a value; its default ``None`` means "from params" in every step."""
    return Option((name,), help, **more)


def _switch(name: str, help: str) -> Option:
    """An on/off option (``store_true``: off unless given)."""
    return Option((name,), help, action="store_true")


_NO_MLFLOW = _switch("--no-mlflow", "do not log to MLflow")
_STORE = _flag("--store", "store directory (default: prepare.store_dir)")
_MASKS = _flag("--masks", "masks parquet (default: missing.masks)")

#: ``rima`` command groups (the first word of a step's command when it has two), with their help.
CLI_GROUPS: dict[str, str] = {"data": "datasets"}

# --- Kubeflow ------------------------------------------------------------------------------------

#: Environment variables a task gets from the cluster's Kubernetes secret (key name == variable
#: name). All are optional in the secret: an AWS role (IRSA) or an unauthenticated in-cluster
#: MLflow needs none. Only their names are here; the compiled pipeline never holds a value.
CREDENTIAL_ENV: tuple[str, ...] = (
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

#: How often a task that talks to MLflow or Optuna's database is retried, and the backoff
#: between tries (first wait, growth factor): long enough to ride out a server restart.
RETRIES = 3
RETRY_BACKOFF = ("30s", 2.0)
HOUR = 3600


@dataclass(frozen=True)
class TaskResources:
    """CPU/memory of one task's container, in Kubernetes quantities (``"500m"``, ``"2"``,
    ``"8Gi"``). Requests are what the scheduler reserves; limits (None: none) cap the pod."""

    cpu: str | None = None
    memory: str | None = None
    cpu_limit: str | None = None
    memory_limit: str | None = None

    KEYS = ("cpu", "memory", "cpu_limit", "memory_limit")

    @classmethod
    def parse(cls, text: str) -> tuple[str, dict[str, str]]:
        """``STEP:cpu=2,memory=8Gi[,cpu_limit=4,memory_limit=16Gi]`` -> (step, changes)."""
        names = kfp_task_names()
        step, sep, body = text.partition(":")
        if not sep or not step or not body:
            raise ValueError(f"task resources {text!r}: expected STEP:cpu=2,memory=8Gi,...")
        if step not in names:
            raise ValueError(f"task resources {text!r}: no step {step!r}; steps: {names}")
        changes = {}
        for pair in body.split(","):
            key, eq, value = pair.strip().partition("=")
            if not eq or key not in cls.KEYS or not value:
                raise ValueError(f"task resources {text!r}: {pair!r} is not one of {cls.KEYS}=V")
            changes[key] = value
        return step, changes


@dataclass(frozen=True)
class KfpTask:
    """How the cluster runs one Kubeflow task: whether a rerun with the same inputs may reuse
    its outputs (``cached``), how often a transient failure is retried (``retries``; 0: never),
    whether it gets the accelerator (``gpu``), which :data:`CREDENTIAL_ENV` variables it gets
    from the secret (``secret_env``; empty: no secret), its default CPU/memory, what the KFP UI
    calls it, and its pod deadline in seconds (Kubernetes ``activeDeadlineSeconds``: a task that
    hangs on a stuck storage lock or a dead NFS mount fails instead of holding its GPU)."""

    name: str
    display_name: str
    resources: TaskResources
    timeout_s: int
    cached: bool = False
    retries: int = 0
    gpu: bool = False
    secret_env: tuple[str, ...] = CREDENTIAL_ENV
    why: str = ""  # for a task that runs no step: what it is for

    @property
    def retried(self) -> bool:
        return self.retries > 0

    @property
    def secrets(self) -> bool:
        return bool(self.secret_env)


# --- the steps -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One step. ``function`` is the :mod:`rima_core.pipeline.steps` function it runs; ``command``
    the ``rima`` command (words) with its ``help`` and ``options`` (every step command also takes
    ``--params``/``--profile``/``--set``); ``dvc_stage`` the ``dvc.yaml`` stage whose ``cmd``
    runs ``rima <command> <dvc_args>``; ``mlproject`` the ``MLproject`` entry point, which passes
    ``--params`` and each of ``mlproject_parameters`` (name, default) on; ``kfp_tasks`` the
    Kubeflow tasks (a fan-out has several). ``None``/``()`` where an orchestrator leaves the step
    out, for the reason in ``why``."""

    name: str
    function: str
    command: tuple[str, ...]
    help: str
    options: tuple[Option, ...]
    dvc_stage: str | None
    dvc_args: str
    mlproject: str | None
    kfp_tasks: tuple[KfpTask, ...]
    mlproject_parameters: tuple[tuple[str, str], ...] = ()
    why: str = ""

    @property
    def kfp_task_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.kfp_tasks)


# Why the Kubeflow flags: data tasks are deterministic in their inputs (cached; fetch_raw keyed
# on its URI); tasks talking to MLflow or Optuna's RDB retry transient network failures; train
# and evaluate are not cached (GPU kernels are not bit-reproducible, and each run should leave
# its own MLflow run); register is never cached (a cached register would skip the version the run
# is about); resolve_config touches no storage or tracking server, so it gets no secret.
# Resources are sized for the tiny/synthetic profiles' data and the paper's models on one GPU.
STEPS: tuple[Step, ...] = (
    Step(
        name="synth",
        function="synth",
        command=("data", "synth"),
        help="write the synthetic retina phantom (FairVision layout)",
        options=(
            _flag("--out"),
            _flag("--n-eyes", type=int),
            _flag("--seed", type=int),
        ),
        dvc_stage=None,
        dvc_args="",
        mlproject="synth",
        mlproject_parameters=(("out", "data/raw"),),
        kfp_tasks=(),
        why="DVC tracks data/raw as data.dvc (a path cannot be both a .dvc output and a stage "
        "output); on Kubeflow the fetch_raw task writes the phantom when no data is named",
    ),
    Step(
        name="prepare",
        function="prepare",
        command=("prepare",),
        help="source tree -> Arrow store + manifest",
        options=(
            _flag(
                "--source",
                f"source format: {', '.join(SOURCES)}, auto, or a registered plug-in (a module "
                "with scan()/load() listed in data.plugins, or a rima.sources entry point); "
                "default: data.source",
                type=source_name,
                metavar="SOURCE",
            ),
            _flag("--disease", choices=(*DISEASES, "auto")),
            _flag("--input"),
            _flag("--out"),
            _switch("--skip-bad", "quarantine bad cases into a report"),
        ),
        dvc_stage="prepare",
        dvc_args="--input ${data.raw_dir} --out ${prepare.store_dir}",
        mlproject="prepare",
        kfp_tasks=(
            KfpTask(
                "prepare",
                "Prepare the Arrow store",
                TaskResources("2", "4Gi", None, "8Gi"),
                timeout_s=6 * HOUR,
                cached=True,
            ),
        ),
    ),
    Step(
        name="validate",
        function="validate",
        command=("validate",),
        help="Great Expectations suite over the store",
        options=(_flag("--store"), _flag("--report")),
        dvc_stage="validate",
        dvc_args="--store ${prepare.store_dir} --report ${validate.report}",
        mlproject="validate",
        kfp_tasks=(
            KfpTask(
                "validate",
                "Validate the data (Great Expectations)",
                TaskResources("1", "4Gi", None, "8Gi"),
                timeout_s=2 * HOUR,
                cached=True,
            ),
        ),
    ),
    Step(
        name="simulate_missing",
        function="simulate_missing",
        command=("simulate-missing",),
        help="seeded missing-modality masks",
        options=(_flag("--store"), _flag("--out")),
        dvc_stage="simulate-missing",
        dvc_args="--store ${prepare.store_dir} --out ${missing.masks}",
        mlproject="simulate_missing",
        kfp_tasks=(
            KfpTask(
                "simulate_missing",
                "Simulate missing modalities",
                TaskResources("500m", "1Gi", None, "2Gi"),
                timeout_s=HOUR,
                cached=True,
            ),
        ),
    ),
    Step(
        name="tune",
        function="tune",
        command=("tune",),
        help="Optuna search over the OT regularisation and lr",
        options=(
            _STORE,
            _MASKS,
            _flag("--out", "output directory (default: tune.out_dir)"),
            _flag("--workers", "processes on one study", type=int),
            _flag("--n-trials", "budget: finished trials", type=int),
            _flag("--timeout-s", "budget: wall seconds", type=float),
            _flag("--storage", "SQLAlchemy URL (default: tune.storage)"),
            _flag("--study-name", "use this study as is (default: name + fingerprint)"),
            _NO_MLFLOW,
        ),
        dvc_stage="tune",
        dvc_args="--store ${prepare.store_dir} --masks ${missing.masks} --out ${tune.out_dir}",
        mlproject="tune",
        kfp_tasks=(
            KfpTask(
                "tune_worker",
                "Tune (Optuna worker)",
                TaskResources("4", "16Gi", None, "32Gi"),
                timeout_s=24 * HOUR,
                retries=RETRIES,
                gpu=True,
            ),
            KfpTask(
                "tune_best",
                "Pick the best trial",
                TaskResources("1", "2Gi", None, "4Gi"),
                timeout_s=HOUR,
                retries=RETRIES,
            ),
        ),
        why="Kubeflow fans tuning out: tune_worker tasks share one study, tune_best reads it",
    ),
    Step(
        name="train",
        function="train",
        command=("train",),
        help="train a model; best epoch on validation -> model.pt",
        options=(
            _STORE,
            _MASKS,
            _flag("--out", "output directory (default: train.out_dir)"),
            _switch("--resume", "continue from out/checkpoint.pt"),
            _flag("--best-params", "tuned best_params.json", metavar="FILE"),
            _flag(
                "--model-name",
                "model to train (default: model.name); without --out it goes to models/NAME",
                metavar="NAME",
            ),
            _NO_MLFLOW,
        ),
        dvc_stage="train",
        dvc_args="--store ${prepare.store_dir} --masks ${missing.masks} --out ${train.out_dir} "
        "--best-params ${tune.out_dir}/best_params.json",
        mlproject="train",
        kfp_tasks=(
            KfpTask(
                "train",
                "Train",
                TaskResources("4", "16Gi", None, "32Gi"),
                timeout_s=24 * HOUR,
                gpu=True,
            ),
        ),
    ),
    Step(
        name="evaluate",
        function="evaluate",
        command=("evaluate",),
        help="score a model under every missing-modality scenario",
        options=(
            _flag("--model", "model.pt (default: train.out_dir/model.pt)"),
            _flag("--store"),
            _flag("--masks"),
            _flag("--out", "output directory (default: evaluate.out_dir)"),
            _NO_MLFLOW,
        ),
        dvc_stage="evaluate",
        dvc_args="--model ${train.out_dir}/model.pt --store ${prepare.store_dir} "
        "--masks ${missing.masks} --out ${evaluate.out_dir}",
        mlproject="evaluate",
        kfp_tasks=(
            KfpTask(
                "evaluate",
                "Evaluate every missing-modality scenario",
                TaskResources("2", "8Gi", None, "16Gi"),
                timeout_s=6 * HOUR,
            ),
        ),
    ),
    Step(
        name="register",
        function="register",
        command=("register",),
        help="register the trained model (alias challenger)",
        options=(
            _flag("--model-dir", "folder with model.pt (train.out_dir)"),
            _flag("--metrics", "metrics.json (default: evaluate.out_dir/...)"),
            _flag("--store", "store whose content hash tags the version"),
            _flag("--out", "also write the summary JSON here"),
            _flag(
                "--receipt",
                "also write what was registered without version or run ids (a DVC output)",
                metavar="FILE",
            ),
        ),
        dvc_stage="register",
        dvc_args="--model-dir ${train.out_dir} --metrics ${evaluate.out_dir}/metrics.json "
        "--store ${prepare.store_dir} --out reports/register.json "
        "--receipt reports/registered_model.json",
        mlproject="register",
        kfp_tasks=(
            KfpTask(
                "register",
                "Register the model (MLflow)",
                TaskResources("1", "4Gi", None, "8Gi"),
                timeout_s=2 * HOUR,
                retries=RETRIES,
            ),
        ),
    ),
    Step(
        name="promote",
        function="promote",
        command=("promote",),
        help="move alias champion to the challenger if it wins",
        options=(
            _switch("--dry-run", "print the comparison, change nothing"),
            _flag("--out", "also write the decision JSON here"),
            _switch("--json", "print the decision as JSON too"),
            _flag(
                "--after",
                "register's summary (its --out): skip, with a recorded reason, if not registered",
                metavar="FILE",
            ),
        ),
        dvc_stage="register",
        dvc_args="--after reports/register.json --out reports/promotion.json",
        mlproject="promote",
        kfp_tasks=(
            KfpTask(
                "promote",
                "Promote if it beats the champion",
                TaskResources("500m", "1Gi", None, "2Gi"),
                timeout_s=HOUR,
                retries=RETRIES,
            ),
        ),
        why="DVC runs it as the register stage's second command: promotion only moves a "
        "registry alias, it has no output of its own",
    ),
    Step(
        name="predict",
        function="predict",
        command=("predict",),
        help="grade eyes listed in a CSV/Parquet file",
        options=(
            _flag("--model", "model URI (default: models:/<mlflow.model_name>@champion)"),
            _flag(
                "--input",
                "table with fundus/oct paths relative to it (csv|parquet); per-image limits: "
                "RIMA_PREDICT_MAX_FUNDUS_ELEMENTS, RIMA_PREDICT_MAX_OCT_ELEMENTS",
                required=True,
            ),
            _flag("--out", "predictions (csv|parquet)", required=True),
        ),
        dvc_stage=None,
        dvc_args="",
        mlproject=None,
        kfp_tasks=(),
        why="serving, not a pipeline step: it grades new eyes with a registered model",
    ),
)

#: Kubeflow tasks that run no step of their own (``why`` says what each is for).
KFP_ONLY_TASKS: tuple[KfpTask, ...] = (
    KfpTask(
        "resolve_config",
        "Resolve the config",
        TaskResources("100m", "256Mi", None, "512Mi"),
        timeout_s=600,
        cached=True,
        secret_env=(),
        why="turns the run's parameters into the one resolved config every task reads",
    ),
    KfpTask(
        "fetch_raw",
        "Fetch the raw data (DVC)",
        TaskResources("1", "2Gi", None, "4Gi"),
        timeout_s=4 * HOUR,
        cached=True,
        why="brings the raw data into the pod (DVC remote, S3, a mounted path, or synth)",
    ),
)

#: The Kubeflow exit task (``dsl.ExitHandler``): it runs after the others whatever became of
#: them and runs no step, so it is no row of the task table. It talks to the MLflow server
#: (secret, retried) and must be able to run when everything else failed: small and never cached
#: (a cached report of another run would end nothing).
KFP_EXIT_TASK = KfpTask(
    "end_failed_runs",
    "End the failed run's MLflow runs",
    TaskResources("100m", "256Mi", None, "512Mi"),
    timeout_s=600,
    retries=RETRIES,
    why="ends the MLflow runs a failed Kubeflow run left RUNNING",
)


@dataclass(frozen=True)
class MLprojectEntry:
    """An ``MLproject`` entry point that runs no single step: its command, why it exists, and a
    ``note`` written above the command in the file."""

    command: str
    why: str
    note: str = ""


#: MLproject entry points that are no single step.
MLPROJECT_ONLY_ENTRIES: dict[str, MLprojectEntry] = {
    "main": MLprojectEntry(
        command="env -u MLFLOW_RUN_ID bash scripts/run_pipeline.sh",
        why="the whole pipeline (scripts/run_pipeline.sh: dvc repro)",
        note="Each DVC stage opens its own MLflow run; they must not all resume the project's run.",
    ),
}

#: Top-level ``rima`` commands that run no step, and why.
NON_STEP_COMMANDS: dict[str, str] = {
    "params": "inspects params and profiles; computes nothing",
    "check-repro": "compares the workspace's results with a commit's; computes nothing",
}


def step(name: str) -> Step:
    """The registered step ``name``; ``KeyError`` listing the steps otherwise."""
    for entry in STEPS:
        if entry.name == name:
            return entry
    raise KeyError(f"no step {name!r}; steps: {[s.name for s in STEPS]}")


def kfp_tasks() -> tuple[KfpTask, ...]:
    """Every Kubeflow task of the pipeline (the exit task aside), in pipeline order."""
    return (*KFP_ONLY_TASKS, *(t for s in STEPS for t in s.kfp_tasks))


def kfp_task_names() -> tuple[str, ...]:
    """The names of :func:`kfp_tasks`."""
    return tuple(t.name for t in kfp_tasks())


def kfp_task_steps() -> dict[str, str | None]:
    """Every Kubeflow task -> the step it runs (``None`` for :data:`KFP_ONLY_TASKS`)."""
    out: dict[str, str | None] = {t.name: None for t in KFP_ONLY_TASKS}
    for entry in STEPS:
        out.update(dict.fromkeys(entry.kfp_task_names, entry.name))
    return out
