"""RIMA as an ``mlflow.pyfunc`` model: one row per eye in, class probabilities and a grade out.

Why a hand-written pyfunc rather than ``mlflow.pytorch``: MLflow 3 exports torch models with
``torch.export`` from an input example, which freezes the batch size and cannot express "this eye
has no OCT". Here the weights (``model.pt`` from :func:`rima_core.models.save_model`), class names
and config are artifacts, and ``predict`` takes a DataFrame whose ``fundus`` / ``oct`` cells are
nested arrays (or file paths, where an :class:`InputPolicy` allows them), either of which may be
null — the missing-modality path the method exists for. A served model is reachable by anyone who
can reach its port, so by default it reads no files, caps rows and image sizes, refuses unknown
columns and answers every failure with one short line (never a stack trace). Preprocessing
reuses the ``prepare`` resizers and the source checks, so a served eye is seen exactly as a
training eye was.

The package's own source travels with the model (``code_paths``) and the model is logged from
code (no pickled object), so a registry version keeps working after the installed package moves on;
``pip_requirements`` are this package's pins (a bare ``torch`` would pull a multi-GB CUDA build).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

INPUT_COLUMNS = ("case_id", "fundus", "oct")  # case_id is optional and echoed back
ARTIFACT_MODEL = "model"
ARTIFACT_CLASSES = "class_names"
ARTIFACT_CONFIG = "config"
# Distributions the serving code imports (checked by tests against what it really imports).
SERVING_DISTRIBUTIONS = (
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "pillow",
    "nibabel",
    "monai",
    "PyYAML",
    "tqdm",
    "mlflow",
)
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
    from rima_core.data.safe_read import npz_keys, read_npz

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
    from rima_core.data import safe_read
    from rima_core.data.sources.fairvision import FUNDUS_KEY, OCT_KEY

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
    from rima_core.data.safe_read import read_nifti
    from rima_core.data.sources.rima_folders import NIFTI_TO_DHW

    data = read_nifti(path, max_bytes=max_bytes, max_voxels=limit, root=root)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return np.transpose(data, NIFTI_TO_DHW) if data.ndim == 3 else data


def _bscan_folder(folder: Path, limit: int, policy: InputPolicy) -> np.ndarray:
    """A GAMMA-style folder of ``<n>_image.jpg`` B-scans; each file must pass ``_inside`` too."""
    from rima_core.data.safe_read import read_image
    from rima_core.data.sources.gamma import bscan_files

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
    from rima_core.data.pixels import as_fundus, as_oct
    from rima_core.data.safe_read import UnsafeInputError
    from rima_core.data.types import CaseError

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
    from rima_core.data.types import ReadLimits

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


# --- the predictor (no MLflow needed) ----------------------------------------------------------


class Predictor:
    """A loaded model plus the preprocessing ``prepare`` applies; grades DataFrames of eyes."""

    def __init__(self, model: Any, spec: Any, device: str = "cpu", batch_size: int = 16) -> None:
        from rima_core.engine import resolve_device

        self.model = model
        self.spec = spec
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.batch_size = batch_size
        self.class_names = list(spec.class_names) or [str(i) for i in range(spec.n_classes)]
        self.fundus_size = int(spec.fundus_shape[0])
        self.oct_shape = [int(s) for s in spec.oct_shape]

    @classmethod
    def from_file(cls, path: str | Path, device: str = "cpu", batch_size: int = 16) -> Predictor:
        from rima_core.models import load_model

        model, spec = load_model(path)
        return cls(model, spec, device=device, batch_size=batch_size)

    def _tensors(self, fundus: list[np.ndarray | None], oct: list[np.ndarray | None]) -> dict:
        import torch

        from rima_core.data.prepare import resize_fundus, resize_oct

        n = len(fundus)
        h = self.fundus_size
        f = torch.zeros((n, 3, h, h))
        o = torch.zeros((n, 1, *self.oct_shape))
        for i, (fi, oi) in enumerate(zip(fundus, oct, strict=True)):
            if fi is not None:
                img = resize_fundus(fi, h)  # uint8 h×h×3, grey replicated
                chw = torch.from_numpy(np.array(img)).permute(2, 0, 1)
                f[i] = chw.to(torch.float32).div_(255.0)
            if oi is not None:
                vol = resize_oct(oi, self.oct_shape)
                o[i, 0] = torch.from_numpy(np.array(vol)).to(torch.float32).div_(255.0)
        return {
            "fundus": f,
            "oct": o,
            "has_fundus": torch.tensor([x is not None for x in fundus]),
            "has_oct": torch.tensor([x is not None for x in oct]),
            # engine.predict carries labels through; inference never uses them
            "label": torch.full((n,), -1, dtype=torch.int64),
            "index": torch.arange(n, dtype=torch.int64),
        }

    def predict(self, frame: pd.DataFrame, policy: InputPolicy | None = None) -> pd.DataFrame:
        """One output row per input row: ``p_<class>`` probabilities, ``grade``, ``grade_name``
        (and ``case_id`` first when the input has one).

        ``policy`` says which file paths may be read and the size limits; the default is
        :meth:`InputPolicy.local` (a trusted local caller). Columns other than
        :data:`INPUT_COLUMNS` are refused, not ignored: a misspelt ``fundus`` would otherwise
        silently grade the eye as OCT-only.
        """
        from rima_core.engine import NonFiniteOutputError
        from rima_core.engine import predict as run_model

        policy = policy or InputPolicy.local()
        if not isinstance(frame, pd.DataFrame):
            try:
                frame = pd.DataFrame(frame)
            except (ValueError, TypeError) as exc:
                raise InputError(f"input is not a table of eyes: {exc}") from None
        unknown = [str(c) for c in frame.columns if c not in INPUT_COLUMNS]
        if unknown:
            shown = ", ".join(repr(c[:64]) for c in unknown[:10])
            raise InputError(
                f"unexpected column(s) [{shown}{', ...' if len(unknown) > 10 else ''}]; "
                f"expected {list(INPUT_COLUMNS)}"
            )
        if frame.columns.duplicated().any():
            raise InputError("a column appears more than once")
        # MLflow drops optional columns absent from a request instead of adding them back
        frame = frame.reindex(columns=list(INPUT_COLUMNS))
        if frame.empty:
            raise InputError("no rows to predict")
        max_rows = policy.limits.max_rows
        if max_rows is not None and len(frame) > max_rows:
            raise InputError(
                f"{len(frame)} rows in one request; at most {max_rows} are accepted "
                f"({_env_name(policy, 'max_rows')}): split the request"
            )
        names = [_row_name(i, c) for i, c in zip(frame.index, frame["case_id"], strict=True)]
        empty = [n for n, f, o in zip(names, frame["fundus"], frame["oct"], strict=True)
                 if is_missing(f) and is_missing(o)]  # fmt: skip
        if empty:
            raise InputError(
                f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}: neither a fundus "
                "nor an OCT given; at least one modality is required per eye"
            )
        probas, grades = [], []
        for start in range(0, len(frame), self.batch_size):
            part = slice(start, start + self.batch_size)
            rows = zip(
                frame["fundus"].iloc[part], frame["oct"].iloc[part], names[part], strict=True
            )
            decoded = [
                (decode(f, "fundus", n, policy), decode(o, "oct", n, policy)) for f, o, n in rows
            ]
            fundus, oct = [d[0] for d in decoded], [d[1] for d in decoded]
            batch = self._tensors(fundus, oct)
            # logits become probabilities in engine.predict, the one place shared with evaluate
            try:
                preds = run_model(self.model, [batch], self.device, progress=False)
            except NonFiniteOutputError as exc:
                bad = [names[start + int(i)] for i in exc.rows]
                raise ModelOutputError(
                    f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}: the model's output "
                    "is not finite (NaN or infinity); no grade given (check the model file)"
                ) from None
            probas.append(preds.proba)
            grades.append(preds.y_pred)  # the model's decoding (argmax or ordinal)
        proba = np.concatenate(probas)
        out = pd.DataFrame(proba, columns=[f"p_{c}" for c in self.class_names], index=frame.index)
        grade = np.concatenate(grades)
        out["grade"] = grade.astype(np.int64)
        out["grade_name"] = [self.class_names[g] for g in grade]
        if frame["case_id"].notna().any():
            out.insert(0, "case_id", frame["case_id"].to_numpy())
        return out


# --- the MLflow wrapper -----------------------------------------------------------------------


_MAX_REPLY_CHARS = 500


def one_line_reply(message: str) -> str:
    """An error reply of the scoring server as one short line.

    MLflow wraps a model's message as ``Failed to predict data '<the whole input table>'.
    \nError: <message>`` and its parse errors append ``Input: <the request body>``; the reply
    keeps the model's own message (or the first line of MLflow's), never the echoed input.
    """
    text = str(message)
    if "\nError: " in text:
        text = text.rsplit("\nError: ", 1)[-1]
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else "the request could not be read"
    if len(first) > _MAX_REPLY_CHARS:
        first = first[: _MAX_REPLY_CHARS - 3] + "..."
    return first


def _one_line_invocations(original: Any) -> Any:
    """``mlflow.pyfunc.scoring_server.invocations`` with every failure a one-line reply: MLflow's
    messages shortened (:func:`one_line_reply`) and stripped of stack traces, a request nested
    too deeply to parse (a RecursionError in MLflow's JSON decoding, an HTTP 500 otherwise) and
    any other parse failure an HTTP 400 whose details go to the server log."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    def invocations(data: Any, content_type: Any, model: Any, input_schema: Any) -> Any:
        try:
            return original(data, content_type, model, input_schema)
        except MlflowException as exc:
            exc.message = one_line_reply(exc.message)
            exc.json_kwargs = {}  # MLflow puts a "stack_trace" here
            raise
        except RecursionError:
            raise MlflowException(
                "the request is nested too deeply to be a table of eyes", error_code=BAD_REQUEST
            ) from None
        except Exception:
            ref = uuid.uuid4().hex[:12]
            log.exception("request %s: could not be read", ref)
            raise MlflowException(
                f"the request could not be read (reference {ref} in the server log)",
                error_code=BAD_REQUEST,
            ) from None

    invocations.rima_one_line = True  # type: ignore[attr-defined]
    return invocations


def install_one_line_replies() -> bool:
    """Wrap the scoring server's request handler (when this process is one: ``mlflow models
    serve`` imports it before loading the model); True when it is wrapped now or already was."""
    import sys

    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    handler = getattr(server, "invocations", None)
    if handler is None:
        return False
    if not getattr(handler, "rima_one_line", False):
        server.invocations = _one_line_invocations(handler)  # type: ignore[union-attr]
    return True


def pyfunc_class() -> type:
    """The PythonModel subclass, defined on first use so importing this module stays cheap."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    class RimaPyfunc(mlflow.pyfunc.PythonModel):
        """Loads ``model.pt`` once per process; every failure becomes a short HTTP 400.

        The request policy (:meth:`InputPolicy.server`: arrays only unless
        ``RIMA_SERVE_FILE_ROOT`` is set, ``RIMA_SERVE_MAX_*`` limits) is read once at load, so
        a bad setting stops the server at start instead of failing each request.
        """

        def load_context(self, context: Any) -> None:
            device = os.environ.get("RIMA_DEVICE", "cpu")
            self.policy = InputPolicy.server()
            install_one_line_replies()
            self.predictor = Predictor.from_file(context.artifacts[ARTIFACT_MODEL], device=device)
            log.info(
                "pyfunc %s loaded; as a model server it takes files %s, limits %s "
                "(rima predict reads local files under its own limits)",
                self.predictor.spec.name,
                f"under {self.policy.file_root}" if self.policy.file_root else "refused",
                self.policy.limits,
            )

        # No type hints here on purpose: MLflow 3 would derive a (wrong) schema from them.
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            # MLflow's scoring server puts the stack trace of any other exception into the
            # response body; here a client gets one short message and the log gets the rest.
            try:
                return self.predictor.predict(model_input, self.policy)
            except ModelOutputError as exc:  # the model's fault, not the request's: HTTP 500
                log.error("%s", exc)
                raise MlflowException(str(exc), error_code=INTERNAL_ERROR) from None
            except InputError as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
            except Exception:
                ref = uuid.uuid4().hex[:12]
                log.exception("request %s: unexpected error while grading", ref)
                raise MlflowException(
                    f"the request could not be graded (reference {ref} in the server log)",
                    error_code=INVALID_PARAMETER_VALUE,
                ) from None

    return RimaPyfunc


_ENTRY = '''"""MLflow models-from-code entry point for RIMA (generated by rima_core.serving)."""
import mlflow

from rima_core.serving import pyfunc_class

mlflow.models.set_model(pyfunc_class()())
'''


def pip_requirements() -> list[str]:
    """This package's pins for the distributions serving imports, e.g. ``torch==2.13.0``.

    Read from the installed package metadata (pyproject is the single source of versions), so the
    local ``+cpu`` label of the installed torch never leaks in and torch is never unpinned.
    """
    try:
        requires = importlib.metadata.requires("rima-core") or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError("rima-core is not installed (pip install -e .); no pins to log") from exc
    pins: dict[str, str] = {}
    for req in requires:
        if ";" in req:  # extras (test tools) are not serving dependencies
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*==\s*([^\s,;]+)\s*", req)
        if m:
            pins[_norm(m.group(1))] = f"{m.group(1)}=={m.group(3)}"
    missing = [d for d in SERVING_DISTRIBUTIONS if _norm(d) not in pins]
    if missing:
        raise RuntimeError(f"pyproject.toml does not pin {missing} with '=='; refusing to log")
    return [pins[_norm(d)] for d in SERVING_DISTRIBUTIONS]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _signature(class_names: Sequence[str]) -> Any:
    """Outputs only. An input schema would make MLflow drop unknown columns with nothing but a
    server-side warning (a misspelt ``fundus`` graded as "no fundus"); without one the request
    reaches :meth:`Predictor.predict`, which refuses them. The input columns are recorded in the
    model's metadata (``rima_input_columns``) instead."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    outputs = Schema(
        [ColSpec("double", f"p_{c}") for c in class_names]
        + [ColSpec("long", "grade"), ColSpec("string", "grade_name")]
    )
    return ModelSignature(inputs=None, outputs=outputs)


