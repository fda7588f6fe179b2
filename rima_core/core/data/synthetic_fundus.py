"""The synthetic phantom's colour fundus renderer and the acquisition sites it imitates.

Split from :mod:`rima_core.core.data.synthetic` (which re-exports these names) so each modality's
rendering reads on its own. A renderer takes the eye's own seeded stream and draws from it in a
fixed order: moving a draw changes every pixel after it, so the order is part of the phantom's
bytes (data.dvc records them).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage

FOCUS_MIN_LESIONS = 3  # anatomy=shared: drusen that mark the focus in every fundus

# Acquisition "sites": colour cast (RGB gain), illumination gradient strength, blur sigma in
# pixels at 64 px, contrast, gamma, brightness. Every eye is imaged at one site (+ jitter).
SITES: tuple[dict[str, Any], ...] = (
    {
        "cast": (1.00, 1.00, 1.00),
        "grad": 0.10,
        "blur": 0.0,
        "contrast": 1.00,
        "gamma": 1.00,
        "bright": 1.00,
    },
    {
        "cast": (1.10, 0.93, 0.80),
        "grad": 0.35,
        "blur": 0.8,
        "contrast": 0.85,
        "gamma": 1.25,
        "bright": 0.92,
    },
    {
        "cast": (0.88, 1.06, 1.15),
        "grad": 0.25,
        "blur": 0.3,
        "contrast": 1.20,
        "gamma": 0.85,
        "bright": 1.05,
    },
    {
        "cast": (1.00, 0.88, 1.02),
        "grad": 0.45,
        "blur": 1.3,
        "contrast": 0.75,
        "gamma": 1.40,
        "bright": 0.82,
    },
)
# site_shift=fundus: the test split's cameras, styles no training eye has (a washed-out,
# blue-green, vignetted handheld camera; a dark, contrasty, saturated one). Sites 4 and 5.
SHIFT_SITES: tuple[dict[str, Any], ...] = (
    {
        "cast": (0.85, 1.12, 1.08),
        "grad": 0.55,
        "blur": 1.8,
        "contrast": 0.65,
        "gamma": 0.75,
        "bright": 1.12,
    },
    {
        "cast": (1.20, 0.85, 0.70),
        "grad": 0.60,
        "blur": 0.0,
        "contrast": 1.45,
        "gamma": 1.60,
        "bright": 0.75,
    },
)


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    return y, x


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Low-frequency texture: a coarse random grid upsampled (unit std-ish). The fundus's shading
    and the OCT's reflectivity both use it, so it lives with the first renderer."""
    coarse = rng.normal(0.0, 1.0, (cells,) * len(shape))
    return ndimage.zoom(coarse, [s / cells for s in shape], order=1, mode="nearest")


def _vessels(
    rng: np.random.Generator, size: int, disc: tuple[float, float], side: float
) -> np.ndarray:
    """Vessel map in [0, 1]: arcades leaving the disc above and below the macula, nasal twigs."""
    t = np.linspace(0.0, 1.0, 6 * size)
    canvas = np.zeros((size, size))
    dx, dy = disc
    for sign in (-1.0, 1.0):
        for reach, bend, nasal in ((1.15, 0.55, False), (0.8, 0.3, False), (0.35, 0.35, True)):
            bend_j = bend * rng.uniform(0.85, 1.15)
            direction = side if nasal else -side
            xs = dx + direction * reach * t
            ys = dy + sign * bend_j * np.sin(np.pi * 0.85 * t) * (1.0 - 0.25 * t)
            # bilinear splat of the curve samples: anti-aliased instead of staircase lines
            fx = np.clip((xs + 1.0) / 2.0 * size - 0.5, 0.0, size - 1.001)
            fy = np.clip((ys + 1.0) / 2.0 * size - 0.5, 0.0, size - 1.001)
            x0, y0 = fx.astype(int), fy.astype(int)
            ax, ay = fx - x0, fy - y0
            for oy, ox, wgt in (
                (0, 0, (1 - ay) * (1 - ax)),
                (0, 1, (1 - ay) * ax),
                (1, 0, ay * (1 - ax)),
                (1, 1, ay * ax),
            ):
                np.add.at(canvas, (y0 + oy, x0 + ox), wgt)
    canvas = ndimage.gaussian_filter(canvas / 6.0, 0.5 * size / 64.0)
    return np.clip(canvas * 3.0, 0.0, 1.0)


