"""Progress bars that suit where the output goes: one helper for every loop that shows progress.

tqdm redraws its bar in place with carriage returns. In a terminal that is one line; in a log
file, a CI job or a Kubeflow pod every redraw is a new line (a 2-epoch run printed 101 of them).
So :func:`progress` draws a normal bar when stderr is a terminal and otherwise stays silent for
loops that finish within a minute, then prints at most one line a minute (long loops such as
preparing a large dataset still show they are alive). ``RIMA_PROGRESS`` overrides the choice:
``on`` (bars as in a terminal), ``off`` (none), ``auto`` (the default).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

ENV = "RIMA_PROGRESS"
# Not a terminal: no output before this many seconds, then at most one line per this interval.
LOG_INTERVAL_S = 60.0


def mode() -> str:
    """``on``, ``off`` or ``log`` (throttled, for output that is not a terminal)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value in ("on", "1", "true", "yes"):
        return "on"
    if value in ("off", "0", "false", "no"):
        return "off"
    stream = sys.stderr
    return "on" if stream is not None and stream.isatty() else "log"


class _LogBar(tqdm):
    """A bar for logs: it draws only on its schedule (``delay``, ``mininterval``). tqdm redraws
    at once on ``set_postfix``/``set_description``, which printed a line per batch."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description(desc, refresh=False)


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` with the display policy of this module.

    ``disable=True`` from the caller still wins (e.g. ``predict(progress=False)``).
    """
    how = mode()
    if how == "off":
        kwargs["disable"] = True
    elif how == "log":
        kwargs.setdefault("delay", LOG_INTERVAL_S)
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
        kwargs.setdefault("ascii", True)
    if kwargs.get("disable") is None:
        kwargs["disable"] = False  # tqdm's None means "off unless a TTY": the policy is ours
    return (_LogBar if how == "log" else tqdm)(iterable, **kwargs)
