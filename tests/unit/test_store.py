"""The Arrow store: round trip, zero-copy reads, batching, content hash, error reporting."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from rima_core.core.data import Store, open_store
from rima_core.core.data.store import (
    MANIFEST_FILE,
    TENSORS_FILE,
    StoreError,
    StoreWriter,
    TensorColumn,
    rows_per_batch,
)
from tests.data_helpers import build_store, make_arrays, make_manifest


def test_round_trip_and_metadata(tmp_path):
    path = build_store(tmp_path / "s", n=20, missing_every=5)
    store = open_store(path)
    assert isinstance(store, Store)
    assert len(store) == 20
    assert store.fundus.shape == (20, 8, 8, 3) and store.oct.shape == (20, 4, 6, 6)
    assert store.n_classes == 3 and store.class_names == ["class0", "class1", "class2"]
    assert store.meta["n_cases"] == 20 and store.meta["fundus_shape"] == [8, 8, 3]
    assert len(store.meta["content_hash"]) == 64
    assert list(store.manifest.columns[:5]) == [
        "case_id",
        "label",
        "split",
        "has_fundus",
        "has_oct",
    ]
    fundus, oct = make_arrays(20)
    manifest = make_manifest(20, missing_every=5)
    for i in range(20):
        exp_f = fundus[i] if manifest.has_fundus[i] else np.zeros_like(fundus[i])
        exp_o = oct[i] if manifest.has_oct[i] else np.zeros_like(oct[i])
        np.testing.assert_array_equal(store.fundus[i], exp_f)
        np.testing.assert_array_equal(store.oct[i], exp_o)
    # absent modalities really are zeros on disk
    assert not store.fundus[0].any() and not store.oct[1].any()


def test_reads_are_zero_copy_and_read_only(tmp_path):
    store = open_store(build_store(tmp_path / "s", n=12))
    a, b = store.fundus[3], store.fundus[3]
    assert np.shares_memory(a, b)
    assert not a.flags.writeable and not store.oct[0].flags.writeable
    with pytest.raises(ValueError):
        a[0, 0, 0] = 1
    # the batch view borrows the memory map's buffer rather than owning a copy
    view = store.fundus.chunks[0]
    assert not view.flags.owndata
    assert np.shares_memory(view, store.fundus[0])


def test_batched_store_indexing_matches_arrays(tmp_path):
    path = build_store(tmp_path / "s", n=23, batch_rows=5)
    store = open_store(path)
    assert store.n_batches == 5
    fundus, oct = make_arrays(23)
    np.testing.assert_array_equal(np.asarray(store.fundus), fundus)
    np.testing.assert_array_equal(store.oct[[22, 0, 7]], oct[[22, 0, 7]])
    np.testing.assert_array_equal(store.oct[3:12], oct[3:12])  # crosses batches: gathered
    np.testing.assert_array_equal(store.fundus[-1], fundus[-1])
    np.testing.assert_array_equal(store.fundus[5:8], fundus[5:8])
    assert np.shares_memory(store.fundus[5:8], store.fundus[6])  # inside one batch: a view
    mask = np.zeros(23, bool)
    mask[[1, 9, 20]] = True
    np.testing.assert_array_equal(store.fundus[mask], fundus[mask])
    np.testing.assert_array_equal(store.fundus[4, :, :, 1], fundus[4, :, :, 1])
    with pytest.raises(IndexError):
        store.fundus[23]
    with pytest.raises(IndexError):
        store.oct[[0, 30]]


def test_hash_is_stable_and_independent_of_batching(tmp_path):
    a = open_store(build_store(tmp_path / "a", n=17, batch_rows=4))
    b = open_store(build_store(tmp_path / "b", n=17, batch_rows=17))
    c = open_store(build_store(tmp_path / "c", n=17, batch_rows=4))
    assert a.meta["content_hash"] == b.meta["content_hash"] == c.meta["content_hash"]
    # same input, same batching -> byte-identical files (no timestamps anywhere)
    for name in (TENSORS_FILE, MANIFEST_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    d = open_store(build_store(tmp_path / "d", n=17, seed=1))
    assert d.meta["content_hash"] != a.meta["content_hash"]
    relabelled = make_manifest(17)
    relabelled.loc[0, "label"] = 2
    e = open_store(build_store(tmp_path / "e", manifest=relabelled))
    assert e.meta["content_hash"] != a.meta["content_hash"]


def test_rows_per_batch_bounds_memory():
    assert rows_per_batch((64, 64, 3), (32, 32, 32)) >= 600  # default store: one batch
    paper = rows_per_batch((384, 384, 3), (96, 96, 96))
    assert 50 <= paper <= 200
    assert rows_per_batch((10**4, 10**4, 3), (1000, 1000, 1000)) == 1


def test_writer_rejects_wrong_shapes(tmp_path):
    with StoreWriter(tmp_path, (8, 8, 3), (4, 6, 6)) as w:
        with pytest.raises(ValueError, match="fundus must be uint8"):
            w.append(np.zeros((8, 8), np.uint8), None)
        with pytest.raises(ValueError, match="oct must be uint8"):
            w.append(None, np.zeros((4, 6, 6), np.float32))
        w.append(None, np.zeros((4, 6, 6), np.uint8))


def test_open_reports_missing_and_inconsistent_stores(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a store"):
        open_store(tmp_path / "nothing")
    path = build_store(tmp_path / "s", n=10)
    # tensors from another store of a different size -> row-count mismatch is named
    other = build_store(tmp_path / "o", n=6)
    (path / TENSORS_FILE).write_bytes((other / TENSORS_FILE).read_bytes())
    with pytest.raises(StoreError, match="6 tensor rows but 10 manifest rows"):
        open_store(path)
    (path / TENSORS_FILE).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="not a readable Arrow IPC file"):
        open_store(path)
    table = pq.read_table(other / MANIFEST_FILE)
    pq.write_table(table.replace_schema_metadata({}), other / MANIFEST_FILE)
    with pytest.raises(StoreError, match="no 'rima' metadata"):
        open_store(other)


def test_metadata_has_no_wall_clock(tmp_path):
    meta = open_store(build_store(tmp_path / "s", n=10)).meta
    assert set(meta) == {
        "source",
        "disease",
        "class_names",
        "fundus_shape",
        "oct_shape",
        "content_hash",
        "n_cases",
        "created_by",
    }
    json.dumps(meta)


def test_tensor_column_single_chunk_is_the_view():
    x = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    col = TensorColumn([x], (3, 4))
    assert np.asarray(col) is x
    rows = list(col)
    assert len(rows) == len(col) == 2 and col.ndim == 3
    assert np.shares_memory(rows[1], x) and rows[1][0, 0] == 12
