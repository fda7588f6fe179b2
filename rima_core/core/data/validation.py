"""``validate``: a Great Expectations suite over the store; the pipeline stops on any failure.

GX validates dataframes, so the store is first summarised into small tables — the manifest, eyes
per split × class, split fractions, per-case pixel statistics, absent-modality maxima, one
integrity row (recomputed vs recorded content hash) and, per present image, the cases in other
splits holding the very same pixels (an eye copied into the test split under a new id leaks
it). Each expectation carries a ``check`` name; the JSON report lists every one with its outcome
and the offending case ids / values, so a failed run says *which* eyes to look at.

Pixel statistics are computed block by block over the memory map (a few MB at a time), in the
same pass that recomputes the content hash, so validating a paper-sized store reads it once and
never holds it in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rima_core.atomic import write_text
from rima_core.config import ValidateConfig
from rima_core.core.data.store import Store, content_hash, open_store, update_tensor_hash
from rima_core.core.data.types import SPLITS
from rima_core.progress import progress as tqdm

log = logging.getLogger(__name__)

MODALITIES = ("fundus", "oct")
# Elements per block when computing statistics: bounds the float32 temporary to ~32 MB.
_BLOCK_ELEMENTS = 8 * 2**20
# Offending entries kept per expectation in the report (the count is always exact).
MAX_OFFENDING = 100


def _blocks(store: Store) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(first row, fundus rows, OCT rows) blocks in row order, zero-copy slices of the map."""
    row_elems = int(np.prod(store.fundus.row_shape)) + int(np.prod(store.oct.row_shape))
    step = max(1, _BLOCK_ELEMENTS // row_elems)
    start = 0
    for f_chunk, o_chunk in zip(store.fundus.chunks, store.oct.chunks, strict=True):
        for i in range(0, len(f_chunk), step):
            yield start + i, f_chunk[i : i + step], o_chunk[i : i + step]
        start += len(f_chunk)


def _row_hashes(block: np.ndarray) -> list[str]:
    """A digest of each row's stored pixels (the resized image: identical eyes, identical bytes)."""
    flat = np.ascontiguousarray(block.reshape(len(block), -1))
    return [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in flat]


def _block_stats(block: np.ndarray) -> dict[str, np.ndarray]:
    flat = block.reshape(len(block), -1)
    as_float = flat.astype(np.float32)
    mean = as_float.mean(axis=1, dtype=np.float64)
    mean_sq = np.square(as_float).mean(axis=1, dtype=np.float64)
    return {
        "mean": mean,
        "std": np.sqrt(np.maximum(mean_sq - mean**2, 0.0)),
        "min": flat.min(axis=1).astype(np.int64),
        "max": flat.max(axis=1).astype(np.int64),
    }


def pixel_statistics(store: Store) -> tuple[pd.DataFrame, str]:
    """Per-case, per-modality mean/std/min/max and pixel digest (``pixel_hash``; all rows) and
    the recomputed tensor digest."""
    hasher = hashlib.sha256()
    parts: dict[str, list[dict[str, np.ndarray]]] = {m: [] for m in MODALITIES}
    hashes: dict[str, list[str]] = {m: [] for m in MODALITIES}
    with tqdm(total=len(store), desc="pixel statistics", unit="eye") as bar:
        for _, f_block, o_block in _blocks(store):
            update_tensor_hash(hasher, f_block, o_block)
            parts["fundus"].append(_block_stats(f_block))
            parts["oct"].append(_block_stats(o_block))
            hashes["fundus"].extend(_row_hashes(f_block))
            hashes["oct"].extend(_row_hashes(o_block))
            bar.update(len(f_block))
    frames = []
    manifest = store.manifest
    for modality in MODALITIES:
        stats = {
            k: np.concatenate([p[k] for p in parts[modality]]) if parts[modality] else []
            for k in ("mean", "std", "min", "max")
        }
        frames.append(
            pd.DataFrame(
                {
                    "case_id": manifest["case_id"].astype(str).to_numpy(),
                    "modality": modality,
                    "present": manifest[f"has_{modality}"].to_numpy(bool),
                    **stats,
                    "pixel_hash": hashes[modality],
                }
            )
        )
    return pd.concat(frames, ignore_index=True), hasher.hexdigest()


def _tables(store: Store, cfg: ValidateConfig) -> dict[str, pd.DataFrame]:
    manifest = store.manifest.copy()
    manifest["case_id"] = manifest["case_id"].astype(object)
    manifest["n_modalities"] = manifest["has_fundus"].astype(int) + manifest["has_oct"].astype(int)
    n = len(manifest)

    counts = manifest.groupby(["split", "label"]).size()
    split_sizes = manifest["split"].value_counts()
    split_class = pd.DataFrame(
        [
            {"split": s, "class_name": name, "label": c, "n_eyes": int(counts.get((s, c), 0))}
            for s in SPLITS
            if split_sizes.get(s, 0) > 0 or cfg.min_split_fraction.get(s, 0.0) > 0
            for c, name in enumerate(store.class_names)
        ]
    )
    splits = pd.DataFrame(
        [
            {
                "split": s,
                "n_eyes": int(split_sizes.get(s, 0)),
                "fraction": float(split_sizes.get(s, 0)) / n if n else 0.0,
                "min_fraction": float(cfg.min_split_fraction.get(s, 0.0)),
            }
            for s in SPLITS
        ]
    )
    pixels, digest = pixel_statistics(store)
    recorded = store.meta.get("content_hash")
    recomputed = content_hash(digest, store.manifest, store.meta)
    integrity = pd.DataFrame(
        [
            {
                "item": "content_hash",
                "recorded": str(recorded),
                "recomputed": recomputed,
            },
            {
                "item": "n_cases",
                "recorded": str(store.meta.get("n_cases")),
                "recomputed": str(n),
            },
        ]
    )
    return {
        "manifest": manifest,
        "duplicates": _cross_split_duplicates(pixels, manifest),
        "split_class": split_class,
        "splits": splits,
        "pixels": pixels[pixels["present"]].reset_index(drop=True),
        "absent": pixels[~pixels["present"]].reset_index(drop=True),
        "integrity": integrity,
    }


def _cross_split_duplicates(pixels: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Per present image: the cases in OTHER splits whose image of that modality is pixel for
    pixel the same (``same_as``, "id (split)"), and how many there are (``n_cross_split``).

    Identical images within one split are no leak and are not counted.
    """
    present = pixels[pixels["present"]].reset_index(drop=True)
    ids, split_names = manifest["case_id"].astype(str), manifest["split"].astype(str)
    split_of = dict(zip(ids, split_names, strict=True))
    splits = present["case_id"].map(split_of)
    groups: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(present["modality"], present["pixel_hash"], strict=True)):
        groups.setdefault(key, []).append(i)
    same_as: list[str] = [""] * len(present)
    counts = np.zeros(len(present), dtype=np.int64)
    for rows in groups.values():
        if len(rows) < 2 or len({splits[i] for i in rows}) < 2:
            continue
        for i in rows:
            others = [j for j in rows if splits[j] != splits[i]]
            counts[i] = len(others)
            same_as[i] = ", ".join(f"{present['case_id'][j]} ({splits[j]})" for j in others[:5])
    return pd.DataFrame(
        {
            "case_id": present["case_id"].astype(object),
            "modality": present["modality"],
            "split": splits.astype(object),
            "same_as": same_as,
            "n_cross_split": counts,
        }
    )


def _suites(k: int, n_rows: int, cfg: ValidateConfig) -> dict[str, list[Any]]:
    """Expectations per table for ``k`` classes and ``n_rows`` tensor rows. Every
    ``meta.check`` is the name failures are reported by."""
    import great_expectations.expectations as gxe

    lo, hi = (float(v) for v in cfg.mean_intensity_range)

    def m(name: str) -> dict[str, str]:
        return {"check": name}

    return {
        "manifest": [
            gxe.ExpectTableRowCountToEqual(value=n_rows, meta=m("manifest_rows_match_tensors")),
            gxe.ExpectColumnValuesToNotBeNull(column="case_id", meta=m("case_id_not_null")),
            gxe.ExpectColumnValuesToBeUnique(column="case_id", meta=m("case_id_unique")),
            gxe.ExpectColumnValuesToNotBeNull(column="label", meta=m("label_not_null")),
            gxe.ExpectColumnValuesToBeBetween(
                column="label", min_value=0, max_value=k - 1, meta=m("label_in_range")
            ),
            gxe.ExpectColumnValuesToBeInSet(
                column="split", value_set=list(SPLITS), meta=m("split_known")
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="n_modalities", min_value=1, max_value=2, meta=m("eye_has_a_modality")
            ),
        ],
        "duplicates": [
            gxe.ExpectColumnValuesToBeBetween(
                column="n_cross_split",
                min_value=0,
                max_value=0,
                meta=m("no_identical_image_across_splits"),
            ),
        ],
        "split_class": [
            gxe.ExpectColumnValuesToBeBetween(
                column="n_eyes", min_value=1, meta=m("every_split_has_every_class")
            ),
        ],
        "splits": [
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="fraction",
                column_B="min_fraction",
                or_equal=True,
                meta=m("split_fraction_at_least_minimum"),
            ),
        ],
        "pixels": [
            gxe.ExpectColumnValuesToBeBetween(
                column="min", min_value=0, max_value=255, meta=m("pixel_min_in_uint8_range")
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="max", min_value=0, max_value=255, meta=m("pixel_max_in_uint8_range")
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="mean", min_value=lo, max_value=hi, meta=m("mean_intensity_in_range")
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="std", min_value=float(cfg.min_pixel_std), meta=m("image_not_constant")
            ),
        ],
        "absent": [
            gxe.ExpectColumnValuesToBeBetween(
                column="max", min_value=0, max_value=0, meta=m("absent_modality_is_zeros")
            ),
        ],
        "integrity": [
            gxe.ExpectColumnPairValuesToBeEqual(
                column_A="recorded", column_B="recomputed", meta=m("store_integrity")
            ),
        ],
    }


_INDEX_COLUMNS = {
    "manifest": ["case_id"],
    "duplicates": ["case_id", "split", "modality", "same_as"],
    "split_class": ["split", "class_name"],
    "splits": ["split"],
    "pixels": ["case_id", "modality"],
    "absent": ["case_id", "modality"],
    "integrity": ["item"],
}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def _entry(table: str, result: Any) -> dict[str, Any]:
    config = result.expectation_config
    res = result.result or {}
    offending = res.get("unexpected_index_list") or res.get("unexpected_list") or []
    if "observed_value" in res and not result.success:
        offending = [{"observed_value": res["observed_value"]}]
    count = res.get("unexpected_count", len(offending))
    exception = (result.exception_info or {}).get("exception_message")
    return {
        "check": config.meta.get("check", config.type),
        "table": table,
        "expectation": config.type,
        "kwargs": _jsonable({k: v for k, v in config.kwargs.items() if k != "batch_id"}),
        "success": bool(result.success),
        "unexpected_count": int(count or 0),
        "offending": _jsonable(list(offending)[:MAX_OFFENDING]),
        **({"exception": exception} if exception else {}),
    }


def _failure_line(entry: dict[str, Any]) -> str:
    if entry.get("exception"):
        return f"{entry['check']} ({entry['table']}): error: {entry['exception']}"
    shown = entry["offending"][:5]
    more = "" if entry["unexpected_count"] <= len(shown) else ", ..."
    return (
        f"{entry['check']} ({entry['table']}): {entry['unexpected_count']} offending: "
        f"{json.dumps(shown, default=str)[1:-1]}{more}"
    )


def validate_store(store: Path, report: Path, cfg: ValidateConfig) -> dict[str, Any]:
    """Run the suite over ``store``, write the JSON report to ``report`` (pass or fail).

    Returns ``{"success", "failures", "report", "n_expectations"}``; ``failures`` holds one line
    per failed expectation, starting with its check name.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx  # slow import (~6 s): only when validating

    # GX logs its internals (docs-site temp dirs, datasource dumps) at INFO, and one of its
    # modules pins its own logger to INFO; keep the step's log about the step.
    for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.WARNING)

    opened = open_store(store)
    tables = _tables(opened, cfg)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    datasource = context.data_sources.add_pandas("rima_store")
    entries: list[dict[str, Any]] = []
    suites = _suites(opened.n_classes, len(opened.fundus), cfg)
    for table, expectations in suites.items():
        frame = tables[table]
        batch = (
            datasource.add_dataframe_asset(table)
            .add_batch_definition_whole_dataframe("all")
            .get_batch(batch_parameters={"dataframe": frame})
        )
        suite = gx.ExpectationSuite(name=f"rima_{table}")
        for expectation in expectations:
            suite.add_expectation(expectation)
        result = batch.validate(
            suite,
            result_format={
                "result_format": "COMPLETE",
                "unexpected_index_column_names": _INDEX_COLUMNS[table],
            },
        )
        order = {e.meta["check"]: i for i, e in enumerate(expectations)}
        results = sorted(result.results, key=lambda r: order[r.expectation_config.meta["check"]])
        entries.extend(_entry(table, r) for r in results)
    failures = [_failure_line(e) for e in entries if not e["success"]]
    success = not failures
    doc = {
        "success": success,
        "store": str(store),
        "content_hash": opened.meta.get("content_hash"),
        "n_cases": len(opened),
        "n_expectations": len(entries),
        "n_failed": len(failures),
        "failures": failures,
        "expectations": entries,
    }
    write_text(report, json.dumps(doc, indent=2) + "\n")
    level = logging.INFO if success else logging.ERROR
    log.log(
        level,
        "validation %s: %d/%d expectations met",
        store,
        len(entries) - len(failures),
        len(entries),
    )
    return {
        "success": success,
        "failures": failures,
        "report": str(report),
        "n_expectations": len(entries),
    }
