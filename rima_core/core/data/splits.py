"""Seeded train/val/test splits of a store's eyes: per class, and by patient when the source
names patients.

Split from :mod:`rima_core.core.data.prepare` (which re-exports these names and decides which
split a store gets) because the split arithmetic is pure: labels, groups, fractions and a seed
in, a split name per row out, testable without a source tree.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rima_core.config import ConfigError
from rima_core.core.data.types import SPLITS


def _check_fractions(fractions: Sequence[float]) -> np.ndarray:
    f = np.asarray(fractions, dtype=np.float64)
    if f.shape != (3,) or (f < 0).any() or abs(f.sum() - 1.0) > 1e-6:
        raise ConfigError(
            f"prepare.split_fractions must be three non-negative numbers (train, val, test) "
            f"summing to 1, got {list(fractions)}"
        )
    return f


def _allocate(n: int, fractions: np.ndarray) -> np.ndarray:
    """Split ``n`` eyes by ``fractions`` (largest remainder), giving every non-empty split at
    least one eye when there are enough, so small classes still reach val and test."""
    exact = fractions * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: n - counts.sum()]] += 1
    wanted = fractions > 0
    if n >= wanted.sum():
        for s in np.flatnonzero(wanted & (counts == 0)):
            counts[int(np.argmax(counts))] -= 1
            counts[s] = 1
    return counts


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[str]:
    """Seeded per-class split into train/val/test (row order in, split name per row out)."""
    f = _check_fractions(fractions)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.empty(len(labels), dtype=object)
    for cls in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == cls))
        counts = _allocate(len(rows), f)
        bounds = np.cumsum(counts)[:-1]
        for name, part in zip(SPLITS, np.split(rows, bounds), strict=True):
            out[part] = name
    return out.tolist()


# Source attribute names (case-insensitive) that identify the patient an eye belongs to. When a
# source has one, prepare splits by patient, so both eyes of a patient land in the same split (an
# eye's fellow eye in the test split would leak the patient's disease into selection/testing).
PATIENT_ID_ATTRIBUTES = frozenset(
    {"patient_id", "patientid", "patient", "pid", "subject_id", "subjectid", "subject"}
)


def patient_ids(attributes: Sequence[dict[str, Any]]) -> list[str | None] | None:
    """Per case, the value of its patient-id attribute (:data:`PATIENT_ID_ATTRIBUTES`); None for
    a case without one, and None overall when no case has any."""
    out: list[str | None] = []
    for attrs in attributes:
        key = next((k for k in attrs if str(k).lower() in PATIENT_ID_ATTRIBUTES), None)
        value = None if key is None else attrs[key]
        missing = value is None or (isinstance(value, float) and np.isnan(value))
        out.append(None if missing or str(value).strip() == "" else str(value))
    return out if any(v is not None for v in out) else None


def grouped_stratified_split(
    labels: Sequence[int], groups: Sequence[str | None], fractions: Sequence[float], seed: int
) -> list[str]:
    """Seeded split of whole patients: every eye of a group gets its group's split.

    Patients are stratified by their most severe label (the highest class index of their eyes);
    an eye with no group is a patient of its own. Eye counts per split then follow the fractions
    up to the size of one patient.
    """
    labels = np.asarray(labels)
    keys = [g if g is not None else f"\0eye{i}" for i, g in enumerate(groups)]
    order = list(dict.fromkeys(keys))  # first appearance: stable across runs
    index = {k: i for i, k in enumerate(order)}
    member = np.array([index[k] for k in keys])
    group_label = np.full(len(order), -1)
    np.maximum.at(group_label, member, labels)
    group_split = np.asarray(stratified_split(group_label.tolist(), fractions, seed), dtype=object)
    return group_split[member].tolist()
