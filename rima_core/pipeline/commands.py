"""What each ``rima`` command does with its options: the handlers of the step commands
(:data:`HANDLERS`: defaults from params, a user's error as one line, extra output) and the
commands that run no step (``params``, ``check-repro``).

:mod:`rima_core.pipeline.cli` builds the parser from the step table and dispatches here; the
handlers only turn options into a :mod:`rima_core.pipeline.steps` call.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from rima_core.atomic import write_text
from rima_core.config import Config, ConfigError, load_config, load_yaml, with_values
from rima_core.core.data.types import printable
from rima_core.ops.registry import RegistryError, format_table
from rima_core.pipeline import repro, steps
from rima_core.redact import redact_config
from rima_core.runs.tune import TuneError

log = logging.getLogger("rima")


class StepFailed(RuntimeError):
    """A step ran but its outcome is a failure the pipeline must stop on (e.g. validation)."""


def add_config_options(p: argparse.ArgumentParser) -> None:
    """``--params``, ``--profile`` and ``--set``: how every command that reads a config gets it."""
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("--profile", default=None, help="profile YAML layered over params")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.profile, args.overrides)


def print_result(result: Any, as_json: bool = False, command: str = "") -> None:
    """A step's summary, credentials masked (it lands in terminals and CI logs): the whole
    summary as JSON on stdout with ``--json`` (for scripts), else one log line of its top-level
    scalars (a pipeline log is read by people; the files each step writes hold the rest)."""
    if result is None:
        return
    result = redact_config(result)
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return
    log.info("%s done: %s", command or "rima", summary_line(result))


def summary_line(result: Any, limit: int = 200) -> str:
    """``k=v`` for the top-level scalars of a step's summary (floats to 4 digits), cut at
    ``limit`` characters; ``--json`` shows everything."""
    if not isinstance(result, dict):
        text = str(result)
    else:
        parts = []
        for key, value in result.items():
            if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
                parts.append(f"{key}={value}")
            elif isinstance(value, float):
                parts.append(f"{key}={value:.4g}")
        text = " ".join(parts) or "(see --json)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- data --------------------------------------------------------------------------------------


def _cmd_synth(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    if args.n_eyes is not None:
        cfg.synth.n_eyes = args.n_eyes
    if args.seed is not None:
        cfg.synth.seed = args.seed
    return steps.synth(args.out or cfg.data.raw_dir, cfg)


def _cmd_prepare(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    if args.source is not None:
        # checked like data.source: a plug-in module must be registered before it is imported
        try:
            cfg = with_values(cfg, {"data.source": args.source}, "params")
        except ConfigError as exc:
            reason = str(exc).split(": ", 1)[-1].rsplit(", got ", 1)[0]
            raise ConfigError(f"--source {args.source}: {reason}") from None
    try:
        return steps.prepare(
            input_dir=args.input or cfg.data.raw_dir,
            out=args.out or cfg.prepare.store_dir,
            cfg=cfg,
            source=cfg.data.source,
            disease=args.disease,
            skip_bad=True if args.skip_bad else None,
        )
    except (PermissionError, IsADirectoryError, NotADirectoryError, UnicodeError) as exc:
        # a source tree we may not read (or name) is the user's problem: one line, exit 2

        raise StepFailed(f"prepare: {printable(exc)}") from exc


def _cmd_validate(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    result = steps.validate(
        args.store or cfg.prepare.store_dir, args.report or cfg.validate.report, cfg
    )
    if not result["success"]:
        lines = "\n".join(f"  - {f}" for f in result["failures"])
        raise StepFailed(f"validation failed ({len(result['failures'])} expectation(s)):\n{lines}")
    return {"success": True, "report": str(args.report or cfg.validate.report)}


def _cmd_simulate_missing(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    return steps.simulate_missing(
        args.store or cfg.prepare.store_dir, args.out or cfg.missing.masks, cfg
    )


# --- model: train / evaluate --------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> Any:
    from rima_core.runs.engine import EngineError

    cfg = config_from_args(args)
    out = args.out or cfg.train.out_dir
    if args.model_name:
        cfg.model.name = args.model_name
        # a baseline goes beside the main model (models/<name>), never over it
        out = args.out or str(Path(cfg.train.out_dir).parent / args.model_name)
    try:
        return steps.train(
            store=args.store or cfg.prepare.store_dir,
            masks=args.masks or cfg.missing.masks,
            out_dir=out,
            cfg=cfg,
            resume=args.resume,
            best_params=args.best_params,
            track=not args.no_mlflow,
        )
    except EngineError as exc:
        raise StepFailed(str(exc)) from exc


def _cmd_evaluate(args: argparse.Namespace) -> Any:
    from rima_core.runs.engine import EngineError

    cfg = config_from_args(args)
    try:
        return steps.evaluate(
            model=args.model or f"{cfg.train.out_dir}/model.pt",
            store=args.store or cfg.prepare.store_dir,
            masks=args.masks or cfg.missing.masks,
            out_dir=args.out or cfg.evaluate.out_dir,
            cfg=cfg,
            track=not args.no_mlflow,
        )
    except EngineError as exc:
        raise StepFailed(str(exc)) from exc


# --- tuning and params ---------------------------------------------------------------------------


def _cmd_tune(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    try:
        return steps.tune(
            store=args.store or cfg.prepare.store_dir,
            masks=args.masks or cfg.missing.masks,
            out_dir=args.out or cfg.tune.out_dir,
            cfg=cfg,
            workers=args.workers,
            n_trials=args.n_trials,
            timeout_s=args.timeout_s,
            storage=args.storage,
            study_name=args.study_name,
            track=not args.no_mlflow,
        )
    except TuneError as exc:
        raise StepFailed(str(exc)) from exc


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _dvc_value(value: Any) -> str:
    """A value in the syntax of ``dvc exp run -S`` (Hydra overrides): JSON scalars and lists."""
    return json.dumps(value, separators=(",", ":"))


def _cmd_params(args: argparse.Namespace) -> Any:
    if args.params_command == "show":
        # credentials masked: this output ends up in terminals, CI logs and bug reports
        print(
            yaml.safe_dump(redact_config(config_from_args(args).to_dict()), sort_keys=False), end=""
        )
        return None
    # overrides: the profile's keys as `dvc exp run` arguments, one per line
    load_config(None, args.profile_file)  # schema check: a typo fails here, not in a stage

    raw = load_yaml(Path(args.profile_file).read_text()) or {}
    for key, value in _flatten(raw).items():
        print(f"++{key}={_dvc_value(value)}")
    return None


def add_params_commands(sub: argparse._SubParsersAction) -> None:
    params = sub.add_parser("params", help="inspect params and profiles")
    params_sub = params.add_subparsers(dest="params_command", required=True)
    p = params_sub.add_parser("show", help="print the effective params (params+profile+--set)")
    add_config_options(p)
    p.set_defaults(func=_cmd_params)
    p = params_sub.add_parser(
        "overrides", help="a profile's keys as `dvc exp run -S` values, one per line"
    )
    p.add_argument("profile_file", metavar="PROFILE")
    p.set_defaults(func=_cmd_params)


# --- registry: register / promote / predict -----------------------------------------------------


def _registry_errors() -> tuple[type[Exception], ...]:
    """User-facing registry/serving errors, imported only when a registry command runs."""
    from mlflow.exceptions import MlflowException

    from rima_core.ops.serving import InputError

    return (RegistryError, InputError, MlflowException)


def _cmd_register(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    store = args.store or cfg.prepare.store_dir
    model_dir = args.model_dir or cfg.train.out_dir
    metrics = args.metrics or f"{cfg.evaluate.out_dir}/metrics.json"
    try:
        result = steps.register(
            model_dir=model_dir,
            metrics=metrics,
            cfg=cfg,
            store=store if Path(store).is_dir() else None,
            out=args.out,
        )
    except _registry_errors() as exc:
        raise StepFailed(str(exc)) from exc
    if args.receipt:
        _write_receipt(args.receipt, cfg.mlflow.model_name, Path(model_dir), Path(metrics))
    return result


def _write_receipt(path: str, model_name: str, model_dir: Any, metrics: Any) -> None:
    """What was registered, without what differs between runs (version, run ids): the model
    name and the digests of the model file and the metrics. The DVC output of the register
    stage, so a rerun with the same model leaves dvc.lock unchanged."""

    def sha256(file: Any) -> str:
        return hashlib.sha256(file.read_bytes()).hexdigest()

    receipt = {
        "model_name": model_name,
        "model_sha256": sha256(model_dir / "model.pt"),
        "metrics_sha256": sha256(metrics),
    }
    write_text(path, json.dumps(receipt, indent=2) + "\n")


def _cmd_promote(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    try:
        result = steps.promote(cfg, dry_run=args.dry_run, out=args.out, after=args.after)
    except _registry_errors() as exc:
        raise StepFailed(str(exc)) from exc
    # in the pipeline (--after) the decision is one logged line and the comparison is in --out;
    # the per-scenario table (a line per scenario) is for a person running promote, or -v
    if not args.after or args.verbose:
        print(format_table(result))
    return result if args.json else None


def _cmd_predict(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    model = args.model or f"models:/{cfg.mlflow.model_name}@champion"
    try:
        return steps.predict(model, args.input, args.out, cfg)
    except _registry_errors() as exc:
        raise StepFailed(str(exc)) from exc


# --- reproduction check ---------------------------------------------------------------------------


class ExitStatus(int):
    """A command's exit status that is a verdict, not an error (``check-repro``: 1 = not
    reproduced); :func:`run` returns it instead of printing a summary."""


def _cmd_check_repro(args: argparse.Namespace) -> Any:
    cfg = config_from_args(args)
    report = repro.check(Path.cwd(), cfg, rev=args.rev)
    facts = None if report.exact else repro.processor_facts()
    status = ExitStatus(0 if report.reproduced else 1)
    if args.json:
        summary = {
            "rev": report.rev,
            "exact": report.exact,
            "reproduced": report.reproduced,
            "verdict": repro.verdict_line(report),
            "numbers": [vars(c) for c in report.comparisons if c.verdict != repro.EXACT],
            "other_files_differ": [p for p, same in report.other_files if not same],
            "model_md5": dict(
                zip(("path", "committed", "workspace"), report.model or (), strict=False)
            ),
            "changed_inputs": report.changed_inputs,
            "intervals_from": report.interval_source,
            "processor": facts,
        }
        print(json.dumps(summary, indent=2, default=str))
        return status
    print("\n".join(repro.render(report, facts)))
    return status


def add_repro_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "check-repro",
        help="do the workspace's pipeline results reproduce the committed ones? (exit 0/1)",
        description="Compare the numbers of the DVC metrics files in the workspace with a "
        "commit's: equal, within the committed bootstrap interval (scores.csv) or "
        "repro.abs_tolerance, or different; say why (inputs, model md5, processor). Exit 0 "
        "reproduced (exactly or within tolerance), 1 not reproduced, 2 a file is missing.",
    )
    add_config_options(p)
    p.add_argument("--rev", default="HEAD", help="git revision with the committed results")
    p.set_defaults(func=_cmd_check_repro)


Handler = Callable[[argparse.Namespace], Any]

#: Steps whose command does more than call its function with the options (defaults from params,
#: a user's error as one line, extra output); any other step runs through :func:`_run_step`.
HANDLERS: dict[str, Handler] = {
    "synth": _cmd_synth,
    "prepare": _cmd_prepare,
    "validate": _cmd_validate,
    "simulate_missing": _cmd_simulate_missing,
    "tune": _cmd_tune,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "register": _cmd_register,
    "promote": _cmd_promote,
    "predict": _cmd_predict,
}
