"""RIMA as an ``mlflow.pyfunc`` model: one row per eye in, class probabilities and a grade out.

Why a hand-written pyfunc rather than ``mlflow.pytorch``: MLflow 3 exports torch models with
``torch.export`` from an input example, which freezes the batch size and cannot express "this eye
has no OCT". Here the weights (``model.pt`` from :func:`rima_core.models.save_model`), class names
and config are artifacts, and ``predict`` takes a DataFrame whose ``fundus`` / ``oct`` cells are
nested arrays or file paths, either of which may be null — the missing-modality path the method
exists for. Preprocessing reuses the ``prepare`` resizers and the source readers, so a served
eye is seen exactly as a training eye was.

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
from collections.abc import Sequence
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


class InputError(ValueError):
    """A request row that cannot be graded; the message names the row and the reason."""


# --- decoding one cell -----------------------------------------------------------------------


def is_missing(value: Any) -> bool:
    """None, NaN, pd.NA and "" mean "this eye has no such image"."""
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _npz_array(path: Path, key: str, row: str) -> np.ndarray:
    """The ``key`` array of a FairVision-style npz, or its only array."""
    with np.load(path, allow_pickle=False) as z:
        if key in z.files:
            return z[key]
        arrays = [k for k in z.files if z[k].ndim >= 2]
        if len(arrays) == 1:
            return z[arrays[0]]
        raise InputError(f"{row}: {path} has no '{key}' array (arrays: {z.files})")


def _read_fundus_file(path: Path, row: str) -> np.ndarray:
    from rima_core.data.sources._common import read_image
    from rima_core.data.sources.fairvision import FUNDUS_KEY

    suffix = path.suffix.lower()
    if suffix in _FUNDUS_IMAGE_SUFFIXES:
        return read_image(path, row)
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        return _npz_array(path, FUNDUS_KEY, row)
    raise InputError(
        f"{row}: fundus file {path} has an unsupported type (use "
        f"{', '.join((*_FUNDUS_IMAGE_SUFFIXES, '.npy', '.npz'))})"
    )


def _read_oct_file(path: Path, row: str) -> np.ndarray:
    from rima_core.data.sources import gamma, rima_folders
    from rima_core.data.sources.fairvision import OCT_KEY

    name = path.name.lower()
    if path.is_dir():  # GAMMA-style folder of numbered B-scan images
        volume = gamma._load_oct(path, row)
        if volume is None:
            raise InputError(f"{row}: OCT folder {path} holds no <n>_image.jpg B-scans")
        return volume
    if name.endswith((".nii", ".nii.gz")):
        return rima_folders._load_nifti(path, row)
    if name.endswith(".npy"):
        return np.load(path, allow_pickle=False)
    if name.endswith(".npz"):
        return _npz_array(path, OCT_KEY, row)
    raise InputError(
        f"{row}: OCT file {path} has an unsupported type (use .nii, .nii.gz, .npy, .npz or a "
        "folder of B-scan images)"
    )


def decode(value: Any, modality: str, row: str) -> np.ndarray | None:
    """A cell -> uint8 pixels (fundus H×W[×3], OCT D×H×W), or None when the cell is empty.

    Arrays follow the source loaders' rules (uint8 kept, 0..1 floats scaled by 255, other ranges
    min-max scaled): the same ``as_fundus`` / ``as_oct`` checks reject a wrong rank here as in
    ``prepare``.
    """
    from rima_core.data.sources._common import as_fundus, as_oct
    from rima_core.data.types import CaseError

    if is_missing(value):
        return None
    try:
        if isinstance(value, str | os.PathLike):
            path = Path(value)
            if not path.exists():
                raise InputError(f"{row}: {modality} file {path} does not exist")
            reader = _read_fundus_file if modality == "fundus" else _read_oct_file
            arr = reader(path, row)
        else:
            try:
                arr = _dense(value)
            except (ValueError, TypeError) as exc:  # ragged or non-numeric nested lists
                raise InputError(f"{row}: {modality} is not a rectangular array: {exc}") from exc
        return as_fundus(arr, row, "input") if modality == "fundus" else as_oct(arr, row, "input")
    except CaseError as exc:
        where = f" {exc.path}" if exc.path and exc.path != "input" else ""
        raise InputError(f"{row}: {modality}{where}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{row}: {modality} could not be read: {exc}") from exc


def _dense(value: Any) -> np.ndarray:
    """Nested lists, or Parquet's object arrays of arrays, as one dense numeric array."""
    arr = np.asarray(value)
    if arr.dtype != object:
        return arr
    if arr.ndim == 0:
        raise TypeError(f"{type(value).__name__} is not an array")
    return np.stack([_dense(v) for v in arr])


