"""Small stores built in tests (no source tree involved): shared by the data-layer tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.core.data.store import StoreWriter, write_manifest
from rima_core.core.data.types import SPLITS


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


def write_store(
    directory: str | Path,
    manifest: pd.DataFrame,
    fundus: np.ndarray,
    oct: np.ndarray,
    *,
    source: str,
    disease: str | None,
    class_names: Sequence[str],
    batch_rows: int | None = None,
) -> dict[str, Any]:
    """Write a whole store from in-memory arrays through the writer ``prepare`` uses.

    Rows whose ``has_*`` flag is false are passed as absent, so the store writes zeros there
    whatever the array holds, as it does for ``prepare``.
    """
    if len(fundus) != len(manifest) or len(oct) != len(manifest):
        raise ValueError(
            f"{len(manifest)} manifest rows but {len(fundus)} fundus / {len(oct)} OCT rows"
        )
    has_f = manifest["has_fundus"].to_numpy(bool)
    has_o = manifest["has_oct"].to_numpy(bool)
    with StoreWriter(directory, fundus.shape[1:], oct.shape[1:], batch_rows) as writer:
        for i in range(len(manifest)):
            writer.append(fundus[i] if has_f[i] else None, oct[i] if has_o[i] else None)
        digest = writer.close()
    return write_manifest(
        directory,
        manifest,
        tensor_digest=digest,
        source=source,
        disease=disease,
        class_names=class_names,
        fundus_shape=fundus.shape[1:],
        oct_shape=oct.shape[1:],
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
