"""Costs and marginals: the scaled intra-set distances, the class-balanced marginals of
labeled GW, its linearised cost and its energy (package docstring, "Conventions").

Why public: callers and benchmarks hand other solvers (POT, the numpy reference) exactly the
costs and marginals used here.
"""

from __future__ import annotations

import torch

from .inputs import OTInputError

CLASS_MASS_RULES = ("share", "uniform")


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
