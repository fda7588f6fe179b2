"""``prepare``: a source tree -> the Arrow store (``tensors.arrow`` + ``manifest.parquet``).

scan (cheap, main process) -> decode + resize (worker processes) -> ordered streaming write ->
split -> manifest, all inside :func:`rima_core.atomic.atomic_dir`, so a failure leaves the previous
store (or nothing), never a partial one.

Reproducibility: cases are written in case-id order, results are consumed in submission order,
resizing is per-output-element arithmetic (no thread-count-dependent reductions), and the split is
drawn from ``cfg.seed`` — the store is byte-identical whatever ``cfg.workers`` is.
"""

from __future__ import annotations

import importlib
import json
import logging
import multiprocessing
import zipfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from rima_core.atomic import atomic_dir
from rima_core.config import ConfigError, PrepareConfig
from rima_core.data.store import StoreWriter, rows_per_batch, split_counts, write_manifest
from rima_core.data.types import SPLITS, CaseError, CaseRef, RawCase, SourceError

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"
# What a damaged file raises inside a loader that did not translate it into a CaseError itself.
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, IndexError, zipfile.BadZipFile)


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


def resolve_source(name: str) -> ModuleType:
    """A registered source name (``fairvision``, ``gamma``, ``rima``) or a dotted module path.

    The module path lets a group plug in its own export format (any module with ``scan`` and
    ``load``) without editing this package.
    """
    if "." in name:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise SourceError(f"source module {name!r} cannot be imported: {exc}") from exc
        if not all(callable(getattr(module, f, None)) for f in ("scan", "load")):
            raise SourceError(f"source module {name!r} must define scan() and load()")
        return module
    from rima_core.data.sources import get_source

    return get_source(name)


def _first_path(ref: CaseRef) -> str | None:
    return next(iter(ref.paths.values()), None) if ref.paths else None


def check_raw_case(raw: RawCase, ref: CaseRef, n_classes: int) -> None:
    """Reject a decoded case the store cannot hold, naming the reason (raises CaseError)."""
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
    if raw.fundus is not None and raw.fundus.ndim == 3 and raw.fundus.shape[2] not in (1, 3):
        raise CaseError(
            ref.case_id, f"fundus has {raw.fundus.shape[2]} channels, expected 1 or 3", path
        )


def _decode(task: _Task) -> _Decoded | _Failed:
    """Load, check and resize one case; errors come back as values so the parent decides."""
    ref = task.ref
    try:
        raw = resolve_source(task.source).load(ref, task.disease)
        check_raw_case(raw, ref, task.n_classes)
        fundus = None if raw.fundus is None else resize_fundus(raw.fundus, task.fundus_size)
        oct = None if raw.oct is None else resize_oct(raw.oct, task.oct_shape)
    except CaseError as exc:
        return _Failed(exc.case_id, exc.path or _first_path(ref), exc.reason)
    except _READ_ERRORS as exc:
        return _Failed(ref.case_id, _first_path(ref), f"unreadable: {type(exc).__name__}: {exc}")
    split = raw.split if raw.split is not None else ref.split
    return _Decoded(ref.case_id, int(raw.label), split, fundus, oct, dict(raw.attributes))


def _worker_init() -> None:
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
        max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_worker_init
    )
    pending: deque[Future] = deque()
    it: Iterable[_Task] = iter(tasks)
    try:
        for task in it:
            pending.append(pool.submit(_decode, task))
            if len(pending) >= in_flight:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)  # type: ignore[call-overload]
            if nxt is not None:
                pending.append(pool.submit(_decode, nxt))
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


