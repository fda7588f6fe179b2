"""Training-time augmentation of a batch (``train.augment``), seeded per epoch.

Why: a few hundred training eyes let the fundus encoder memorise its training photos; on the
default phantom the fundus path sat ~0.08 QWK below what the photos allow. The transforms are
ones that leave the grade unchanged in real eyes:

- ``flip``: mirror the eye left-right, the fundus about its vertical axis and the OCT volume
  along the lateral (fast, W) axis together, so that what both modalities see at one place
  stays at one place (a right eye's layout mirrored is a left eye's).
- ``intensity``: the fundus photo's contrast and brightness as another camera or exposure
  would give them (each eye its own factor, about its own mean). The OCT is not jittered: its
  encoder standardises each volume, so a gain would be undone.

Every eye draws its random numbers whether or not it is transformed, from a CPU generator that
training seeds per (``runtime.seed``, epoch) with its own stream (``train.epoch_seed``), so an
epoch resumed from its checkpoint sees the batches an uninterrupted one saw and a run is
reproducible on one machine. The numbers are drawn on the CPU and the transforms run where the
batch is (on the GPU in a CUDA run: no extra host copy of the volumes per step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

CONTRAST = 0.15  # fundus contrast factor drawn in [1 - CONTRAST, 1 + CONTRAST]
BRIGHTNESS = 0.05  # fundus brightness shift drawn in [-BRIGHTNESS, BRIGHTNESS] (inputs in [0, 1])
STREAM = 1  # train.epoch_seed's stream of the augmentation (0, none: the epoch's shuffle)


def augment_batch(
    batch: dict[str, torch.Tensor], kinds: Sequence[str], generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """A copy of ``batch`` (on any device) with ``kinds`` applied per eye.

    An absent modality is zeros in the batch and stays zeros (a flip or an affine map about
    its own mean leaves a constant image constant; intensity is applied only where the fundus
    is present).
    """
    if not kinds:
        return batch
    out = dict(batch)
    fundus, oct_ = batch["fundus"], batch["oct"]
    n = fundus.shape[0]
    if "flip" in kinds:
        flip = (torch.rand(n, generator=generator) < 0.5).to(fundus.device)
        out["fundus"] = fundus = torch.where(flip[:, None, None, None], fundus.flip(-1), fundus)
        out["oct"] = torch.where(flip[:, None, None, None, None], oct_.flip(-1), oct_)
    if "intensity" in kinds:
        u = (torch.rand(n, 2, generator=generator) * 2 - 1).to(fundus.device)
        contrast = (1 + CONTRAST * u[:, 0]).to(fundus.dtype)[:, None, None, None]
        shift = (BRIGHTNESS * u[:, 1]).to(fundus.dtype)[:, None, None, None]
        mean = fundus.mean(dim=(1, 2, 3), keepdim=True)
        jittered = ((fundus - mean) * contrast + mean + shift).clamp(0.0, 1.0)
        present = batch["has_fundus"].to(torch.bool)[:, None, None, None]
        out["fundus"] = torch.where(present, jittered, fundus)
    return out
