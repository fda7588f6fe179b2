"""``prepare``'s case conversion: one scanned case -> a checked, resized eye (or the reason not).

Split from :mod:`rima_core.core.data.prepare` (which re-exports the public names) because this
part runs inside the worker processes (:mod:`rima_core.core.data.prepare_workers`): a task and
its result are plain picklable values, and every failure of an untrusted case comes back as a
:class:`_Failed` value for the parent to report or quarantine, never as a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from rima_core.config import ConfigError, PrepareConfig
from rima_core.core.data.resize import resize_fundus, resize_oct
from rima_core.core.data.sources import ALIASES, SOURCES, get_source, load_plugin
from rima_core.core.data.types import (
    SPLITS,
    CaseError,
    CaseRef,
    RawCase,
    ReadLimits,
    is_utf8,
    printable,
    using_read_limits,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Task:
    """One case for a worker: which loader reads it and the store's shapes and limits."""

    source: str
    ref: CaseRef
    disease: str | None
    n_classes: int
    fundus_size: int
    oct_shape: tuple[int, int, int]
    limits: ReadLimits = field(default_factory=ReadLimits)


@dataclass
class _Decoded:
    """A case a worker decoded, checked and resized to the store's shapes."""

    case_id: str
    label: int
    split: str | None
    fundus: np.ndarray | None
    oct: np.ndarray | None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Row:
    """What the manifest keeps of a decoded case once its pixels are written."""

    case_id: str
    label: int
    split: str | None
    has_fundus: bool
    has_oct: bool
    attributes: dict[str, Any]

    @classmethod
    def of(cls, d: _Decoded) -> _Row:
        return cls(
            d.case_id, d.label, d.split, d.fundus is not None, d.oct is not None, d.attributes
        )


@dataclass
class _Failed:
    """A case a worker could not convert, and why (the parent reports or quarantines it)."""

    case_id: str
    path: str | None
    reason: str

    def error(self) -> CaseError:
        return CaseError(self.case_id, self.reason, self.path)


def resolve_source(name: str, plugins: Collection[str] | None = None) -> ModuleType:
    """A built-in source name (``fairvision``, ``gamma``, ``rima`` or an alias) or a plug-in.

    A plug-in (a dotted module path with ``scan`` and ``load``, or a ``rima.sources`` entry-point
    name) lets a group add its own export format without editing this package; with
    ``plugins`` (``data.plugins``) an unregistered one is refused before it is imported
    (:func:`rima_core.core.data.sources.load_plugin`). Configuration values (params, ``--set``,
    ``--source``, Kubeflow parameters) are checked against the registry before they get here.
    """
    if name.lower() in SOURCES or name.lower() in ALIASES:
        return get_source(name)
    return load_plugin(name, plugins)


def _first_path(ref: CaseRef) -> str | None:
    return next(iter(ref.paths.values()), None) if ref.paths else None


def limits_of(cfg: PrepareConfig) -> ReadLimits:
    """The ``prepare.max_*`` / ``prepare.min_*`` settings as loader limits (validated)."""
    values = {
        name: getattr(cfg, name, getattr(ReadLimits, name))
        for name in ReadLimits.__dataclass_fields__
    }
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"prepare.{name} must be a positive integer, got {value!r}")
    return ReadLimits(**values)


def _ref_problem(ref: CaseRef) -> str | None:
    """Why a scanned case is bad before any pixel is read (None when it is not)."""
    if ref.problem:
        return ref.problem
    names = [ref.case_id, *ref.paths.values()]
    if not all(is_utf8(n) for n in names):
        return "file or folder name is not valid UTF-8; rename it"
    return None


