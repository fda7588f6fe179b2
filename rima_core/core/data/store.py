"""The Arrow tensor store: one directory that every training-time step reads zero-copy.

Why Arrow IPC and not Parquet or npz: training reads random rows every epoch, and a memory-mapped
IPC file with fixed-shape tensor columns gives each row as a numpy view straight from the page
cache — no decode, no copy. Parquet stays for the small tables (manifest, masks, reports), where
it is the better format.

Layout (see ``docs/interfaces.md``, "Store"):

- ``tensors.arrow`` — Arrow IPC file, uncompressed, record batches of ~:data:`BATCH_BYTES` each
  (so writing a paper-sized store never holds more than one batch in memory), columns ``fundus``
  (uint8 H×W×3) and ``oct`` (uint8 D×H×W). Row i is manifest row i. An absent modality is zeros.
- ``manifest.parquet`` — one row per eye, with the store metadata as the Parquet key-value entry
  ``rima`` (JSON). Nothing time-dependent is written, so the same input gives byte-identical
  files and DVC sees an unchanged output on a rerun.

A store of more than one record batch cannot be one contiguous numpy array without copying, so
:class:`TensorColumn` presents the per-batch views as one N-row array: integer indexing and
slices inside one batch are zero-copy views; fancy indexing gathers into a new array.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from rima_core import __version__
from rima_core.core.data.types import SPLITS, SourceError

log = logging.getLogger(__name__)

TENSORS_FILE = "tensors.arrow"
MANIFEST_FILE = "manifest.parquet"
META_KEY = b"rima"
# Target size of one record batch. Large enough that the default 64²/32³ store is a single batch
# (one plain numpy view per column), small enough to bound memory when writing 384²/96³ stores.
BATCH_BYTES = 128 * 2**20
MANIFEST_COLUMNS = ("case_id", "label", "split", "has_fundus", "has_oct")


class StoreError(SourceError):
    """A store directory that is missing pieces or inconsistent with itself.

    A subclass of :class:`SourceError` because for every step after ``prepare`` the store *is*
    the source: the CLI reports it as a user error, not a traceback.
    """


def rows_per_batch(
    fundus_shape: Sequence[int], oct_shape: Sequence[int], target_bytes: int = BATCH_BYTES
) -> int:
    """Rows per record batch so that one batch holds about ``target_bytes`` of pixels."""
    row_bytes = int(np.prod(fundus_shape)) + int(np.prod(oct_shape))
    return max(1, target_bytes // max(1, row_bytes))


def update_tensor_hash(hasher: Any, fundus: np.ndarray, oct: np.ndarray) -> None:
    """Feed rows into ``hasher`` row by row (fundus then OCT), so the digest does not depend on
    how the rows were batched — the writer and the validator batch differently."""
    for i in range(len(fundus)):
        hasher.update(np.ascontiguousarray(fundus[i]))
        hasher.update(np.ascontiguousarray(oct[i]))


def content_hash(tensor_digest: str, manifest: pd.DataFrame, meta: dict[str, Any]) -> str:
    """Hash of the pixels (their digest), the manifest rows and the content-defining metadata."""
    keys = ("source", "disease", "class_names", "fundus_shape", "oct_shape", "n_cases")
    described = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True)
    h = hashlib.sha256()
    h.update(b"tensors:" + tensor_digest.encode())
    h.update(b"\nmanifest:" + manifest.to_csv(index=False, lineterminator="\n").encode())
    h.update(b"\nmeta:" + described.encode())
    return h.hexdigest()


def _schema(fundus_shape: Sequence[int], oct_shape: Sequence[int]) -> pa.Schema:
    return pa.schema(
        [
            pa.field("fundus", pa.fixed_shape_tensor(pa.uint8(), list(fundus_shape))),
            pa.field("oct", pa.fixed_shape_tensor(pa.uint8(), list(oct_shape))),
        ]
    )


class StoreWriter:
    """Streams rows into ``tensors.arrow`` one record batch at a time, hashing them on the way.

    Rows are copied into a preallocated batch buffer and written when it is full, so memory stays
    at one batch however many eyes the store holds.
    """

    def __init__(
        self,
        directory: str | Path,
        fundus_shape: Sequence[int],
        oct_shape: Sequence[int],
        batch_rows: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.fundus_shape = tuple(int(s) for s in fundus_shape)
        self.oct_shape = tuple(int(s) for s in oct_shape)
        if len(self.fundus_shape) != 3 or self.fundus_shape[2] != 3:
            raise ValueError(f"fundus_shape must be (H, W, 3), got {self.fundus_shape}")
        if len(self.oct_shape) != 3:
            raise ValueError(f"oct_shape must be (D, H, W), got {self.oct_shape}")
        self.batch_rows = batch_rows or rows_per_batch(self.fundus_shape, self.oct_shape)
        self._fundus = np.zeros((self.batch_rows, *self.fundus_shape), np.uint8)
        self._oct = np.zeros((self.batch_rows, *self.oct_shape), np.uint8)
        self._fill = 0
        self.n_rows = 0
        self._hasher = hashlib.sha256()
        self._schema = _schema(self.fundus_shape, self.oct_shape)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._sink = pa.OSFile(str(self.directory / TENSORS_FILE), "wb")
        self._writer = ipc.new_file(
            self._sink, self._schema, options=ipc.IpcWriteOptions(compression=None)
        )
        self._closed = False

    def append(self, fundus: np.ndarray | None, oct: np.ndarray | None) -> None:
        """Add one row; ``None`` stores zeros (an absent modality)."""
        i = self._fill
        for name, value, buf, shape in (
            ("fundus", fundus, self._fundus, self.fundus_shape),
            ("oct", oct, self._oct, self.oct_shape),
        ):
            if value is None:
                buf[i] = 0
            elif value.shape != shape or value.dtype != np.uint8:
                raise ValueError(
                    f"row {self.n_rows}: {name} must be uint8 {shape}, "
                    f"got {value.dtype} {value.shape}"
                )
            else:
                buf[i] = value
        self._fill += 1
        self.n_rows += 1
        if self._fill == self.batch_rows:
            self._flush()

    def _flush(self) -> None:
        n = self._fill
        if n == 0:
            return
        fundus, oct = self._fundus[:n], self._oct[:n]
        update_tensor_hash(self._hasher, fundus, oct)
        batch = pa.record_batch(
            [
                pa.FixedShapeTensorArray.from_numpy_ndarray(fundus),
                pa.FixedShapeTensorArray.from_numpy_ndarray(oct),
            ],
            schema=self._schema,
        )
        # The IPC writer copies the batch into the file here, so the buffers can be reused.
        self._writer.write_batch(batch)
        self._fill = 0

    def close(self) -> str:
        """Flush, close the file and return the digest of all rows written."""
        if not self._closed:
            self._flush()
            self._writer.close()
            self._sink.close()
            self._closed = True
        return self._hasher.hexdigest()

    def abort(self) -> None:
        """Close the file without flushing (the caller discards the directory)."""
        if not self._closed:
            self._closed = True
            try:
                self._writer.close()
            finally:
                self._sink.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_manifest(
    directory: str | Path,
    manifest: pd.DataFrame,
    *,
    tensor_digest: str,
    source: str,
    disease: str | None,
    class_names: Sequence[str],
    fundus_shape: Sequence[int],
    oct_shape: Sequence[int],
) -> dict[str, Any]:
    """Write ``manifest.parquet`` with the store metadata; returns that metadata.

    Checks the columns every consumer relies on; content checks (label ranges, splits, ...) are
    the validation step's job so that a defective store can still be opened and reported on.
    """
    missing = [c for c in MANIFEST_COLUMNS if c not in manifest.columns]
    if missing:
        raise ValueError(f"manifest lacks column(s) {missing}")
    manifest = manifest.reset_index(drop=True)
    meta: dict[str, Any] = {
        "source": source,
        "disease": disease,
        "class_names": [str(c) for c in class_names],
        "fundus_shape": [int(s) for s in fundus_shape],
        "oct_shape": [int(s) for s in oct_shape],
        "n_cases": len(manifest),
    }
    meta["content_hash"] = content_hash(tensor_digest, manifest, meta)
    meta["created_by"] = f"rima_core {__version__}"
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[META_KEY] = json.dumps(meta, sort_keys=True).encode()
    pq.write_table(table.replace_schema_metadata(metadata), Path(directory) / MANIFEST_FILE)
    return meta


class TensorColumn:
    """An N-row uint8 tensor column over the store's record batches, numpy-like and read-only.

    ``col[i]`` and slices within one batch are zero-copy views into the memory map; slices that
    cross batches, integer or boolean index arrays and ``np.asarray(col)`` gather into a new array
    (no copy at all when the store is a single batch, which the default sizes are).
    """

    def __init__(self, chunks: Sequence[np.ndarray], row_shape: Sequence[int]) -> None:
        self._chunks = tuple(chunks)
        self.row_shape = tuple(int(s) for s in row_shape)
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self.shape = (int(self._starts[-1]), *self.row_shape)
        self.dtype = np.dtype(np.uint8)

    @property
    def chunks(self) -> tuple[np.ndarray, ...]:
        """The per-record-batch zero-copy views."""
        return self._chunks

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TensorColumn(shape={self.shape}, dtype=uint8, batches={len(self._chunks)})"

    def _row(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for {n} rows")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._chunks[k][i - self._starts[k]]

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.row_shape), np.uint8)
        if len(rows) == 0:
            return out
        n = len(self)
        if rows.min() < -n or rows.max() >= n:
            raise IndexError(f"index out of range for {n} rows")
        rows = rows % n
        which = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(which):
            sel = which == k
            out[sel] = self._chunks[k][rows[sel] - self._starts[k]]
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            if not key:
                return self[:]
            head, rest = key[0], key[1:]
            if isinstance(head, int | np.integer):
                return self._row(int(head))[rest]
            return self[head][(slice(None), *rest)]
        if isinstance(key, int | np.integer):
            return self._row(int(key))
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1 and stop > start:
                k = int(np.searchsorted(self._starts, start, side="right")) - 1
                if stop <= self._starts[k + 1]:
                    base = self._starts[k]
                    return self._chunks[k][start - base : stop - base]
            return self._gather(np.arange(start, stop, step))
        index = np.asarray(key)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"boolean index of shape {index.shape} for {len(self)} rows")
            index = np.flatnonzero(index)
        if not np.issubdtype(index.dtype, np.integer):
            raise IndexError(f"unsupported index {key!r}")
        return self._gather(index.ravel()).reshape(*index.shape, *self.row_shape)

    def __iter__(self) -> Iterator[np.ndarray]:
        for chunk in self._chunks:
            yield from chunk

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if len(self._chunks) == 1 and not copy:
            out = self._chunks[0]
        elif not self._chunks:
            out = np.zeros(self.shape, np.uint8)
        else:
            out = np.concatenate(self._chunks)
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass
class Store:
    """An opened store. Arrays are read-only views over the memory map; copy before editing."""

    path: Path
    manifest: pd.DataFrame
    meta: dict[str, Any]
    fundus: TensorColumn
    oct: TensorColumn

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def n_classes(self) -> int:
        return len(self.meta["class_names"])

    @property
    def n_batches(self) -> int:
        return len(self.fundus.chunks)

    def __len__(self) -> int:
        return len(self.manifest)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The store metadata alone (no pixels touched)."""
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path}: not a store (no {MANIFEST_FILE})")
    raw = pq.read_schema(manifest_path).metadata or {}
    if META_KEY not in raw:
        raise StoreError(f"{manifest_path}: no '{META_KEY.decode()}' metadata entry")
    return json.loads(raw[META_KEY])