def render_fundus(
    rng: np.random.Generator,
    sev: float,
    site: int,
    right_eye: bool,
    size: int,
    *,
    focus: tuple[float, float] | None = None,
    sheen: float | None = None,
) -> np.ndarray:
    """One colour fundus (H×W×3 uint8) showing ``sev`` through cup-to-disc ratio and lesions.

    ``focus`` (x, y; anatomy=shared): the lesions are drusen clustered around it (at least
    FOCUS_MIN_LESIONS, so the focus shows in mild eyes too). ``sheen`` (private_latent): a
    macular sheen whose strength follows it. None: neither, and not one draw changes."""
    y, x = _grid(size)
    px = 2.0 / size  # one pixel in normalised units
    r2 = x * x + y * y
    shade = 1.0 - 0.4 * r2 + 0.05 * smooth_field(rng, (size, size), 6)
    img = np.array([0.80, 0.36, 0.17])[None, None, :] * shade[..., None]

    mac = np.exp(-((x - rng.normal(0, 0.03)) ** 2 + (y - rng.normal(0, 0.03)) ** 2) / 0.035)
    img *= (1.0 - 0.35 * mac)[..., None]

    side = 1.0 if right_eye else -1.0
    disc_c = (side * 0.45 + rng.normal(0, 0.03), rng.normal(0, 0.04))
    vessels = _vessels(rng, size, disc_c, side)
    img = img * (1.0 - 0.55 * vessels[..., None]) + 0.55 * vessels[..., None] * np.array(
        [0.45, 0.08, 0.06]
    )

    rd = 0.17 * rng.uniform(0.93, 1.07)
    dist = np.sqrt((x - disc_c[0]) ** 2 + (y - disc_c[1]) ** 2)
    disc = 1.0 / (1.0 + np.exp(-(rd - dist) / (0.6 * px)))
    img = img * (1.0 - disc[..., None]) + disc[..., None] * np.array([0.93, 0.72, 0.45])
    cdr = float(np.clip(0.25 + 0.55 * sev, 0.1, 0.92))
    cup = 1.0 / (1.0 + np.exp(-(cdr * rd - dist) / (0.6 * px)))
    img = img * (1.0 - cup[..., None]) + cup[..., None] * np.array([1.0, 0.96, 0.82])

    n_les = int(np.clip(np.rint(16.0 * max(sev, 0.0) ** 2 + rng.normal(0.0, 0.7)), 0, 30))
    if focus is not None:
        n_les = max(n_les, FOCUS_MIN_LESIONS)
    if n_les:
        ang = rng.uniform(0.0, 2.0 * np.pi, n_les)
        rad = rng.uniform(0.08, 0.62, n_les)
        if focus is None:
            lx = rad * np.cos(ang) - side * 0.05
            ly = rad * np.sin(ang)
        else:  # a cluster around the focus, 0.03-0.13 from it
            spread = 0.03 + 0.10 * (rad - 0.08) / 0.54
            lx = focus[0] + spread * np.cos(ang)
            ly = focus[1] + spread * np.sin(ang)
        size_l = (0.025 + 0.045 * max(sev, 0.0)) * rng.uniform(0.7, 1.3, n_les)
        d2 = (x[None] - lx[:, None, None]) ** 2 + (y[None] - ly[:, None, None]) ** 2
        alpha = np.clip(1.6 * np.exp(-d2 / (2.0 * size_l[:, None, None] ** 2)), 0.0, 1.0)
        bright = rng.uniform(size=n_les) < 0.6  # exudates; others haemorrhages
        if focus is not None:
            bright[:] = True  # drusen
        for mask, colour in ((bright, (1.0, 0.9, 0.45)), (~bright, (0.32, 0.04, 0.03))):
            if mask.any():
                a = alpha[mask].max(axis=0)[..., None]
                img = img * (1.0 - a) + a * np.array(colour)
    if sheen is not None:  # a greyish-yellow glow over the macula (no draw: streams unchanged)
        a = (0.5 * float(np.clip(sheen, 0.0, 1.0)) * np.exp(-(x * x + y * y) / 0.05))[..., None]
        img = img * (1.0 - a) + a * np.array([0.90, 0.84, 0.62])

    style = (SITES + SHIFT_SITES)[site]
    theta = rng.uniform(0.0, 2.0 * np.pi)
    illum = 1.0 + style["grad"] * (np.cos(theta) * x + np.sin(theta) * y)
    cast = np.asarray(style["cast"]) * (1.0 + rng.normal(0.0, 0.03, 3)) * style["bright"]
    img = img * illum[..., None] * cast
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = np.clip((img - mean) * style["contrast"] + mean, 0.0, 1.0) ** style["gamma"]
    blur = (style["blur"] + rng.uniform(0.0, 0.3)) * size / 64.0
    if blur > 0.05:
        img = ndimage.gaussian_filter(img, (blur, blur, 0.0))
    img = img + rng.normal(0.0, 0.015, img.shape)
    field = 1.0 / (1.0 + np.exp(-(0.94 - np.sqrt(r2)) / px))
    img = img * field[..., None]
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
