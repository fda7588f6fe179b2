"""What a request to the served model may ask for, and how one cell becomes an image array.

A served model is reachable by anyone who can reach its port, so a request is checked before any
pixel is decoded: the row and size limits (:class:`Limits`, from ``RIMA_SERVE_*`` /
``RIMA_PREDICT_*``), which file paths it may name (:class:`InputPolicy`), and what a ``fundus`` /
``oct`` cell may hold (:func:`decode`: a nested array, or a file path where the policy allows).
Every refusal is an :class:`InputError` naming the row; a refused file gets one neutral message
on the server (the detail goes to its log only).

Apart from :mod:`rima_core.ops.serving` (which re-exports these names) because this is the request's
trust boundary, with no model in it: the predictor and the MLflow wrapper build on it.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.core.data import safe_read
from rima_core.core.data.pixels import as_fundus, as_oct
from rima_core.core.data.safe_read import (
    UnsafeInputError,
    npz_keys,
    read_image,
    read_nifti,
    read_npz,
)
from rima_core.core.data.sources.fairvision import FUNDUS_KEY, OCT_KEY
from rima_core.core.data.sources.gamma import bscan_files
from rima_core.core.data.sources.rima_folders import NIFTI_TO_DHW
from rima_core.core.data.types import CaseError, ReadLimits

# the serving logger: these lines are the server's, as before this module was split from it
log = logging.getLogger("rima_core.ops.serving")

_FUNDUS_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


# --- what a request may ask for: limits and the file policy ----------------------------------

# Environment variables, one name per limit; ``{prefix}`` is RIMA_SERVE_ (the HTTP server, i.e.
# the pyfunc) or RIMA_PREDICT_ (``rima predict`` on local files). docs/security.md lists
# them (a test checks it names every one).
ENV_FILE_ROOT = "RIMA_SERVE_FILE_ROOT"
SERVE_PREFIX = "RIMA_SERVE_"
PREDICT_PREFIX = "RIMA_PREDICT_"
_LIMIT_ENV = {
    "max_rows": "MAX_ROWS",
    "max_fundus_elements": "MAX_FUNDUS_ELEMENTS",
    "max_oct_elements": "MAX_OCT_ELEMENTS",
}


@dataclass(frozen=True)
class Limits:
    """Per-request caps. ``max_rows`` None = no cap (the CLI grades a table batch by batch).

    Elements are numbers in one image (H×W×C or D×H×W), counted before a nested JSON list is
    turned into an array and, for files, checked from headers before pixels are decoded.
    """

    max_rows: int | None
    max_fundus_elements: int
    max_oct_elements: int

    @classmethod
    def from_env(cls, prefix: str, defaults: Limits) -> Limits:
        """``defaults`` overridden by ``{prefix}MAX_ROWS`` etc.; a bad value names the variable."""
        values: dict[str, int | None] = {}
        for field_name, suffix in _LIMIT_ENV.items():
            name = prefix + suffix
            raw = os.environ.get(name, "").strip()
            if not raw:
                values[field_name] = getattr(defaults, field_name)
                continue
            try:
                value = int(raw)
            except ValueError:
                value = 0
            if value < 1:
                raise ValueError(f"{name}={raw!r}: expected a positive integer")
            values[field_name] = value
        return cls(**values)  # type: ignore[arg-type]

    def of(self, modality: str) -> int:
        return self.max_fundus_elements if modality == "fundus" else self.max_oct_elements


# The HTTP server takes nested JSON arrays, held as Python lists (~8 bytes per number) before
# any check can run: the defaults allow a 1024×1024 RGB fundus and a 128³ OCT, well above the
# model's input size (images are resized to fundus_size / oct_shape anyway).
SERVE_LIMITS = Limits(max_rows=32, max_fundus_elements=1024 * 1024 * 3, max_oct_elements=128**3)
# Local files of a trusted user: room for full-size scans (a GAMMA OCT is 256×512×992).
PREDICT_LIMITS = Limits(max_rows=None, max_fundus_elements=1 << 27, max_oct_elements=1 << 28)


@dataclass(frozen=True)
class InputPolicy:
    """Which file paths a request may name, and the limits.

    ``file_root`` None and ``any_path`` False: file paths are refused (arrays only), the HTTP
    default. With a root, a path (relative to the root, or absolute) is resolved — symlinks and
    ``..`` included — and must lie inside it. ``any_path`` is the local CLI: the user's own
    files, with detailed reasons; the server answers every file failure with one neutral
    message, so a client learns nothing about files outside what it may read.
    """

    limits: Limits
    file_root: Path | None = None
    any_path: bool = False

    @classmethod
    def server(cls) -> InputPolicy:
        """The pyfunc's policy, from ``RIMA_SERVE_FILE_ROOT`` and ``RIMA_SERVE_MAX_*``."""
        limits = Limits.from_env(SERVE_PREFIX, SERVE_LIMITS)
        raw = os.environ.get(ENV_FILE_ROOT, "").strip()
        if not raw:
            return cls(limits)
        root = Path(raw).expanduser()
        if not root.is_absolute() or not root.is_dir():
            raise ValueError(f"{ENV_FILE_ROOT}={raw!r}: expected the absolute path of a folder")
        return cls(limits, file_root=root.resolve(strict=True))

    @classmethod
    def local(cls) -> InputPolicy:
        """Local use (``rima predict``, :class:`Predictor` from Python): any path, big limits."""
        return cls(Limits.from_env(PREDICT_PREFIX, PREDICT_LIMITS), any_path=True)

    @property
    def files_allowed(self) -> bool:
        return self.any_path or self.file_root is not None


