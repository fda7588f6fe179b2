"""``prepare``: a source tree -> the Arrow store (``tensors.arrow`` + ``manifest.parquet``).

scan (cheap, main process) -> decode + resize (worker processes) -> ordered streaming write ->
split -> manifest, all inside :func:`rima_core.atomic.atomic_dir`, so a failure leaves the previous
store (or nothing), never a partial one.

Reproducibility: cases are written in case-id order, results are consumed in submission order,
resizing is per-output-element arithmetic (no thread-count-dependent reductions), and the split is
drawn from ``cfg.seed`` — the store is byte-identical whatever ``cfg.workers`` is.

Hostile input: loaders read through :mod:`rima_core.core.data.safe_read` under the ``prepare.max_*``
limits (:class:`~rima_core.core.data.types.ReadLimits`, installed in every worker); any exception
while decoding one case is that case's failure (reported, or quarantined with ``--skip-bad``), never
a traceback. Workers die with the parent (``PR_SET_PDEATHSIG`` plus a parent-pid watchdog), and the
temporary store of a killed run is removed by the next run (:mod:`rima_core.atomic`).

Layout: this module is the step (scan, write, split, manifest, summary); one case's conversion is
in :mod:`rima_core.core.data.prepare_cases`, the worker pool in
:mod:`rima_core.core.data.prepare_workers`, resizing in :mod:`rima_core.core.data.resize` and the
split arithmetic in :mod:`rima_core.core.data.splits`. Their public names stay importable from
here.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.atomic import atomic_dir
from rima_core.config import ConfigError, PrepareConfig
from rima_core.core.data.prepare_cases import (
    _Failed,
    _first_path,
    _printable_path,
    _Row,
    _Task,
    check_raw_case,
    limits_of,
    resolve_source,
)
from rima_core.core.data.prepare_workers import _decode_all
from rima_core.core.data.resize import resize_fundus, resize_oct
from rima_core.core.data.sources import ScanResult, detect_source
from rima_core.core.data.splits import (
    PATIENT_ID_ATTRIBUTES,
    _check_fractions,
    grouped_stratified_split,
    patient_ids,
    stratified_split,
)
from rima_core.core.data.store import StoreWriter, split_counts, write_manifest
from rima_core.core.data.types import (
    CaseError,
    CaseRef,
    ReadLimits,
    SourceError,
    printable,
    using_read_limits,
)
from rima_core.progress import progress as tqdm

# Names kept importable from here: serving, the benchmarks and the tests import them from this
# module (the step's one public entry), wherever they are defined.
__all__ = [
    "PATIENT_ID_ATTRIBUTES",
    "QUARANTINE_FILE",
    "_Row",
    "_assign_splits",
    "check_raw_case",
    "grouped_stratified_split",
    "limits_of",
    "patient_ids",
    "prepare_store",
    "resize_fundus",
    "resize_oct",
    "resolve_source",
    "stratified_split",
]

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"


# --- manifest ------------------------------------------------------------------------------------


def _attribute_column(values: list[Any]) -> pd.Series:
    """One ``source_*`` column with a type every case agrees on (Parquet needs one type)."""
    present = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    integer = bool | np.bool_ | int | np.integer
    if all(isinstance(v, integer) for v in present):
        return pd.Series([None if v is None else int(v) for v in values], dtype="Int64")
    if all(isinstance(v, integer | float | np.floating) for v in present):
        return pd.Series([np.nan if v is None else float(v) for v in values], dtype="float64")
    return pd.Series([None if v is None else str(v) for v in values], dtype="string")


def _manifest(rows: list[_Row], splits: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "case_id": pd.Series([r.case_id for r in rows], dtype="string"),
            "label": pd.Series([r.label for r in rows], dtype="int64"),
            "split": pd.Series(splits, dtype="string"),
            "has_fundus": pd.Series([r.has_fundus for r in rows], dtype=bool),
            "has_oct": pd.Series([r.has_oct for r in rows], dtype=bool),
        }
    )
    keys = sorted({k for r in rows for k in r.attributes})
    for key in keys:
        df[f"source_{key}"] = _attribute_column([r.attributes.get(key) for r in rows])
    return df


# --- the step ------------------------------------------------------------------------------------


def _duplicates(cases: Sequence[CaseRef]) -> dict[str, list[CaseRef]]:
    counts = Counter(c.case_id for c in cases)
    return {
        cid: [c for c in cases if c.case_id == cid] for cid, n in sorted(counts.items()) if n > 1
    }


def _sizes(cfg: PrepareConfig) -> tuple[int, tuple[int, int, int]]:
    """The store's fundus size and OCT shape, refused unless they are sizes."""
    fundus_size = int(cfg.fundus_size)
    oct_shape = tuple(int(s) for s in cfg.oct_shape)
    if fundus_size < 1 or len(oct_shape) != 3 or min(oct_shape) < 1:
        raise ConfigError(
            f"prepare: fundus_size {cfg.fundus_size} / oct_shape {cfg.oct_shape} are not sizes"
        )
    return fundus_size, oct_shape  # type: ignore[return-value]


