"""The hardened ``.npy`` reader: header checked before allocation, bounded reads, and object
arrays through a restricted unpickler only.

Split from :mod:`rima_core.core.data.safe_read` (which re-exports the public names; its docstring
states the rules). :func:`_read_array` is the one place an ``.npy`` stream becomes an array, for
a plain ``.npy`` file here and for every npz member (:mod:`rima_core.core.data.safe_npz`).
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npformat

from rima_core.core.data.safe_files import (
    _ALLOWED_KINDS,
    _CHUNK,
    _MAX_HEADER_SIZE,
    DEFAULT_MAX_FILE_BYTES,
    MAX_COMPRESSION_RATIO,
    RATIO_CHECK_FLOOR,
    UnsafeInputError,
    _Budget,
    _opened,
)

# --- restricted unpickling ----------------------------------------------------------------------

# (module, name) pairs a FairVision object array needs: the array and dtype reconstruction that
# ndarray.__reduce__ emits (numpy 1.x and 2.x module paths), scalar reconstruction, and plain
# Python scalar constructors. Nothing here can reach the file system, a shell or an import.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("builtins", "str"),
        ("builtins", "int"),
        ("builtins", "float"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_ALLOWED_GLOBALS`; every other global raises.

    ``persistent_load`` is refused too (the default already raises; made explicit here).
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"pickled object refers to {module}.{name}: refused")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("pickled persistent ids are refused")


def _plain_array(obj: Any, path: str | Path) -> np.ndarray:
    """An unpickled object array -> a str / int64 / float64 array, or a refusal."""
    if not isinstance(obj, np.ndarray) or obj.dtype != np.dtype(object):
        raise UnsafeInputError(path, f"object payload is {type(obj).__name__}, not an array")
    items = obj.ravel().tolist()
    if all(isinstance(x, str) for x in items):
        return np.array(items, dtype=str).reshape(obj.shape) if items else obj.astype(str)
    if all(isinstance(x, bytes) for x in items):
        return np.array(items, dtype=bytes).reshape(obj.shape)
    if all(type(x) is int for x in items):
        try:
            return np.array(items, dtype=np.int64).reshape(obj.shape)
        except OverflowError as exc:
            raise UnsafeInputError(path, "object array holds an integer out of range") from exc
    if all(type(x) in (int, float) for x in items):
        return np.array(items, dtype=np.float64).reshape(obj.shape)
    kinds = sorted({type(x).__name__ for x in items})
    raise UnsafeInputError(path, f"object array holds {kinds}; only str, int or float allowed")


class _BoundedReader(io.RawIOBase):
    """Reads from ``raw`` but never more than the budget allows (pickle payloads)."""

    def __init__(self, raw: IO[bytes], budget: _Budget, what: str) -> None:
        self._raw = raw
        self._budget = budget
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        view = memoryview(b)
        want = min(len(view), self._budget.left + 1)
        data = self._raw.read(want)
        self._budget.take(len(data), self._what)
        view[: len(data)] = data
        return len(data)


def _read_exact(fp: IO[bytes], out: np.ndarray, path: str | Path, what: str) -> None:
    """Fill ``out`` from ``fp`` in chunks; a short stream is a truncated file."""
    buf = out.reshape(-1).view(np.uint8)
    pos, total = 0, buf.size
    while pos < total:
        data = fp.read(min(_CHUNK, total - pos))
        if not data:
            raise UnsafeInputError(
                path, f"{what} is unreadable or truncated ({pos} of {total} data bytes)"
            )
        buf[pos : pos + len(data)] = np.frombuffer(data, np.uint8)
        pos += len(data)


def _drain(fp: IO[bytes], budget: _Budget, what: str) -> None:
    """Read a member to its end (so zip checks its CRC), counting trailing bytes to the cap."""
    while True:
        data = fp.read(_CHUNK)
        if not data:
            return
        budget.take(len(data), f"{what} (trailing data)")


# --- .npy ---------------------------------------------------------------------------------------


def _read_header(fp: IO[bytes], path: str | Path, what: str) -> tuple[tuple[int, ...], bool, Any]:
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(
                fp, max_header_size=_MAX_HEADER_SIZE
            )
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(
                fp, max_header_size=_MAX_HEADER_SIZE
            )
        else:
            raise UnsafeInputError(path, f"{what}: unsupported .npy format version {version}")
    except UnsafeInputError:
        raise
    except (ValueError, TypeError, OSError, EOFError, SyntaxError, struct.error) as exc:
        raise UnsafeInputError(path, f"{what}: not a valid .npy header ({exc})") from exc
    except (zipfile.BadZipFile, zlib.error) as exc:
        raise UnsafeInputError(path, f"{what}: unreadable or truncated data ({exc})") from exc
    if any(int(s) < 0 for s in shape):
        raise UnsafeInputError(path, f"{what}: negative dimension in shape {shape}")
    return tuple(int(s) for s in shape), bool(fortran), dtype


def _read_array(
    fp: IO[bytes],
    budget: _Budget,
    what: str,
    compressed_size: int | None = None,
    max_elements: int | None = None,
) -> np.ndarray:
    """One .npy stream -> array, applying the dtype rules and the byte budget.

    ``compressed_size`` (deflated npz members) lets a zip bomb be refused from its header alone.
    """
    path = budget.path
    shape, fortran, dtype = _read_header(fp, path, what)
    if max_elements is not None and math.prod(shape) > max_elements:
        raise UnsafeInputError(
            path,
            f"{what} of shape {shape} has {math.prod(shape)} elements, over the limit of "
            f"{max_elements} (prepare.max_volume_voxels)",
        )
    if dtype == np.dtype(object):
        reader = io.BufferedReader(_BoundedReader(fp, budget, what))
        try:
            obj = RestrictedUnpickler(reader).load()
        except UnsafeInputError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            ValueError,
            TypeError,
            AttributeError,
            IndexError,
            KeyError,
            OverflowError,
            MemoryError,
            struct.error,
        ) as exc:
            raise UnsafeInputError(path, f"{what}: refused object array ({exc})") from exc
        except (zipfile.BadZipFile, zlib.error, OSError) as exc:
            raise UnsafeInputError(path, f"{what}: unreadable or truncated data ({exc})") from exc
        arr = _plain_array(obj, path)
        if arr.shape != shape:
            raise UnsafeInputError(path, f"{what}: payload shape {arr.shape} != header {shape}")
        return arr
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise UnsafeInputError(path, f"{what}: structured dtype {dtype} is refused")
    if dtype.kind not in _ALLOWED_KINDS:
        raise UnsafeInputError(path, f"{what}: dtype {dtype} is refused (complex/datetime/void)")
    nbytes = math.prod(shape) * dtype.itemsize
    budget.take(nbytes, f"{what} of shape {shape} and dtype {dtype}")
    if compressed_size is not None:
        _check_ratio(budget.path, what, compressed_size, nbytes)
    out = np.empty(shape, dtype=dtype, order="F" if fortran else "C")
    try:
        _read_exact(fp, out.T if fortran else out, path, what)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise UnsafeInputError(path, f"{what}: unreadable or truncated data ({exc})") from exc
    return out


def read_npy(
    path: str | Path,
    *,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    root: str | Path | None = None,
) -> np.ndarray:
    """Read one ``.npy`` file under the module's rules (header checked before allocation)."""
    budget = _Budget(path, max_bytes)
    try:
        with _opened(path, root) as fp:
            arr = _read_array(fp, budget, "array")
            _drain(fp, budget, "array")
            return arr
    except OSError as exc:
        raise UnsafeInputError(path, f"cannot read: {exc.strerror or exc}") from exc


def _check_ratio(path: str | Path, what: str, compressed: int, inflated: int) -> None:
    if inflated > RATIO_CHECK_FLOOR and inflated > MAX_COMPRESSION_RATIO * max(compressed, 1):
        raise UnsafeInputError(
            path,
            f"{what} inflates {compressed} -> {inflated} bytes "
            f"(over {MAX_COMPRESSION_RATIO}×): refused as a zip bomb",
        )
