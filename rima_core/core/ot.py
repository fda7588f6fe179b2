"""Optimal transport for RIMA: label-constrained entropic Gromov-Wasserstein + the feature step.

Why it is written directly in torch rather than calling OTT or POT: the OT step runs on every
training batch, on the training device, on detached features. The authors' route (OTT-JAX called
eagerly, numpy round trips, the feature Sinkhorn solved twice in float64) costs ~10 s per batch
on a CPU; the same math here costs a fraction of a second, and never leaves the device except for
a convergence test every few iterations (see ``benchmarks/speed.py``).

API (shaped like POT's)
-----------------------
Solvers: :func:`sinkhorn` (entropic OT for a given cost, POT's ``ot.sinkhorn`` convention),
:func:`labeled_gw` (label-constrained entropic GW), :func:`feature_coupling` (the co-OT feature
step). Each takes ``log``: with ``log=True`` it returns ``(T, log_dict)``, the dict holding at
least ``SOLVER_LOG_KEYS``. Costs and marginals: :func:`scaled_sqdist`, :func:`feature_cost`,
:func:`class_marginals`; :func:`gw_energy` evaluates a coupling. Inputs are torch tensors or numpy
arrays; results come back in the caller's type, device and dtype.

Resources are explicit. *Threads:* every solver takes ``num_threads``; by default problems of
at most ``SMALL_PROBLEM_ENTRIES`` entries (labeled GW at batch sizes) run on one thread and
larger ones (the feature step) on torch's current count — see :func:`_thread_policy` for why,
and for the caveat that ``torch.set_num_threads`` is process-global (restored on exit).
*Memory:* the feature step keeps its two large scratch matrices in a :class:`Workspace`
(``DEFAULT_WORKSPACE`` unless the caller passes one). There is no other module state.

Conventions (shared by both solvers)
------------------------------------
*Cost scaling.* Every cost matrix is divided by its maximum, so its entries lie in [0, 1].
*Epsilon.* ``epsilon`` is relative to the maximum of the scaled cost, i.e. the Gibbs kernel is
``exp(-C / (epsilon * max C_scaled)) = exp(-C / epsilon)`` on the max-scaled cost: a value of
5e-3 means the same amount of blur whatever the scale of the features. For GW the kernel of each
outer step is built from the linearised cost ``L(T) = C_x² p 1ᵀ + 1 qᵀ C_z² − 2 C_x T C_zᵀ``
(the square-loss decomposition of Peyré et al. 2016); with max-scaled ``C_x, C_z`` and a coupling
of mass 1, ``L(T)`` again lies in [0, 1]. This is OTT's convention (OTT linearises with
``L(T)``); POT's entropic GW builds its kernel from the *gradient* ``2 L(T)``, so POT's
``epsilon`` equals ``2 * epsilon`` here — and, for ``entropic_fused_gromov_wasserstein`` with
weight ``alpha`` (kernel ``exp(-(2 alpha L(T) + (1 - alpha) M) / epsilon_pot)``),
``epsilon_pot = 2 * alpha * epsilon``. The tests check this against POT to ~1e-11 in float64.
For the feature step the kernel is ``exp(-M / epsilon)`` on the max-scaled cost, exactly POT's
``ot.sinkhorn(a, b, M, reg=epsilon)``.

Class masses (labeled GW)
-------------------------
Mass may only move between samples of the same label, and the problem is solved *jointly* over
all classes with the 0/1 same-label mask in the kernel. (One GW problem per class is a different
problem: it drops the cross-class terms of the GW energy.) The two sides generally have
different class counts, so uniform marginals would be infeasible; instead each class ``c``
present on both sides receives a total mass ``w_c`` on each side, spread uniformly over that
class's samples. A class present on one side only gets zero mass (its rows or columns of ``T``
are exactly zero). ``class_mass="share"`` (default) sets ``w_c`` to the mean of the class's
share among the shared-class samples of ``x`` and of ``z`` — it reduces to uniform marginals when
both sides have the same class proportions; ``class_mass="uniform"`` gives every shared class
the same mass.

Numerics
--------
Float32 is enough. Before the single ``exp`` the log-kernel is shifted by its row maxima and then
its column maxima (equivalently the cost by row minima, then column minima), so every kernel
entry lies in (0, 1] with a 1 in every row and column and the scaling form of Sinkhorn neither
overflows nor loses a row. When the scalings leave ``[1/L, L]`` (small epsilon: the optimal
duals lie many epsilon away from that shift) they are absorbed into the kernel, which is rebuilt
(stabilised Sinkhorn, Schmitzer 2019). Only if the iterates still stop being finite is the solve
repeated with log-domain updates (``logsumexp`` with ``-inf`` on masked entries), which cannot
produce NaN — but cost an ``exp`` over the whole matrix per iteration. Masked entries of the
kernel are exact zeros, so cross-label mass is exactly 0.0.

Speed of the feature step (6144 × 2048 at the paper's shapes) is memory traffic: the cost is one
matrix product of augmented factors, the shift and scaling are done in place, the exponent is
floored just above float underflow (``exp`` of underflowing arguments takes a slow path), the
two large scratch matrices are reused across calls (:class:`Workspace`), and the Sinkhorn
updates are over-relaxed (``relax``), which halves the iterations there. On the CPU, large
matrices are allocated through numpy (transparent huge pages, :func:`_empty`), and the kernel's
``exp`` and column minima use numpy's faster single-pass routines.

Stopping rules
--------------
Every Sinkhorn solve stops when the L1 error of *both* marginals of its iterate is <= its
tolerance (:func:`_sinkhorn_kernel`), tested every ``check_every`` iterations: by default on the
CPU every iteration for large problems and every 3rd for small ones (a test costs a few vector
ops there), every 5-10 on an accelerator, where each is a host sync (:func:`_check_interval`).
The defaults are what a training step needs, no tighter: couplings within L1 1e-3 of their
marginals and a GW energy within 2 % of a tight solve (``labeled_gw``: ``tol = inner_tol =
1e-3``; measured within 0.1 % of a float64 solve to 1e-10 at the paper's and the default
shapes, see ``benchmarks/results/ot_speed.md``). Pass tighter tolerances for exact class
masses.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

ArrayLike = torch.Tensor | np.ndarray

CLASS_MASS_RULES = ("share", "uniform")


class OTInputError(ValueError):
    """Inputs that do not describe a valid transport problem (shapes, labels, NaN, epsilon)."""


# --------------------------------------------------------------------------------------------
# conversions


@dataclass
class _Origin:
    """How to hand results back: numpy iff the caller gave numpy, in the caller's dtype."""

    numpy: bool
    dtype: torch.dtype
    device: torch.device


