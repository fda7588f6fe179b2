"""Pixel arrays as the store keeps them: fundus H×W[×3] and OCT D×H×W, uint8.

One set of rules for every way pixels come in (the source loaders in ``prepare``, arrays and
files sent to the served model), so a wrong rank or an odd dtype is rejected with the same
message wherever it shows up.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rima_core.core.data.types import CaseError

log = logging.getLogger(__name__)


def to_uint8(arr: np.ndarray, case_id: str, path: str | Path, what: str) -> np.ndarray:
    """Bring pixel data to uint8 without changing what an 8-bit export would have held.

    Rules, in order: uint8 is kept; values already within 0..255 (integers, or floats that are
    not all within 0..1) are rounded; floats within 0..1 are multiplied by 255; anything else
    (16-bit scanners, signed or calibrated NIfTI) is min-max scaled to 0..255 per array.
    Non-finite values are an error: they mean a broken export, not a dark pixel.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == bool or arr.size == 0:
        raise CaseError(
            case_id, f"{what} has unusable dtype {arr.dtype} / size {arr.size}", str(path)
        )
    if arr.dtype.kind not in "iuf":  # complex would silently lose its imaginary part
        raise CaseError(case_id, f"{what} is not real numeric (dtype {arr.dtype})", str(path))
    data = arr.astype(np.float64, copy=False)
    if not np.isfinite(data).all():
        raise CaseError(case_id, f"{what} contains NaN or infinite values", str(path))
    lo, hi = float(data.min()), float(data.max())
    is_int = np.issubdtype(arr.dtype, np.integer)
    if lo >= 0.0 and hi <= 255.0 and (is_int or hi > 1.0):
        return np.rint(data).astype(np.uint8)
    if lo >= 0.0 and hi <= 1.0:
        return np.rint(data * 255.0).astype(np.uint8)
    if hi == lo:
        return np.zeros(arr.shape, np.uint8)
    log.debug("case %s: %s min-max scaled from [%g, %g] to uint8", case_id, what, lo, hi)
    return np.rint((data - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def as_fundus(arr: np.ndarray, case_id: str, path: str | Path) -> np.ndarray:
    """A fundus as H×W (grey) or H×W×3 uint8; reject anything that is not an image."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]  # drop alpha
    elif a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels-first export
        if a.shape[-1] == 1:
            a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)):
        raise CaseError(
            case_id,
            f"fundus has shape {a.shape}; expected H×W (grey) or H×W×3 (rank 2 or 3)",
            str(path),
        )
    if min(a.shape[:2]) < 2:
        raise CaseError(case_id, f"fundus has degenerate shape {a.shape}", str(path))
    return np.ascontiguousarray(to_uint8(a, case_id, path, "fundus"))


def as_oct(arr: np.ndarray, case_id: str, path: str | Path) -> np.ndarray:
    """An OCT volume as D×H×W uint8 (B-scans first); reject other ranks."""
    a = np.asarray(arr)
    while a.ndim > 3 and a.shape[-1] == 1:  # e.g. NIfTI with a trailing singleton time axis
        a = a[..., 0]
    if a.ndim != 3:
        raise CaseError(
            case_id,
            f"OCT volume has rank {a.ndim} (shape {a.shape}); expected 3 (D×H×W)",
            str(path),
        )
    if min(a.shape) < 1:
        raise CaseError(case_id, f"OCT volume has an empty axis (shape {a.shape})", str(path))
    return np.ascontiguousarray(to_uint8(a, case_id, path, "OCT volume"))
