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
import sys
from collections.abc import Callable
from typing import Any

from rima_core.config import Config, ConfigError, load_config
from rima_core.data.types import CaseError, SourceError

log = logging.getLogger("rima")


class StepFailed(RuntimeError):
    """A step ran but its outcome is a failure the pipeline must stop on (e.g. validation)."""


def _common(p: argparse.ArgumentParser) -> None:
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


def _print(result: Any) -> None:
    if result is not None:
        print(json.dumps(result, indent=2, default=str))


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

    cfg = _config(args)
    return steps.prepare(
        input_dir=args.input or cfg.data.raw_dir,
        out=args.out or cfg.prepare.store_dir,
        cfg=cfg,
        source=args.source,
        disease=args.disease,
        skip_bad=True if args.skip_bad else None,
    )


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


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("synth", help="write the synthetic retina phantom (FairVision layout)")
    _common(p)
    p.add_argument("--out", default=None)
    p.add_argument("--n-eyes", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("prepare", help="source tree -> Arrow store + manifest")
    _common(p)
    p.add_argument("--source", choices=["fairvision", "gamma", "rima", "auto"], default=None)
    p.add_argument(
        "--disease", choices=["amd", "dr", "glaucoma", "synthetic", "auto"], default=None
    )
    p.add_argument("--input", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--skip-bad", action="store_true", help="quarantine bad cases into a report")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("validate", help="Great Expectations suite over the store")
    _common(p)
    p.add_argument("--store", default=None)
    p.add_argument("--report", default=None)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("simulate-missing", help="seeded missing-modality masks")
    _common(p)
    p.add_argument("--store", default=None)
    p.add_argument("--out", default=None)
    p.set_defaults(func=_cmd_simulate_missing)


# Each group of commands registers itself here; keep one function per group.
COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [_add_data_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rima", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMAND_GROUPS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        _print(args.func(args))
    except (ConfigError, CaseError, SourceError, StepFailed, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
