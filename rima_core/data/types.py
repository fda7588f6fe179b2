"""The records that flow from a source loader into the store.

Loaders work in two phases so that ``prepare`` can decode in parallel: ``scan`` lists cases
cheaply (ids, paths, any label/split known from a sheet or folder) and ``load`` decodes one case
into pixels. Both raise :class:`CaseError` naming the case, so a bad eye is reported (or
quarantined with ``--skip-bad``) instead of crashing half-way through a store.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")


class CaseError(ValueError):
    """A single case that cannot be read; ``str()`` names the case, the file and the reason."""

    def __init__(self, case_id: str, reason: str, path: str | None = None) -> None:
        self.case_id = case_id
        self.reason = reason
        self.path = path
        where = f" ({path})" if path else ""
        super().__init__(f"case {case_id}{where}: {reason}")


class SourceError(ValueError):
    """A source tree that cannot be read as a whole (wrong layout, missing label sheet, ...)."""


@dataclass(frozen=True)
class CaseRef:
    """What ``scan`` knows about a case before decoding it. Must be picklable."""

    case_id: str
    paths: dict[str, str]  # role -> file path, e.g. {"npz": ...} or {"fundus": ..., "oct_dir": ...}
    label: int | None = None  # known from a sheet/folder; None when only the file holds it
    split: str | None = None  # train/val/test when the source has a split, else None


@dataclass
class RawCase:
    """One decoded eye, before resizing. Either modality may be absent (None), never both."""

    case_id: str
    label: int
    split: str | None
    fundus: np.ndarray | None  # H×W (grey) or H×W×3, uint8
    oct: np.ndarray | None  # D×H×W (B-scans first), uint8
    attributes: dict[str, Any] = field(default_factory=dict)
