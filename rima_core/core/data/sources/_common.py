"""Helpers shared by the source loaders: the scan result, folder scans and label sheets (pixel
decoding, shared with serving, is in rima_core/core/data/pixels.py).

Every loader must turn the same kinds of damage (unreadable file, wrong rank, odd dtype,
malformed label sheet) into the same :class:`CaseError` / :class:`SourceError` messages, so
these live in one place rather than three slightly different copies.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rima_core.core.data import safe_read
from rima_core.core.data.types import CaseError, CaseRef, SourceError, read_limits

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

# Folder spellings seen across copies of the datasets -> the store's split names.
_SPLIT_ALIASES = {
    "training": "train",
    "train": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class ScanResult:
    """What a source holds, before any pixel is decoded (see docs/interfaces.md)."""

    class_names: list[str]
    cases: list[CaseRef]
    source: str
    disease: str | None = None
    notes: list[str] = field(default_factory=list)  # lenient fixes worth reporting


def split_of(folder_name: str) -> str | None:
    """``Training`` / ``train`` / ``training`` -> ``train`` (etc.); None for other names."""
    return _SPLIT_ALIASES.get(folder_name.strip().lower())


def child_dir(parent: Path, *names: str) -> Path | None:
    """The first child directory whose name matches one of ``names`` case-insensitively."""
    if not parent.is_dir():
        return None
    wanted = [n.lower() for n in names]
    children = {c.name.lower(): c for c in sorted(parent.iterdir()) if c.is_dir()}
    for name in wanted:
        if name in children:
            return children[name]
    return None


def is_entry(path: Path) -> bool:
    """A file-system entry a loader should read: a regular file, and also a FIFO, socket or
    device (which the readers then refuse, naming the case) rather than silently skipping it
    as a missing image; not a folder, not a dangling link."""
    try:
        return path.exists() and not path.is_dir()
    except OSError:
        return False


def read_image(path: Path, case_id: str, mode: str | None = None) -> np.ndarray:
    """Decode one image file fully (truncation is detected here, not later in a worker).

    Goes through :func:`rima_core.core.data.safe_read.read_image`, so the pixel cap
    (``prepare.max_image_pixels``) is checked from the header before any pixel is decoded.
    """
    try:
        return safe_read.read_image(path, max_pixels=read_limits().max_image_pixels, mode=mode)
    except safe_read.UnsafeInputError as exc:
        raise CaseError(case_id, exc.reason, str(path)) from exc


def ascii_int(name: str) -> int | None:
    """``"0042"`` -> 42; None for anything else. ``str.isdigit`` is not enough: ``"²"`` and
    other Unicode digits pass it and then break ``int()``."""
    return int(name) if name.isascii() and name.isdigit() else None


def case_folders(images: Path, problems: dict[int, str]) -> dict[int, Path]:
    """The case folders under ``images``: integer id -> folder, for folder names of ASCII digits.

    Two folders with one id (``7`` and ``007``) make that eye a problem, recorded in
    ``problems`` (id -> reason) for ``prepare`` to report or quarantine; the first is kept.
    """
    folders: dict[int, Path] = {}
    for child in sorted(images.iterdir()):
        key = ascii_int(child.name)
        if key is None or not child.is_dir():
            continue
        if key in folders:
            problems.setdefault(key, f"duplicate id: folders {folders[key].name} and {child.name}")
            continue
        folders[key] = child
    return folders


_INT_RE = re.compile(r"^\s*(\d+)(?:\.0*)?\s*$")


def _as_int_id(value: object) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return int(value) if float(value).is_integer() else None
    m = _INT_RE.match(str(value))
    return int(m.group(1)) if m else None


def read_onehot_sheet(
    path: Path,
    id_column: str = "data",
    class_columns: list[str] | None = None,
    case_name: Callable[[int], str] = str,
    bad: dict[int, str] | None = None,
) -> tuple[list[str], dict[int, int]]:
    """Read a label sheet ``id_column`` + one-hot class columns -> (class names, id -> grade).

    ``class_columns`` (normalised: lower case, ``-``/space -> ``_``) pins the expected columns;
    otherwise every column after the id column is a class, in sheet order. ``case_name`` turns
    the sheet's integer id into the case id used in error messages (GAMMA pads it to 4 digits).
    A row whose values have no unique maximum (all zero, blank, tie) has no defined argmax and
    is rejected.

    With ``bad`` given, a row that is wrong on its own (no unique maximum, non-numeric values,
    a repeated id) is recorded there (id -> reason) instead of raising, so ``prepare
    --skip-bad`` can quarantine that eye and keep the others; a repeated id keeps no label.
    """
    df = _load_sheet(path)
    id_col, cols, names = _sheet_columns(df, path, id_column, class_columns)
    labels = _sheet_labels(df, path, id_col, cols, case_name, bad)
    if not labels and not (bad or {}):
        raise SourceError(f"{path}: the label sheet has no rows")
    return names, labels


def _load_sheet(path: Path) -> pd.DataFrame:
    """The first sheet of the workbook at ``path``, every failure a :class:`SourceError`."""
    import pandas as pd

    try:
        with safe_read.open_regular(path) as fh:  # a FIFO named like the sheet must not hang
            return pd.read_excel(fh, engine="openpyxl")
    except safe_read.UnsafeInputError as exc:
        raise SourceError(f"{exc}") from exc
    except Exception as exc:  # openpyxl raises a zoo of types for broken workbooks
        raise SourceError(f"{path}: cannot read the label sheet: {exc}") from exc


def _sheet_columns(
    df: pd.DataFrame, path: Path, id_column: str, class_columns: list[str] | None
) -> tuple[Any, list[Any], list[str]]:
    """The sheet's id column, its one-hot class columns and the class names they stand for."""
    norm = {c: re.sub(r"[\s\-]+", "_", str(c).strip().lower()) for c in df.columns}
    by_norm = {v: k for k, v in norm.items()}
    if id_column not in by_norm:
        raise SourceError(f"{path}: no '{id_column}' column; columns are {list(df.columns)}")
    id_col = by_norm[id_column]
    if class_columns is not None:
        missing = [c for c in class_columns if c not in by_norm]
        if missing:
            raise SourceError(
                f"{path}: missing one-hot column(s) {missing}; "
                f"expected {[id_column, *class_columns]}, found {list(df.columns)}"
            )
        cols = [by_norm[c] for c in class_columns]
        names = list(class_columns)
    else:
        pos = list(df.columns).index(id_col)
        cols = [c for c in df.columns[pos + 1 :] if not str(c).startswith("Unnamed")]
        names = [str(c).strip() for c in cols]
        if len(cols) < 2:
            raise SourceError(f"{path}: need at least two one-hot class columns after '{id_col}'")
    return id_col, cols, names


