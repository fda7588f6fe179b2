"""``rima <step> ...``: a thin command line over :mod:`rima_core.steps`.

Every command reads ``--params`` (default ``params.yaml``; embedded defaults when it does not
exist), an optional ``--profile`` file layered on top, and ``--set section.key=value``
overrides. Explicit path options win over the paths in params. Errors that are the user's
(bad input, failed validation) exit non-zero with one clear message, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from rima_core.config import Config, ConfigError, load_config, load_yaml
from rima_core.data.sources import ALIASES, SOURCES
from rima_core.data.sources.fairvision import DISEASES
from rima_core.data.types import CaseError, SourceError
from rima_core.redact import install_log_redaction, redact_config

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


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.params, args.profile, args.overrides)


def _print(result: Any, as_json: bool = False, command: str = "") -> None:
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
    from rima_core import steps

    cfg = _config(args)
    if args.n_eyes is not None:
        cfg.synth.n_eyes = args.n_eyes
    if args.seed is not None:
        cfg.synth.seed = args.seed
    return steps.synth(args.out or cfg.data.raw_dir, cfg)


def _cmd_prepare(args: argparse.Namespace) -> Any:
    from rima_core import steps
    from rima_core.config import with_values

    cfg = _config(args)
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
        from rima_core.data.types import printable

        raise StepFailed(f"prepare: {printable(exc)}") from exc


def _cmd_validate(args: argparse.Namespace) -> Any:
    from rima_core import steps

    cfg = _config(args)
    result = steps.validate(
        args.store or cfg.prepare.store_dir, args.report or cfg.validate.report, cfg
    )
    if not result["success"]:
        lines = "\n".join(f"  - {f}" for f in result["failures"])
        raise StepFailed(f"validation failed ({len(result['failures'])} expectation(s)):\n{lines}")
    return {"success": True, "report": str(args.report or cfg.validate.report)}


def _cmd_simulate_missing(args: argparse.Namespace) -> Any:
    from rima_core import steps

    cfg = _config(args)
    return steps.simulate_missing(
        args.store or cfg.prepare.store_dir, args.out or cfg.missing.masks, cfg
    )


def _source_name(text: str) -> str:
    """``--source``: a built-in source (or alias), ``auto``, a ``rima.sources`` entry-point
    name, or a dotted module path listed in ``data.plugins`` (checked once params are read)."""
    from rima_core.config import registered_plugins

    if text == "auto" or "." in text or text.lower() in SOURCES or text.lower() in ALIASES:
        return text
    if text in registered_plugins():
        return text
    raise argparse.ArgumentTypeError(
        f"unknown source {text!r}: expected one of {', '.join(SOURCES)}, auto, "
        "or a registered plug-in (data.plugins, or a rima.sources entry point)"
    )


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("synth", help="write the synthetic retina phantom (FairVision layout)")
    add_config_options(p)
    p.add_argument("--out", default=None)
    p.add_argument("--n-eyes", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="source tree -> Arrow store + manifest")
    add_config_options(p)
    p.add_argument(
        "--source",
        type=_source_name,
        default=None,
        metavar="SOURCE",
        help=f"source format: {', '.join(SOURCES)}, auto, or a registered plug-in (a module "
        "with scan()/load() listed in data.plugins, or a rima.sources entry point); "
        "default: data.source",
    )
    p.add_argument("--disease", choices=[*DISEASES, "auto"], default=None)
    p.add_argument("--input", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--skip-bad", action="store_true", help="quarantine bad cases into a report")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("validate", help="Great Expectations suite over the store")
    add_config_options(p)
    p.add_argument("--store", default=None)
    p.add_argument("--report", default=None)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("simulate-missing", help="seeded missing-modality masks")
    add_config_options(p)
    p.add_argument("--store", default=None)
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_simulate_missing)


# --- model: train / evaluate --------------------------------------------------------------------


def _cmd_train(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from rima_core import steps
    from rima_core.engine import EngineError

    cfg = _config(args)
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
    from rima_core import steps
    from rima_core.engine import EngineError

    cfg = _config(args)
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


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model; best epoch on validation -> model.pt")
    add_config_options(p)
    p.add_argument("--store", default=None, help="store directory (default: prepare.store_dir)")
    p.add_argument("--masks", default=None, help="masks parquet (default: missing.masks)")
    p.add_argument("--out", default=None, help="output directory (default: train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from out/checkpoint.pt")
    p.add_argument("--best-params", default=None, metavar="FILE", help="tuned best_params.json")
    p.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="model to train (default: model.name); without --out it goes to models/NAME",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score a model under every missing-modality scenario")
    add_config_options(p)
    p.add_argument("--model", default=None, help="model.pt (default: train.out_dir/model.pt)")
    p.add_argument("--store", default=None)
    p.add_argument("--masks", default=None)
    p.add_argument("--out", default=None, help="output directory (default: evaluate.out_dir)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_cmd_evaluate)


# --- tuning and params ---------------------------------------------------------------------------


def _cmd_tune(args: argparse.Namespace) -> Any:
    from rima_core import steps
    from rima_core.tune import TuneError

    cfg = _config(args)
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
    import yaml

    if args.params_command == "show":
        # credentials masked: this output ends up in terminals, CI logs and bug reports
        print(yaml.safe_dump(redact_config(_config(args).to_dict()), sort_keys=False), end="")
        return None
    # overrides: the profile's keys as `dvc exp run` arguments, one per line
    load_config(None, args.profile_file)  # schema check: a typo fails here, not in a stage
    from pathlib import Path

    raw = load_yaml(Path(args.profile_file).read_text()) or {}
    for key, value in _flatten(raw).items():
        print(f"++{key}={_dvc_value(value)}")
    return None


def _add_tune_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="Optuna search over the OT regularisation and lr")
    add_config_options(p)
    p.add_argument("--store", default=None, help="store directory (default: prepare.store_dir)")
    p.add_argument("--masks", default=None, help="masks parquet (default: missing.masks)")
    p.add_argument("--out", default=None, help="output directory (default: tune.out_dir)")
    p.add_argument("--workers", type=int, default=None, help="processes on one study")
    p.add_argument("--n-trials", type=int, default=None, help="budget: finished trials")
    p.add_argument("--timeout-s", type=float, default=None, help="budget: wall seconds")
    p.add_argument("--storage", default=None, help="SQLAlchemy URL (default: tune.storage)")
    p.add_argument(
        "--study-name", default=None, help="use this study as is (default: name + fingerprint)"
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=_cmd_tune)

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

    from rima_core.registry import RegistryError
    from rima_core.serving import InputError

    return (RegistryError, InputError, MlflowException)


def _cmd_register(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from rima_core import steps

    cfg = _config(args)
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
    import hashlib

    from rima_core.atomic import write_text

    def sha256(file: Any) -> str:
        return hashlib.sha256(file.read_bytes()).hexdigest()

    receipt = {
        "model_name": model_name,
        "model_sha256": sha256(model_dir / "model.pt"),
        "metrics_sha256": sha256(metrics),
    }
    write_text(path, json.dumps(receipt, indent=2) + "\n")


def _cmd_promote(args: argparse.Namespace) -> Any:
    from rima_core import steps
    from rima_core.registry import format_table

    cfg = _config(args)
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
    from rima_core import steps

    cfg = _config(args)
    model = args.model or f"models:/{cfg.mlflow.model_name}@champion"
    try:
        return steps.predict(model, args.input, args.out, cfg)
    except _registry_errors() as exc:
        raise StepFailed(str(exc)) from exc


def _add_registry_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("register", help="register the trained model (alias challenger)")
    add_config_options(p)
    p.add_argument("--model-dir", default=None, help="folder with model.pt (train.out_dir)")
    p.add_argument("--metrics", default=None, help="metrics.json (default: evaluate.out_dir/...)")
    p.add_argument("--store", default=None, help="store whose content hash tags the version")
    p.add_argument("--out", default=None, help="also write the summary JSON here")
    p.add_argument(
        "--receipt",
        default=None,
        metavar="FILE",
        help="also write what was registered without version or run ids (a DVC output)",
    )
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("promote", help="move alias champion to the challenger if it wins")
    add_config_options(p)
    p.add_argument("--dry-run", action="store_true", help="print the comparison, change nothing")
    p.add_argument("--out", default=None, help="also write the decision JSON here")
    p.add_argument("--json", action="store_true", help="print the decision as JSON too")
    p.add_argument(
        "--after",
        default=None,
        metavar="FILE",
        help="register's summary (its --out): skip, with a recorded reason, if not registered",
    )
    p.set_defaults(func=_cmd_promote)

    p = sub.add_parser("predict", help="grade eyes listed in a CSV/Parquet file")
    add_config_options(p)
    p.add_argument(
        "--model", default=None, help="model URI (default: models:/<mlflow.model_name>@champion)"
    )
    p.add_argument(
        "--input",
        required=True,
        help="table with fundus/oct paths relative to it (csv|parquet); per-image limits: "
        "RIMA_PREDICT_MAX_FUNDUS_ELEMENTS, RIMA_PREDICT_MAX_OCT_ELEMENTS",
    )
    p.add_argument("--out", required=True, help="predictions (csv|parquet)")
    p.set_defaults(func=_cmd_predict)


# --- reproduction check ---------------------------------------------------------------------------


class ExitStatus(int):
    """A command's exit status that is a verdict, not an error (``check-repro``: 1 = not
    reproduced); :func:`run` returns it instead of printing a summary."""


def _cmd_check_repro(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from rima_core import repro

    cfg = _config(args)
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


def _add_repro_commands(sub: argparse._SubParsersAction) -> None:
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


# Each group of commands registers itself here; keep one function per group.
COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [_add_data_commands]
COMMAND_GROUPS.append(_add_model_commands)
COMMAND_GROUPS.append(_add_tune_commands)
COMMAND_GROUPS.append(_add_registry_commands)
COMMAND_GROUPS.append(_add_repro_commands)


DESCRIPTION = """\
RIMA pipeline: eye-disease grading from fundus photos and OCT volumes that stays accurate
when one of the two is missing.

