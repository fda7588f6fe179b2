"""The hardened ``.npz`` reader: a member cap, a byte budget over all members together, and
deflated members that inflate like a zip bomb refused.

Split from :mod:`rima_core.core.data.safe_read` (which re-exports the public names; its docstring
states the rules). Each member is an ``.npy`` stream read by :mod:`rima_core.core.data.safe_npy`,
so an npz member and a plain ``.npy`` file meet the same dtype and size rules.
"""

from __future__ import annotations

import contextlib
import struct
import zipfile
import zlib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO

import numpy as np

from rima_core.core.data.safe_files import (
    DEFAULT_MAX_FILE_BYTES,
    MAX_NPZ_MEMBERS,
    UnsafeInputError,
    _Budget,
    _opened,
)
from rima_core.core.data.safe_npy import _check_ratio, _drain, _read_array

# --- .npz ---------------------------------------------------------------------------------------


def _open_zip(path: str | Path, fp: IO[bytes]) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(fp)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, struct.error) as exc:
        raise UnsafeInputError(
            path, f"unreadable or truncated npz (not a valid zip file): {exc}"
        ) from exc
    except OSError as exc:
        raise UnsafeInputError(path, f"cannot read: {exc.strerror or exc}") from exc
    if len(zf.infolist()) > MAX_NPZ_MEMBERS:
        zf.close()
        raise UnsafeInputError(path, f"npz has more than {MAX_NPZ_MEMBERS} members")
    return zf


@contextlib.contextmanager
def _zip(path: str | Path, root: str | Path | None) -> Iterator[zipfile.ZipFile]:
    """The npz at ``path`` as an archive over the checked descriptor (both closed after)."""
    with _opened(path, root) as fp, _open_zip(path, fp) as zf:
        yield zf


def _npy_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """key -> member, as ``np.load`` names them (``.npy`` stripped); other members ignored."""
    return {
        info.filename[: -len(".npy")]: info
        for info in zf.infolist()
        if info.filename.endswith(".npy") and not info.is_dir()
    }


def npz_keys(path: str | Path, *, root: str | Path | None = None) -> list[str]:
    """The array names in an npz, without decoding any array."""
    with _zip(path, root) as zf:
        return sorted(_npy_members(zf))


def read_npz(
    path: str | Path,
    *,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    keys: Collection[str] | None = None,
    max_elements: int | None = None,
    root: str | Path | None = None,
) -> dict[str, np.ndarray]:
    """Read the arrays of an npz (all, or only ``keys`` that are present) under the rules above.

    ``max_bytes`` caps the decompressed bytes of the members read, together; ``max_elements``
    (optional) caps the element count of each member, checked from its header. A member whose
    declared sizes disagree with its data, whose CRC fails or that inflates like a zip bomb is
    refused. ``root`` (optional): the opened file must lie inside this folder.
    """
    budget = _Budget(path, max_bytes)
    out: dict[str, np.ndarray] = {}
    with _zip(path, root) as zf:
        members = _npy_members(zf)
        wanted = sorted(members) if keys is None else sorted(k for k in keys if k in members)
        for key in wanted:
            info = members[key]
            what = f"member {key!r}"
            before = budget.left
            compressed = info.compress_size if info.compress_type != zipfile.ZIP_STORED else None
            try:
                with zf.open(info) as fp:
                    out[key] = _read_array(fp, budget, what, compressed, max_elements)
                    _drain(fp, budget, what)
            except UnsafeInputError:
                raise
            except (
                zipfile.BadZipFile,
                zlib.error,
                EOFError,
                ValueError,
                struct.error,
                OSError,
                NotImplementedError,
                RuntimeError,
            ) as exc:
                raise UnsafeInputError(
                    path, f"{what}: unreadable or truncated npz member ({exc})"
                ) from exc
            if compressed is not None:
                _check_ratio(path, what, compressed, before - budget.left)
    return out
