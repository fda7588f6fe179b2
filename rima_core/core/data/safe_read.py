"""Readers for untrusted array and image files that never run code and never over-allocate.

Why this exists: ``np.load`` with pickling allowed, on a file from outside, executes whatever
its pickle asks for, an ``.npy`` header may claim a terabyte array (numpy allocates before it
reads), a deflated npz member may inflate a thousandfold (zip bomb) and a PNG may declare
gigapixels. Every loader (and the model server) reads user files through this module only.

Rules, shared by every reader:

- Dtypes: booleans, integers, floats, fixed-width byte/unicode strings. Complex, structured,
  datetime and object arrays are refused, except object arrays of plain ``str``/``int``/
  ``float`` (real FairVision copies store label strings that way), which are read through
  :class:`RestrictedUnpickler` (numpy's array reconstruction and plain scalars only; anything
  else raises before it is called) and returned as ``str``/``int64``/``float64`` arrays.
- Sizes: every ``.npy`` header (shape × itemsize) is checked against ``max_bytes`` BEFORE any
  allocation; bytes are then read in bounded chunks, so a lying header or a member that inflates
  past the cap is refused with at most ``max_bytes`` held. For an npz the cap is on the whole
  file's decompressed members together (so it bounds each member too), and a deflated member
  that inflates more than :data:`MAX_COMPRESSION_RATIO` times beyond
  :data:`RATIO_CHECK_FLOOR` bytes is refused as a zip bomb.
- Files: every reader opens the name once, without blocking (a FIFO would hang a reader that
  waits for a writer), and checks the opened descriptor, not the name: it must be a regular file
  (FIFOs, sockets, devices and folders are refused) and, when the caller passes ``root``, its
  real path must lie inside ``root`` (a symlink or folder swapped in between a name check and
  the read cannot redirect it). All bytes are then read from that descriptor.
- Errors: every refusal or damage is an :class:`UnsafeInputError` whose message names the file
  and the reason; callers turn it into their own per-case error.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import math
import os
import pickle
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.lib import format as npformat

from rima_core.core.data.types import one_line, printable

log = logging.getLogger(__name__)

# Defaults; the prepare settings (``prepare.max_file_bytes`` etc.) override them per call.
DEFAULT_MAX_FILE_BYTES = 1 << 30  # 1 GiB decompressed per file
DEFAULT_MAX_IMAGE_PIXELS = 1 << 26  # 67 Mpx; a 2992×2000 fundus is 6 Mpx
# A deflated member may inflate this many times (real OCT data: < 10×) ...
MAX_COMPRESSION_RATIO = 200
# ... once it is larger than this (small constant arrays legitimately compress ~1000×).
RATIO_CHECK_FLOOR = 16 << 20
MAX_NPZ_MEMBERS = 4096
_MAX_HEADER_SIZE = 10_000  # numpy's own default limit for the npy header dict
_CHUNK = 1 << 20
_ALLOWED_KINDS = frozenset("biufSU")  # bool, int, uint, float, bytes, unicode


class UnsafeInputError(ValueError):
    """A user file that is refused: damaged, too large, or asking for code to run."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = one_line(reason)  # library messages may span lines (nibabel's do)
        super().__init__(f"{printable(path)}: {self.reason}")


# --- opening: regular files only, checked on the descriptor -------------------------------------