def input_example() -> pd.DataFrame:
    """Three small eyes — both modalities, fundus only, OCT only. ``predict`` resizes, so the
    example stays a few hundred numbers instead of a full-size volume in the model's JSON."""
    rng = np.random.default_rng(0)
    fundus = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8).tolist()
    oct = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8).tolist()
    return pd.DataFrame(
        {
            "case_id": ["both", "fundus_only", "oct_only"],
            "fundus": [fundus, fundus, None],
            "oct": [oct, None, oct],
        }
    )


def _copy_package(dest: Path) -> Path:
    """A clean copy of the ``rima_core`` source (no bytecode caches) for ``code_paths``."""
    src = Path(__file__).resolve().parent
    target = dest / "rima_core"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def model_file(model_dir: str | Path) -> Path:
    """``model_dir/model.pt`` (or ``model_dir`` itself when it is the file)."""
    path = Path(model_dir)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model file (run `rima train` first)")
    return path


def log_pyfunc(model_dir: str | Path, cfg: Any, name: str = "model") -> Any:
    """Log ``model_dir/model.pt`` as a pyfunc model in the active run; returns MLflow's ModelInfo.

    ``cfg`` (a :class:`~rima_core.config.Config`) is stored as the ``config`` artifact so a served
    version records the settings it was trained with.
    """
    import mlflow.pyfunc

    from rima_core.models import load_model

    path = model_file(model_dir)
    try:
        _, spec = load_model(path)  # fail here, not in the registry, if the file is not a model
    except ValueError as exc:  # damaged weights, or a spec asking for more than the file holds
        raise InputError(str(exc).splitlines()[0]) from None
    class_names = list(spec.class_names) or [str(i) for i in range(spec.n_classes)]
    with tempfile.TemporaryDirectory(prefix="rima-pyfunc-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "class_names.json").write_text(json.dumps(class_names))
        from rima_core.redact import redact_config  # the served config holds no credentials

        config = redact_config(cfg.to_dict())
        (tmp_path / "config.json").write_text(json.dumps(config, indent=2, default=str))
        entry = tmp_path / "rima_pyfunc.py"
        entry.write_text(_ENTRY)
        code = _copy_package(tmp_path / "code")
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(entry),
            artifacts={
                ARTIFACT_MODEL: str(path),
                ARTIFACT_CLASSES: str(tmp_path / "class_names.json"),
                ARTIFACT_CONFIG: str(tmp_path / "config.json"),
            },
            code_paths=[str(code)],
            pip_requirements=pip_requirements(),
            signature=_signature(class_names),
            input_example=input_example(),
            metadata={"rima_input_columns": list(INPUT_COLUMNS)},
        )
    log.info("logged pyfunc %s (%s, %d classes)", info.model_uri, spec.name, len(class_names))
    return info


