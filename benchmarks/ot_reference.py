"""An independent numpy implementation of the RIMA OT step: the yardstick for ``rima_core.ot``.

Why it exists: the speed target of the OT step is relative ("at most 1.5x a plain numpy
implementation of the same math"), because absolute times on a shared CPU move with its load.
This module is that numpy implementation, written from the math in ``rima_core/ot.py``'s module
docstring rather than from its code: float32 throughout, the same algorithm (mirror-descent
entropic GW on the masked, warm-started, row/column-shifted kernel; the feature step's one
over-relaxed Sinkhorn solve) and the same stopping rules, so both do the same number of
iterations and the ratio of their times measures implementation cost only. It has none of the
library's guards (no absorption, no log-domain fallback, no input checks): at the benchmark's
shapes and epsilons neither is needed, which ``benchmarks/speed.py`` checks through the
iteration counts and the L1 distance between the two couplings it reports.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


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


def _sinkhorn(
    k: np.ndarray,
    p: np.ndarray,
    q: np.ndarray,
    v: np.ndarray,
    max_iter: int,
    tol: float,
    check_every: int,
    omega: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scaling Sinkhorn (over-relaxed by ``omega`` until the error stops falling)."""
    tiny = np.finfo(F32).tiny
    u = np.ones_like(p)
    kv = k @ v
    prev = np.inf
    it = 0
    while it < max_iter:
        new_u = p / np.maximum(kv, tiny)
        u = new_u if omega == 1.0 else np.where(p > 0, u ** (1 - omega) * new_u**omega, 0)
        new_v = q / np.maximum(u @ k, tiny)
        v = new_v if omega == 1.0 else np.where(q > 0, v ** (1 - omega) * new_v**omega, 0)
        kv = k @ v
        it += 1
        if it % check_every and it != max_iter:
            continue
        err = float(np.abs(u * kv - p).sum())
        if err <= tol:
            break
        if err > prev:
            omega = 1.0
        prev = err
    if omega != 1.0:
        v = q / np.maximum(u @ k, tiny)
    return u.astype(F32), v.astype(F32), it


def labeled_gw(
    x: np.ndarray,
    lx: np.ndarray,
    z: np.ndarray,
    lz: np.ndarray,
    epsilon: float = 5e-3,
    max_iter: int = 50,
    tol: float = 1e-5,
    inner_max_iter: int = 500,
    inner_tol: float = 1e-6,
    check_every: int = 5,
) -> tuple[np.ndarray, int]:
    """Label-constrained entropic GW (``rima_core.ot.labeled_gw``'s math); (T, outer its)."""
    mask, p, q = share_marginals(lx, lz)
    cx, cz = scaled_sqdist(x.astype(F32)), scaled_sqdist(z.astype(F32))
    const = ((cx * cx) @ p)[:, None] + ((cz * cz) @ q)[None, :]
    w = np.maximum(mask @ q, np.finfo(F32).tiny)
    t = np.where(mask, p[:, None] * q[None, :] / w[:, None], 0).astype(F32)
    f, g = np.zeros_like(p), np.zeros_like(q)
    floor = 0.5 * np.log(np.finfo(F32).tiny)
    outer = 0
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
        f, g = f - epsilon * rmax, g - epsilon * cmax
        # warm start: the column shift goes back in as the initial column scaling
        b0 = np.maximum(cmax, floor) if outer > 1 else np.zeros_like(cmax)
        k = np.exp(h + b0[None, :])
        u, v, _ = _sinkhorn(k, p, q, np.ones_like(q), inner_max_iter, inner_tol, check_every)
        new_t = (u[:, None] * k * v[None, :]).astype(F32)
        f = f + epsilon * np.log(u)
        g = g + epsilon * (b0 + np.log(v))
        f, g = np.where(np.isfinite(f), f, 0), np.where(np.isfinite(g), g, 0)
        change = float(np.abs(new_t - t).sum())
        t = new_t
        if change <= tol:
            break
    return t, outer


def feature_coupling(
    x: np.ndarray,
    z: np.ndarray,
    t: np.ndarray,
    epsilon: float = 5e-3,
    max_iter: int = 200,
    tol: float = 1e-3,
    check_every: int = 10,
    relax: float = 1.5,
) -> tuple[np.ndarray, int]:
    """Feature coupling on the max-scaled COOT cost (``rima_core.ot.feature_coupling``)."""
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
    u, v, it = _sinkhorn(k, p, q, np.ones_like(q), max_iter, tol, check_every, relax)
    out = k * u[:, None]
    out *= v[None, :]
    return out, it