Every command reads --params (default params.yaml; built-in defaults when it does not exist),
an optional --profile file layered on top, and --set section.key=value overrides. Explicit
path options win over the paths in params. `rima COMMAND --help` lists a command's options.
The Kubeflow pipeline has its own command line in the repository checkout:
`python -m pipelines --help`.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (plain text, line breaks kept); each option's default shown
    when it has a real one (defaults that mean "from params" are said in the help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


class _Parser(argparse.ArgumentParser):
    """Every (sub)command parser gets :class:`_HelpFormatter` (subparsers inherit the class),
    and errors that say what the user probably meant: the closest command for a mistyped one,
    and for an unknown ``--flag`` the ``--set section.key=value`` that sets it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        words = [a for a in getattr(self, "_argv", []) if not a.startswith("-")]
        super().error(message + _hint(message, words[0] if words else self.prog))


def _hint(message: str, command: str) -> str:
    """A "did you mean" for argparse's invalid-choice and unrecognized-arguments errors."""
    import difflib

    from rima_core.config import Config

    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        options = re.findall(r"'([^']*)'", choice.group(2))
        close = difflib.get_close_matches(choice.group(1), options, n=1, cutoff=0.5)
        return f"; did you mean '{close[0]}'?" if close else ""
    flags = re.findall(r"--([A-Za-z][\w-]*)", message)
    if "unrecognized arguments" not in message or not flags:
        return ""
    command = command.split()[-1].replace("-", "_")
    keys: dict[str, list[str]] = {}
    for section, values in Config().to_dict().items():
        for key in values:
            keys.setdefault(key.replace("_", "-"), []).append(section)
    for flag in flags:
        close = difflib.get_close_matches(flag, list(keys), n=1, cutoff=0.75)
        if close:
            sections = keys[close[0]]
            section = command if command in sections else sections[0]
            key = close[0].replace("-", "_")
            return (
                "; settings are changed with --set SECTION.KEY=VALUE, "
                f"e.g. --set {section}.{key}=..."
            )
    return "; settings are changed with --set SECTION.KEY=VALUE (see `rima params show`)"


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A top-level parser with ``--version``/``--verbose`` and this CLI's help formatting, for
    ``rima`` and for command lines built on it outside the library (``python -m pipelines``)."""
    from rima_core import __version__

    parser = _Parser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--json", action="store_true", help="print the step's whole summary as JSON on stdout"
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("rima", DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _PlainTextFilter(logging.Filter):
    """Strips terminal colour codes from records (MLflow colours some of its warnings), so log
    files and CI logs show text, not escape sequences."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is the logging module's business
            return True
        clean = _ANSI.sub("", message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# library loggers whose INFO lines are about the library itself, not the run (-v shows them)
NOISY_LIBRARIES = ("great_expectations", "alembic")


# warnings about how a library was called, not about the run, that every run would repeat (-v
# shows them): MLflow's advice on integer columns in the logged model's inferred signature, and
# on type hints of the pyfunc's predict (rima_core.serving checks its inputs itself)
NOISY_WARNINGS = (
    r"Hint: Inferred schema contains integer column",
    r"Add type hints to the `predict` method",
)


def _one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: Any = None
) -> str:
    """``file:line: Category: message`` on one line (the default adds the source line and a
    blank line: three log lines per warning)."""
    text = " ".join(str(message).split())
    return f"{filename}:{lineno}: {category.__name__}: {text}"


def _quiet_libraries(verbose: bool = False) -> None:
    """Library output fit for logs: Python warnings go through logging (one line, colour codes
    stripped), and MLflow's artifact download bars are off — `rima` downloads artifacts only for
    itself (e.g. `register` reading back the logged model), where they printed the same bar
    several times. An explicit MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR wins. Without -v, MLflow's
    own INFO log lines (rima logs what it did) and :data:`NOISY_WARNINGS` are off; an explicit
    MLFLOW_LOGGING_LEVEL wins."""
    import os
    import warnings

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.formatwarning = _one_line_warning  # type: ignore[assignment]
    logging.captureWarnings(True)
    if not verbose:  # ~200 "Skipping registering function" lines per validate; -v shows them
        for name in NOISY_LIBRARIES:
            logging.getLogger(name).setLevel(logging.WARNING)
        # read when mlflow is imported, which the commands do after this
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        for pattern in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=UserWarning)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _PlainTextFilter) for f in handler.filters):
            handler.addFilter(_PlainTextFilter())


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command's ``func``: logging set up and redacted, the
    summary printed, a user's error one logged line and exit 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # no log line (ours, MLflow's, Optuna's) may print a password held in a URL-like setting
    install_log_redaction()
    _quiet_libraries(args.verbose)
    try:
        result = args.func(args)
        if isinstance(result, ExitStatus):
            return int(result)
        _print(result, getattr(args, "json", False), getattr(args, "command", ""))
    except (ConfigError, CaseError, SourceError, StepFailed, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # disk full, permissions, ...: the environment's, not a bug
        log.error("%s", _os_error_line(exc))
        return 1
    return 0


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError: what failed, on which file, and why (no traceback)."""
    import errno

    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    hint = "; free some space and rerun" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{type(exc).__name__}{where}: {reason}{hint}"


if __name__ == "__main__":
    sys.exit(main())