def _sheet_labels(
    df: pd.DataFrame,
    path: Path,
    id_col: Any,
    cols: list[Any],
    case_name: Callable[[int], str],
    bad: dict[int, str] | None,
) -> dict[int, int]:
    """id -> grade of every well-formed row; a row wrong on its own raises, or with ``bad``
    is recorded there (see :func:`read_onehot_sheet`)."""
    import pandas as pd

    def row_problem(case_int: int, reason: str) -> None:
        if bad is None:
            raise CaseError(case_name(case_int), reason, str(path))
        bad.setdefault(case_int, reason)

    labels: dict[int, int] = {}
    seen: set[int] = set()
    for row_no, (raw_id, values) in enumerate(
        zip(df[id_col].tolist(), df[cols].to_numpy(), strict=True), start=2
    ):
        if raw_id is None or (isinstance(raw_id, float) and np.isnan(raw_id)):
            if pd.isna(values).all():
                continue  # trailing blank row
            raise SourceError(f"{path}: row {row_no} has labels but no id")
        case_int = _as_int_id(raw_id)
        if case_int is None:
            raise SourceError(f"{path}: row {row_no}: id {raw_id!r} is not an integer")
        if case_int in labels or case_int in seen:
            row_problem(case_int, f"duplicate id in the label sheet (row {row_no})")
            labels.pop(case_int, None)
            continue
        seen.add(case_int)
        try:
            vec = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            row_problem(case_int, f"non-numeric one-hot values {list(values)} (row {row_no})")
            continue
        if np.isnan(vec).any() or vec.max() <= 0 or (vec == vec.max()).sum() != 1:
            row_problem(case_int, f"label row {list(values)} has no unique maximum (row {row_no})")
            continue
        labels[case_int] = int(vec.argmax())
    return labels
