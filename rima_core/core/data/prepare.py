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
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from rima_core.atomic import atomic_dir
from rima_core.config import ConfigError, PrepareConfig
from rima_core.core.data.store import StoreWriter, rows_per_batch, split_counts, write_manifest
from rima_core.core.data.types import (
    SPLITS,
    CaseError,
    CaseRef,
    RawCase,
    ReadLimits,
    SourceError,
    is_utf8,
    printable,
    set_read_limits,
    using_read_limits,
)
from rima_core.progress import progress as tqdm

if TYPE_CHECKING:
    from rima_core.core.data.sources import ScanResult

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCHDOG_PERIOD_S = 1.0


# --- resizing ------------------------------------------------------------------------------------


def resize_fundus(image: np.ndarray, size: int) -> np.ndarray:
    """H×W or H×W×3 uint8 -> size×size×3 uint8 (grey replicated: the model takes 3 channels).

    PIL's bilinear filter widens its support when shrinking, so a 2000-px fundus reduced to 64 px
    is area-averaged rather than aliased.
    """
    from PIL import Image

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.shape[:2] == (size, size):
        out = image
    else:
        mode = "L" if image.ndim == 2 else "RGB"
        pil = Image.fromarray(np.ascontiguousarray(image), mode=mode)
        out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.uint8)


def resize_oct(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """D×H×W uint8 -> ``shape`` uint8.

    Axes that shrink are area-averaged (adaptive average pooling) and axes that grow are then
    interpolated trilinearly: plain trilinear sampling from 200 to 32 slices would read one slice
    in six and alias the retinal layers.
    """
    import torch
    import torch.nn.functional as F

    target = tuple(int(s) for s in shape)
    if tuple(volume.shape) == target:
        return np.ascontiguousarray(volume, dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(volume)).to(torch.float32)[None, None]
    shrunk = tuple(min(s, t) for s, t in zip(volume.shape, target, strict=True))
    if shrunk != tuple(volume.shape):
        x = F.adaptive_avg_pool3d(x, shrunk)
    if shrunk != target:
        x = F.interpolate(x, size=target, mode="trilinear", align_corners=False)
    return x[0, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()


# --- decoding (runs in worker processes) ---------------------------------------------------------


@dataclass(frozen=True)
class _Task:
    source: str
    ref: CaseRef
    disease: str | None
    n_classes: int
    fundus_size: int
    oct_shape: tuple[int, int, int]
    limits: ReadLimits = field(default_factory=ReadLimits)


@dataclass
class _Decoded:
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
    from rima_core.core.data.sources import ALIASES, SOURCES, get_source, load_plugin

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


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when ``parent_pid`` does, even if the parent is SIGKILLed.

    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``). Everywhere
    (and in case the parent died before prctl ran, or the signal is lost because the creating
    thread exited first): a daemon thread polls the parent pid and exits the process.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc with prctl: the watchdog still works
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable", exc_info=True)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(_WATCHDOG_PERIOD_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_init(parent_pid: int, limits: ReadLimits) -> None:
    _die_with_parent(parent_pid)
    set_read_limits(limits)
    # One intra-op thread per worker: the pool already uses every core it was given.
    import torch

    torch.set_num_threads(1)


def _decode_all(tasks: Sequence[_Task], workers: int) -> Iterator[_Decoded | _Failed]:
    """Yield results in task order, keeping at most a few batches of resized eyes in flight."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _decode(task)
        return
    task0 = tasks[0]
    in_flight = 2 * rows_per_batch((task0.fundus_size,) * 2 + (3,), task0.oct_shape)
    in_flight = max(4 * workers, min(in_flight, 1024))
    # spawn, not fork: the parent may hold torch/OpenMP threads, which a forked child inherits
    # in a locked state.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(os.getpid(), task0.limits),
    )
    pending: deque[tuple[_Task, Future]] = deque()
    it: Iterable[_Task] = iter(tasks)
    try:
        for task in it:
            pending.append((task, pool.submit(_decode, task)))
            if len(pending) >= in_flight:
                break
        while pending:
            task, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as exc:
                raise SourceError(
                    "a prepare worker process died (killed, or out of memory) while decoding "
                    f"case {printable(task.ref.case_id)} or one near it; lower prepare.workers "
                    "or prepare.max_file_bytes"
                ) from exc
            nxt = next(it, None)  # type: ignore[call-overload]
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode, nxt)))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- splitting -----------------------------------------------------------------------------------


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or abs(f.sum() - 1.0) > 1e-6:
        raise ConfigError(
            f"prepare.split_fractions must be three non-negative numbers (train, val, test) "
            f"summing to 1, got {list(fractions)}"
        )
    return f


def _allocate(n: int, fractions: np.ndarray) -> np.ndarray:
    """Split ``n`` eyes by ``fractions`` (largest remainder), giving every non-empty split at
    least one eye when there are enough, so small classes still reach val and test."""
    exact = fractions * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    wanted = fractions > 0
    if n >= wanted.sum():
        for s in np.flatnonzero(wanted & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[s] = 1
    return counts


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """Seeded per-class split into train/val/test (row order in, split name per row out)."""
    f = _check_fractions(fractions)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        counts = _allocate(len(rows), f)
        bounds = np.cumsum(counts)[:-1]
        for name, part in zip(SPLITS, np.split(rows, bounds), strict=True):
            out[part] = name
    return out.tolist()


# Source attribute names (case-insensitive) that identify the patient an eye belongs to. When a
# source has one, prepare splits by patient, so both eyes of a patient land in the same split (an
# eye's fellow eye in the test split would leak the patient's disease into selection/testing).
PATIENT_ID_ATTRIBUTES = frozenset(
    {"patient_id", "patientid", "patient", "pid", "subject_id", "subjectid", "subject"}
)


def patient_ids(attributes: Sequence[dict[str, Any]]) -> list[str | None] | None:
    """Per case, the value of its patient-id attribute (:data:`PATIENT_ID_ATTRIBUTES`); None for
    a case without one, and None overall when no case has any."""
    out: list[str | None] = []
    for attrs in attributes:
        key = next((k for k in attrs if str(k).lower() in PATIENT_ID_ATTRIBUTES), None)
        value = None if key is None else attrs[key]
        missing = value is None or (isinstance(value, float) and np.isnan(value))
        out.append(None if missing or str(value).strip() == "" else str(value))
    return out if any(v is not None for v in out) else None


def grouped_stratified_split(
    labels: Sequence[int], groups: Sequence[str | None], fractions: Sequence[float], seed: int
) -> list[str]:
    """Seeded split of whole patients: every eye of a group gets its group's split.

    Patients are stratified by their most severe label (the highest class index of their eyes);
    an eye with no group is a patient of its own. Eye counts per split then follow the fractions
    up to the size of one patient.
    """
    labels = np.asarray(labels)
    keys = [g if g is not None else f"\0eye{i}" for i, g in enumerate(groups)]
    order = list(dict.fromkeys(keys))  # first appearance: stable across runs
    index = {k: i for i, k in enumerate(order)}
    member = np.array([index[k] for k in keys])
    group_label = np.full(len(order), -1)
    np.maximum.at(group_label, member, labels)
    group_split = np.asarray(stratified_split(group_label.tolist(), fractions, seed), dtype=object)
    return group_split[member].tolist()


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
            from rima_core.core.data.sources import detect_source

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
