"""Paired statistics of the missing-modality benchmark: differences seed by seed, their standard
errors, a t-test per cell and Holm's correction over a family of cells.

Why paired: every method of one (setting, seed) is trained and scored on the same generated
dataset with the same training seed, so ``rima − other`` seed by seed removes the dataset's luck
(most of the spread: the test split is ~120 eyes). Why Holm: an ablation study reads dozens of
cells; at 5 % per cell a few "significant" cells are expected by chance. Holm's step-down keeps
the family-wise error at ``alpha`` and is never less powerful than Bonferroni.

A verdict is ``better`` / ``worse`` when the cell's difference is non-zero at the corrected level,
``level`` otherwise (which means "not distinguishable with these seeds", not "equal").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
VERDICTS = ("better", "level", "worse")


@dataclass
class PairedCell:
    """One comparison: ``rima − other`` in one (setting, scenario) over paired seeds."""

    family: str
    setting: str
    scenario: str
    other: str
    diffs: list[float]
    p_value: float = float("nan")
    p_holm: float = float("nan")
    verdict: str = "level"

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return float(np.mean(self.diffs)) if self.diffs else float("nan")

    @property
    def standard_error(self) -> float:
        if self.n < 2:
            return float("nan")
        return float(np.std(self.diffs, ddof=1) / np.sqrt(self.n))


def paired_p_value(diffs: list[float] | np.ndarray) -> float:
    """Two-sided one-sample t-test of mean zero. NaN with fewer than 2 seeds; with no spread
    at all it is 0 for a non-zero mean (every seed agrees exactly) and 1 for a zero mean."""
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    if d.size < 2:
        return float("nan")
    sd = d.std(ddof=1)
    if sd <= 1e-12 * max(1.0, abs(float(d.mean()))):  # rounding of equal values is no spread
        return 0.0 if d.mean() != 0.0 else 1.0
    t = d.mean() / (sd / np.sqrt(d.size))
    return float(2.0 * stats.t.sf(abs(t), df=d.size - 1))


def holm(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1); NaN entries stay NaN and do
    not count towards the family size."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    m = idx.size
    if m == 0:
        return out.tolist()
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, (m - rank) * p[i])
        out[i] = min(1.0, running)
    return out.tolist()


def judge(cells: list[PairedCell], alpha: float = ALPHA) -> list[PairedCell]:
    """Fill each cell's p-value, Holm-adjusted p-value (over ``cells``: one family) and verdict."""
    for c in cells:
        c.p_value = paired_p_value(c.diffs)
    for c, adj in zip(cells, holm([c.p_value for c in cells]), strict=True):
        c.p_holm = adj
        if np.isfinite(adj) and adj < alpha:
            c.verdict = "better" if c.mean > 0 else "worse"
        else:
            c.verdict = "level"
    return cells
