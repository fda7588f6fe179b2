"""Torch access to the store: one split under one missing-modality scenario.

The memory map is opened lazily, on first item access in whichever process reads: a mapped file
handle must not be pickled into spawned DataLoader workers, and a forked worker should map the
file itself rather than share the parent's reader. Everything else (row indices, availability) is
small and computed once in ``__init__``, so a worker starts without reading the manifest again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from rima_core.core.data.masks import read_masks
from rima_core.core.data.store import Store, open_store
from rima_core.core.data.types import SPLITS

_SCALE = np.float32(255.0)


class EyeDataset(Dataset):
    """Eyes of ``split`` with availability = scenario mask AND source availability.

    Item: ``fundus`` float32 (3,H,W) and ``oct`` float32 (1,D,H,W) in [0, 1] (zeros when the
    modality is unavailable), ``has_fundus`` / ``has_oct`` bool tensors, ``label`` int64 and
    ``index`` int64 (row in the store).
    """

    def __init__(
        self,
        store_path: str | Path,
        masks: pd.DataFrame | str | Path | None,
        split: str,
        scenario: str = "complete",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.store_path = Path(store_path)
        self.split = split
        self.scenario = scenario
        store = open_store(self.store_path)
        self.meta = store.meta
        self.class_names = store.class_names
        self.fundus_shape = tuple(store.meta["fundus_shape"])
        self.oct_shape = tuple(store.meta["oct_shape"])
        manifest = store.manifest
        rows = np.flatnonzero((manifest["split"] == split).to_numpy(bool))
        self.rows = rows.astype(np.int64)
        self.labels = manifest["label"].to_numpy(np.int64)[rows]
        self.case_ids = manifest["case_id"].to_numpy(str)[rows]
        has_f = manifest["has_fundus"].to_numpy(bool)[rows]
        has_o = manifest["has_oct"].to_numpy(bool)[rows]
        if masks is not None:
            mask_f, mask_o = self._scenario_mask(masks, split, scenario, self.case_ids)
            has_f, has_o = has_f & mask_f, has_o & mask_o
        self.has_fundus = has_f
        self.has_oct = has_o
        self._store: Store | None = None
        del store

    @staticmethod
    def _scenario_mask(
        masks: pd.DataFrame | str | Path, split: str, scenario: str, case_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        table = masks if isinstance(masks, pd.DataFrame) else read_masks(masks)
        sel = table[(table["scenario"] == scenario) & (table["split"] == split)]
        if sel.empty:
            known = sorted(table["scenario"].astype(str).unique())
            raise ValueError(f"no masks for scenario {scenario!r} on split {split!r}; have {known}")
        sel = sel.set_index(sel["case_id"].astype(str))
        if sel.index.has_duplicates:
            dup = sel.index[sel.index.duplicated()][0]
            raise ValueError(f"masks list case {dup} twice for {scenario!r}/{split!r}")
        absent = [c for c in case_ids if c not in sel.index]
        if absent:
            raise ValueError(
                f"masks for {scenario!r}/{split!r} lack {len(absent)} case(s) of the store, "
                f"e.g. {absent[:3]}: they were made for another store"
            )
        sel = sel.loc[list(case_ids)]
        return sel["has_fundus"].to_numpy(bool), sel["has_oct"].to_numpy(bool)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None  # never ship a memory map to another process
        return state

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.store_path)
        return self._store

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int | Sequence[int]) -> dict[str, torch.Tensor]:
        """One eye for an integer index; a whole batch (leading batch axis) for a sequence."""
        if isinstance(i, int | np.integer):
            batch = self.get_batch([int(i)])
            return {key: value[0] for key, value in batch.items()}
        return self.get_batch(i)

    def get_batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """The collated batch for ``indices`` (positions in this dataset), built in place.

        Each eye's pixels are converted straight from the read-only map into the batch array
        (uint8 -> float32 / 255 and H×W×3 -> 3×H×W in one numpy pass): no per-eye tensors to
        stack afterwards, and no threaded torch cast, which stalls on a busy host.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"index out of range for {n} eyes")
        idx %= max(n, 1)
        rows = self.rows[idx]
        has_f, has_o = self.has_fundus[idx], self.has_oct[idx]
        h, w = self.fundus_shape[0], self.fundus_shape[1]
        fundus = np.zeros((len(idx), 3, h, w), np.float32)
        oct = np.zeros((len(idx), 1, *self.oct_shape), np.float32)
        store = self.store if (has_f.any() or has_o.any()) else None
        for j, row in enumerate(rows):
            if has_f[j]:
                np.divide(store.fundus[int(row)].transpose(2, 0, 1), _SCALE, out=fundus[j])
            if has_o[j]:
                np.divide(store.oct[int(row)], _SCALE, out=oct[j, 0])
        return {
            "fundus": torch.from_numpy(fundus),
            "oct": torch.from_numpy(oct),
            "has_fundus": torch.from_numpy(has_f),
            "has_oct": torch.from_numpy(has_o),
            "label": torch.from_numpy(self.labels[idx]),
            "index": torch.from_numpy(rows),
        }


class _Identity:
    """Collate for batches the dataset already built (picklable, unlike a lambda)."""

    def __call__(self, batch: Any) -> Any:
        return batch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = True,
    drop_last: bool = False,
    multiprocessing_context: str | None = None,
) -> DataLoader:
    """A DataLoader whose shuffling order depends only on ``seed``.

    For an :class:`EyeDataset` the sampler yields whole batches of indices and the dataset builds
    each batch in one array (see :meth:`EyeDataset.get_batch`); other datasets are collated per
    item as usual. Either way the order and contents are those of ``DataLoader(dataset,
    batch_size, shuffle, generator=torch.Generator().manual_seed(seed))``.
    ``pin_memory`` is honoured only when CUDA is available (pinning on a CPU-only host is wasted
    work and warns). Workers stay alive between epochs because each one maps the store once.
    """
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    common: dict[str, Any] = {
        "num_workers": num_workers,
        "generator": generator,
        "pin_memory": bool(pin_memory and torch.cuda.is_available()),
        "persistent_workers": num_workers > 0,
        "multiprocessing_context": multiprocessing_context if num_workers > 0 else None,
    }
    if not isinstance(dataset, EyeDataset):
        return DataLoader(
            dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common
        )
    base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    return DataLoader(
        dataset,
        sampler=BatchSampler(base, batch_size=batch_size, drop_last=drop_last),
        batch_size=None,
        collate_fn=_Identity(),
        **common,
    )
