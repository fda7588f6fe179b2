"""``rima <step> ...``: a thin command line over :mod:`rima_core.pipeline.steps`.

The step commands, with their options and help, are made from the step table
(:data:`rima_core.pipeline.step_registry.STEPS`); what the table cannot say, how a command turns its
options into the step's arguments, lives in :mod:`rima_core.pipeline.commands` (``HANDLERS``, and
the commands that run no step: ``params``, ``check-repro``). This module builds the parser, sets up
logging and turns a user's error into one line and an exit status.

Every command reads ``--params`` (default ``params.yaml``; embedded defaults when it does not
exist), an optional ``--profile`` file layered on top, and ``--set section.key=value``
overrides. Explicit path options win over the paths in params. Errors that are the user's
(bad input, failed validation) exit non-zero with one clear message, not a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from rima_core import __version__
from rima_core.config import Config, ConfigError
from rima_core.core.data.types import CaseError, SourceError
from rima_core.pipeline import step_registry, steps
from rima_core.pipeline.commands import (
    HANDLERS,
    ExitStatus,
    StepFailed,
    add_config_options,
    add_params_commands,
    add_repro_commands,
    config_from_args,
    print_result,
    summary_line,
)
from rima_core.redact import install_log_redaction

log = logging.getLogger("rima")

# what other modules take from here (pipelines/cli.py builds its commands on these)
__all__ = [
    "HANDLERS",
    "StepFailed",
    "add_config_options",
    "build_parser",
    "main",
    "new_parser",
    "run",
    "summary_line",
]


# --- the step commands, from the step table -------------------------------------------------------


def _run_step(entry: step_registry.Step, args: argparse.Namespace) -> Any:
    """A step with no handler of its own: ``rima_core.pipeline.steps.<function>(cfg=...,
    **options)``,
    each of the step's options passed under its ``dest``. This is what lets a new step get its
    command from its row of the step table alone."""

    options = {option.dest: getattr(args, option.dest) for option in entry.options}
    return getattr(steps, entry.function)(cfg=config_from_args(args), **options)


def _add_step_commands(sub: argparse._SubParsersAction) -> None:
    """One command per row of :data:`rima_core.pipeline.step_registry.STEPS`, in the table's order:
    its help and options from the row, ``--params``/``--profile``/``--set`` on every one, its
    handler from :data:`HANDLERS` or :func:`_run_step`. A two-word command (``rima data synth``)
    goes under its group (:data:`rima_core.pipeline.step_registry.CLI_GROUPS`)."""
    groups: dict[str, argparse._SubParsersAction] = {}
    for entry in step_registry.STEPS:
        *group, word = entry.command
        parent = sub
        if group:
            (head,) = group
            if head not in groups:
                parser = sub.add_parser(head, help=step_registry.CLI_GROUPS[head])
                groups[head] = parser.add_subparsers(dest=f"{head}_command", required=True)
            parent = groups[head]
        p = parent.add_parser(word, help=entry.help)
        add_config_options(p)
        for option in entry.options:
            p.add_argument(*option.flags, **option.kwargs())
        handler = HANDLERS.get(entry.name) or functools.partial(_run_step, entry)
        p.set_defaults(func=handler)


# Each group of commands registers itself here; keep one function per group.
COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [_add_step_commands]
COMMAND_GROUPS.append(add_params_commands)
COMMAND_GROUPS.append(add_repro_commands)


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
# on type hints of the pyfunc's predict (rima_core.ops.serving checks its inputs itself)
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
        print_result(result, getattr(args, "json", False), getattr(args, "command", ""))
    except (ConfigError, CaseError, SourceError, StepFailed, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:  # disk full, permissions, ...: the environment's, not a bug
        log.error("%s", _os_error_line(exc))
        return 1
    return 0


def _os_error_line(exc: OSError) -> str:
    """One line for an OSError: what failed, on which file, and why (no traceback)."""

    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f" ({exc.filename})" if exc.filename else ""
    hint = "; free some space and rerun" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{type(exc).__name__}{where}: {reason}{hint}"


if __name__ == "__main__":
    sys.exit(main())
