"""Resources of the OT solvers, both explicit: scratch memory and threads.

Why: at the paper's shapes the feature step's cost is memory traffic and the labeled GW step's
is op overhead, so where memory comes from (:func:`_empty`, :class:`Workspace`) and how many
threads a solve uses (:func:`_thread_policy`) decide its speed. Nothing here changes a value.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .inputs import OTInputError

# Matrices of at least this many bytes are allocated through numpy on the CPU (see _empty).
HUGE_PAGE_BYTES = 4 * 2**20

_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _empty(shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised matrix; large CPU ones in memory numpy allocated.

    Why: numpy advises the kernel to back blocks of 4 MB and more with transparent huge pages
    (``madvise``), torch does not. Where the kernel grants them only on advice (the usual
    ``[madvise]`` setting), a fresh 50 MB torch tensor costs ~12k page faults at first touch
    (measured: 28-33 ms to write the 6144 x 2048 feature coupling into fresh torch memory, 7-9 ms
    into numpy's), and every later pass over it pays TLB misses. The tensor shares numpy's
    memory and keeps it alive; nothing else differs.
    """
    np_dtype = _NUMPY_DTYPES.get(dtype)
    nbytes = shape[0] * shape[1] * torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 0
    if device.type != "cpu" or np_dtype is None or nbytes < HUGE_PAGE_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=np_dtype))


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """``exp`` in place; on the CPU through numpy's vectorised ``exp``.

    Why: on the feature kernel (12.6M float32 entries, arguments floored above underflow)
    numpy's ``exp`` takes 5.8 ms, torch's 8-11 ms. Same values up to float rounding, and
    deterministic on one machine like every op here.
    """
    if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and t.is_contiguous():
        a = t.numpy()
        np.exp(a, out=a)
        return t
    return t.exp_()


def _col_min(m: torch.Tensor) -> torch.Tensor:
    """Column minima of ``m``; on the CPU through numpy.

    Why: ``amin(dim=0)`` on a row-major CPU matrix is a strided reduction (4-7 ms on the
    6144 x 2048 feature cost, 12-16 ms on a loaded machine); numpy's is a contiguous
    single-threaded pass (1.7-2.8 ms) — and one op, where splitting the rows into blocks would
    be many multi-threaded ones, each waiting for a descheduled worker on a busy machine. Minima
    are exact, so the result is the same.
    """
    if m.device.type == "cpu" and m.dtype in _NUMPY_DTYPES and m.is_contiguous():
        return torch.from_numpy(m.numpy().min(axis=0))
    return m.amin(dim=0)


class Workspace:
    """Scratch matrices that :func:`feature_coupling` reuses across calls.

    Why: the feature step works on two 6144×2048 matrices every training batch. On CPU, glibc
    hands blocks above 32 MB straight to ``mmap``, so each fresh 50 MB tensor is ~12k page
    faults — measured here at ~50 ms per allocation, as much as the arithmetic on it. Only the
    latest shape per name is kept; :meth:`clear` frees them. A workspace serves one call at a
    time: a call that finds it in use (another thread) works in fresh memory instead of
    waiting. ``DEFAULT_WORKSPACE`` is the one used when a caller passes none.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def matrix(
        self, name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The scratch matrix ``name`` (contents undefined: the caller overwrites them)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            self._buffers.pop(name, None)
            buf = _empty(shape, dtype, device)
            self._buffers[name] = buf
        return buf

    def clear(self) -> None:
        """Free the scratch matrices (the next call allocates them again)."""
        self._buffers = {}

    @contextmanager
    def lease(self) -> Iterator[Workspace]:
        """This workspace for the duration of one call, or a throw-away one if it is busy."""
        if not self._lock.acquire(blocking=False):
            yield Workspace()
            return
        try:
            yield self
        finally:
            self._lock.release()


DEFAULT_WORKSPACE = Workspace()


def clear_workspace() -> None:
    """Release the scratch matrices of ``DEFAULT_WORKSPACE``."""
    DEFAULT_WORKSPACE.clear()


# Problems whose working matrices have at most this many entries run on one thread unless the
# caller says otherwise (``num_threads``). Why: labeled GW at the paper's batch size is ~1000
# tiny (32 × 32) operations; multi-threaded BLAS calls on such matrices buy nothing, and on a
# busy machine every one of them waits for a descheduled worker thread (measured: 7 ms on one
# thread, 130–490 ms on two, for the same solve). 2**16 is twice ATen's grain size, below which
# its element-wise kernels run serially anyway.
SMALL_PROBLEM_ENTRIES = 2**16


@contextmanager
def _thread_policy(num_threads: int | None, entries: int, device: torch.device) -> Iterator[None]:
    """Run the body with the solver's thread count, restoring torch's afterwards.

    ``num_threads``: None = 1 for small problems (``entries <= SMALL_PROBLEM_ENTRIES``) and
    torch's current setting otherwise; an int = that many. ``torch.set_num_threads`` is
    process-global, so other threads' torch work during the call also sees the solver's count;
    the setting is restored in ``finally`` and the change is a no-op on other devices.
    """
    if num_threads is not None and num_threads < 1:
        raise OTInputError(f"num_threads must be >= 1 or None, got {num_threads!r}")
    before = torch.get_num_threads()
    want = num_threads
    if want is None:
        want = 1 if entries <= SMALL_PROBLEM_ENTRIES else before
    if device.type != "cpu" or want == before:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(before)