_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def fd_real_path(fd: int) -> Path | None:
    """The real path of an open descriptor (Linux ``/proc/self/fd``); None where unknown."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None


def _inside_root(fd: int, path: str | Path, root: Path) -> None:
    """Refuse ``fd`` unless the file it is open on lies inside ``root`` (checked on the
    descriptor: a symlink or folder swapped in after a name check cannot pass)."""
    real = fd_real_path(fd)
    if real is None:  # no /proc: the name's real path must be this very inode
        try:
            candidate = Path(os.path.realpath(path))
            same = os.path.samestat(os.stat(candidate), os.fstat(fd))
        except OSError:
            same = False
        if not same:
            raise UnsafeInputError(path, "changed while it was opened")
        real = candidate
    if not real.is_relative_to(root):
        raise UnsafeInputError(path, f"resolves to {real}, outside {root}")


def open_regular(path: str | Path, *, root: str | Path | None = None) -> IO[bytes]:
    """Open ``path`` for reading as a binary file object, refusing anything but a regular file.

    The name is opened once with ``O_NONBLOCK`` (opening a FIFO does not wait for a writer),
    then the descriptor is checked: ``fstat`` must say regular file and, with ``root``, its real
    path must lie inside ``root``. Blocking mode is restored before it is returned.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UnsafeInputError(path, f"cannot read: {exc.strerror or exc}") from exc
    except (ValueError, TypeError) as exc:  # NUL byte in the name
        raise UnsafeInputError(path, f"cannot read: {exc}") from exc
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeInputError(path, f"is {_kind(mode)}, not a regular file: refused")
        if root is not None:
            _inside_root(fd, path, Path(root))
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~getattr(os, "O_NONBLOCK", 0))
        return os.fdopen(fd, "rb")
    except UnsafeInputError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise UnsafeInputError(path, f"cannot read: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def _opened(path: str | Path, root: str | Path | None) -> Iterator[IO[bytes]]:
    fp = open_regular(path, root=root)
    try:
        yield fp
    finally:
        fp.close()


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


# --- bounded streams ----------------------------------------------------------------------------


class _Budget:
    """Decompressed bytes still allowed for one file."""

    def __init__(self, path: str | Path, max_bytes: int | None) -> None:
        self.path = path
        self.left = max_bytes if max_bytes is not None else DEFAULT_MAX_FILE_BYTES
        self.limit = self.left

    def take(self, n: int, what: str) -> None:
        if n > self.left:
            raise UnsafeInputError(
                self.path,
                f"{what} needs {n} bytes, over the limit of {self.limit} bytes per file "
                "(prepare.max_file_bytes)",
            )
        self.left -= n


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


def _check_ratio(path: str | Path, what: str, compressed: int, inflated: int) -> None:
    if inflated > RATIO_CHECK_FLOOR and inflated > MAX_COMPRESSION_RATIO * max(compressed, 1):
        raise UnsafeInputError(
            path,
            f"{what} inflates {compressed} -> {inflated} bytes "
            f"(over {MAX_COMPRESSION_RATIO}×): refused as a zip bomb",
        )


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


# --- images -------------------------------------------------------------------------------------

_CONVERT_TO_RGB = ("P", "PA", "CMYK", "YCbCr", "RGBA")
_CONVERT_TO_L = ("1", "LA")


def read_image(
    path: str | Path,
    *,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    mode: str | None = None,
    root: str | Path | None = None,
) -> np.ndarray:
    """Decode one png/jpg/... fully, refusing more than ``max_pixels`` before decoding.

    The pixel count is checked from the header (``Image.open`` reads no pixel data); PIL's own
    ``MAX_IMAGE_PIXELS`` guard stays on as a second line, and its DecompressionBomb warning or
    error becomes an :class:`UnsafeInputError`. ``mode`` converts (e.g. ``"L"``, ``"RGB"``);
    without it palette/CMYK/alpha images become RGB and 1-bit/LA images grey.
    """
    from PIL import Image, UnidentifiedImageError

    limit = max_pixels if max_pixels is not None else DEFAULT_MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with _opened(path, root) as fp, Image.open(fp) as img:
                width, height = img.size
                if width * height > limit:
                    raise UnsafeInputError(
                        path,
                        f"image of {width}×{height} pixels is over the limit of {limit} "
                        "(prepare.max_image_pixels)",
                    )
                img.load()
                if mode is not None and img.mode != mode:
                    img = img.convert(mode)
                elif img.mode in _CONVERT_TO_RGB:
                    img = img.convert("RGB")
                elif img.mode in _CONVERT_TO_L:
                    img = img.convert("L")
                return np.asarray(img)
    except UnsafeInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnsafeInputError(path, f"decompression bomb refused: {exc}") from exc
    except (
        OSError,
        UnidentifiedImageError,
        SyntaxError,
        ValueError,
        EOFError,
        TypeError,
        struct.error,
        zlib.error,
        MemoryError,
        IndexError,
        KeyError,
    ) as exc:
        raise UnsafeInputError(path, f"unreadable or truncated image: {exc}") from exc


# --- NIfTI --------------------------------------------------------------------------------------


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
    import gzip

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