def open_store(path: str | Path) -> Store:
    """Memory-map a store. Cheap: reads the manifest and the IPC footer, not the pixels."""
    path = Path(path)
    tensors_path = path / TENSORS_FILE
    meta = read_meta(path)
    if not tensors_path.exists():
        raise FileNotFoundError(f"{path}: not a store (no {TENSORS_FILE})")
    manifest = pq.read_table(path / MANIFEST_FILE).to_pandas()
    source = pa.memory_map(str(tensors_path), "r")
    try:
        reader = ipc.open_file(source)
    except pa.ArrowInvalid as exc:
        raise StoreError(f"{tensors_path}: not a readable Arrow IPC file: {exc}") from exc
    names = reader.schema.names
    if names[:2] != ["fundus", "oct"]:
        raise StoreError(f"{tensors_path}: expected columns fundus, oct; found {names}")
    fundus_chunks, oct_chunks = [], []
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)
        fundus_chunks.append(batch.column(0).to_numpy_ndarray())
        oct_chunks.append(batch.column(1).to_numpy_ndarray())
    fundus = TensorColumn(fundus_chunks, meta["fundus_shape"])
    oct = TensorColumn(oct_chunks, meta["oct_shape"])
    for name, col, arrow_type in (
        ("fundus", fundus, reader.schema.field(0).type),
        ("oct", oct, reader.schema.field(1).type),
    ):
        if list(arrow_type.shape) != list(col.row_shape):
            raise StoreError(
                f"{tensors_path}: {name} rows are {list(arrow_type.shape)} but the manifest "
                f"metadata says {list(col.row_shape)}"
            )
    if len(fundus) != len(manifest):
        raise StoreError(
            f"{path}: {len(fundus)} tensor rows but {len(manifest)} manifest rows "
            "(the store is incomplete or was edited by hand)"
        )
    return Store(path=path, manifest=manifest, meta=meta, fundus=fundus, oct=oct)


def split_counts(manifest: pd.DataFrame) -> dict[str, int]:
    """Eyes per split in the canonical order (zeros included)."""
    counts = manifest["split"].value_counts()
    return {s: int(counts.get(s, 0)) for s in SPLITS}
