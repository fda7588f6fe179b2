"""EyeDataset / make_loader: items, masks AND source availability, workers, determinism."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from rima_core.config import MissingConfig
from rima_core.core.data.dataset import EyeDataset, make_loader
from rima_core.core.data.masks import build_masks, simulate_missing
from rima_core.core.data.store import open_store
from tests.data_helpers import build_store, make_arrays, make_manifest

N = 30


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("ds") / "store", n=N, missing_every=6)


def test_item_layout_and_values(store):
    ds = EyeDataset(store, None, "train")
    assert len(ds) == int(0.6 * N)
    item = ds[1]  # eye0001: OCT absent in the source (missing_every=6 drops OCT of row 1)
    assert item["fundus"].shape == (3, 8, 8) and item["fundus"].dtype == torch.float32
    assert item["oct"].shape == (1, 4, 6, 6) and item["oct"].dtype == torch.float32
    assert item["label"].dtype == torch.int64 and item["index"].item() == 1
    fundus, _ = make_arrays(N)
    expected = torch.from_numpy(fundus[1]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(item["fundus"], expected)
    assert item["has_fundus"].item() and not item["has_oct"].item()
    assert not item["oct"].any()
    # returned tensors own writable memory (the map is read-only)
    item["fundus"].add_(1)
    np.testing.assert_array_equal(open_store(store).fundus[1], fundus[1])


def test_mask_and_source_availability_combine(store, tmp_path):
    masks = tmp_path / "m.parquet"
    simulate_missing(store, masks, MissingConfig(rate=1.0))
    manifest = make_manifest(N, missing_every=6)
    test_rows = manifest[manifest.split == "test"]
    ds = EyeDataset(store, masks, "test", "fundus_missing")
    for i in range(len(ds)):
        item = ds[i]
        src_f, src_o = test_rows.iloc[i][["has_fundus", "has_oct"]]
        # rate 1: the fundus is dropped wherever OCT can stand in for it
        assert item["has_fundus"].item() == (bool(src_f) and not bool(src_o))
        assert item["has_oct"].item() == bool(src_o)
        if not item["has_fundus"]:
            assert not item["fundus"].any()


def test_mask_never_restores_source_absence(store):
    table = build_masks(make_manifest(N, missing_every=6), MissingConfig())
    table["has_fundus"] = True  # a (bad) mask that claims every fundus exists
    table["has_oct"] = True
    ds = EyeDataset(store, table, "train", "complete")
    assert not ds[0]["has_fundus"].item()  # eye0000 has no fundus in the source
    assert not ds[1]["has_oct"].item()


def test_masks_from_another_store_are_rejected(store):
    table = build_masks(make_manifest(N), MissingConfig())
    table = table[table.case_id != "eye0003"]
    with pytest.raises(ValueError, match="lack 1 case"):
        EyeDataset(store, table, "train")
    with pytest.raises(ValueError, match="no masks for scenario 'nope'"):
        EyeDataset(store, table, "train", "nope")


def test_pickle_does_not_carry_the_map(store):
    ds = EyeDataset(store, None, "val")
    ds[0]
    assert ds._store is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None
    torch.testing.assert_close(clone[0]["oct"], ds[0]["oct"])


def _epoch(loader):
    return torch.cat([b["index"] for b in loader]).tolist()


def test_loader_shuffle_is_seeded(store):
    ds = EyeDataset(store, None, "train")
    a = _epoch(make_loader(ds, 4, shuffle=True, seed=3))
    b = _epoch(make_loader(ds, 4, shuffle=True, seed=3))
    c = _epoch(make_loader(ds, 4, shuffle=True, seed=4))
    assert a == b and a != c and sorted(a) == list(ds.rows)
    assert _epoch(make_loader(ds, 4, shuffle=False)) == list(ds.rows)


def test_spawn_workers_read_the_store(store):
    ds = EyeDataset(store, None, "train")
    loader = make_loader(
        ds, 5, shuffle=True, num_workers=2, seed=1, multiprocessing_context="spawn"
    )
    assert not loader.pin_memory or torch.cuda.is_available()
    batches = list(loader)
    reference = list(make_loader(ds, 5, shuffle=True, num_workers=0, seed=1))
    assert len(batches) == len(reference)
    for got, want in zip(batches, reference, strict=True):
        assert got.keys() == want.keys()
        for key in got:
            torch.testing.assert_close(got[key], want[key])


def test_batched_loader_matches_per_item_collation(store, tmp_path):
    masks = tmp_path / "m.parquet"
    simulate_missing(store, masks, MissingConfig())
    ds = EyeDataset(store, masks, "train", "mixed")
    generator = torch.Generator().manual_seed(7)
    plain = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, generator=generator)
    batched = make_loader(ds, 4, shuffle=True, seed=7)
    assert len(batched) == len(plain) == 5
    for got, want in zip(batched, plain, strict=True):
        assert got.keys() == want.keys()
        for key in got:
            assert got[key].dtype == want[key].dtype, key
            torch.testing.assert_close(got[key], want[key])
    batch = ds[[0, 3]]
    assert batch["fundus"].shape == (2, 3, 8, 8) and batch["index"].tolist() == [0, 3]
    with pytest.raises(IndexError):
        ds[[len(ds)]]
