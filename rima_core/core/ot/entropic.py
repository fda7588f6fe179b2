"""Entropic OT for a given cost, POT's ``ot.sinkhorn`` convention.

Why a public solver of its own: it is the building block the tests compare with POT directly,
and the route for callers that already have a cost matrix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .inputs import (
    ArrayLike,
    OTInputError,
    _back,
    _check_finite,
    _compute_dtype,
    _Origin,
    _to_tensor,
)
from .kernel import _Rules, _solve_shifted
from .options import _check_interval, _check_solver_options, _sinkhorn_log_dict
from .resources import _thread_policy


def sinkhorn(
    a: ArrayLike,
    b: ArrayLike,
    cost: ArrayLike,
    epsilon: float,
    max_iter: int = 1000,
    tol: float = 1e-9,
    check_every: int | None = None,
    relax: float = 1.0,
    log_domain: bool | None = None,
    num_threads: int | None = None,
    log: bool = False,
) -> ArrayLike | tuple[ArrayLike, dict[str, Any]]:
    """Entropic OT between histograms ``a`` (n) and ``b`` (m) for ``cost`` (n × m).

    The coupling minimises ``<T, C> − epsilon H(T)`` with marginals ``a, b``; its kernel is
    ``exp(-C / epsilon)`` on the cost as given (no scaling), i.e. POT's
    ``ot.sinkhorn(a, b, C, reg=epsilon)``. ``+inf`` cost entries forbid a pair (exact 0 in
    ``T``). Stabilised scaling iterations, with the log-domain fallback of ``log_domain``
    (module docstring); the solve stops when the L1 error of both marginals is <= ``tol``
    (tested every ``check_every`` iterations; None = the device's default, module docstring).
    ``relax`` over-relaxes the updates (1 = plain).
    ``num_threads``: the thread policy (module docstring).

    Returns ``T`` in the caller's type/device/dtype (numpy iff ``cost`` is numpy); with ``log``
    also ``{iterations, marginal_error, converged, log_domain, absorptions, f, g}``, where the
    dual potentials give ``T_ij = exp((f_i + g_j − C_ij) / epsilon)``.
    """
    origin_is_numpy = isinstance(cost, np.ndarray)
    ct = _to_tensor(cost, "cost")
    device = ct.device
    at = _to_tensor(a, "a", device)
    bt = _to_tensor(b, "b", device)
    if ct.ndim != 2 or at.shape != (ct.shape[0],) or bt.shape != (ct.shape[1],):
        raise OTInputError(
            f"sinkhorn: expected a (n,), b (m,), cost (n, m); got {tuple(at.shape)}, "
            f"{tuple(bt.shape)}, {tuple(ct.shape)}"
        )
    check_every = _check_interval(check_every, device, "sinkhorn", ct.numel())
    eps = _check_solver_options(epsilon, relax, max_iter=max_iter, check_every=check_every)
    dtype = _compute_dtype(ct, at, bt)
    origin = _Origin(origin_is_numpy, ct.dtype if ct.is_floating_point() else dtype, device)
    ct, at, bt = ct.to(dtype), at.to(dtype), bt.to(dtype)
    _check_finite("sinkhorn(a, b)", at, bt)
    if bool(torch.isnan(ct).any()) or bool((at < 0).any()) or bool((bt < 0).any()):
        raise OTInputError("sinkhorn: cost has NaN or a marginal has negative entries")
    with torch.no_grad(), _thread_policy(num_threads, ct.numel(), device):
        zeros_a, zeros_b = torch.zeros_like(at), torch.zeros_like(bt)
        h = ct.neg().div_(eps)
        rules = _Rules(max_iter, tol, check_every, log_domain, relax)
        res = _solve_shifted(h, zeros_a, zeros_b, at, bt, eps, rules)
    out = _back(res.t, origin)
    if not log:
        return out
    return out, {**_sinkhorn_log_dict(res), "f": _back(res.f, origin), "g": _back(res.g, origin)}
