"""Sinkhorn on a shifted log-kernel: the numerical core every solver shares.

Why one place: labeled GW, the feature step and plain :func:`~rima_core.core.ot.sinkhorn` all
solve entropic OT through :func:`_solve` (stabilised scaling iterations with absorption, then
the log domain as a last resort; package docstring, "Numerics"), so a fix to the iterations or
the stopping rule reaches all of them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .resources import _empty, _exp_

logger = logging.getLogger(__name__)


@dataclass
class _SinkhornResult:
    t: torch.Tensor
    f: torch.Tensor  # row potential (cost units), -inf on zero-mass rows
    g: torch.Tensor
    iterations: int
    error: float  # L1 error of both marginals (a bound; columns exact after the last update)
    converged: bool
    log_domain: bool
    absorptions: int


def _finite_or_zero(t: torch.Tensor) -> torch.Tensor:
    """``t`` with NaN and ±inf replaced by 0: one op (``isfinite`` + ``where`` are five at the
    dispatcher, and at batch sizes each op's overhead is the cost)."""
    return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)


def _shift(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Subtract row maxima, then column maxima, of a log-kernel in place.

    Afterwards every finite entry is <= 0 and every row and column that has a finite entry
    holds a 0, so ``exp(h)`` lies in (0, 1] with a 1 in every such row and column. Rows and
    columns that are entirely ``-inf`` (masked) get a shift of 0.
    """
    rmax = h.amax(dim=1)
    rmax = _finite_or_zero(rmax)
    h.sub_(rmax[:, None])
    cmax = h.amax(dim=0)
    cmax = _finite_or_zero(cmax)
    h.sub_(cmax[None, :])
    return h, rmax, cmax


def _scaling_limit(dtype: torch.dtype) -> float:
    """Scalings beyond [1/limit, limit] are absorbed into the kernel (float32: ~2.5e15).

    The scalings carry the marginal masses (``u ~ p / K v``, ~1e-4 at d = 6144), so the range
    must be wide enough that a converging solve at the default epsilon never needs an absorption
    (each costs an ``exp`` over the matrix), yet leave room below the float range for the growth
    between two checks and for the products ``u K v``.
    """
    return float(torch.finfo(dtype).max) ** 0.4


def _build_kernel(
    h: torch.Tensor,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    floor: float | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``exp(max(h + a_i + b_j, floor))``, written into ``out`` when given (no allocation).

    ``floor`` keeps the exponent above float underflow: ``exp`` of arguments whose result
    underflows takes a slow path (~15x slower on the 12.6M-entry feature kernel). It must be
    None where ``h`` holds ``-inf`` for forbidden pairs that have to stay exactly 0.
    """
    if a is None and b is None:
        if out is None:
            k = h.clone() if floor is None else h.clamp_min(floor)
        else:
            k = out.copy_(h) if floor is None else torch.clamp(h, min=floor, out=out)
    else:
        row = a[:, None] if a is not None else torch.zeros((), dtype=h.dtype, device=h.device)
        k = h + row if out is None else torch.add(h, row, out=out)
        if b is not None:
            k.add_(b[None, :])
        if floor is not None:
            k.clamp_min_(floor)
    return _exp_(k)


def _relaxed(
    old: torch.Tensor, new: torch.Tensor, pos: torch.Tensor, omega: float, zero: torch.Tensor
) -> torch.Tensor:
    """Over-relaxed scaling ``old^(1-ω) new^ω`` (0 where the marginal is 0); ``new`` if ω = 1."""
    if omega == 1.0:
        return new
    return torch.where(pos, old.pow(1.0 - omega) * new.pow(omega), zero)


@dataclass
class _Scaling:
    """The iterate of the kernel route: kernel ``K = exp(h + a_i + b_j)`` with the absorbed
    log-scalings ``a, b``, the running scalings ``u, v`` (``v_plain``: the last plain column
    update) and the mat-vecs ``kv = K v``, ``ktu = Kᵀu`` that the convergence test reuses."""

    k: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    v_plain: torch.Tensor
    kv: torch.Tensor
    ktu: torch.Tensor | None = None


@dataclass
class _Masses:
    """The marginals of one kernel-route solve and what its iterations derive from them once."""

    p: torch.Tensor
    q: torch.Tensor
    pos_p: torch.Tensor  # rows / columns that carry mass
    pos_q: torch.Tensor
    zero: torch.Tensor
    pq: torch.Tensor  # both marginals: the target of the convergence test
    pad: torch.Tensor  # +inf on zero-mass rows/columns: excludes them from the scalings' min
    tiny: float  # clamp of K v and Kᵀu: zero-mass rows keep scaling 0 rather than NaN


def _masses(h: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> _Masses:
    """Computed once per solve (in ``h``'s dtype and device): at batch sizes every op's
    overhead is the cost, so the loop must not redo them."""
    pos_p = p > 0
    pos_q = q > 0
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    pq = torch.cat([p, q])
    pad = torch.where(pq > 0, zero, math.inf)
    return _Masses(p, q, pos_p, pos_q, zero, pq, pad, torch.finfo(h.dtype).tiny)


def _scaling_start(
    h: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    b0: torch.Tensor | None,
    floor: float | None,
    k_buf: torch.Tensor | None,
) -> _Scaling:
    """Scalings 1 on the kernel of ``h`` with the warm column log-scaling ``b0`` absorbed."""
    a = torch.zeros_like(p)
    b = torch.zeros_like(q) if b0 is None else b0.clone()
    k = _build_kernel(h, None, b0, floor, k_buf)
    u = torch.ones_like(p)
    v = torch.ones_like(q)
    return _Scaling(k, a, b, u, v, v, k @ v)


def _scaling_update(s: _Scaling, m: _Masses, omega: float) -> None:
    """One iteration in place: rows, then columns, each over-relaxed by ``omega``."""
    u_new = m.p / s.kv.clamp_min(m.tiny)
    s.u = _relaxed(s.u, u_new, m.pos_p, omega, m.zero)
    s.ktu = s.k.T @ s.u
    s.v_plain = m.q / s.ktu.clamp_min(m.tiny)
    s.v = _relaxed(s.v, s.v_plain, m.pos_q, omega, m.zero)
    s.kv = s.k @ s.v


def _scaling_stats(s: _Scaling, m: _Masses) -> list[float]:
    """One host sync: ``[marginal error, largest scaling, smallest scaling]``, the scalings
    those of mass-carrying rows/columns (few ops: at batch sizes each op's overhead is the
    cost)."""
    assert s.ktu is not None  # set by the first update
    uv = torch.cat([s.u, s.v])
    return torch.stack(
        [torch.dist(torch.cat([s.u * s.kv, s.v * s.ktu]), m.pq, 1), uv.max(), (uv + m.pad).min()]
    ).tolist()


def _absorb(
    s: _Scaling, m: _Masses, h: torch.Tensor, floor: float | None, k_buf: torch.Tensor | None
) -> None:
    """Fold the scalings into the kernel (one ``exp``) and restart them from 1.

    Right after a column update every entry of ``u K v`` is at most ``q_j <= 1`` (for ω = 1),
    so the rebuilt kernel cannot overflow.
    """
    s.a = s.a + s.u.log()
    s.b = s.b + s.v.log()
    s.k = _build_kernel(h, s.a, s.b, floor, k_buf)
    s.u = torch.ones_like(m.p)
    s.v = s.v_plain = torch.ones_like(m.q)
    s.kv = s.k @ s.v


def _scaling_coupling(s: _Scaling) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``T = diag(u) K diag(v_plain)`` in fresh memory and the final log-scalings: ending on
    the plain column update gives exact columns (see :func:`_sinkhorn_kernel`)."""
    v = s.v_plain  # the identity when ω = 1
    t = torch.mul(s.k, s.u[:, None], out=_empty(tuple(s.k.shape), s.k.dtype, s.k.device))
    t.mul_(v[None, :])
    return t, s.a + s.u.log(), s.b + v.log()


def _sinkhorn_kernel(
    h: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    b0: torch.Tensor | None,
    max_iter: int,
    tol: float,
    check_every: int,
    floor: float | None = None,
    k_buf: torch.Tensor | None = None,
    relax: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float, bool, int] | None:
    """Scaling Sinkhorn with absorption (Schmitzer 2019) on the log-kernel ``h <= 0``.

    The kernel is ``exp(h + a_i + b_j)`` with absorbed log-scalings ``a, b``; the running
    scalings ``u, v`` are folded into ``a, b`` and the kernel rebuilt (one ``exp``) whenever
    they leave ``[1/limit, limit]`` — which a small epsilon needs, since the optimal duals then
    lie many ``epsilon`` away from the row/column-minimum shift. Division by a clamped ``K v``
    keeps zero-mass rows at scaling 0 rather than NaN. Each iteration costs two mat-vecs, and
    the convergence test reuses both: the error of the iterate ``(u, v)`` is
    ``|u * K v − p|₁ + |v * Kᵀu − q|₁`` (``K v`` is the next row update's, ``Kᵀu`` this column
    update's), tested every ``check_every`` iterations (one host sync each).

    ``relax`` = ω > 1 over-relaxes the updates, ``u <- u^(1-ω) (p / K v)^ω`` (Thibault et al.,
    "Overrelaxed Sinkhorn-Knopp", 2017): ω = 1.5 halves the iterations of the feature problem.
    An over-relaxed column update leaves the columns inexact, so the solve ends on the plain
    one ``v = q / Kᵀu`` (no extra mat-vec: ``Kᵀu`` is at hand). That moves the row sums by at
    most the column error (``Σ_j (Kᵀu)_j |v'_j − v_j| = |v * Kᵀu − q|₁``, all terms >= 0), so
    the returned coupling has exact columns and a row error <= the reported ``error``.

    Returns ``(T, a, b, iterations, error, converged, absorptions)`` with the final log-scalings
    (relative to ``h``), or None when the iterates stopped being finite (the caller then
    retries without relaxation, then in the log domain).
    """
    limit = _scaling_limit(h.dtype)
    s = _scaling_start(h, p, q, b0, floor, k_buf)
    m = _masses(h, p, q)
    omega = relax
    err = prev_err = math.inf
    it = 0
    absorptions = 0
    converged = False
    while it < max_iter:
        _scaling_update(s, m, omega)
        it += 1
        if it % check_every and it != max_iter:
            continue
        err, largest, smallest = _scaling_stats(s, m)
        if not (math.isfinite(err) and math.isfinite(largest) and smallest > 0.0):
            return None  # NaN/overflow, or a scaling of a mass-carrying row underflowed to 0
        if err <= tol:
            converged = True
            break
        if err > prev_err:
            omega = 1.0  # over-relaxation stopped helping: plain (monotone) updates from here
        prev_err = err
        if max(largest, 1.0 / smallest) > limit and it < max_iter:
            _absorb(s, m, h, floor, k_buf)
            absorptions += 1
    t, a, b = _scaling_coupling(s)
    return t, a, b, it, err, converged, absorptions


def _sinkhorn_log(
    h: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    b0: torch.Tensor,
    max_iter: int,
    tol: float,
    check_every: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, float, bool]:
    """Log-domain Sinkhorn on log-kernel ``h`` (``-inf`` = forbidden): cannot overflow.

    An all ``-inf`` row (zero-mass sample) has log-sum-exp ``-inf``; it is replaced by 0 so the
    row's log-scaling is ``log 0 = -inf`` rather than NaN.
    """
    logp = p.log()
    logq = q.log()
    a = torch.zeros_like(p)
    b = b0.clone()
    err = math.inf
    it = 0
    converged = False

    def _safe(lse: torch.Tensor) -> torch.Tensor:
        return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    while it < max_iter:
        a = logp - _safe(torch.logsumexp(h + b[None, :], 1))
        b = logq - _safe(torch.logsumexp(h + a[:, None], 0))
        it += 1
        if it % check_every == 0 or it == max_iter:
            row = (a + torch.logsumexp(h + b[None, :], 1)).exp()
            err = float((row - p).abs().sum())
            if err <= tol:
                converged = True
                break
    t = (h + a[:, None] + b[None, :]).exp_()
    return t, a, b, it, err, converged


@dataclass(frozen=True)
class _Rules:
    """How one Sinkhorn solve iterates and stops (shared by every route and every caller)."""

    max_iter: int
    tol: float  # on the L1 error of both marginals
    check_every: int  # iterations between convergence tests (each one host sync)
    log_domain: bool | None = None  # None: automatic fallback; True: always; False: never
    relax: float = 1.0  # over-relaxation ω of the kernel route (1 = plain Sinkhorn)


def _solve(
    h: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    eps: float,
    rules: _Rules,
    b0: torch.Tensor | None = None,
    floor: float | None = None,
    k_buf: torch.Tensor | None = None,
) -> _SinkhornResult:
    """Entropic OT for the *shifted* log-kernel ``h = (f + g − C)/eps`` (``-inf`` = forbidden).

    Tries the stabilised kernel route (over-relaxed if ``rules.relax`` > 1, then plain) unless
    ``rules.log_domain`` is True; the log-domain route is the last resort. ``b0``: initial
    column log-scaling (a warm start). ``floor``/``k_buf``: see :func:`_build_kernel`.
    """
    its, tol, every = rules.max_iter, rules.tol, rules.check_every
    if not rules.log_domain:
        for omega in dict.fromkeys((rules.relax, 1.0)):
            out = _sinkhorn_kernel(h, p, q, b0, its, tol, every, floor, k_buf, omega)
            if out is not None:
                t, a, b, it, err, conv, absorbed = out
                return _SinkhornResult(t, f + eps * a, g + eps * b, it, err, conv, False, absorbed)
            logger.debug("kernel-domain Sinkhorn (relax=%s) stopped being finite", omega)
        if rules.log_domain is False:
            raise FloatingPointError(
                "Sinkhorn iterates stopped being finite and log_domain=False forbids the "
                "log-domain fallback"
            )
    b0 = torch.zeros_like(q) if b0 is None else b0
    t, a, b, it, err, conv = _sinkhorn_log(h, p, q, b0, its, tol, every)
    return _SinkhornResult(t, f + eps * a, g + eps * b, it, err, conv, True, 0)


def _solve_shifted(
    h: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    eps: float,
    rules: _Rules,
    warm: bool = False,
) -> _SinkhornResult:
    """:func:`_solve` after shifting ``h`` in place (potentials ``f``, ``g`` absorb the shift).

    ``warm``: the incoming potentials are a previous solution (the GW outer loop), so the
    column shift is handed back as the initial column scaling instead of being thrown away —
    otherwise the shift would erase the warm start and every inner solve would restart.
    """
    h, rmax, cmax = _shift(h)
    f = f - eps * rmax
    g = g - eps * cmax
    b0 = None
    if warm:
        # a column whose warm scaling would underflow starts from 1 (it is far off anyway)
        b0 = cmax.clamp_min(0.5 * math.log(torch.finfo(h.dtype).tiny))
    return _solve(h, f, g, p, q, eps, rules, b0=b0)
