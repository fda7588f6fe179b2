"""The gradient steps of one training epoch: optimiser, lr schedule and the batch loop.

Apart from :mod:`rima_core.runs.train` so the arithmetic a step does (loss, scaling, clipping,
the per-step schedule) reads in one place, without the epoch bookkeeping (validation,
checkpoints, history) around it. Every number a run produces starts here, so the order of the
operations below is part of the bit-for-bit reproducibility contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rima_core.config import Config
from rima_core.core.augment import augment_batch
from rima_core.progress import progress as tqdm
from rima_core.runs.engine import autocast, to_device


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to the base lr, then cosine decay to 0 at ``total_steps`` (per step)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Optimisation:
    """The optimiser, its lr schedule and (fp16 only) the loss scaler: what a step updates
    besides the weights, and what a checkpoint must restore for a bit-identical resume."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None

    @classmethod
    def build(
        cls, model: nn.Module, cfg: Config, n_train: int, dtype: torch.dtype | None
    ) -> Optimisation:
        """AdamW with linear warm-up and cosine decay per step (:func:`lr_factor`), over the
        parameters that train (all of them, but for distillation's frozen teacher)."""
        tc = cfg.train
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
        steps_per_epoch = math.ceil(n_train / tc.batch_size)
        total_steps = steps_per_epoch * tc.epochs
        warmup_steps = round(tc.warmup_epochs * steps_per_epoch)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, warmup_steps, total_steps)
        )
        scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
        return cls(optimizer, scheduler, scaler)


class EpochStats:
    """Sample-weighted means of losses and model stats; ``*_seconds`` stats are summed.

    A stat a model reports only for some batches (e.g. ``ot_skipped``) is averaged over the
    samples of the batches that reported it.
    """

    def __init__(self) -> None:
        self.n = 0
        self.sums: dict[str, float] = {}
        self.weights: dict[str, int] = {}

    def add(self, batch_size: int, values: dict[str, float]) -> None:
        self.n += batch_size
        for key, value in values.items():
            weight = 1 if key.endswith("_seconds") else batch_size
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
            self.weights[key] = self.weights.get(key, 0) + batch_size

    def result(self) -> dict[str, float]:
        return {
            k: v if k.endswith("_seconds") else v / self.weights[k] for k, v in self.sums.items()
        }


def _step(model: nn.Module, loss: torch.Tensor, opt: Optimisation, grad_clip: float) -> None:
    """Backward pass, clipping, optimiser and schedule step (through the scaler under fp16)."""
    optimizer, scheduler, scaler = opt.optimizer, opt.scheduler, opt.scaler
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()


def train_one_epoch(
    model: nn.Module,
    loader: Any,
    opt: Optimisation,
    device: torch.device,
    dtype: torch.dtype | None,
    grad_clip: float,
    desc: str,
    augment: tuple[list[str], torch.Generator] | None = None,
) -> dict[str, float]:
    """One pass over ``loader`` with a step per batch; the epoch's :class:`EpochStats` means.

    ``augment`` is the augmentations and the CPU generator they draw on (seeded per epoch, so a
    resumed run draws the same)."""
    model.train()
    acc = EpochStats()
    bar = tqdm(loader, desc=desc, leave=False)
    for step, batch in enumerate(bar):
        b = to_device(batch, device)
        if augment is not None:
            b = augment_batch(b, *augment)
        with autocast(device, dtype):
            out = model(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"], labels=b["label"])
        ce = F.cross_entropy(out.logits.float(), b["label"])
        aux = out.aux_loss.float()
        loss = ce + aux
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{desc}, batch {step}: non-finite loss (ce={ce.item()}, aux={aux.item()}); "
                "lower train.lr or the OT epsilons"
            )
        _step(model, loss, opt, grad_clip)
        values = {"loss": loss.item(), "ce": ce.item(), "aux": aux.item()}
        values.update({k: float(v) for k, v in out.stats.items()})
        acc.add(int(b["label"].shape[0]), values)
        bar.set_postfix(loss=f"{values['loss']:.3f}")
    if acc.n == 0:
        raise ValueError(f"{desc}: the training loader yielded no batches")
    return acc.result()
