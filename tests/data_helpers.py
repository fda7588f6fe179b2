"""Small stores built in tests (no source tree involved): shared by the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rima_core.data.store import write_store
from rima_core.data.types import SPLITS


def make_arrays(
    n: int, fundus_size: int = 8, oct_shape: tuple[int, int, int] = (4, 6, 6), seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Textured uint8 images: mid-grey mean, clearly non-constant."""
    rng = np.random.default_rng(seed)
    fundus = rng.integers(40, 200, size=(n, fundus_size, fundus_size, 3), dtype=np.uint8)
    oct = rng.integers(40, 200, size=(n, *oct_shape), dtype=np.uint8)
    return fundus, oct


def make_manifest(n: int, n_classes: int = 3, missing_every: int = 0) -> pd.DataFrame:
    """Labels cycle over classes; splits 60/20/20 in blocks so every split holds every class.

    ``missing_every`` > 0 drops the fundus of every k-th eye and the OCT of the one after it.
    """
    labels = np.arange(n) % n_classes
    cut1, cut2 = int(0.6 * n), int(0.8 * n)
    splits = [SPLITS[0]] * cut1 + [SPLITS[1]] * (cut2 - cut1) + [SPLITS[2]] * (n - cut2)
    has_f = np.ones(n, bool)
    has_o = np.ones(n, bool)
    if missing_every:
        has_f[::missing_every] = False
        has_o[1::missing_every] = False
    return pd.DataFrame(
        {
            "case_id": pd.Series([f"eye{i:04d}" for i in range(n)], dtype="string"),
            "label": labels.astype(np.int64),
            "split": pd.Series(splits, dtype="string"),
            "has_fundus": has_f,
            "has_oct": has_o,
        }
    )


def build_store(
    path: Path,
    n: int = 30,
    n_classes: int = 3,
    missing_every: int = 0,
    batch_rows: int | None = None,
    seed: int = 0,
    manifest: pd.DataFrame | None = None,
    fundus: np.ndarray | None = None,
    oct: np.ndarray | None = None,
) -> Path:
    """Write a small valid store (or one with the given pieces swapped in) and return its path."""
    manifest = make_manifest(n, n_classes, missing_every) if manifest is None else manifest
    f, o = make_arrays(len(manifest), seed=seed)
    write_store(
        path,
        manifest,
        f if fundus is None else fundus,
        o if oct is None else oct,
        source="test",
        disease=None,
        class_names=[f"class{c}" for c in range(n_classes)],
        batch_rows=batch_rows,
    )
    return path