def _scan(
    source: str,
    input_dir: Path,
    disease: str,
    limits: ReadLimits,
    plugins: Collection[str] | None = None,
) -> tuple[str, ScanResult]:
    """The loader's listing of ``input_dir`` (``source="auto"``: the layout found there), and
    the loader name the workers resolve (a plug-in is vetted here, before any file is read)."""
    with using_read_limits(limits):
        if source == "auto":
            source = detect_source(input_dir)
        module = resolve_source(source, plugins)
        scan = module.scan(input_dir, disease)
    if not scan.cases:
        raise SourceError(f"{input_dir}: the {scan.source} source holds no cases")
    return source, scan


def _without_duplicates(
    cases: list[CaseRef], skip_bad: bool, quarantine: list[dict[str, Any]]
) -> list[CaseRef]:
    """``cases`` minus every case whose id is not unique; those go to ``quarantine`` with
    ``skip_bad``, and are an error without it (which of two eyes is meant cannot be known)."""
    dups = _duplicates(cases)
    if not dups:
        return cases
    cid, refs = next(iter(dups.items()))
    paths = ", ".join(str(_first_path(r)) for r in refs)
    if not skip_bad:
        raise CaseError(cid, f"duplicate case id ({len(refs)} cases: {paths})")
    for cid, refs in dups.items():
        log.warning("quarantined %d cases with the duplicate id %s", len(refs), printable(cid))
        for r in refs:
            quarantine.append(
                {
                    "case_id": printable(cid),
                    "path": _printable_path(_first_path(r)),
                    "reason": "duplicate case id",
                }
            )
    return [c for c in cases if c.case_id not in dups]


def _write_tensors(
    directory: Path,
    tasks: list[_Task],
    workers: int,
    shapes: tuple[tuple[int, int, int], tuple[int, int, int]],
    skip_bad: bool,
    quarantine: list[dict[str, Any]],
) -> tuple[list[_Row], str]:
    """Decode every case (``workers`` processes) into the store's tensor file; return the
    manifest rows of the eyes written and the tensors' digest. A bad case raises, or with
    ``skip_bad`` goes to ``quarantine``."""
    rows: list[_Row] = []
    results = _decode_all(tasks, workers)
    try:
        with StoreWriter(directory, *shapes) as writer:
            for result in tqdm(results, total=len(tasks), desc="prepare", unit="eye"):
                if isinstance(result, _Failed):
                    if not skip_bad:
                        raise result.error()
                    log.warning("quarantined %s", result.error())
                    quarantine.append(
                        {"case_id": result.case_id, "path": result.path, "reason": result.reason}
                    )
                    continue
                writer.append(result.fundus, result.oct)
                rows.append(_Row.of(result))  # pixels now live in the writer's buffer only
            digest = writer.close()
    finally:
        # Stop the worker pool now, not whenever a traceback holding the generator is freed.
        results.close()
    return rows, digest


def _prepare_summary(
    out: Path,
    scan: ScanResult,
    manifest: pd.DataFrame,
    meta: dict[str, Any],
    n_quarantined: int,
) -> dict[str, Any]:
    class_names = list(scan.class_names)
    counts = manifest["label"].value_counts()
    return {
        "store": str(out),
        "source": scan.source,
        "disease": scan.disease,
        "n_cases": len(manifest),
        "n_quarantined": n_quarantined,
        "class_names": class_names,
        "class_counts": {name: int(counts.get(i, 0)) for i, name in enumerate(class_names)},
        "split_counts": split_counts(manifest),
        "missing_fundus": int((~manifest["has_fundus"]).sum()),
        "missing_oct": int((~manifest["has_oct"]).sum()),
        "content_hash": meta["content_hash"],
        "notes": list(getattr(scan, "notes", [])),
    }


