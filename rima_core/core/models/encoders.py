"""Modality encoders: fundus photo (3xHxW) -> d_f features, OCT volume (1xDxHxW) -> d_o.

Every encoder is ``input scaling -> backbone -> projection``. Inputs arrive as floats in [0, 1]
(the dataset's contract); the scaling that the backbone expects lives here, next to the backbone,
so a pretrained checkpoint and its normalisation cannot drift apart:
- fundus: ImageNet mean/std (what Res2Net ImageNet weights were trained with; harmless for the
  small CNN),
- OCT: per-volume zero mean / unit variance (the MedicalNet convention; OCT intensity scales
  differ between devices, so a fixed affine map would not be comparable across sources).

Backbones: ``small_cnn2d`` / ``small_cnn3d`` (CPU defaults, a few ms per eye at 64² / 32³) and the
paper profile ``res2net50`` (2D Res2Net-50 26w×4s) / ``resnet10_3d`` (MONAI ResNet-10 in the
MedicalNet layout). Pretrained weights are read only from a local file, never downloaded.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

FUNDUS_ENCODERS = ("small_cnn2d", "res2net50")
OCT_ENCODERS = ("small_cnn3d", "resnet10_3d")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Classifier / segmentation heads that public checkpoints carry but a feature backbone lacks.
_HEAD_PREFIXES = ("fc.", "conv_seg.", "classifier.", "head.")


class PretrainedWeightsError(ValueError):
    """A local weights file that is missing, unreadable or does not fit the backbone."""


class ImageNetNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # Constants, not state: kept out of the state_dict so checkpoints stay backbone-only.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class VolumeStandardize(nn.Module):
    """Per-volume z-score; ``eps`` keeps a constant volume finite instead of dividing by 0."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        std = x.std(dim=dims, keepdim=True, unbiased=False)
        return (x - mean) / (std + self.eps)


def _conv_block(conv: type[nn.Module], c_in: int, c_out: int, pool: nn.Module) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: only the rows that have a modality are encoded, so the
    # encoder sees sub-batches of varying (possibly tiny) size, where batch statistics are noisy.
    groups = min(8, c_out)
    return nn.Sequential(
        conv(c_in, c_out, 3, padding=1, bias=False),
        nn.GroupNorm(groups, c_out),
        nn.ReLU(inplace=True),
        pool,
    )


class SmallCNN2d(nn.Module):
    """Four conv blocks (32-64-128-128 channels, each halving the resolution), global avg pool."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128, 128)) -> None:
        super().__init__()
        chans = (3, *widths)
        self.blocks = nn.Sequential(
            *(_conv_block(nn.Conv2d, a, b, nn.MaxPool2d(2)) for a, b in itertools.pairwise(chans))
        )
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3))


class SmallCNN3d(nn.Module):
    """A strided stem (OCT volumes are large), then three pooled conv blocks, global avg pool."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        stem = nn.Sequential(
            nn.Conv3d(1, widths[0], 3, stride=2, padding=1, bias=False),
            nn.GroupNorm(min(8, widths[0]), widths[0]),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.Sequential(
            stem,
            *(
                _conv_block(nn.Conv3d, a, b, nn.MaxPool3d(2, ceil_mode=True))
                for a, b in itertools.pairwise(widths)
            ),
        )
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).mean(dim=(2, 3, 4))


class ResNet10_3d(nn.Module):
    """MONAI 3D ResNet-10 in the MedicalNet layout (stride-2 stem, type-B shortcuts without bias),
    so MedicalNet ``resnet_10*.pth`` weights load into it. MONAI is imported lazily: it costs
    seconds to import and the CPU defaults never need it."""

    def __init__(self) -> None:
        super().__init__()
        from monai.networks.nets import resnet10

        self.net = resnet10(
            spatial_dims=3,
            n_input_channels=1,
            shortcut_type="B",
            feed_forward=False,
            conv1_t_stride=2,
            bias_downsample=False,
        )
        self.out_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    # Pretrained checkpoints name MONAI's parameters without our ``net.`` wrapper.
    def load_backbone_state(self, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
        result = self.net.load_state_dict(state, strict=False)
        return list(result.missing_keys), list(result.unexpected_keys)


class Encoder(nn.Module):
    """``scale -> backbone -> projection to dim``; ``out_dim`` is the feature size."""

    def __init__(self, norm: nn.Module, backbone: nn.Module, dim: int) -> None:
        super().__init__()
        self.norm = norm
        self.backbone = backbone
        # No projection when the backbone already has the requested size (paper: d_f = 2048).
        self.proj = nn.Identity() if backbone.out_dim == dim else nn.Linear(backbone.out_dim, dim)
        self.out_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone(self.norm(x)))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/unsafe files
        raise PretrainedWeightsError(f"{path}: cannot read as a torch checkpoint: {exc}") from exc
    # Accept a bare state_dict or the common wrappers ({"state_dict": ...}, {"model": ...}).
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{path}: expected a state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(backbone: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``backbone``; any key or shape mismatch is an error.

    A ``module.`` prefix (DataParallel checkpoints, MedicalNet) is stripped and classifier /
    segmentation heads are ignored; everything else must match exactly, because silently
    training from a half-loaded backbone is the failure this check exists to prevent.
    """
    path = Path(path)
    state = _read_state_dict(path)
    dropped = [k for k in state if k.startswith(_HEAD_PREFIXES)]
    state = {k: v for k, v in state.items() if k not in dropped}
    if dropped:
        log.info("%s: ignoring %d head parameter(s) %s", path, len(dropped), dropped[:4])
    try:
        if isinstance(backbone, ResNet10_3d):
            missing, unexpected = backbone.load_backbone_state(state)
        else:
            result = backbone.load_state_dict(state, strict=False)
            missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    except RuntimeError as exc:  # shape mismatches
        raise PretrainedWeightsError(f"{path}: weights do not fit the backbone: {exc}") from exc
    if missing or unexpected:
        raise PretrainedWeightsError(
            f"{path}: weights do not match the {type(backbone).__name__} backbone; "
            f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''} "
            f"({len(unexpected)})"
        )
    log.info("loaded pretrained %s weights from %s", type(backbone).__name__, path)


def build_encoder(kind: str, dim: int, weights: str | Path | None = None) -> Encoder:
    """Build a fundus (``small_cnn2d``, ``res2net50``) or OCT (``small_cnn3d``, ``resnet10_3d``)
    encoder producing ``dim`` features; ``weights`` is an optional local backbone checkpoint."""
    if kind == "small_cnn2d":
        norm, backbone = ImageNetNorm(), SmallCNN2d()
    elif kind == "res2net50":
        from .res2net import res2net50_26w_4s

        norm, backbone = ImageNetNorm(), res2net50_26w_4s()
    elif kind == "small_cnn3d":
        norm, backbone = VolumeStandardize(), SmallCNN3d()
    elif kind == "resnet10_3d":
        norm, backbone = VolumeStandardize(), ResNet10_3d()
    else:
        raise ValueError(
            f"unknown encoder {kind!r}; fundus: {list(FUNDUS_ENCODERS)}, oct: {list(OCT_ENCODERS)}"
        )
    if weights:
        load_pretrained(backbone, weights)
    return Encoder(norm, backbone, dim)
