"""The feature step of co-optimal transport: the feature-wise coupling given a sample coupling.

Why a module of its own: it is the one large problem (6144 x 2048 at the paper's shapes), so its
cost, log-kernel and scratch memory are written for memory traffic, unlike labeled GW's.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch

from .inputs import (
    ArrayLike,
    OTInputError,
    _back,
    _check_finite,
    _compute_dtype,
    _features,
    _Origin,
    _output_dtype,
    _to_tensor,
)
from .kernel import _Rules, _solve
from .options import _check_interval, _check_solver_options, _sinkhorn_log_dict
from .resources import DEFAULT_WORKSPACE, Workspace, _col_min, _thread_policy

logger = logging.getLogger(__name__)


def feature_cost(
    x: torch.Tensor, z: torch.Tensor, t: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Co-OT feature cost ``M_ij = Σ_ab (x_ai − z_bj)² t_ab`` (d_x × d_z), unscaled.

    Computed as ``(x²)ᵀ t1 1ᵀ + 1 ((z²)ᵀ tᵀ1)ᵀ − 2 xᵀ t z`` in ONE product of augmented factors
    (a single pass over the d_x × d_z result), into ``out`` when given (see :class:`Workspace`).
    """
    a = t.sum(1)
    b = t.sum(0)
    ones_x = torch.ones(x.shape[1], 1, dtype=x.dtype, device=x.device)
    ones_z = torch.ones(1, z.shape[1], dtype=x.dtype, device=x.device)
    left = torch.cat([-2.0 * (x.T @ t), ((x * x).T @ a)[:, None], ones_x], dim=1)
    right = torch.cat([z, ones_z, ((z * z).T @ b)[None, :]], dim=0)
    return torch.mm(left, right) if out is None else torch.mm(left, right, out=out)


def _feature_log_kernel(m: torch.Tensor, eps: float) -> torch.Tensor:
    """The shifted log-kernel ``h`` of the max-scaled cost, in place of ``m``.

    Shift by row minima, then column minima (kernel entries in (0, 1], a 1 in every row and
    column), then scale by ``1/(epsilon * max M)`` (two plain reductions: ``torch.aminmax``
    along rows is ~15x slower on CPU).
    """
    rmin = m.amin(dim=1)
    scale = 1.0 / (eps * max(float(m.max()), torch.finfo(m.dtype).tiny))
    m.sub_(rmin[:, None])
    cmin = _col_min(m)
    return torch.add(scale * cmin[None, :], m, alpha=-scale, out=m)


def feature_coupling(
    x: ArrayLike,
    z: ArrayLike,
    t: ArrayLike,
    epsilon: float = 5e-3,
    max_iter: int = 200,
    tol: float = 1e-3,
    check_every: int | None = None,
    log_domain: bool | None = None,
    relax: float = 1.5,
    num_threads: int | None = None,
    workspace: Workspace | None = None,
    log: bool = False,
) -> ArrayLike | tuple[ArrayLike, dict[str, Any]]:
    """Feature-wise coupling ``T_v`` (d_x × d_z) given the sample coupling ``t`` (n_x × n_z).

    The co-optimal-transport feature step with square loss: the cost is :func:`feature_cost`
    divided by its max; feature marginals are uniform. ``t`` is fixed, so one entropic solve
    is the whole answer. The solve stops when the L1 error of both marginals is <= ``tol``
    (tested every ``check_every`` iterations, None = the device's default; the columns are
    exact after the last update).
    ``relax``: over-relaxation ω of the Sinkhorn updates (1 = plain Sinkhorn); it drops back
    to 1 by itself as soon as the error stops decreasing. ``log_domain`` as in
    :func:`labeled_gw`; ``num_threads`` the thread policy (module docstring: torch's count at
    the paper's sizes). The two d_x × d_z scratch matrices live in ``workspace``
    (``DEFAULT_WORKSPACE`` when None); the returned matrix is always a fresh tensor.

    Returns ``T_v`` in the caller's type/device/dtype (numpy iff ``x`` is numpy) and, with
    ``log``, ``{iterations, marginal_error, converged, log_domain, absorptions}``.
    """
    origin_is_numpy = isinstance(x, np.ndarray)
    xt = _features(x, "x", None)
    device = xt.device
    zt = _features(z, "z", device)
    tt = _to_tensor(t, "T", device)
    if tt.shape != (xt.shape[0], zt.shape[0]):
        raise OTInputError(
            f"T: expected shape ({xt.shape[0]}, {zt.shape[0]}) to couple x and z, "
            f"got {tuple(tt.shape)}"
        )
    check_every = _check_interval(
        check_every, device, "feature_coupling", xt.shape[1] * zt.shape[1]
    )
    eps = _check_solver_options(epsilon, relax, max_iter=max_iter, check_every=check_every)
    dtype = _compute_dtype(xt, zt)
    origin = _Origin(origin_is_numpy, _output_dtype(xt, zt, dtype), device)
    d_x, d_z = xt.shape[1], zt.shape[1]
    if d_x == 0 or d_z == 0:
        raise OTInputError(f"feature_coupling: empty feature dimension ({d_x}, {d_z})")
    xt = xt.to(dtype)
    zt = zt.to(dtype)
    tt = tt.to(dtype)
    _check_finite("feature_coupling(x, z, T)", xt, zt, tt)

    ws_in = DEFAULT_WORKSPACE if workspace is None else workspace
    with torch.no_grad(), _thread_policy(num_threads, d_x * d_z, device), ws_in.lease() as ws:
        m = feature_cost(xt, zt, tt, out=ws.matrix("feature_cost", (d_x, d_z), dtype, device))
        h = _feature_log_kernel(m, eps)
        res = _solve(
            h,
            torch.zeros(d_x, dtype=dtype, device=device),
            torch.zeros(d_z, dtype=dtype, device=device),
            torch.full((d_x,), 1.0 / d_x, dtype=dtype, device=device),
            torch.full((d_z,), 1.0 / d_z, dtype=dtype, device=device),
            eps, _Rules(max_iter, tol, check_every, log_domain, relax),
            floor=math.log(torch.finfo(dtype).tiny) + 1.0,
            k_buf=ws.matrix("feature_kernel", (d_x, d_z), dtype, device),
        )  # fmt: skip
    if not res.converged:
        logger.debug(
            "feature_coupling: marginal error %.2e after %d its", res.error, res.iterations
        )
    out = _back(res.t, origin)
    return (out, _sinkhorn_log_dict(res)) if log else out
