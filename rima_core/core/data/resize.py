"""Resizing decoded eyes to the store's fixed shapes: a fundus to size×size×3, an OCT volume to
D×H×W, both uint8.

Its own module because two steps share it: ``prepare`` resizes every source eye here and the
model server (:mod:`rima_core.ops.serving`) resizes a request's images the same way, so a served
eye is the pixels a trained model saw. Both functions are per-output-element arithmetic (no
thread-count-dependent reductions), so the store's bytes do not depend on ``prepare.workers``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def resize_fundus(image: np.ndarray, size: int) -> np.ndarray:
    """H×W or H×W×3 uint8 -> size×size×3 uint8 (grey replicated: the model takes 3 channels).

    PIL's bilinear filter widens its support when shrinking, so a 2000-px fundus reduced to 64 px
    is area-averaged rather than aliased.
    """
    from PIL import Image

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.shape[:2] == (size, size):
        out = image
    else:
        mode = "L" if image.ndim == 2 else "RGB"
        pil = Image.fromarray(np.ascontiguousarray(image), mode=mode)
        out = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out, dtype=np.uint8)


def resize_oct(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """D×H×W uint8 -> ``shape`` uint8.

    Axes that shrink are area-averaged (adaptive average pooling) and axes that grow are then
    interpolated trilinearly: plain trilinear sampling from 200 to 32 slices would read one slice
    in six and alias the retinal layers.
    """
    import torch
    import torch.nn.functional as F

    target = tuple(int(s) for s in shape)
    if tuple(volume.shape) == target:
        return np.ascontiguousarray(volume, dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(volume)).to(torch.float32)[None, None]
    shrunk = tuple(min(s, t) for s, t in zip(volume.shape, target, strict=True))
    if shrunk != tuple(volume.shape):
        x = F.adaptive_avg_pool3d(x, shrunk)
    if shrunk != target:
        x = F.interpolate(x, size=target, mode="trilinear", align_corners=False)
    return x[0, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()