def prepare_store(
    source: str,
    input_dir: Path,
    out: Path,
    cfg: PrepareConfig,
    disease: str = "auto",
    skip_bad: bool = False,
) -> dict[str, Any]:
    """Build the store at ``out`` from the source tree ``input_dir``; returns a summary.

    A bad case raises its :class:`CaseError` and leaves no store behind (an existing store at
    ``out`` is kept). With ``skip_bad`` the bad cases are listed in ``<out>/quarantine.json``
    (case_id, path, reason) and the rest are written.
    """
    input_dir, out = Path(input_dir), Path(out)
    if not input_dir.exists():
        raise FileNotFoundError(f"{input_dir}: input directory does not exist")
    fundus_size = int(cfg.fundus_size)
    oct_shape = tuple(int(s) for s in cfg.oct_shape)
    if fundus_size < 1 or len(oct_shape) != 3 or min(oct_shape) < 1:
        raise ConfigError(
            f"prepare: fundus_size {cfg.fundus_size} / oct_shape {cfg.oct_shape} are not sizes"
        )
    _check_fractions(cfg.split_fractions)
    if source == "auto":
        from rima_core.data.sources import detect_source

        source = detect_source(input_dir)
    scan = resolve_source(source).scan(input_dir, disease)
    class_names = list(scan.class_names)
    if not scan.cases:
        raise SourceError(f"{input_dir}: the {scan.source} source holds no cases")
    cases = sorted(scan.cases, key=lambda c: c.case_id)
    quarantine: list[dict[str, Any]] = []
    dups = _duplicates(cases)
    if dups:
        cid, refs = next(iter(dups.items()))
        paths = ", ".join(str(_first_path(r)) for r in refs)
        if not skip_bad:
            raise CaseError(cid, f"duplicate case id ({len(refs)} cases: {paths})")
        for cid, refs in dups.items():
            for r in refs:
                quarantine.append(
                    {"case_id": cid, "path": _first_path(r), "reason": "duplicate case id"}
                )
        cases = [c for c in cases if c.case_id not in dups]
    resolved_disease = scan.disease if scan.disease is not None else disease
    # Workers resolve the loader by the name given here (registered name or module path).
    tasks = [
        _Task(source, ref, resolved_disease, len(class_names), fundus_size, oct_shape)
        for ref in cases
    ]
    log.info(
        "prepare: %d cases from %s (%s), %d worker(s) -> %s",
        len(cases),
        input_dir,
        scan.source,
        cfg.workers,
        out,
    )
    fundus_shape = (fundus_size, fundus_size, 3)
    rows: list[_Row] = []
    with atomic_dir(out) as tmp:
        results = _decode_all(tasks, cfg.workers)
        try:
            with StoreWriter(tmp, fundus_shape, oct_shape) as writer:
                for result in tqdm(results, total=len(tasks), desc="prepare", unit="eye"):
                    if isinstance(result, _Failed):
                        if not skip_bad:
                            raise result.error()
                        log.warning("quarantined %s", result.error())
                        quarantine.append(
                            {
                                "case_id": result.case_id,
                                "path": result.path,
                                "reason": result.reason,
                            }
                        )
                        continue
                    writer.append(result.fundus, result.oct)
                    rows.append(_Row.of(result))  # pixels now live in the writer's buffer only
                digest = writer.close()
        finally:
            # Stop the worker pool now, not whenever a traceback holding the generator is freed.
            results.close()
        if not rows:
            raise SourceError(
                f"{input_dir}: all {len(scan.cases)} cases are bad; first: "
                f"{quarantine[0]['case_id']}: {quarantine[0]['reason']}"
            )
        splits = _assign_splits(rows, cfg)
        manifest = _manifest(rows, splits)
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
    counts = manifest["label"].value_counts()
    return {
        "store": str(out),
        "source": scan.source,
        "disease": scan.disease,
        "n_cases": len(manifest),
        "n_quarantined": len(quarantine),
        "class_names": class_names,
        "class_counts": {name: int(counts.get(i, 0)) for i, name in enumerate(class_names)},
        "split_counts": split_counts(manifest),
        "missing_fundus": int((~manifest["has_fundus"]).sum()),
        "missing_oct": int((~manifest["has_oct"]).sum()),
        "content_hash": meta["content_hash"],
        "notes": list(getattr(scan, "notes", [])),
    }


def _assign_splits(rows: list[_Row], cfg: PrepareConfig) -> list[str]:
    """The source's own split when every case has one, else a seeded stratified split."""
    given = [r.split for r in rows]
    if all(s is not None for s in given):
        return [str(s) for s in given]
    if any(s is not None for s in given):
        lacking = [r.case_id for r in rows if r.split is None]
        raise SourceError(
            f"{len(lacking)} of {len(rows)} cases have no split while the others do "
            f"(e.g. {lacking[:3]}); fix the tree or drop the source split for all"
        )
    return stratified_split([r.label for r in rows], cfg.split_fractions, cfg.seed)
