"""Pieces every model shares: the base class that holds the calling convention and the input
checks (:class:`EyeModel`), the output record, modality dropout, the encoders, encoding only
the rows that have a modality while keeping the batch order, and running feature standardisation.

Keeping these in one place is what makes the models interchangeable for the engine: the same
availability rules (an eye with neither modality is an input error; modality dropout never drops
both) and the same per-sample bookkeeping apply to RIMA, its ablations and the baselines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .encoders import build_encoder
from .spec import RimaConfig


class MissingModalityError(ValueError):
    """An eye in the batch has neither a fundus photo nor an OCT volume: nothing to grade."""

    def __init__(self, positions: list[int]) -> None:
        self.positions = positions
        shown = positions[:20]
        more = f" (+{len(positions) - 20} more)" if len(positions) > 20 else ""
        super().__init__(
            f"batch position(s) {shown}{more} have neither a fundus photo nor an OCT volume "
            "(has_fundus and has_oct both false); at least one modality is required per eye"
        )


@dataclass
class ModelOutput:
    """What every model returns; the engine adds cross-entropy on ``logits`` to ``aux_loss``."""

    logits: torch.Tensor  # (B, K)
    aux_loss: torch.Tensor  # scalar; 0 when the model has no auxiliary objective
    stats: dict[str, float] = field(default_factory=dict)


def check_inputs(
    fundus: torch.Tensor,
    oct: torch.Tensor,
    has_fundus: torch.Tensor,
    has_oct: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and availability; return the masks as bool vectors on the input device."""
    if fundus.dim() != 4 or fundus.shape[1] != 3:
        raise ValueError(f"fundus must be (B, 3, H, W) floats in [0, 1], got {tuple(fundus.shape)}")
    if oct.dim() != 5 or oct.shape[1] != 1:
        raise ValueError(f"oct must be (B, 1, D, H, W) floats in [0, 1], got {tuple(oct.shape)}")
    batch = fundus.shape[0]
    has_f = has_fundus.reshape(-1).to(device=fundus.device, dtype=torch.bool)
    has_o = has_oct.reshape(-1).to(device=fundus.device, dtype=torch.bool)
    if not (oct.shape[0] == has_f.numel() == has_o.numel() == batch):
        raise ValueError(
            f"batch sizes disagree: fundus {batch}, oct {oct.shape[0]}, "
            f"has_fundus {has_f.numel()}, has_oct {has_o.numel()}"
        )
    neither = ~(has_f | has_o)
    if bool(neither.any()):
        raise MissingModalityError(neither.nonzero().flatten().tolist())
    return has_f, has_o