class InputError(ValueError):
    """A request row that cannot be graded; the message names the row and the reason."""


class ModelOutputError(InputError):
    """The model's output for some rows is not finite (NaN/inf): an error, never a grade."""


class _FileRefused(Exception):
    """A file a request named could not be used; ``detail`` is for the server log only."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


_NEUTRAL = (
    "{row}: {modality} file cannot be read (it is missing, outside the server's allowed folder, "
    "unreadable, too large or not a supported file)"
)


# --- decoding one cell -----------------------------------------------------------------------


def is_missing(value: Any) -> bool:
    """None, NaN, pd.NA and "" mean "this eye has no such image"."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _inside(path: Path, policy: InputPolicy) -> Path:
    """``path`` resolved (symlinks, ``..``) and, on the server, required to lie in the root."""
    try:
        if policy.any_path:
            return path.resolve(strict=True)
        root = policy.file_root
        if root is None:  # decode() refuses paths before this; kept for any other caller
            raise _FileRefused("file paths are not allowed")
        real = (path if path.is_absolute() else root / path).resolve(strict=True)
    except FileNotFoundError:
        raise _FileRefused("does not exist") from None
    except (OSError, RuntimeError, ValueError) as exc:  # loop, NUL byte, name too long
        raise _FileRefused(f"cannot be resolved ({exc})") from None
    if not policy.any_path and not real.is_relative_to(root):
        raise _FileRefused(f"resolves to {real}, outside {root}")
    return real


def _npz_array(path: Path, key: str, max_bytes: int, root: Path | None = None) -> np.ndarray:
    """The ``key`` array of a FairVision-style npz, or its only image-like array."""

    keys = npz_keys(path, root=root)
    if key in keys:
        return read_npz(path, max_bytes=max_bytes, keys=[key], root=root)[key]
    arrays = {
        k: a for k, a in read_npz(path, max_bytes=max_bytes, root=root).items() if a.ndim >= 2
    }
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise _FileRefused(f"has no '{key}' array and not exactly one image array ({keys})")


def _read_file(path: Path, modality: str, policy: InputPolicy) -> np.ndarray:
    """One fundus/OCT file (or B-scan folder) through the restricted readers, within limits."""

    limit = policy.limits.of(modality)
    max_bytes = limit * 8  # float64 data of the largest allowed image
    real = _inside(path, policy)
    # The name check above is a first filter; what counts is the descriptor each reader opens:
    # a regular file (a FIFO is refused without waiting for a writer) whose real path lies in
    # the root, so a folder swapped for a symlink after _inside cannot redirect the read.
    root = None if policy.any_path else policy.file_root
    name = real.name.lower()
    if modality == "fundus" and name.endswith(_FUNDUS_IMAGE_SUFFIXES):
        return safe_read.read_image(real, max_pixels=limit, root=root)
    if name.endswith(".npy"):
        return safe_read.read_npy(real, max_bytes=max_bytes, root=root)
    if name.endswith(".npz"):
        key = FUNDUS_KEY if modality == "fundus" else OCT_KEY
        return _npz_array(real, key, max_bytes, root)
    if modality == "oct" and name.endswith((".nii", ".nii.gz")):
        return _nifti_dhw(real, limit, max_bytes, root)
    if modality == "oct" and real.is_dir():
        return _bscan_folder(real, limit, policy)
    raise _FileRefused(
        f"has an unsupported type for {modality} (fundus: "
        f"{', '.join(_FUNDUS_IMAGE_SUFFIXES)}, .npy, .npz; OCT: .nii, .nii.gz, .npy, .npz or a "
        "folder of <n>_image B-scans)"
    )


def _nifti_dhw(path: Path, limit: int, max_bytes: int, root: Path | None = None) -> np.ndarray:
    """A NIfTI volume in the D×H×W order ``prepare`` uses for the RIMA folders."""

    data = read_nifti(path, max_bytes=max_bytes, max_voxels=limit, root=root)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return np.transpose(data, NIFTI_TO_DHW) if data.ndim == 3 else data


def _bscan_folder(folder: Path, limit: int, policy: InputPolicy) -> np.ndarray:
    """A GAMMA-style folder of ``<n>_image.jpg`` B-scans; each file must pass ``_inside`` too."""

    scans, total = [], 0
    root = None if policy.any_path else policy.file_root
    for f in bscan_files(folder):
        scan = read_image(_inside(f, policy), max_pixels=max(limit - total, 1), mode="L", root=root)
        total += scan.size
        if total > limit:
            raise _FileRefused(f"B-scans hold more than {limit} pixels")
        scans.append(scan)
    if not scans:
        raise _FileRefused("holds no <n>_image.jpg B-scans")
    if len({s.shape for s in scans}) != 1:
        raise _FileRefused("B-scans differ in size")
    return np.stack(scans, axis=0)


