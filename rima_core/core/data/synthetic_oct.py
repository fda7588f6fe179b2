"""The synthetic phantom's OCT renderer: a layered retina with localised lesions, under speckle.

Split from :mod:`rima_core.core.data.synthetic` (which re-exports :func:`render_oct`) so each
modality's rendering reads on its own. The volume is built in stages, each its own helper --
the retina's surfaces, the lesions that lift the RPE or open fluid cavities, the reflective
layers, then speckle and the device's look -- all drawing from one stream in a fixed order:
moving a draw changes every voxel after it, so the order is part of the phantom's bytes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from rima_core.core.data.synthetic_fundus import smooth_field

FLUID_MAX_POCKETS = 6  # private_latent: OCT fluid pockets at phi = 1


def render_oct(
    rng: np.random.Generator,
    sev: float,
    shape: tuple[int, int, int],
    *,
    focus: tuple[float, float] | None = None,
    fluid: float | None = None,
    device: int = 0,
) -> np.ndarray:
    """One OCT volume (D×H×W uint8): thickness and localised lesions grow with ``sev``.

    ``focus`` (x, y in fundus units = column w, B-scan d; anatomy=shared): the lesions are drusen
    clustered there (at least 2). ``fluid`` (private_latent): every severity lesion is a druse and
    fluid pockets whose number and size follow ``fluid`` are added. ``device`` 1 (site_shift=oct):
    another device's look (grainier speckle, A-scan blur, other gain and contrast curve). The
    defaults change nothing."""
    sev_c = max(sev, 0.0)
    retina = _surfaces(rng, sev_c, shape)
    _severity_lesions(rng, retina, sev_c, focus, fluid)
    if fluid is not None:
        _fluid_pockets(rng, retina, float(np.clip(fluid, 0.0, 1.0)))
    return _acquire(rng, _reflectivity(rng, retina), device)


@dataclasses.dataclass
class _Retina:
    """One eye's retina while it is built: the ILM and RPE surfaces (D×W, depth from the top of
    a B-scan) and the fluid cavities (D×H×W, 0..1) that the lesion stages edit in turn."""

    d: np.ndarray  # D×1: B-scan position in [-1, 1]
    w: np.ndarray  # 1×W: column position in [-1, 1]
    z: np.ndarray  # 1×H×1: depth, 0 at the top of a B-scan
    ilm: np.ndarray
    rpe: np.ndarray
    cavity: np.ndarray

    def bump(self, d0: float, w0: float, sd: float, sw: float) -> np.ndarray:
        """A Gaussian footprint (D×W) centred on B-scan ``d0``, column ``w0``."""
        d, w = self.d, self.w
        return np.exp(-((d - d0) ** 2) / (2 * sd**2) - ((w - w0) ** 2) / (2 * sw**2))

    def pocket(self, bump: np.ndarray, amp: float) -> None:
        """Fluid: the retina swells, a dark cavity forms above the RPE."""
        self.ilm = self.ilm - 0.8 * amp * bump
        zc = (self.rpe - 0.8 * amp - 0.03)[:, None, :]
        sz = 0.6 * amp + 0.015
        self.cavity = np.maximum(
            self.cavity, bump[:, None, :] * np.exp(-((self.z - zc) ** 2) / (2 * sz**2))
        )


def _surfaces(rng: np.random.Generator, sev_c: float, shape: tuple[int, int, int]) -> _Retina:
    """The healthy retina's surfaces: a tilted top, an RPE as deep as the severity makes the
    retina thick, and the foveal pit in the ILM; no cavity yet."""
    n_d, n_h, n_w = shape
    d = np.linspace(-1.0, 1.0, n_d)[:, None]
    w = np.linspace(-1.0, 1.0, n_w)[None, :]
    z = ((np.arange(n_h) + 0.5) / n_h)[None, :, None]  # depth, 0 at the top of a B-scan

    pit = np.exp(-((d - rng.normal(0, 0.05)) ** 2 + (w - rng.normal(0, 0.05)) ** 2) / 0.08)
    top = 0.22 + rng.normal(0, 0.02) + 0.05 * rng.uniform(-1, 1) * w + 0.02 * rng.uniform(-1, 1) * d
    rpe = top + (0.26 + 0.20 * sev_c) * rng.uniform(0.95, 1.05)
    ilm = top + 0.08 * pit  # the foveal pit: inner retina thins, the RPE stays flat
    return _Retina(d, w, z, ilm, rpe, np.zeros((n_d, n_h, n_w), dtype=np.float32))


def _severity_lesions(
    rng: np.random.Generator,
    retina: _Retina,
    sev_c: float,
    focus: tuple[float, float] | None,
    fluid: float | None,
) -> None:
    """The severity's lesions, a few B-scans each: drusen that lift the RPE or fluid pockets;
    with ``focus`` a merged cluster of drusen there, with ``fluid`` drusen only."""
    n_d, n_w = retina.d.shape[0], retina.w.shape[1]
    lesions = int(np.clip(np.rint(7.0 * sev_c**2 + rng.normal(0.0, 0.6)), 0, 12))
    if focus is not None:
        lesions = max(lesions, 2)
    cluster = np.zeros((n_d, n_w))  # anatomy=shared: the RPE's lift by the focus's drusen
    for _ in range(lesions):
        d0 = rng.uniform(-0.9, 0.9)
        w0 = rng.uniform(-0.7, 0.7)
        if focus is not None:  # within 0.12 of the focus
            d0, w0 = focus[1] + 0.12 * d0 / 0.9, focus[0] + 0.12 * w0 / 0.7
        sd = rng.uniform(0.6, 1.4) * 2.0 / n_d  # about 2-4 B-scans
        sw = (0.07 + 0.08 * sev_c) * rng.uniform(0.7, 1.3)
        bump = retina.bump(d0, w0, sd, sw)
        amp = (0.04 + 0.06 * sev_c) * rng.uniform(0.7, 1.3)
        drusen = rng.uniform() < 0.5
        if focus is not None:  # a cluster of drusen: overlapping ones merge, they do not stack
            cluster = np.maximum(cluster, amp * bump)
        elif drusen or fluid is not None:  # drusen: the RPE is lifted
            retina.rpe = retina.rpe - amp * bump
        else:
            retina.pocket(bump, amp)
    retina.rpe = retina.rpe - cluster


def _fluid_pockets(rng: np.random.Generator, retina: _Retina, phi: float) -> None:
    """private_latent: fluid pockets whose number and size follow ``phi`` (clipped to [0, 1])."""
    n_d = retina.d.shape[0]
    for _ in range(int(np.rint(FLUID_MAX_POCKETS * phi))):
        d0, w0 = rng.uniform(-0.6, 0.6), rng.uniform(-0.5, 0.5)
        sd = rng.uniform(1.0, 2.0) * 2.0 / n_d  # about 2-6 B-scans
        sw = (0.08 + 0.12 * phi) * rng.uniform(0.7, 1.3)
        bump = retina.bump(d0, w0, sd, sw)
        retina.pocket(bump, (0.05 + 0.10 * phi) * rng.uniform(0.7, 1.3))


def _reflectivity(rng: np.random.Generator, retina: _Retina) -> np.ndarray:
    """The noiseless volume (D×H×W float32): the retinal layers' reflectivities between the
    surfaces, darkened in the cavities, under a smooth gain across the scan."""
    ilm, rpe, z = retina.ilm, retina.rpe, retina.z
    n_d, n_h, n_w = retina.cavity.shape
    # Boundaries top->bottom (D×W each) and the reflectivity below each one.
    frac = np.cumsum([0.0, 0.16, 0.22, 0.12, 0.10])  # RNFL, GCL-IPL, INL, OPL, then ONL to the RPE
    bounds = [ilm + f * (rpe - ilm) for f in frac] + [rpe, rpe + 0.035, rpe + 0.035 + 0.14]
    refl = [0.05, 0.78, 0.50, 0.22, 0.48, 0.14, 0.95, 0.45, 0.12]  # vitreous first
    ramp = 1.2 / n_h  # boundaries blur over about one pixel (linear ramp: cheaper than a sigmoid)
    zf = z.astype(np.float32)
    vol = np.full((n_d, n_h, n_w), refl[0], dtype=np.float32)
    for b, below, above in zip(bounds, refl[1:], refl[:-1], strict=True):
        step = np.clip((zf - b[:, None, :].astype(np.float32)) / ramp + 0.5, 0.0, 1.0)
        vol += np.float32(below - above) * step
    vol *= (1.0 - 0.9 * retina.cavity).astype(np.float32)
    vol *= (1.0 + 0.08 * smooth_field(rng, (n_d, n_w), 6))[:, None, :].astype(np.float32)
    return vol


def _acquire(rng: np.random.Generator, vol: np.ndarray, device: int) -> np.ndarray:
    """The device's image of ``vol``: speckle, read noise, gain and offset, and for ``device`` 1
    another device's look; quantised to uint8."""
    looks = 4.0 if not device else 1.6  # speckle: gamma shape (fewer looks: grainier)
    speckle = rng.standard_gamma(looks, vol.shape, dtype=np.float32) * np.float32(1.0 / looks)
    vol = vol * speckle + np.float32(0.02) * rng.standard_normal(vol.shape, dtype=np.float32)
    vol = vol * rng.uniform(0.85, 1.1) + rng.uniform(-0.02, 0.04)
    if device:  # another device: blur along the A-scan, a compressive curve, lower gain, offset
        vol = ndimage.gaussian_filter(vol, (0.0, 0.9, 0.6))
        vol = 0.75 * np.clip(vol, 0.0, None) ** 0.7 + 0.05
    return np.clip(np.rint(vol * 230.0), 0, 255).astype(np.uint8)
