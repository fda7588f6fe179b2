"""The records that flow from a source loader into the store.

Loaders work in two phases so that ``prepare`` can decode in parallel: ``scan`` lists cases
cheaply (ids, paths, any label/split known from a sheet or folder) and ``load`` decodes one case
into pixels. Both raise :class:`CaseError` naming the case, so a bad eye is reported (or
quarantined with ``--skip-bad``) instead of crashing half-way through a store.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "val", "test")


_CONTROL = {i: f"\\x{i:02x}" for i in (*range(32), 127)}


def printable(text: object) -> str:
    """``text`` safe to log, print or write as UTF-8, on one line.

    A file name that is not valid UTF-8 reaches Python as lone surrogates (``\\udcff``), which
    make logging, ``print`` and Arrow raise ``UnicodeEncodeError``; they are shown escaped, and
    so are control characters (a file name may hold a newline).
    """
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8").translate(_CONTROL)


def one_line(text: object) -> str:
    """A library's multi-line message as one printable line (line breaks become spaces)."""
    return printable(re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip())


def is_utf8(text: str) -> bool:
    """Whether ``text`` (a file name, a case id) encodes to UTF-8 as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class CaseError(ValueError):
    """A single case that cannot be read; ``str()`` names the case, the file and the reason."""

    def __init__(self, case_id: str, reason: str, path: str | None = None) -> None:
        self.case_id = printable(case_id)
        self.reason = one_line(reason)
        self.path = None if path is None else printable(path)
        where = f" ({self.path})" if path else ""
        super().__init__(f"case {self.case_id}{where}: {self.reason}")


class SourceError(ValueError):
    """A source tree that cannot be read as a whole (wrong layout, missing label sheet, ...)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(one_line(message))


@dataclass(frozen=True)
class ReadLimits:
    """How much one case's files may hold before they are refused (``prepare.*`` settings).

    Why: source files come from outside; without caps a 60 KB npz inflates to gigabytes, a PNG
    header claims gigapixels and a 1×1×1 volume slips through as an "eye". Loaders read them via
    :func:`read_limits` (set per worker process by ``prepare``), so the loader contract
    ``load(ref, disease)`` stays unchanged for custom source modules.
    """

    max_file_bytes: int = 1 << 30  # decompressed bytes per file (npz members together, NIfTI)
    max_image_pixels: int = 1 << 26  # per 2-D image (fundus, one B-scan)
    max_volume_voxels: int = 1 << 28  # per OCT volume (GAMMA: 256 × 992 × 512 = 130 M)
    min_fundus_size: int = 8  # each side of a fundus, pixels
    min_oct_size: int = 2  # each axis of an OCT volume


_LIMITS: list[ReadLimits] = [ReadLimits()]


def read_limits() -> ReadLimits:
    """The limits in force in this process."""
    return _LIMITS[-1]


def set_read_limits(limits: ReadLimits) -> None:
    """Set this process's limits (worker initialiser)."""
    _LIMITS[:] = [limits]


@contextlib.contextmanager
def using_read_limits(limits: ReadLimits) -> Iterator[ReadLimits]:
    """Apply ``limits`` in this process for the duration of a ``with`` block."""
    _LIMITS.append(limits)
    try:
        yield limits
    finally:
        _LIMITS.pop()


@dataclass(frozen=True)
class CaseRef:
    """What ``scan`` knows about a case before decoding it. Must be picklable."""

    case_id: str
    paths: dict[str, str]  # role -> file path, e.g. {"npz": ...} or {"fundus": ..., "oct_dir": ...}
    label: int | None = None  # known from a sheet/folder; None when only the file holds it
    split: str | None = None  # train/val/test when the source has a split, else None
    # Set by ``scan`` for a case it already knows is bad (duplicate folder, bad sheet row):
    # ``prepare`` reports or quarantines it like a decoding failure instead of aborting the scan.
    problem: str | None = None


@dataclass
class RawCase:
    """One decoded eye, before resizing. Either modality may be absent (None), never both."""

    case_id: str
    label: int
    split: str | None
    fundus: np.ndarray | None  # H×W (grey) or H×W×3, uint8
    oct: np.ndarray | None  # D×H×W (B-scans first), uint8
    attributes: dict[str, Any] = field(default_factory=dict)
