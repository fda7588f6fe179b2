"""One function per pipeline step: the only place a step is implemented.

DVC stages (via the ``rima`` CLI), MLproject entry points and Kubeflow components all call these
functions with paths and a :class:`~rima_core.config.Config`; none of them holds step logic.
Each function writes its outputs atomically (temporary path, then rename) through the module it
delegates to, and returns a small JSON-able summary. Heavy imports (torch, mlflow, great
expectations) happen inside the functions so ``rima --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rima_core.config import Config

log = logging.getLogger(__name__)


def synth(out: str | Path, cfg: Config) -> dict[str, Any]:
    """Write the synthetic retina phantom in the Harvard FairVision npz layout."""
    from rima_core.data.synthetic import generate

    return generate(Path(out), cfg.synth)


def prepare(
    input_dir: str | Path,
    out: str | Path,
    cfg: Config,
    source: str | None = None,
    disease: str | None = None,
    skip_bad: bool | None = None,
) -> dict[str, Any]:
    """Read a source tree, resize and write the Arrow store + Parquet manifest."""
    from rima_core.data.prepare import prepare_store

    return prepare_store(
        source=source or cfg.data.source,
        input_dir=Path(input_dir),
        out=Path(out),
        cfg=cfg.prepare,
        disease=disease or cfg.data.disease,
        skip_bad=cfg.prepare.skip_bad if skip_bad is None else skip_bad,
    )


def validate(store: str | Path, report: str | Path, cfg: Config) -> dict[str, Any]:
    """Run the Great Expectations suite; the returned dict has ``success`` and ``failures``."""
    from rima_core.data.validation import validate_store

    return validate_store(Path(store), Path(report), cfg.validate)


def simulate_missing(store: str | Path, out: str | Path, cfg: Config) -> dict[str, Any]:
    """Write seeded availability masks for every split and scenario."""
    from rima_core.data.masks import simulate_missing as _simulate

    return _simulate(Path(store), Path(out), cfg.missing)
