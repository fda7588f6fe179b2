"""Label-constrained entropic Gromov-Wasserstein (:func:`labeled_gw`), in named parts.

Why in parts: inputs (:func:`_gw_inputs`), the problem computed once (:func:`_gw_problem`), the
start (:func:`_gw_start`) and the mirror-descent loop (:func:`_gw_mirror_descent`) can each be
read, timed (``benchmarks/speed.py``) and tested on their own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .costs import CLASS_MASS_RULES, _gw_linear_cost, class_marginals, gw_energy, scaled_sqdist
from .inputs import (
    ArrayLike,
    OTInputError,
    _back,
    _check_finite,
    _compute_dtype,
    _features,
    _labels,
    _Origin,
    _output_dtype,
)
from .kernel import _finite_or_zero, _Rules, _solve_shifted
from .options import _check_interval, _check_solver_options
from .resources import _thread_policy

logger = logging.getLogger(__name__)


def _gw_inputs(
    x: ArrayLike, labels_x: ArrayLike, z: ArrayLike, labels_z: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, _Origin]:
    """Features in the compute dtype on ``x``'s device, integer labels, and how to answer."""
    xt = _features(x, "x", None)
    device = xt.device
    zt = _features(z, "z", device)
    lx = _labels(labels_x, xt.shape[0], "labels_x", device)
    lz = _labels(labels_z, zt.shape[0], "labels_z", device)
    dtype = _compute_dtype(xt, zt)
    origin = _Origin(isinstance(x, np.ndarray), _output_dtype(xt, zt, dtype), device)
    return xt.to(dtype), zt.to(dtype), lx, lz, origin


@dataclass
class _GWProblem:
    """Everything the mirror-descent loop needs, computed once per call."""

    cx: torch.Tensor  # max-scaled intra-set costs
    cz: torch.Tensor
    mask: torch.Tensor  # same-label pairs
    p: torch.Tensor  # class-balanced marginals
    q: torch.Tensor
    const: torch.Tensor  # C_x² p 1ᵀ + 1 qᵀ C_z²: the part of L(T) that does not depend on T


def _gw_problem(
    xt: torch.Tensor, zt: torch.Tensor, lx: torch.Tensor, lz: torch.Tensor, class_mass: str
) -> tuple[_GWProblem, int]:
    """Costs, marginals and the constant cost term; plus the number of shared classes.

    The shared-class count is the one host sync before the solve.
    """
    mask, p, q = class_marginals(lx, lz, class_mass, xt.dtype)
    n_shared = int(torch.unique(lx[mask.any(1)]).numel())
    cx = scaled_sqdist(xt)
    cz = scaled_sqdist(zt)
    const = ((cx * cx) @ p)[:, None] + ((cz * cz) @ q)[None, :]
    return _GWProblem(cx, cz, mask, p, q, const), n_shared


def _gw_start(prob: _GWProblem) -> torch.Tensor:
    """The product coupling inside each class block: feasible and label-respecting."""
    dtype = prob.p.dtype
    w_of_x = (prob.mask.to(dtype) @ prob.q).clamp_min(torch.finfo(dtype).tiny)  # x_i's w_c
    return torch.where(
        prob.mask,
        prob.p[:, None] * prob.q[None, :] / w_of_x[:, None],
        torch.zeros((), dtype=dtype, device=prob.p.device),
    )


@dataclass
class _GWTrace:
    t: torch.Tensor
    iterations: int
    sinkhorn_iterations: int
    converged: bool
    log_domain: bool


def _gw_mirror_descent(
    prob: _GWProblem, eps: float, max_iter: int, tol: float, inner: _Rules
) -> _GWTrace:
    """Outer loop: linearise at ``T``, solve the masked entropic OT warm-started, repeat.

    Stops when the L1 change of ``T`` is <= ``tol`` and that step's inner solve met its
    tolerance (one host sync per outer step): a loose ``tol`` must not end the loop on an
    unconverged Sinkhorn solve (small epsilon), whose warm-started successors would still
    improve the marginals. Once an inner solve needed the log domain, the later ones start there.
    """
    t = _gw_start(prob)
    f = torch.zeros_like(prob.p)
    g = torch.zeros_like(prob.q)
    neg_inf = torch.full((), -math.inf, dtype=t.dtype, device=t.device)
    use_log = bool(inner.log_domain)
    converged = False
    sink_its = 0
    outer = 0
    while outer < max_iter:
        outer += 1
        cost = _gw_linear_cost(prob.cx, prob.cz, t, prob.const)
        f = _finite_or_zero(f)
        g = _finite_or_zero(g)
        h = torch.where(prob.mask, (f[:, None] + g[None, :] - cost) / eps, neg_inf)
        rules = replace(inner, log_domain=True) if use_log else inner
        res = _solve_shifted(h, f, g, prob.p, prob.q, eps, rules, warm=outer > 1)
        use_log = use_log or res.log_domain
        sink_its += res.iterations
        change = float((res.t - t).abs().sum())
        t, f, g = res.t, res.f, res.g
        if change <= tol and res.converged:
            converged = True
            break
    return _GWTrace(t, outer, sink_its, converged, use_log)


def _gw_log() -> dict[str, Any]:
    """The log of the all-zero coupling (a side empty, or no class shared); a solve updates it."""
    return {
        "iterations": 0,
        "sinkhorn_iterations": 0,
        "marginal_error": 0.0,
        "objective": 0.0,
        "converged": True,
        "log_domain": False,
        "n_shared_classes": 0,
    }


