"""A plain, independent numpy implementation of the RIMA OT step, the yardstick of
``rima_core.core.ot``.

Why it exists: the speed target of the OT step is relative ("at most 1.2x a plain numpy
implementation that reaches the same accuracy"), because absolute times on a shared CPU move with
their load. This module is written from the math in ``rima_core/core/ot/``'s module docstring, not
from its code: float32 throughout, mirror-descent entropic GW on the masked, warm-started,
row/column-shifted kernel, and the feature step as one Sinkhorn solve on the max-scaled COOT cost.

It has its *own, natural* stopping rule, not the library's: the accuracy a training step needs
is "marginals within L1 1e-3" (and a GW energy within 2 % of a tight solve), so

* every Sinkhorn solve stops at the first iteration whose marginal error (rows + columns, L1)
  is <= ``tol`` — tested after *every* iteration, since on the host the test is free (both
  mat-vecs it needs are the ones the next update uses);
* the GW outer loop stops when the L1 change of ``T`` is <= ``tol``.

It has none of the library's guards (no absorption, no log-domain fallback, no input checks):
at the benchmark's shapes and epsilons neither is needed, which ``benchmarks/speed.py`` checks
by comparing the marginal errors and GW energies of both solutions.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
TOL = 1e-3  # the accuracy criterion: L1 marginal error of every coupling


_BUFFERS: dict[tuple[int, int], np.ndarray] = {}


def _buffer(shape: tuple[int, int]) -> np.ndarray:
    """A float32 scratch matrix kept across calls (benchmark-only: one caller, one thread)."""
    if shape not in _BUFFERS:
        _BUFFERS.clear()
        _BUFFERS[shape] = np.empty(shape, F32)
    return _BUFFERS[shape]


def share_marginals(lx: np.ndarray, lz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Same-label mask and the "share" class marginals, written out per class."""
    shared = np.intersect1d(lx, lz)
    in_x, in_z = np.isin(lx, shared), np.isin(lz, shared)
    p, q = np.zeros(len(lx), F32), np.zeros(len(lz), F32)
    for c in shared:
        nxc, nzc = (lx == c).sum(), (lz == c).sum()
        w = 0.5 * (nxc / in_x.sum() + nzc / in_z.sum())
        p[lx == c] = w / nxc
        q[lz == c] = w / nzc
    return lx[:, None] == lz[None, :], p, q


def scaled_sqdist(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=0, keepdims=True)
    sq = np.einsum("ij,ij->i", xc, xc)
    c = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (xc @ xc.T), 0.0)
    np.fill_diagonal(c, 0.0)
    return (c / c.max()).astype(F32)


def gw_energy(cx: np.ndarray, cz: np.ndarray, t: np.ndarray) -> float:
    """``sum_ijkl (C_x[i,k] - C_z[j,l])^2 T_ij T_kl`` in float64, from T's own marginals."""
    cx, cz, t = cx.astype(np.float64), cz.astype(np.float64), t.astype(np.float64)
    a, b = t.sum(1), t.sum(0)
    return float(a @ (cx * cx) @ a + b @ (cz * cz) @ b - 2.0 * ((cx @ t @ cz) * t).sum())


def _sinkhorn(
    k: np.ndarray, p: np.ndarray, q: np.ndarray, tol: float, max_iter: int, omega: float = 1.0
) -> tuple[np.ndarray, np.ndarray, int, float]:
    """Scaling Sinkhorn from ``v = 1``; stops once the L1 marginal error is <= ``tol``.

    ``omega`` > 1 over-relaxes the updates until the error stops falling. The error of the
    iterate ``(u, v)`` is ``|u * K v - p| + |v * K'u - q|``, from the two mat-vecs the loop
    computes anyway. Returns ``(u, v, iterations, error)``; on stopping, ``v`` is replaced by
    the plain update ``q / K'u`` (exact columns), which moves the rows by at most the column
    error, so the returned coupling's error is still <= the reported one.
    """
    tiny = np.finfo(F32).tiny
    u = np.ones_like(p)
    v = np.ones_like(q)
    kv = k @ v
    err = prev = np.inf
    it = 0
    while it < max_iter:
        new_u = p / np.maximum(kv, tiny)
        u = new_u if omega == 1.0 else np.where(p > 0, u ** (1 - omega) * new_u**omega, 0)
        ktu = u @ k
        v_plain = q / np.maximum(ktu, tiny)
        v = v_plain if omega == 1.0 else np.where(q > 0, v ** (1 - omega) * v_plain**omega, 0)
        kv = k @ v
        it += 1
        err = float(np.abs(u * kv - p).sum() + np.abs(v * ktu - q).sum())
        if err <= tol:
            break
        if err > prev:
            omega = 1.0
        prev = err
    return u.astype(F32), v_plain.astype(F32), it, err


