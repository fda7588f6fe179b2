"""Alignment diagnostics for RIMA models: numbers that show whether the OT parts carry signal.

A model can score well while its alignment does nothing (the translators learn only the mean
feature direction, ``T_v`` stays close to uniform, the class-wise couplings are flat averages);
then a later change that breaks the alignment would go unnoticed. These numbers go into the
training summary, MLflow and the missing-modality benchmark so such a regression shows:

- ``probe_qwk_*``: QWK of a linear probe (multinomial logistic regression, fitted on the train
  split) on a feature space: the real fundus / OCT features, and the translations
  fundus→OCT / OCT→fundus. ``cross_probe_qwk_*`` applies the probe fitted on the REAL target
  features to the translations: high only when a translation lands where the real feature of
  that grade lies.
- ``centred_cosine_*``: mean cosine between a translation and the real feature of the same eye
  after subtracting each space's mean over the split (raw cosine between non-negative features is
  high for any pair).
- ``tv_column_max``: mean over fundus dimensions of the largest share one OCT dimension has in
  that column of ``T_v`` (``tv_column_max_uniform`` = the same for a uniform coupling, 1/d_o).
- ``gw_row_max``: mean over fundus rows of the largest share one OCT row has in that row of a
  labeled-GW coupling on the split's complete eyes (``gw_row_max_flat`` = the same for a coupling
  that spreads each row evenly over the same-label columns).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from rima_core.core import ot
from rima_core.core.metrics import classification_metrics

log = logging.getLogger(__name__)

__all__ = ["alignment_diagnostics", "encode_split", "supports_diagnostics"]


def supports_diagnostics(model: nn.Module) -> bool:
    """Only models with standardised encoders and translators (RIMA and its ablations)."""
    return all(hasattr(model, a) for a in ("encode", "g_fo", "g_of"))


@torch.no_grad()
def encode_split(
    model: nn.Module,
    store: str | Path,
    masks: pd.DataFrame,
    split: str,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Standardised features and translations of every eye of ``split`` with both modalities.

    Returns ``f``, ``o`` (real features), ``fo`` (fundus→OCT), ``of`` (OCT→fundus), ``y``.
    """
    from rima_core.core.data.dataset import EyeDataset, make_loader

    ds = EyeDataset(store, masks, split, "complete")
    loader = make_loader(ds, batch_size=batch_size, shuffle=False, num_workers=0, seed=0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("f", "o", "fo", "of", "y")}
    try:
        for batch in loader:
            both = batch["has_fundus"] & batch["has_oct"]
            if not bool(both.any()):
                continue
            fundus = batch["fundus"][both].to(device)
            oct_ = batch["oct"][both].to(device)
            ones = torch.ones(int(both.sum()), dtype=torch.bool, device=device)
            f, o = model.encode(fundus, oct_, ones, ones)
            parts["f"].append(f.float().cpu().numpy())
            parts["o"].append(o.float().cpu().numpy())
            parts["fo"].append(model.g_fo(f).float().cpu().numpy())
            parts["of"].append(model.g_of(o).float().cpu().numpy())
            parts["y"].append(batch["label"][both].numpy())
    finally:
        model.train(was_training)
    if not parts["y"]:
        raise ValueError(f"split {split!r} has no eye with both modalities: nothing to diagnose")
    return {k: np.concatenate(v) for k, v in parts.items()}


def _probe(train_x: np.ndarray, train_y: np.ndarray) -> Any:
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000, C=1.0).fit(train_x, train_y)


def _qwk(y: np.ndarray, pred: np.ndarray, n_classes: int) -> float:
    proba = np.eye(n_classes)[pred]
    return float(classification_metrics(y, proba)["qwk"])


def _centred_cosine(pred: np.ndarray, real: np.ndarray) -> float:
    a = pred - pred.mean(0)
    b = real - real.mean(0)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def _gw_concentration(
    f: np.ndarray, o: np.ndarray, y: np.ndarray, epsilon: float, max_eyes: int
) -> tuple[float, float]:
    n = min(len(y), max_eyes)
    T, _ = ot.labeled_gw(
        torch.from_numpy(f[:n]), torch.from_numpy(y[:n]), torch.from_numpy(o[:n]),
        torch.from_numpy(y[:n]), epsilon=epsilon,
    )  # fmt: skip
    T = T.numpy()
    mass = T.sum(1)
    rows = mass > 0
    share = float(np.mean(T[rows].max(1) / mass[rows]))
    same = (y[:n, None] == y[None, :n]).sum(1)[rows]
    return share, float(np.mean(1.0 / same))


def alignment_diagnostics(
    model: nn.Module,
    store: str | Path,
    masks: pd.DataFrame | str | Path,
    split: str = "test",
    fit_split: str = "train",
    max_gw_eyes: int = 128,
) -> dict[str, float]:
    """The numbers of the module docstring for ``model`` on ``split`` (probes fitted on
    ``fit_split``). Empty for models without translators."""
    from rima_core.core.data.masks import read_masks

    if not supports_diagnostics(model):
        return {}
    mask_df = masks if isinstance(masks, pd.DataFrame) else read_masks(masks)
    fit = encode_split(model, store, mask_df, fit_split)
    ev = encode_split(model, store, mask_df, split)
    k = int(max(fit["y"].max(), ev["y"].max())) + 1
    out: dict[str, float] = {}
    probes = {}
    for space in ("f", "o", "fo", "of"):
        probes[space] = _probe(fit[space], fit["y"])
        out[f"probe_qwk_{_NAMES[space]}"] = _qwk(ev["y"], probes[space].predict(ev[space]), k)
    out["cross_probe_qwk_fundus_to_oct"] = _qwk(ev["y"], probes["o"].predict(ev["fo"]), k)
    out["cross_probe_qwk_oct_to_fundus"] = _qwk(ev["y"], probes["f"].predict(ev["of"]), k)
    out["centred_cosine_fundus_to_oct"] = _centred_cosine(ev["fo"], ev["o"])
    out["centred_cosine_oct_to_fundus"] = _centred_cosine(ev["of"], ev["f"])
    tv = getattr(model, "T_v", None)
    if tv is not None:
        t = tv.detach().float().cpu().numpy()
        cols = t / np.maximum(t.sum(0, keepdims=True), np.finfo(np.float32).tiny)
        out["tv_column_max"] = float(cols.max(0).mean())
        out["tv_column_max_uniform"] = 1.0 / t.shape[0]
    # the model's own GW epsilon: the concentration is read at the scale training used
    epsilon = float(model.cfg.gw_epsilon)
    share, flat = _gw_concentration(ev["f"], ev["o"], ev["y"], epsilon, max_gw_eyes)
    out["gw_row_max"] = share
    out["gw_row_max_flat"] = flat
    return out


_NAMES = {"f": "fundus", "o": "oct", "fo": "fundus_to_oct", "of": "oct_to_fundus"}