def _row_name(index: Any, case_id: Any) -> str:
    return f"row {index}" + ("" if is_missing(case_id) else f" (case_id {case_id})")


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

    @property
    def output_columns(self) -> list[str]:
        return [f"p_{c}" for c in self.class_names] + ["grade", "grade_name"]

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

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """One output row per input row: ``p_<class>`` probabilities, ``grade``, ``grade_name``
        (and ``case_id`` first when the input has one)."""
        from rima_core.engine import predict as run_model

        if not isinstance(frame, pd.DataFrame):
            frame = pd.DataFrame(frame)
        unknown = set(frame.columns) - set(INPUT_COLUMNS)
        if unknown:
            raise InputError(
                f"unexpected column(s) {sorted(map(str, unknown))}; expected {list(INPUT_COLUMNS)}"
            )
        # MLflow drops optional columns absent from a request instead of adding them back
        frame = frame.reindex(columns=list(INPUT_COLUMNS))
        if frame.empty:
            raise InputError("no rows to predict")
        names = [_row_name(i, c) for i, c in zip(frame.index, frame["case_id"], strict=True)]
        empty = [n for n, f, o in zip(names, frame["fundus"], frame["oct"], strict=True)
                 if is_missing(f) and is_missing(o)]  # fmt: skip
        if empty:
            raise InputError(
                f"{', '.join(empty[:10])}{' ...' if len(empty) > 10 else ''}: neither a fundus "
                "nor an OCT given; at least one modality is required per eye"
            )
        probas = []
        for start in range(0, len(frame), self.batch_size):
            part = slice(start, start + self.batch_size)
            rows = zip(
                frame["fundus"].iloc[part], frame["oct"].iloc[part], names[part], strict=True
            )
            decoded = [(decode(f, "fundus", n), decode(o, "oct", n)) for f, o, n in rows]
            fundus, oct = [d[0] for d in decoded], [d[1] for d in decoded]
            batch = self._tensors(fundus, oct)
            preds = run_model(self.model, [batch], self.device, progress=False)
            probas.append(preds.proba)
        proba = np.concatenate(probas)
        out = pd.DataFrame(proba, columns=[f"p_{c}" for c in self.class_names], index=frame.index)
        grade = proba.argmax(axis=1)
        out["grade"] = grade.astype(np.int64)
        out["grade_name"] = [self.class_names[g] for g in grade]
        if frame["case_id"].notna().any():
            out.insert(0, "case_id", frame["case_id"].to_numpy())
        return out


# --- the MLflow wrapper -----------------------------------------------------------------------


def pyfunc_class() -> type:
    """The PythonModel subclass, defined on first use so importing this module stays cheap."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class RimaPyfunc(mlflow.pyfunc.PythonModel):
        """Loads ``model.pt`` once per process; bad rows become HTTP 400 with the row named."""

        def load_context(self, context: Any) -> None:
            device = os.environ.get("RIMA_DEVICE", "cpu")
            self.predictor = Predictor.from_file(context.artifacts[ARTIFACT_MODEL], device=device)

        # No type hints here on purpose: MLflow 3 would derive a (wrong) schema from them; the
        # explicit signature logged with the model describes the input instead.
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            try:
                return self.predictor.predict(model_input)
            except (InputError, ValueError) as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc

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
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "case_id", required=False),
            ColSpec(AnyType(), "fundus", required=False),  # nested array or file path
            ColSpec(AnyType(), "oct", required=False),
        ]
    )
    outputs = Schema(
        [ColSpec("double", f"p_{c}") for c in class_names]
        + [ColSpec("long", "grade"), ColSpec("string", "grade_name")]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


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
    _, spec = load_model(path)  # fail here, not in the registry, if the file is not a model
    class_names = list(spec.class_names) or [str(i) for i in range(spec.n_classes)]
    with tempfile.TemporaryDirectory(prefix="rima-pyfunc-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "class_names.json").write_text(json.dumps(class_names))
        (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
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
    its images. The output (CSV or Parquet by suffix) is written atomically.
    """
    from rima_core.atomic import atomic_file

    input_path, out = Path(input_path), Path(out)
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path}: no such input table")
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
    from mlflow.exceptions import MlflowException

    model = load(model_uri)
    try:
        result = model.predict(frame)
    except MlflowException as exc:  # the pyfunc's wrapping of a bad row: keep the message clean
        if exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise InputError(f"{input_path}: {exc.message}") from exc
    out_suffix = out.suffix.lower()
    if out_suffix not in (".csv", ".parquet", ".pq"):
        raise InputError(f"{out}: output must be .csv or .parquet")
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
