"""The hardened NIfTI reader: header shape × dtype checked before any voxel is read, from the
already-checked descriptor.

Split from :mod:`rima_core.core.data.safe_read` (which re-exports :func:`read_nifti`; its
docstring states the rules) so each file format's reader reads on its own.
"""

from __future__ import annotations

import gzip
import logging
import math
from pathlib import Path
from typing import IO, Any

import numpy as np

from rima_core.core.data.safe_files import (
    _ALLOWED_KINDS,
    DEFAULT_MAX_FILE_BYTES,
    UnsafeInputError,
    _Budget,
    _opened,
)
from rima_core.core.data.types import one_line, printable

log = logging.getLogger(__name__)


def read_nifti(
    path: str | Path,
    *,
    max_bytes: int | None = DEFAULT_MAX_FILE_BYTES,
    max_voxels: int | None = None,
    root: str | Path | None = None,
) -> np.ndarray:
    """Read a NIfTI volume's voxels, checking header shape × dtype before any data is read.

    The array is the stored dtype (with nibabel's scaling applied when the header asks for it);
    a scaled volume is float64, so the byte check uses the larger of the two item sizes.
    """
    import nibabel as nib

    # nibabel logs header fixes of damaged files at ERROR on its own logger; they would be a
    # second error line beside ours, so they are held back and re-logged as warnings.
    held = _HeldRecords()
    nib_log = logging.getLogger("nibabel.global")
    nib_log.addFilter(held)
    try:
        with _opened(path, root) as fp:
            data = _read_nifti(nib, path, fp, max_bytes, max_voxels)
    finally:
        nib_log.removeFilter(held)
    for message in held.messages:
        log.warning("%s: nibabel: %s", printable(path), one_line(message))
    return data


class _HeldRecords(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.append(record.getMessage())
        return False


def _nifti_image(nib: Any, path: str | Path, fp: IO[bytes]) -> Any:
    """The NIfTI-1/2 image of a single ``.nii`` / ``.nii.gz`` file read from ``fp`` (the
    already-checked descriptor), never reopened by name."""
    from nibabel.fileholders import FileHolder

    stream: IO[bytes] = fp
    if str(path).lower().endswith(".gz"):
        stream = gzip.GzipFile(fileobj=fp, mode="rb")  # type: ignore[assignment]
    magic = stream.read(4)
    stream.seek(0)
    nifti2 = magic in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c")  # sizeof_hdr 540
    klass = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    holder = FileHolder(fileobj=stream)
    return klass.from_file_map({"header": holder, "image": holder})


def _read_nifti(
    nib: Any, path: str | Path, fp: IO[bytes], max_bytes: int | None, max_voxels: int | None
) -> np.ndarray:
    try:
        img = _nifti_image(nib, path, fp)
        header = img.header
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        slope, _inter = header.get_slope_inter()
    except Exception as exc:  # nibabel raises many types (ImageFileError, EOFError, ...)
        raise UnsafeInputError(path, f"unreadable NIfTI header: {exc}") from exc
    if dtype.kind not in _ALLOWED_KINDS - {"S", "U"} or dtype.fields is not None:
        raise UnsafeInputError(path, f"NIfTI dtype {dtype} is refused (complex/RGB/structured)")
    if any(s < 0 for s in shape):
        raise UnsafeInputError(path, f"NIfTI has a negative dimension in shape {shape}")
    voxels = math.prod(shape)
    if max_voxels is not None and voxels > max_voxels:
        raise UnsafeInputError(
            path,
            f"NIfTI of shape {shape} has {voxels} voxels, over the limit of {max_voxels} "
            "(prepare.max_volume_voxels)",
        )
    itemsize = max(dtype.itemsize, 8) if slope is not None else dtype.itemsize
    _Budget(path, max_bytes).take(voxels * itemsize, f"NIfTI of shape {shape} and dtype {dtype}")
    try:
        return np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated data, damaged gzip, ...
        raise UnsafeInputError(path, f"unreadable or truncated NIfTI data: {exc}") from exc