def _reason(exc: Exception) -> str:
    """The reason of a file failure without the path (the caller names the file once)."""
    if isinstance(exc, _FileRefused):
        return exc.detail
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(getattr(exc, "reason", None) or exc)


def _claimed_size(value: Any, depth: int = 5) -> int:
    """Elements a nested list claims, following first items (no array built yet)."""
    if isinstance(value, np.ndarray):
        if value.dtype != object:
            return int(value.size)
        n = int(value.size)
        return n * (_claimed_size(value.flat[0], depth - 1) if n and depth else 1)
    if isinstance(value, list | tuple):
        n = len(value)
        return n * (_claimed_size(value[0], depth - 1) if n and depth else 1)
    return 1


def _env_name(policy: InputPolicy, field_name: str) -> str:
    """The variable that sets ``field_name`` of ``policy.limits`` (for refusal messages)."""
    return (PREDICT_PREFIX if policy.any_path else SERVE_PREFIX) + _LIMIT_ENV[field_name]


def _check_size(n: int, modality: str, row: str, policy: InputPolicy) -> None:
    limit = policy.limits.of(modality)
    if n > limit:
        setting = _env_name(policy, f"max_{modality}_elements")
        raise InputError(
            f"{row}: {modality} has {n} elements, over the limit of {limit} per image "
            f"({setting}); send it resized to about the model's input size"
        )


def decode(
    value: Any, modality: str, row: str, policy: InputPolicy | None = None
) -> np.ndarray | None:
    """A cell -> uint8 pixels (fundus H×W[×3], OCT D×H×W), or None when the cell is empty.

    Arrays follow the source loaders' rules (uint8 kept, 0..1 floats scaled by 255, other ranges
    min-max scaled): the same ``as_fundus`` / ``as_oct`` checks reject a wrong rank here as in
    ``prepare``. File paths are read only as ``policy`` allows (default: :meth:`InputPolicy.local`).
    """

    policy = policy or InputPolicy.local()
    if is_missing(value):
        return None
    if isinstance(value, str | os.PathLike):
        if not policy.files_allowed:
            raise InputError(
                f"{row}: {modality} is a file path, but this server takes arrays only (nested "
                f"lists of pixel values); an operator may allow files under {ENV_FILE_ROOT}"
            )
        try:
            arr = _read_file(Path(value), modality, policy)
        except (_FileRefused, UnsafeInputError, CaseError, OSError, ValueError) as exc:
            detail = _reason(exc)
            if policy.any_path:
                raise InputError(f"{row}: {modality} file {value}: {detail}") from None
            log.warning("%s: %s file %r refused: %s", row, modality, str(value)[:300], detail)
            raise InputError(_NEUTRAL.format(row=row, modality=modality)) from None
    else:
        _check_size(_claimed_size(value), modality, row, policy)
        try:
            arr = _dense(value)
        except (ValueError, TypeError) as exc:  # ragged or non-numeric nested lists
            raise InputError(f"{row}: {modality} is not a rectangular array: {exc}") from None
    _check_size(int(arr.size), modality, row, policy)
    try:
        out = as_fundus(arr, row, "input") if modality == "fundus" else as_oct(arr, row, "input")
    except CaseError as exc:
        raise InputError(f"{row}: {modality}: {exc.reason}") from None
    except (ValueError, TypeError) as exc:  # e.g. a complex dtype
        raise InputError(f"{row}: {modality} has unusable values ({exc})") from None
    _check_shape(out, modality, row)
    return out


def _check_shape(arr: np.ndarray, modality: str, row: str) -> None:
    """The minimum sizes ``prepare`` applies (``prepare.min_fundus_size`` / ``min_oct_size``):
    an eye the store would refuse is not graded either."""

    limits = ReadLimits()
    if modality == "fundus" and min(arr.shape[:2]) < limits.min_fundus_size:
        raise InputError(
            f"{row}: fundus of shape {arr.shape} is below the minimum side of "
            f"{limits.min_fundus_size} pixels (as prepare.min_fundus_size)"
        )
    if modality == "oct" and min(arr.shape) < limits.min_oct_size:
        raise InputError(
            f"{row}: oct of shape {arr.shape} is below the minimum axis of "
            f"{limits.min_oct_size} (as prepare.min_oct_size)"
        )


def _dense(value: Any) -> np.ndarray:
    """Nested lists, or Parquet's object arrays of arrays, as one dense numeric array."""
    arr = np.asarray(value)
    if arr.dtype != object:
        return arr
    if arr.ndim == 0:
        raise TypeError(f"{type(value).__name__} is not an array")
    return np.stack([_dense(v) for v in arr])


def _row_name(index: Any, case_id: Any) -> str:
    if is_missing(case_id):
        return f"row {index}"
    text = str(case_id)
    return f"row {index} (case_id {text[:64]}{'...' if len(text) > 64 else ''})"
