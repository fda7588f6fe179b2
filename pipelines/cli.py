"""``python -m pipelines``: compile, submit and run the Kubeflow pipeline from a checkout.

The pipeline and its components are compile-time code beside the library (the image holds only
``rima_core``), so their command line lives here and builds on :mod:`rima_core.pipeline.cli` (the
same ``--params``/``--profile``/``--set`` options, help formatting and exit codes), never the other
way round.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rima_core.config import ConfigError
from rima_core.pipeline.cli import StepFailed, add_config_options, new_parser, run
from rima_core.pipeline.remote_config import RUN_PARAMETERS

DESCRIPTION = """\
The RIMA pipeline on Kubeflow Pipelines: compile the package, submit a run, or run the same DAG
here with kfp.local. Run from the repository checkout: python -m pipelines COMMAND --help.
"""


def _cluster_options(args: argparse.Namespace) -> Any:
    from pipelines.rima_pipeline import (
        DEFAULT_RESOURCES,
        ClusterOptions,
        Toleration,
        with_resources,
    )

    selector = {}
    for pair in args.gpu_node_selector:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise StepFailed(f"--gpu-node-selector {pair!r}: expected KEY=VALUE")
        selector[key] = value
    tolerations = tuple(Toleration.parse(t) for t in args.gpu_toleration)
    return ClusterOptions(
        image=args.image,
        secret_name=args.secret,
        gpu_type="" if args.no_gpu else args.gpu_type,
        gpu_count=0 if args.no_gpu else args.gpus,
        gpu_tolerations=tolerations if args.gpu_toleration else ClusterOptions.gpu_tolerations,
        gpu_node_selector=selector,
        gpu_cpu_request=args.gpu_cpu,
        gpu_memory_request=args.gpu_memory,
        tune_parallelism=args.tune_parallelism,
        resources=with_resources(DEFAULT_RESOURCES, args.task_resources),
    )


def _cmd_compile(args: argparse.Namespace) -> Any:
    from pipelines.compile import compile_pipeline

    out = compile_pipeline(
        args.out,
        args.params,
        args.profile,
        args.overrides,
        _cluster_options(args),
        allow_local_mlflow=args.allow_local_mlflow,
    )
    return {"package": str(out)}


def _cmd_submit(args: argparse.Namespace) -> Any:
    from pipelines.submit import build_submission, submit

    submission = build_submission(
        package=args.package,
        experiment=args.experiment,
        host=args.host,
        namespace=args.namespace,
        run_name=args.run_name,
        argument_pairs=args.arg,
        enable_caching=False if args.no_cache else None,
        service_account=args.service_account,
        wait_s=args.wait,
    )
    return submit(submission)


def _cmd_run_local(args: argparse.Namespace) -> Any:
    from pipelines.local import run_local

    return run_local(args.params, args.profile, args.overrides, args.root, args.arg)


def parameters_markdown() -> str:
    """The run parameters as the Markdown table of docs/kubernetes.md (from ``RUN_PARAMETERS``)."""
    lines = ["| parameter | type | sets | meaning |", "| --- | --- | --- | --- |"]
    for p in RUN_PARAMETERS:
        sets = f"`{p.config_key}`" if p.config_key else "-"
        cell = p.help.replace("|", "\\|")
        lines.append(f"| `{p.name}` | {p.type.__name__} | {sets} | {cell} |")
    return "\n".join(lines) + "\n"


def _cmd_parameters(args: argparse.Namespace) -> Any:
    sys.stdout.write(parameters_markdown())
    return None


def _guarded(func: Any) -> Any:
    """A user's mistake that the pipeline code reports as ValueError/RuntimeError (a bad
    toleration, an unknown step, a failed local task) becomes one logged line and exit 2."""

    def call(args: argparse.Namespace) -> Any:
        try:
            return func(args)
        except (ValueError, RuntimeError) as exc:
            if isinstance(exc, ConfigError | StepFailed):
                raise
            raise StepFailed(str(exc)) from exc

    return call


def _add_compile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="write the pipeline package (KFP IR YAML)")
    add_config_options(p)
    p.add_argument("--out", default="rima_pipeline.yaml", help="package path (.yaml)")
    p.add_argument("--image", default=None, help="component image (default: $RIMA_IMAGE)")
    p.add_argument("--secret", default="rima-credentials", help="Kubernetes secret -> env")
    p.add_argument("--gpu-type", default="nvidia.com/gpu", help="accelerator resource name")
    p.add_argument("--gpus", type=int, default=1, help="accelerators per train/tune task")
    p.add_argument("--no-gpu", action="store_true", help="CPU-only cluster: no accelerators")
    p.add_argument(
        "--gpu-toleration",
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        help="toleration for GPU tasks (repeatable; default nvidia.com/gpu:NoSchedule)",
    )
    p.add_argument(
        "--gpu-node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="node selector for GPU tasks (repeatable)",
    )
    p.add_argument("--gpu-cpu", default=None, help="CPU request of GPU tasks, e.g. 8")
    p.add_argument("--gpu-memory", default=None, help="memory request of GPU tasks, e.g. 32Gi")
    p.add_argument("--tune-parallelism", type=int, default=None, help="max concurrent workers")
    p.add_argument(
        "--task-resources",
        action="append",
        default=[],
        metavar="STEP:cpu=C,memory=M[,cpu_limit=C,memory_limit=M]",
        help="CPU/memory of one step's task (repeatable), e.g. train:cpu=8,memory=32Gi",
    )
    p.add_argument(
        "--allow-local-mlflow",
        action="store_true",
        help="compile with a sqlite:/file: tracking URI (only for a volume all pods share)",
    )
    p.set_defaults(func=_guarded(_cmd_compile))


def _add_submit(sub: argparse._SubParsersAction) -> None:
    names = ", ".join(p.name for p in RUN_PARAMETERS)
    p = sub.add_parser("submit", help="start a run on Kubeflow Pipelines (kfp.Client)")
    p.add_argument("--package", default="rima_pipeline.yaml", help="compiled package")
    p.add_argument("--host", default=None, help="KFP API URL (default: $KF_PIPELINES_ENDPOINT)")
    p.add_argument("--namespace", default=None, help="Kubeflow profile namespace")
    p.add_argument("--experiment", required=True, help="KFP experiment name")
    p.add_argument("--run-name", default=None)
    p.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"pipeline parameter for this run (repeatable); NAME is one of: {names}",
    )
    p.add_argument("--no-cache", action="store_true", help="disable caching for this run")
    p.add_argument("--service-account", default=None, help="Kubernetes service account")
    p.add_argument(
        "--wait", type=int, default=0, metavar="SECONDS", help="block until the run ends"
    )
    p.set_defaults(func=_guarded(_cmd_submit))


def _add_run_local(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run-local", help="run the pipeline here with kfp.local")
    add_config_options(p)
    p.add_argument("--root", default="reports/kfp-local", help="where task outputs go")
    p.add_argument(
        "--arg", action="append", default=[], metavar="NAME=VALUE", help="pipeline parameter"
    )
    p.set_defaults(func=_guarded(_cmd_run_local))


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("python -m pipelines", DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_compile(sub)
    _add_submit(sub)
    _add_run_local(sub)
    p = sub.add_parser("parameters", help="print the run parameters as a Markdown table")
    p.set_defaults(func=_cmd_parameters)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)