def load(model_uri: str) -> Any:
    """``mlflow.pyfunc.load_model`` with the project's tracking configuration already applied."""
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model(model_uri)


def predict_files(model_uri: str, input_path: str | Path, out: str | Path) -> dict[str, Any]:
    """Batch prediction from a CSV/Parquet table of eyes (``fundus``/``oct`` file paths or empty).

    Relative paths are resolved against the table's folder, as in a manifest that travels with
    its images. The caller is the local user, so any path is allowed, but files go through the
    same restricted readers and per-image limits (``RIMA_PREDICT_MAX_*``) as on the server; rows
    are not capped (they are graded batch by batch). The output (CSV or Parquet by suffix) is
    written atomically.
    """
    from rima_core.atomic import atomic_file

    input_path, out = Path(input_path), Path(out)
    try:
        policy = InputPolicy.local()
    except ValueError as exc:  # a bad RIMA_PREDICT_MAX_* value
        raise InputError(str(exc)) from None
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path}: no such input table")
    out_suffix = out.suffix.lower()
    if out_suffix not in (".csv", ".parquet", ".pq"):
        raise InputError(f"{out}: output must be .csv or .parquet")
    suffix = input_path.suffix.lower()
    if suffix == ".csv":
        frame = pd.read_csv(input_path, dtype={"case_id": str, "fundus": str, "oct": str})
    elif suffix in (".parquet", ".pq"):
        frame = pd.read_parquet(input_path)
    else:
        raise InputError(f"{input_path}: input must be .csv or .parquet")
    for col in ("fundus", "oct"):
        if col in frame.columns:
            frame[col] = [_resolve(v, input_path.parent) for v in frame[col]]
    try:
        model = load(model_uri)
    except ValueError as exc:  # the version's model.pt is damaged or asks for too much memory
        raise InputError(f"{model_uri}: {str(exc).splitlines()[0]}") from None
    try:
        predictor = model.unwrap_python_model().predictor
    except (AttributeError, ValueError) as exc:
        raise InputError(f"{model_uri} is not a RIMA pyfunc model") from exc
    try:
        result = predictor.predict(frame, policy)
    except InputError as exc:
        raise InputError(f"{input_path}: {exc}") from None
    with atomic_file(out) as tmp:
        if out_suffix == ".csv":
            result.to_csv(tmp, index=False)
        else:
            result.to_parquet(tmp, index=False)
    counts = result["grade_name"].value_counts().to_dict()
    return {"model": model_uri, "rows": len(result), "out": str(out), "grades": counts}


def _resolve(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value.strip() and not Path(value).is_absolute():
        return str(base / value)
    return value
