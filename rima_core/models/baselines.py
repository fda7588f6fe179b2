"""Baselines on the same encoders as RIMA, so a comparison isolates the method, not the backbone.

- ``fundus_only`` / ``oct_only``: one encoder and a head. An eye without that modality still
  gets a prediction (every model must grade every valid eye, or scenario metrics would be computed
  on different eyes): its feature is a single learned "missing" embedding, so the prediction for
  such an eye is the model's learned prior, which is what a single-modality model can honestly
  offer there.
- ``late_fusion_zero``: both encoders, features concatenated, zeros for a missing modality.
- ``late_fusion_dropout``: the same, trained with modality dropout so it sees zeros in training
  even when the training set is complete.
"""

from __future__ import annotations

import torch
from torch import nn

from rima_core.config import ModelConfig

from .common import MLP, ModelOutput, check_inputs, encode_present, training_dropout, zero_loss
from .encoders import build_encoder


class SingleModality(nn.Module):
    """Grade from one modality; a learned embedding stands in where that modality is missing."""

    def __init__(
        self, mcfg: ModelConfig, n_classes: int, modality: str, *, pretrained: bool = True
    ) -> None:
        super().__init__()
        if modality not in ("fundus", "oct"):
            raise ValueError(f"modality must be 'fundus' or 'oct', got {modality!r}")
        self.modality = modality
        if modality == "fundus":
            kind, dim, weights = mcfg.fundus_encoder, mcfg.fundus_dim, mcfg.fundus_weights
        else:
            kind, dim, weights = mcfg.oct_encoder, mcfg.oct_dim, mcfg.oct_weights
        self.encoder = build_encoder(kind, dim, weights if pretrained else None)
        self.missing = nn.Parameter(torch.randn(dim) * 0.02)
        self.head = MLP(dim, mcfg.hidden_dim, n_classes, mcfg.dropout)

    def forward(
        self,
        fundus: torch.Tensor,
        oct: torch.Tensor,
        has_fundus: torch.Tensor,
        has_oct: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        has_f, has_o = check_inputs(fundus, oct, has_fundus, has_oct)
        x, present = (fundus, has_f) if self.modality == "fundus" else (oct, has_o)
        feats = encode_present(self.encoder, x, present)
        feats = torch.where(present[:, None], feats, self.missing.to(feats.dtype))
        logits = self.head(feats)
        return ModelOutput(
            logits, zero_loss(logits), {"missing_fraction": float((~present).float().mean())}
        )


class LateFusion(nn.Module):
    """Concatenate both features (zeros for a missing one) and classify."""

    def __init__(
        self,
        mcfg: ModelConfig,
        n_classes: int,
        *,
        modality_dropout: float = 0.0,
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"model.modality_dropout must be in [0, 1), got {modality_dropout}")
        self.modality_dropout = modality_dropout
        self.fundus_encoder = build_encoder(
            mcfg.fundus_encoder, mcfg.fundus_dim, mcfg.fundus_weights if pretrained else None
        )
        self.oct_encoder = build_encoder(
            mcfg.oct_encoder, mcfg.oct_dim, mcfg.oct_weights if pretrained else None
        )
        self.head = MLP(mcfg.fundus_dim + mcfg.oct_dim, mcfg.hidden_dim, n_classes, mcfg.dropout)

    def forward(
        self,
        fundus: torch.Tensor,
        oct: torch.Tensor,
        has_fundus: torch.Tensor,
        has_oct: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        has_f, has_o = check_inputs(fundus, oct, has_fundus, has_oct)
        stats: dict[str, float] = {}
        has_f, has_o = training_dropout(self.training, self.modality_dropout, has_f, has_o, stats)
        f = encode_present(self.fundus_encoder, fundus, has_f)  # zeros where absent
        o = encode_present(self.oct_encoder, oct, has_o)
        logits = self.head(torch.cat([f, o.to(f.dtype)], dim=1))
        return ModelOutput(logits, zero_loss(logits), stats)
