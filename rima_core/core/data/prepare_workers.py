"""``prepare``'s worker pool: cases decoded in parallel processes, results yielded in order.

Split from :mod:`rima_core.core.data.prepare` so the process management (spawned workers that
die with their parent, a bounded number of eyes in flight, a dead worker turned into one
:class:`SourceError`) reads apart from what a worker does with a case
(:mod:`rima_core.core.data.prepare_cases`). Results come back in submission order whatever the
worker count, which is what keeps the store byte-identical across ``prepare.workers``.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from rima_core.core.data.prepare_cases import _decode, _Decoded, _Failed, _Task
from rima_core.core.data.store import rows_per_batch
from rima_core.core.data.types import ReadLimits, SourceError, printable, set_read_limits

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_WATCHDOG_PERIOD_S = 1.0


def _die_with_parent(parent_pid: int) -> None:
    """Make this worker exit when ``parent_pid`` does, even if the parent is SIGKILLed.

    Linux: the kernel sends SIGKILL on the parent's death (``PR_SET_PDEATHSIG``). Everywhere
    (and in case the parent died before prctl ran, or the signal is lost because the creating
    thread exited first): a daemon thread polls the parent pid and exits the process.
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc with prctl: the watchdog still works
            log.debug("prctl(PR_SET_PDEATHSIG) unavailable", exc_info=True)
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(_WATCHDOG_PERIOD_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_init(parent_pid: int, limits: ReadLimits) -> None:
    _die_with_parent(parent_pid)
    set_read_limits(limits)
    # One intra-op thread per worker: the pool already uses every core it was given.
    import torch

    torch.set_num_threads(1)


def _decode_all(tasks: Sequence[_Task], workers: int) -> Iterator[_Decoded | _Failed]:
    """Yield results in task order, keeping at most a few batches of resized eyes in flight."""
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            yield _decode(task)
        return
    task0 = tasks[0]
    in_flight = 2 * rows_per_batch((task0.fundus_size,) * 2 + (3,), task0.oct_shape)
    in_flight = max(4 * workers, min(in_flight, 1024))
    # spawn, not fork: the parent may hold torch/OpenMP threads, which a forked child inherits
    # in a locked state.
    ctx = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(
        max_workers=min(workers, len(tasks)),
        mp_context=ctx,
        initializer=_worker_init,
        initargs=(os.getpid(), task0.limits),
    )
    pending: deque[tuple[_Task, Future]] = deque()
    it: Iterable[_Task] = iter(tasks)
    try:
        for task in it:
            pending.append((task, pool.submit(_decode, task)))
            if len(pending) >= in_flight:
                break
        while pending:
            task, future = pending.popleft()
            try:
                result = future.result()
            except BrokenProcessPool as exc:
                raise SourceError(
                    "a prepare worker process died (killed, or out of memory) while decoding "
                    f"case {printable(task.ref.case_id)} or one near it; lower prepare.workers "
                    "or prepare.max_file_bytes"
                ) from exc
            nxt = next(it, None)  # type: ignore[call-overload]
            if nxt is not None:
                pending.append((nxt, pool.submit(_decode, nxt)))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