def modality_dropout(
    has_f: torch.Tensor, has_o: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """For eyes with both modalities, drop one (fundus or OCT, equally likely) with probability p.

    This trains the missing-modality path (translations standing in for a real feature) on eyes
    whose real features exist; an eye keeps at least one modality, so it never becomes invalid.
    Draws from the global torch generator, so ``torch.manual_seed`` makes it reproducible.
    """
    if p <= 0:
        return has_f, has_o
    both = has_f & has_o
    drop = both & (torch.rand(has_f.shape, device=has_f.device) < p)
    drop_fundus = drop & (torch.rand(has_f.shape, device=has_f.device) < 0.5)
    drop_oct = drop & ~drop_fundus
    return has_f & ~drop_fundus, has_o & ~drop_oct


def training_dropout(
    training: bool, p: float, has_f: torch.Tensor, has_o: torch.Tensor, stats: dict[str, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`modality_dropout` in training mode only, recording the dropped fraction in ``stats``.

    A dropped modality is then treated exactly like a missing one, including not encoding it.
    """
    if not training or p <= 0:
        return has_f, has_o
    kept_f, kept_o = modality_dropout(has_f, has_o, p)
    stats["modality_dropped"] = float(((kept_f != has_f) | (kept_o != has_o)).float().mean())
    return kept_f, kept_o


@dataclass
class Inputs:
    """One checked batch: the images and each eye's availability as bool vectors on the images'
    device (after modality dropout, when the model applies it)."""

    fundus: torch.Tensor  # (B, 3, H, W)
    oct: torch.Tensor  # (B, 1, D, H, W)
    has_f: torch.Tensor  # (B,)
    has_o: torch.Tensor  # (B,)
    labels: torch.Tensor | None  # (B,) in training; None at inference


class EyeModel(nn.Module, ABC):
    """Base of every model: the engine's calling convention, with the input checks done once.

    Subclasses implement :meth:`grade` on the checked batch and set ``modality_dropout`` if they
    train with it (:meth:`dropped`).
    """

    modality_dropout: float = 0.0

    def forward(
        self,
        fundus: torch.Tensor,
        oct: torch.Tensor,
        has_fundus: torch.Tensor,
        has_oct: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        has_f, has_o = check_inputs(fundus, oct, has_fundus, has_oct)
        return self.grade(Inputs(fundus, oct, has_f, has_o, labels))

    @abstractmethod
    def grade(self, x: Inputs) -> ModelOutput:
        """Logits, auxiliary loss and stats for the checked batch ``x``."""

    def dropped(self, x: Inputs, stats: dict[str, float]) -> Inputs:
        """``x`` after this model's modality dropout (training mode only; see
        :func:`training_dropout`)."""
        has_f, has_o = training_dropout(
            self.training, self.modality_dropout, x.has_f, x.has_o, stats
        )
        return replace(x, has_f=has_f, has_o=has_o)

    def encode_both(self, x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Fundus and OCT features of the eyes that have them (zeros elsewhere), in one dtype,
        from the ``fundus_encoder`` and ``oct_encoder`` of models that have both."""
        f = encode_present(self.fundus_encoder, x.fundus, x.has_f)
        o = encode_present(self.oct_encoder, x.oct, x.has_o)
        return f, o.to(f.dtype)


def checked_dropout(p: float) -> float:
    """``p`` if it is a usable modality-dropout rate (1 would drop a modality of every eye)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"model.modality_dropout must be in [0, 1), got {p}")
    return p


def modality_encoder(cfg: RimaConfig, modality: str, pretrained: bool) -> nn.Module:
    """The encoder of ``modality`` ("fundus" or "oct"); ``pretrained=False`` ignores the local
    weights file named in ``cfg`` (the caller will load every parameter itself)."""
    if modality == "fundus":
        kind, dim, weights = cfg.fundus_encoder, cfg.fundus_dim, cfg.fundus_weights
    elif modality == "oct":
        kind, dim, weights = cfg.oct_encoder, cfg.oct_dim, cfg.oct_weights
    else:
        raise ValueError(f"modality must be 'fundus' or 'oct', got {modality!r}")
    return build_encoder(kind, dim, weights if pretrained else None)


def build_encoders(cfg: RimaConfig, pretrained: bool) -> tuple[nn.Module, nn.Module]:
    """The fundus and the OCT encoder, built in that order (the order of their random
    initialisation, so a seed gives the same weights in every model)."""
    fundus = modality_encoder(cfg, "fundus", pretrained)
    return fundus, modality_encoder(cfg, "oct", pretrained)


def encode_present(encoder: nn.Module, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Encode only the rows that have the modality and scatter them back to their batch rows.

    Rows without the modality are zeros in the result (callers replace them); nothing is grouped
    or reordered, so row i of the result always belongs to eye i.
    """
    idx = present.nonzero().flatten()
    batch = x.shape[0]
    if idx.numel() == 0:
        return x.new_zeros(batch, encoder.out_dim)
    feats = encoder(x.index_select(0, idx))
    return feats.new_zeros(batch, feats.shape[1]).index_copy(0, idx, feats)


class RunningStandardizer(nn.Module):
    """Per-dimension running mean and variance of a feature space (buffers, saved with the model).

    Updated from each training batch's present rows with momentum ``momentum`` (the first update
    replaces the initial zeros/ones, as BatchNorm's cumulative start would); applied the same way
    in training and at inference, so a translation learned in training means the same at test.
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        if x.shape[0] < 2:
            return
        x = x.detach().float()
        m = self.momentum if int(self.updates) > 0 else 1.0
        self.mean.lerp_(x.mean(0), m)
        self.var.lerp_(x.var(0, unbiased=True), m)
        self.updates += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) * torch.rsqrt(self.var + self.eps).to(x.dtype)


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: the small head used throughout."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_in),
            nn.Linear(d_in, d_hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(d_hidden, d_out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def zero_loss(like: torch.Tensor) -> torch.Tensor:
    """A scalar 0 on the right device, for models/batches without an auxiliary objective."""
    return like.new_zeros(())


# The paths a complete eye's prediction pools (models/rima.py, step 7), in the order of the
# ``path_weights`` buffer: the full fusion, fundus + a stand-in for the OCT, OCT + a stand-in
# for the fundus.
PATHS = ("full", "fundus_only", "oct_only")
DEFAULT_PATH_WEIGHTS = (1.0, 0.0, 0.0)  # the full path alone


class PathPooling:
    """Mixin of the models whose complete eyes have three paths (RIMA's family, imputation):
    the ``path_weights`` buffer, its default for models saved before it existed, and the pooled
    prediction ``softmax(Σ_k w_k log p_k)`` of a complete eye.

    A model calls :meth:`init_path_weights` in ``__init__``, :meth:`pooled` on its logits, and
    provides ``complete_eye_log_probs(inputs) -> ((paths, n, K) log-probabilities, rows)``, what
    :func:`rima_core.runs.calibration.calibrate_paths` fits the weights on.
    """

    PATHS = PATHS
    path_weights: torch.Tensor

    def init_path_weights(self) -> None:
        self.register_buffer("path_weights", torch.tensor(DEFAULT_PATH_WEIGHTS))  # type: ignore[attr-defined]

    def reset_path_weights(self) -> None:
        """Back to the full path alone (in place: device and dtype kept)."""
        with torch.no_grad():
            self.path_weights.copy_(torch.tensor(DEFAULT_PATH_WEIGHTS))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # models saved before the path weights existed predicted with the full path alone
        state_dict.setdefault(prefix + "path_weights", torch.tensor(DEFAULT_PATH_WEIGHTS))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]

    def pooled(
        self,
        full_logits: torch.Tensor,
        both: torch.Tensor,
        path_log_probs: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``full_logits`` with the rows of complete eyes (``both``) replaced by
        ``Σ_k w_k log p_k``; ``path_log_probs(idx)`` gives the (paths, len(idx), K)
        log-probabilities of rows ``idx``. With the default weights (the full path alone) the
        logits are returned untouched: training and older models compute what they did."""
        w = self.path_weights
        if torch.equal(w, torch.tensor(DEFAULT_PATH_WEIGHTS, device=w.device, dtype=w.dtype)):
            return full_logits
        idx = both.nonzero().flatten()
        if idx.numel() == 0:
            return full_logits
        lp = path_log_probs(idx)
        pooled = (w.to(lp.dtype)[:, None, None] * lp).sum(dim=0)
        return full_logits.index_copy(0, idx, pooled.to(full_logits.dtype))
