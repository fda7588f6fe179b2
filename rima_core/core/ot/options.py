"""The option checks and defaults every public solver shares (one place, so they cannot drift
apart): iteration counts, over-relaxation, the convergence-test interval and the log dict.

Every solver takes ``log``: with ``log=True`` it returns ``(T, log_dict)``, whose keys include
``SOLVER_LOG_KEYS`` plus the solver's own. ``num_threads`` is the thread policy of
:func:`~rima_core.core.ot.resources._thread_policy`.
"""

from __future__ import annotations

from typing import Any

import torch

from .inputs import OTInputError, _check_epsilon
from .kernel import _SinkhornResult
from .resources import SMALL_PROBLEM_ENTRIES

SOLVER_LOG_KEYS = ("iterations", "marginal_error", "converged", "log_domain")


def _check_iterations(**counts: int) -> None:
    bad = [k for k, v in counts.items() if v < 1]
    if bad:
        raise OTInputError(f"{', '.join(bad)} must be >= 1")


def _check_relax(relax: float) -> None:
    """Over-relaxation ω must lie in [1, 2): Sinkhorn with ω >= 2 need not converge."""
    if not 1.0 <= relax < 2.0:
        raise OTInputError(f"relax must lie in [1, 2), got {relax!r}")


# Iterations between two convergence tests when a solver is called with ``check_every=None``.
# On the CPU a test costs a handful of vector ops and no real sync (the values are already in
# host memory). For large problems (the feature step) that is nothing next to an iteration's two
# mat-vecs, so every iteration is tested and the solve stops at the first one that meets its
# tolerance; for small ones (labeled GW at batch sizes, the feature step at params.yaml's sizes)
# a test costs about an iteration's worth of op overhead, and every 3rd was measured fastest
# (10-15 % over every one, 1 thread). On an accelerator each test is a device->host sync that
# stalls the queue, so it happens every 5-10 iterations.
CHECK_EVERY_CPU = 1
CHECK_EVERY_CPU_SMALL = 3
CHECK_EVERY_ACCELERATOR = {"sinkhorn": 10, "labeled_gw": 5, "feature_coupling": 10}


def _check_interval(
    check_every: int | None, device: torch.device, solver: str, entries: int
) -> int:
    """``check_every`` as given, or the default for ``device`` and the problem's size when None
    (``entries``: of the matrix Sinkhorn iterates on; see above)."""
    if check_every is not None:
        return check_every
    if device.type != "cpu":
        return CHECK_EVERY_ACCELERATOR[solver]
    return CHECK_EVERY_CPU_SMALL if entries <= SMALL_PROBLEM_ENTRIES else CHECK_EVERY_CPU


def _check_solver_options(epsilon: float, relax: float | None = None, **counts: int) -> float:
    """The option checks every solver makes (one place, so the solvers cannot drift apart);
    returns ``epsilon`` as a float."""
    eps = _check_epsilon(epsilon)
    _check_iterations(**counts)
    if relax is not None:
        _check_relax(relax)
    return eps


def _sinkhorn_log_dict(res: _SinkhornResult) -> dict[str, Any]:
    return {
        "iterations": res.iterations,
        "marginal_error": res.error,
        "converged": res.converged,
        "log_domain": res.log_domain,
        "absorptions": res.absorptions,
    }