def prepare_store(
    source: str,
    input_dir: Path,
    out: Path,
    cfg: PrepareConfig,
    disease: str = "auto",
    skip_bad: bool = False,
    plugins: Collection[str] | None = None,
) -> dict[str, Any]:
    """Build the store at ``out`` from the source tree ``input_dir``; returns a summary.

    ``source`` is a built-in name, ``auto`` or a plug-in; ``plugins`` (``data.plugins``) is the
    allow-list a plug-in must be on (or be a ``rima.sources`` entry point) before it is
    imported; ``None``: the caller's code named the module itself.

    A bad case raises its :class:`CaseError` and leaves no store behind (an existing store at
    ``out`` is kept). With ``skip_bad`` the bad cases are listed in ``<out>/quarantine.json``
    (case_id, path, reason) and the rest are written.
    """
    input_dir, out = Path(input_dir), Path(out)
    if not input_dir.exists():
        raise FileNotFoundError(f"{printable(input_dir)}: input directory does not exist")
    fundus_size, oct_shape = _sizes(cfg)
    _check_fractions(cfg.split_fractions)
    limits = limits_of(cfg)
    source, scan = _scan(source, input_dir, disease, limits, plugins)
    class_names = list(scan.class_names)
    quarantine: list[dict[str, Any]] = []
    cases = sorted(scan.cases, key=lambda c: c.case_id)
    cases = _without_duplicates(cases, skip_bad, quarantine)
    resolved_disease = scan.disease if scan.disease is not None else disease
    # Workers resolve the loader by the name given here (registered name or module path).
    tasks = [
        _Task(source, ref, resolved_disease, len(class_names), fundus_size, oct_shape, limits)
        for ref in cases
    ]
    log.info(
        "prepare: %d cases from %s (%s), %d worker(s) -> %s",
        len(cases),
        printable(input_dir),
        scan.source,
        cfg.workers,
        out,
    )
    fundus_shape = (fundus_size, fundus_size, 3)
    with atomic_dir(out) as tmp:
        shapes = (fundus_shape, oct_shape)
        rows, digest = _write_tensors(tmp, tasks, cfg.workers, shapes, skip_bad, quarantine)
        if not rows:
            raise SourceError(
                f"{input_dir}: all {len(scan.cases)} cases are bad; first: "
                f"{quarantine[0]['case_id']}: {quarantine[0]['reason']}"
            )
        manifest = _manifest(rows, _assign_splits(rows, cfg))
        meta = write_manifest(
            tmp,
            manifest,
            tensor_digest=digest,
            source=scan.source,
            disease=scan.disease,
            class_names=class_names,
            fundus_shape=fundus_shape,
            oct_shape=oct_shape,
        )
        if skip_bad:
            report = {"n_quarantined": len(quarantine), "cases": quarantine}
            (tmp / QUARANTINE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return _prepare_summary(out, scan, manifest, meta, len(quarantine))


def _assign_splits(rows: list[_Row], cfg: PrepareConfig) -> list[str]:
    """The source's own split when every case has one, else a seeded stratified split — by
    patient when the source has patient ids (:data:`PATIENT_ID_ATTRIBUTES`)."""
    given = [r.split for r in rows]
    patients = patient_ids([r.attributes for r in rows])
    if all(s is not None for s in given):
        if patients is not None:
            _warn_patients_across_splits(patients, [str(s) for s in given])
        return [str(s) for s in given]
    if any(s is not None for s in given):
        lacking = [r.case_id for r in rows if r.split is None]
        raise SourceError(
            f"{len(lacking)} of {len(rows)} cases have no split while the others do "
            f"(e.g. {lacking[:3]}); fix the tree or drop the source split for all"
        )
    if patients is not None:
        return grouped_stratified_split(
            [r.label for r in rows], patients, cfg.split_fractions, cfg.seed
        )
    return stratified_split([r.label for r in rows], cfg.split_fractions, cfg.seed)


def _warn_patients_across_splits(patients: list[str | None], splits: list[str]) -> None:
    """The source's own split is kept as published, but a patient in two splits is reported."""
    seen: dict[str, set[str]] = {}
    for p, s in zip(patients, splits, strict=True):
        if p is not None:
            seen.setdefault(p, set()).add(s)
    spanning = sorted(p for p, s in seen.items() if len(s) > 1)
    if spanning:
        log.warning(
            "the source's own split puts %d patient(s) in more than one split (e.g. %s); kept as "
            "published, but metrics on those splits are not patient-independent",
            len(spanning),
            spanning[:3],
        )
