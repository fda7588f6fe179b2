"""Inputs and outputs of the OT solvers: conversion, validation and the answer's type.

Why a module of its own: every public solver accepts torch tensors or numpy arrays and answers
in the caller's type, device and dtype; doing that in one place keeps the solvers' checks and
error messages (:class:`OTInputError`) from drifting apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


class OTInputError(ValueError):
    """Inputs that do not describe a valid transport problem (shapes, labels, NaN, epsilon)."""


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