def check_raw_case(
    raw: RawCase, ref: CaseRef, n_classes: int, limits: ReadLimits | None = None
) -> None:
    """Reject a decoded case the store cannot hold, naming the reason (raises CaseError).

    ``limits`` adds the size rules: a fundus side below ``min_fundus_size``, an OCT axis below
    ``min_oct_size`` (a 1×1×1 "volume") or above ``max_volume_voxels`` voxels is refused.
    """
    limits = limits or ReadLimits()
    path = _first_path(ref)
    if raw.case_id != ref.case_id:
        raise CaseError(ref.case_id, f"loader returned case id {raw.case_id!r}", path)
    if raw.fundus is None and raw.oct is None:
        raise CaseError(ref.case_id, "eye has neither a fundus image nor an OCT volume", path)
    if isinstance(raw.label, bool) or not isinstance(raw.label, int | np.integer):
        raise CaseError(ref.case_id, f"label {raw.label!r} is not an integer", path)
    if not 0 <= int(raw.label) < n_classes:
        raise CaseError(ref.case_id, f"label {raw.label} outside [0, {n_classes})", path)
    split = raw.split if raw.split is not None else ref.split
    if split is not None and split not in SPLITS:
        raise CaseError(ref.case_id, f"split {split!r} is not one of {SPLITS}", path)
    for name, arr, ranks in (("fundus", raw.fundus, (2, 3)), ("OCT volume", raw.oct, (3,))):
        if arr is None:
            continue
        if arr.ndim not in ranks:
            raise CaseError(ref.case_id, f"{name} has rank {arr.ndim} (shape {arr.shape})", path)
        if arr.dtype != np.uint8:
            raise CaseError(ref.case_id, f"{name} has dtype {arr.dtype}, expected uint8", path)
        if min(arr.shape) == 0:
            raise CaseError(ref.case_id, f"{name} has an empty axis (shape {arr.shape})", path)
    if raw.fundus is not None:
        side = min(raw.fundus.shape[:2])
        if side < limits.min_fundus_size:
            raise CaseError(
                ref.case_id,
                f"fundus of shape {raw.fundus.shape} is below the minimum side of "
                f"{limits.min_fundus_size} (prepare.min_fundus_size)",
                path,
            )
        if raw.fundus.shape[0] * raw.fundus.shape[1] > limits.max_image_pixels:
            raise CaseError(ref.case_id, "fundus is over prepare.max_image_pixels", path)
    if raw.oct is not None:
        if raw.oct.ndim == 3 and min(raw.oct.shape) < limits.min_oct_size:
            raise CaseError(
                ref.case_id,
                f"OCT volume of shape {raw.oct.shape} is below the minimum axis of "
                f"{limits.min_oct_size} (prepare.min_oct_size)",
                path,
            )
        if raw.oct.size > limits.max_volume_voxels:
            raise CaseError(ref.case_id, "OCT volume is over prepare.max_volume_voxels", path)
    if raw.fundus is not None and raw.fundus.ndim == 3 and raw.fundus.shape[2] not in (1, 3):
        raise CaseError(
            ref.case_id, f"fundus has {raw.fundus.shape[2]} channels, expected 1 or 3", path
        )


def _decode(task: _Task) -> _Decoded | _Failed:
    """Load, check and resize one case; errors come back as values so the parent decides."""
    ref = task.ref
    problem = _ref_problem(ref)
    if problem is not None:
        return _Failed(printable(ref.case_id), _printable_path(_first_path(ref)), problem)
    try:
        with using_read_limits(task.limits):
            raw = resolve_source(task.source).load(ref, task.disease)
        check_raw_case(raw, ref, task.n_classes, task.limits)
        fundus = None if raw.fundus is None else resize_fundus(raw.fundus, task.fundus_size)
        oct = None if raw.oct is None else resize_oct(raw.oct, task.oct_shape)
    except CaseError as exc:
        return _Failed(exc.case_id, exc.path or _printable_path(_first_path(ref)), exc.reason)
    except Exception as exc:  # untrusted bytes: any failure is this case's, never a traceback
        log.debug("case %s failed", printable(ref.case_id), exc_info=True)
        reason = printable(f"unreadable: {type(exc).__name__}: {exc}")
        return _Failed(printable(ref.case_id), _printable_path(_first_path(ref)), reason)
    split = raw.split if raw.split is not None else ref.split
    # attribute strings come from the files: keep them writable as UTF-8 (Parquet)
    attrs = {
        printable(k): printable(v) if isinstance(v, str) else v for k, v in raw.attributes.items()
    }
    return _Decoded(ref.case_id, int(raw.label), split, fundus, oct, attrs)


def _printable_path(path: str | None) -> str | None:
    return None if path is None else printable(path)