def _to_tensor(a: ArrayLike, name: str, device: torch.device | None = None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    elif isinstance(a, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        raise OTInputError(f"{name}: expected a torch.Tensor or numpy array, got {type(a)!r}")
    if device is not None and t.device != device:
        t = t.to(device)
    return t


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Promote the inputs' float types; half precision is computed in float32."""
    dtype = torch.float32
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    if floats:
        dtype = floats[0]
        for d in floats[1:]:
            dtype = torch.promote_types(dtype, d)
    if dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    return dtype


def _output_dtype(x: torch.Tensor, z: torch.Tensor, compute: torch.dtype) -> torch.dtype:
    """The caller's float type (promoted across x and z); the compute type for int features."""
    if x.is_floating_point() and z.is_floating_point():
        return torch.promote_types(x.dtype, z.dtype)
    return compute


def _features(a: ArrayLike, name: str, device: torch.device | None) -> torch.Tensor:
    t = _to_tensor(a, name, device)
    if t.ndim != 2:
        raise OTInputError(f"{name}: expected a 2-d (samples x features) array, got {t.shape}")
    return t


def _labels(a: ArrayLike, n: int, name: str, device: torch.device) -> torch.Tensor:
    t = _to_tensor(a, name, device)
    if t.ndim != 1 or t.shape[0] != n:
        raise OTInputError(f"{name}: expected {n} labels (1-d), got shape {tuple(t.shape)}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise OTInputError(f"{name}: labels must be integers, got {t.dtype}")
    return t.long()


def _check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    epsilon = float(epsilon)
    if not math.isfinite(epsilon) or epsilon <= 0:
        raise OTInputError(f"{name} must be a positive finite number, got {epsilon!r}")
    return epsilon


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    """One host sync before the solve: NaN/inf features would otherwise surface as NaN T."""
    ok = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
    if not bool(ok):
        raise OTInputError(f"{name}: input contains NaN or infinite values")


def _back(t: torch.Tensor, origin: _Origin) -> ArrayLike:
    t = t.to(origin.dtype)
    if origin.numpy:
        return t.cpu().numpy()
    return t


# --------------------------------------------------------------------------------------------
# resources: scratch memory and threads, both explicit


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


# --------------------------------------------------------------------------------------------
# costs


def scaled_sqdist(x: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances divided by their max.

    The points are centred first: the Gram trick ``|a|² + |b|² − 2ab`` loses digits to
    cancellation in float32 when the features share a large common offset (post-ReLU
    embeddings do).
    """
    xc = x - x.mean(dim=0, keepdim=True)
    sq = (xc * xc).sum(dim=1)
    c = sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T)
    c = c.clamp_min_(0.0)
    c.fill_diagonal_(0.0)
    return c / c.max().clamp_min(torch.finfo(c.dtype).tiny)


def class_marginals(
    lx: torch.Tensor, lz: torch.Tensor, rule: str = "share", dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same-label mask and the per-class balanced marginals ``p, q`` (see module docstring).

    Public so callers and benchmarks can hand other solvers exactly the marginals used here.
    Computed from pairwise label comparisons rather than ``torch.unique`` so that nothing here
    needs a host sync on a GPU.
    """
    mask = lx[:, None] == lz[None, :]
    nx_c = (lx[:, None] == lx[None, :]).sum(1).to(dtype)  # size of x_i's class in x
    nz_c = (lz[:, None] == lz[None, :]).sum(1).to(dtype)  # size of z_j's class in z
    x_shared = mask.any(1)
    z_shared = mask.any(0)
    mz_of_x = mask.sum(1).to(dtype)  # size of x_i's class in z (0: absent there)
    mx_of_z = mask.sum(0).to(dtype)
    one = torch.ones((), dtype=dtype, device=lx.device)
    if rule == "share":
        n_x = x_shared.sum().to(dtype).clamp_min(one)
        n_z = z_shared.sum().to(dtype).clamp_min(one)
        # w_c = (n_x,c / N_x + n_z,c / N_z) / 2, spread over the class's samples on each side
        p = 0.5 * (1.0 / n_x + mz_of_x / (nx_c * n_z))
        q = 0.5 * (1.0 / n_z + mx_of_z / (nz_c * n_x))
    elif rule == "uniform":
        n_classes = (x_shared.to(dtype) / nx_c).sum().clamp_min(one)
        p = 1.0 / (n_classes * nx_c)
        q = 1.0 / (n_classes * nz_c)
    else:
        raise OTInputError(f"class_mass must be one of {CLASS_MASS_RULES}, got {rule!r}")
    p = torch.where(x_shared, p, torch.zeros_like(p))
    q = torch.where(z_shared, q, torch.zeros_like(q))
    return mask, p, q


def _gw_linear_cost(
    cx: torch.Tensor, cz: torch.Tensor, t: torch.Tensor, const: torch.Tensor
) -> torch.Tensor:
    """``L(T) = C_x² p 1ᵀ + 1 qᵀ C_z² − 2 C_x T C_z`` (``const`` holds the first two terms)."""
    return const - 2.0 * (cx @ t @ cz)


def gw_energy(cx: torch.Tensor, cz: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``Σ_ijkl (C_x[i,k] − C_z[j,l])² T_ij T_kl`` using ``T``'s own marginals (exact)."""
    a = t.sum(1)
    b = t.sum(0)
    return a @ (cx * cx) @ a + b @ (cz * cz) @ b - 2.0 * ((cx @ t @ cz) * t).sum()


# --------------------------------------------------------------------------------------------
# Sinkhorn on a shifted log-kernel


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
    tiny = torch.finfo(h.dtype).tiny
    limit = _scaling_limit(h.dtype)
    a = torch.zeros_like(p)
    b = torch.zeros_like(q) if b0 is None else b0.clone()
    k = _build_kernel(h, None, b0, floor, k_buf)
    u = torch.ones_like(p)
    v = torch.ones_like(q)
    v_plain = v
    pos_p = p > 0
    pos_q = q > 0
    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    pq = torch.cat([p, q])
    pad = torch.where(pq > 0, zero, math.inf)  # excludes zero-mass rows/columns from the min
    omega = relax
    err = prev_err = math.inf
    it = 0
    absorptions = 0
    converged = False
    kv = k @ v
    while it < max_iter:
        u_new = p / kv.clamp_min(tiny)
        u = _relaxed(u, u_new, pos_p, omega, zero)
        ktu = k.T @ u
        v_plain = q / ktu.clamp_min(tiny)
        v = _relaxed(v, v_plain, pos_q, omega, zero)
        kv = k @ v
        it += 1
        if it % check_every and it != max_iter:
            continue
        # one host sync: the marginal error, and the range of the scalings of mass-carrying
        # rows/columns (few ops: at batch sizes each op's overhead is the cost)
        uv = torch.cat([u, v])
        stats = torch.stack(
            [torch.dist(torch.cat([u * kv, v * ktu]), pq, 1), uv.max(), (uv + pad).min()]
        ).tolist()
        err = stats[0]
        if not (math.isfinite(stats[0]) and math.isfinite(stats[1]) and stats[2] > 0.0):
            return None  # NaN/overflow, or a scaling of a mass-carrying row underflowed to 0
        if err <= tol:
            converged = True
            break
        if err > prev_err:
            omega = 1.0  # over-relaxation stopped helping: plain (monotone) updates from here
        prev_err = err
        if max(stats[1], 1.0 / stats[2]) > limit and it < max_iter:
            # fold the scalings into the kernel; right after a column update every entry of
            # u K v is at most q_j <= 1 (for ω = 1), so the rebuilt kernel cannot overflow
            a = a + u.log()
            b = b + v.log()
            k = _build_kernel(h, a, b, floor, k_buf)
            u = torch.ones_like(p)
            v = v_plain = torch.ones_like(q)
            kv = k @ v
            absorptions += 1
    v = v_plain  # exact columns (see above); the identity when ω = 1
    t = torch.mul(k, u[:, None], out=_empty(tuple(k.shape), k.dtype, k.device))
    t.mul_(v[None, :])
    return t, a + u.log(), b + v.log(), it, err, converged, absorptions


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


# --------------------------------------------------------------------------------------------
# public solvers
#
# Every solver takes ``log``: with ``log=True`` it returns ``(T, log_dict)``, whose keys include
# ``SOLVER_LOG_KEYS`` plus the solver's own. ``num_threads`` is the thread policy of
# :func:`_thread_policy`.

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


# ---- labeled GW, in named parts


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
    check_every = _check_interval(check_every, xt.device, "labeled_gw", xt.shape[0] * zt.shape[0])
    eps = _check_solver_options(
        epsilon, max_iter=max_iter, inner_max_iter=inner_max_iter, check_every=check_every
    )
    if class_mass not in CLASS_MASS_RULES:
        raise OTInputError(f"class_mass must be one of {CLASS_MASS_RULES}, got {class_mass!r}")
    n_x, n_z = xt.shape[0], zt.shape[0]
    info: dict[str, Any] = {
        "iterations": 0,
        "sinkhorn_iterations": 0,
        "marginal_error": 0.0,
        "objective": 0.0,
        "converged": True,
        "log_domain": False,
        "n_shared_classes": 0,
    }
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
        t = trace.t
        marg = float((t.sum(1) - prob.p).abs().sum() + (t.sum(0) - prob.q).abs().sum())
        objective = float(gw_energy(prob.cx, prob.cz, t))
    info.update(
        iterations=trace.iterations,
        sinkhorn_iterations=trace.sinkhorn_iterations,
        marginal_error=marg,
        objective=objective,
        converged=trace.converged,
        log_domain=trace.log_domain,
    )
    if not trace.converged:
        logger.debug(
            "labeled_gw did not converge in %d outer iterations: %s", trace.iterations, info
        )
    return (_back(t, origin), info) if log else _back(t, origin)


# ---- feature coupling


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
