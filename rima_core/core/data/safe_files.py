"""The ground rules every hardened reader (:mod:`rima_core.core.data.safe_read`) stands on:
the limits, the one error type, opening a name as a checked regular file, and the byte budget.

Split from :mod:`rima_core.core.data.safe_read` (which re-exports these names) so each per-format
reader (``safe_npy``, ``safe_npz``, ``safe_image``, ``safe_nifti``) imports the shared rules
from one place below it, and a reader cannot open a file or count bytes its own way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from rima_core.core.data.types import one_line, printable

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
