"""RIMA as an ``mlflow.pyfunc`` model: one row per eye in, class probabilities and a grade out.

Why a hand-written pyfunc rather than ``mlflow.pytorch``: MLflow 3 exports torch models with
``torch.export`` from an input example, which freezes the batch size and cannot express "this eye
has no OCT". Here the weights (``model.pt`` from :func:`rima_core.core.models.save_model`), class
names and config are artifacts, and ``predict`` takes a DataFrame whose ``fundus`` / ``oct`` cells
are nested arrays (or file paths, where an :class:`InputPolicy` allows them), either of which may be
null — the missing-modality path the method exists for. A served model is reachable by anyone who
can reach its port, so by default it reads no files, caps rows and image sizes, refuses unknown
columns and answers every failure with one short line (never a stack trace). Preprocessing reuses
the ``prepare`` resizers and the source checks, so a served eye is seen exactly as a training eye
was.

The package's own source travels with the model (``code_paths``) and the model is logged from
code (no pickled object), so a registry version keeps working after the installed package moves on;
``pip_requirements`` are this package's pins (a bare ``torch`` would pull a multi-GB CUDA build).

The request's limits, file policy and cell decoding are :mod:`rima_core.ops.serving_inputs`; this
module holds the predictor and the MLflow wrapper, and re-exports those names.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.atomic import atomic_file

# What a request may ask for and how a cell is decoded have a module of their own; every public
# name stays importable from here (re-exported: hence the noqa).
from rima_core.ops.serving_inputs import (  # noqa: F401
    _LIMIT_ENV,
    _NEUTRAL,
    ENV_FILE_ROOT,
    PREDICT_LIMITS,
    PREDICT_PREFIX,
    SERVE_LIMITS,
    SERVE_PREFIX,
    InputError,
    InputPolicy,
    Limits,
    ModelOutputError,
    _env_name,
    _row_name,
    decode,
    is_missing,
)
from rima_core.redact import redact_config  # the served config holds no credentials

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


# --- the predictor (no MLflow needed) ----------------------------------------------------------


class Predictor:
    """A loaded model plus the preprocessing ``prepare`` applies; grades DataFrames of eyes."""

    def __init__(self, model: Any, spec: Any, device: str = "cpu", batch_size: int = 16) -> None:
        from rima_core.runs.engine import resolve_device

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
        from rima_core.core.models import load_model

        model, spec = load_model(path)
        return cls(model, spec, device=device, batch_size=batch_size)

    def _tensors(self, fundus: list[np.ndarray | None], oct: list[np.ndarray | None]) -> dict:
        import torch

        from rima_core.core.data.prepare import resize_fundus, resize_oct

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
        from rima_core.runs.engine import NonFiniteOutputError
        from rima_core.runs.engine import predict as run_model

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


_ENTRY = '''"""MLflow models-from-code entry point for RIMA (generated by rima_core.ops.serving)."""
import mlflow

from rima_core.ops.serving import pyfunc_class

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
    src = Path(__file__).resolve().parents[1]  # rima_core/, from rima_core/ops/
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

    from rima_core.core.models import load_model

    path = model_file(model_dir)
    try:
        _, spec = load_model(path)  # fail here, not in the registry, if the file is not a model
    except ValueError as exc:  # damaged weights, or a spec asking for more than the file holds
        raise InputError(str(exc).splitlines()[0]) from None
    class_names = list(spec.class_names) or [str(i) for i in range(spec.n_classes)]
    with tempfile.TemporaryDirectory(prefix="rima-pyfunc-") as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "class_names.json").write_text(json.dumps(class_names))

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