def _gw_options(
    xt: torch.Tensor,
    zt: torch.Tensor,
    epsilon: float,
    max_iter: int,
    inner_max_iter: int,
    check_every: int | None,
    class_mass: str,
) -> tuple[float, int]:
    """``epsilon`` as a float and the convergence-test interval, after every option check."""
    check_every = _check_interval(check_every, xt.device, "labeled_gw", xt.shape[0] * zt.shape[0])
    eps = _check_solver_options(
        epsilon, max_iter=max_iter, inner_max_iter=inner_max_iter, check_every=check_every
    )
    if class_mass not in CLASS_MASS_RULES:
        raise OTInputError(f"class_mass must be one of {CLASS_MASS_RULES}, got {class_mass!r}")
    return eps, check_every


def _gw_summary(prob: _GWProblem, trace: _GWTrace) -> dict[str, Any]:
    """What the log reports of a finished solve: the counts, the L1 error of both marginals and
    the GW energy of ``T`` with the scaled costs (two host syncs)."""
    t = trace.t
    marg = float((t.sum(1) - prob.p).abs().sum() + (t.sum(0) - prob.q).abs().sum())
    objective = float(gw_energy(prob.cx, prob.cz, t))
    return {
        "iterations": trace.iterations,
        "sinkhorn_iterations": trace.sinkhorn_iterations,
        "marginal_error": marg,
        "objective": objective,
        "converged": trace.converged,
        "log_domain": trace.log_domain,
    }


def labeled_gw(
    x: ArrayLike,
    labels_x: ArrayLike,
    z: ArrayLike,
    labels_z: ArrayLike,
    epsilon: float = 5e-3,
    max_iter: int = 50,
    tol: float = 1e-3,
    inner_max_iter: int = 500,
    inner_tol: float = 1e-3,
    check_every: int | None = None,
    class_mass: str = "share",
    log_domain: bool | None = None,
    num_threads: int | None = None,
    log: bool = True,
) -> ArrayLike | tuple[ArrayLike, dict[str, Any]]:
    """Label-constrained entropic Gromov-Wasserstein coupling between ``x`` and ``z``.

    ``x`` (n_x × d_x) and ``z`` (n_z × d_z) may live in spaces of different dimension: only
    their intra-set squared-Euclidean distances (each divided by its max) are compared. Mass
    moves only between equal labels; the class masses follow ``class_mass`` (module docstring).

    Mirror descent (Peyré et al. 2016, the scheme of POT's and OTT's entropic GW): each outer
    step linearises the GW energy at the current ``T`` and solves one entropic OT problem with
    the masked Gibbs kernel, warm-started from the previous potentials. The outer loop stops
    when the L1 change of ``T`` is <= ``tol`` (and the step's inner solve converged); each
    Sinkhorn solve stops when the L1 error of both its marginals is <= ``inner_tol`` (tested
    every ``check_every`` iterations, None = the device's default; with the one test of the
    change of ``T`` per outer step, the only host syncs inside the loops). The defaults are the
    training accuracy (module docstring, "Stopping rules"); the former ``tol=1e-5,
    inner_tol=1e-6`` give class masses exact to ~1e-6.
    ``log_domain``: None = automatic fallback, True = always, False = never (raise instead).
    ``num_threads``: the thread policy (module docstring; one thread at batch sizes).

    Returns ``T`` (n_x × n_z) in the caller's type/device/dtype and, with ``log`` (the default
    here, unlike the other solvers: a caller needs ``n_shared_classes`` to know whether ``T``
    carries any information), a dict: ``iterations`` (outer), ``sinkhorn_iterations`` (total
    inner), ``marginal_error`` (L1 of both marginals), ``objective`` (GW energy of ``T`` with
    the scaled costs), ``converged``, ``log_domain``, ``n_shared_classes``. When no class is
    shared (or a side is empty) ``T`` is all zeros and ``n_shared_classes`` is 0: the caller
    should skip its OT loss.
    """
    xt, zt, lx, lz, origin = _gw_inputs(x, labels_x, z, labels_z)
    eps, check_every = _gw_options(
        xt, zt, epsilon, max_iter, inner_max_iter, check_every, class_mass
    )
    n_x, n_z = xt.shape[0], zt.shape[0]
    info = _gw_log()
    zeros = torch.zeros(n_x, n_z, dtype=xt.dtype, device=xt.device)
    if n_x == 0 or n_z == 0:
        return (_back(zeros, origin), info) if log else _back(zeros, origin)

    with torch.no_grad(), _thread_policy(num_threads, n_x * n_z, xt.device):
        _check_finite("labeled_gw(x, z)", xt, zt)
        prob, n_shared = _gw_problem(xt, zt, lx, lz, class_mass)
        info["n_shared_classes"] = n_shared
        if n_shared == 0:
            return (_back(zeros, origin), info) if log else _back(zeros, origin)
        inner = _Rules(inner_max_iter, inner_tol, check_every, log_domain)
        trace = _gw_mirror_descent(prob, eps, max_iter, tol, inner)
        summary = _gw_summary(prob, trace)
    info.update(summary)
    if not trace.converged:
        logger.debug(
            "labeled_gw did not converge in %d outer iterations: %s", trace.iterations, info
        )
    return (_back(trace.t, origin), info) if log else _back(trace.t, origin)