def labeled_gw(
    x: np.ndarray,
    lx: np.ndarray,
    z: np.ndarray,
    lz: np.ndarray,
    epsilon: float = 5e-3,
    tol: float = TOL,
    max_iter: int = 100,
    inner_max_iter: int = 1000,
) -> tuple[np.ndarray, dict[str, int]]:
    """Label-constrained entropic GW (``rima_core.core.ot.labeled_gw``'s math).

    Returns ``(T, {"iterations": outer, "sinkhorn_iterations": inner total})``.
    """
    mask, p, q = share_marginals(lx, lz)
    cx, cz = scaled_sqdist(x.astype(F32)), scaled_sqdist(z.astype(F32))
    const = ((cx * cx) @ p)[:, None] + ((cz * cz) @ q)[None, :]
    w = np.maximum(mask @ q, np.finfo(F32).tiny)
    t = np.where(mask, p[:, None] * q[None, :] / w[:, None], 0).astype(F32)
    f, g = np.zeros_like(p), np.zeros_like(q)
    outer = inner = 0
    while outer < max_iter:
        outer += 1
        cost = const - 2.0 * (cx @ t @ cz)
        h = np.where(mask, (f[:, None] + g[None, :] - cost) / F32(epsilon), -np.inf)
        rmax = h.max(axis=1)
        rmax = np.where(np.isfinite(rmax), rmax, 0)
        h -= rmax[:, None]
        cmax = h.max(axis=0)
        cmax = np.where(np.isfinite(cmax), cmax, 0)
        h -= cmax[None, :]
        k = np.exp(h)
        u, v, its, _ = _sinkhorn(k, p, q, tol, inner_max_iter)
        inner += its
        new_t = (u[:, None] * k * v[None, :]).astype(F32)
        with np.errstate(divide="ignore"):
            f = f - epsilon * rmax + epsilon * np.log(u)
            g = g - epsilon * cmax + epsilon * np.log(v)
        f, g = np.where(np.isfinite(f), f, 0), np.where(np.isfinite(g), g, 0)
        change = float(np.abs(new_t - t).sum())
        t = new_t
        if change <= tol:
            break
    return t, {"iterations": outer, "sinkhorn_iterations": inner}


def feature_coupling(
    x: np.ndarray,
    z: np.ndarray,
    t: np.ndarray,
    epsilon: float = 5e-3,
    tol: float = TOL,
    max_iter: int = 1000,
    relax: float = 1.5,
) -> tuple[np.ndarray, int]:
    """Feature coupling on the max-scaled COOT cost (``rima_core.core.ot.feature_coupling``)."""
    x, z, t = x.astype(F32), z.astype(F32), t.astype(F32)
    d_x, d_z = x.shape[1], z.shape[1]
    # in place in one reused buffer: a fresh 50 MB array costs ~12k page faults per call
    m = np.matmul(x.T @ t, z, out=_buffer((d_x, d_z)))
    m *= -2.0
    m += ((x * x).T @ t.sum(1))[:, None]
    m += ((z * z).T @ t.sum(0))[None, :]
    scale = F32(1.0 / (epsilon * m.max()))
    m -= m.min(axis=1)[:, None]
    m -= m.min(axis=0)[None, :]
    m *= -scale
    np.maximum(m, np.log(np.finfo(F32).tiny) + 1.0, out=m)
    k = np.exp(m, out=m)
    p, q = np.full(d_x, 1 / d_x, F32), np.full(d_z, 1 / d_z, F32)
    u, v, it, _ = _sinkhorn(k, p, q, tol, max_iter, relax)
    out = k * u[:, None]
    out *= v[None, :]
    return out, it
