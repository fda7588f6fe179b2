"""Seeded missing-modality masks: which modality each eye is *treated* as having, per scenario.

Masks live beside the store, not in it, so one store serves every scenario and a new scenario
never rewrites pixels. Rules:

- Rates apply over the eyes of a split that have **both** modalities in the source: an eye that
  already lacks one cannot lose the other (never both missing), and a mask never restores a
  modality the source lacks (mask = scenario AND source availability).
- Counts are exact (``round(rate * n_both)`` eyes per split), not Bernoulli draws, so a 30 %
  scenario holds 30 % on a 50-eye test split too.
- Randomness comes from a permutation per (seed, scenario family, split), seeded by a SHA-256 of
  those names — never Python's ``hash``, which is salted per process. A family is
  ``fundus_missing`` or ``oct_missing`` (the plain scenario and its ``@R`` sweep share it) or
  ``mixed``: rates of one family are nested (the eyes missing at 25 % are among those missing at
  50 %), which keeps rate curves smooth, and adding a scenario never changes another's mask.
- ``mixed`` draws disjoint sets from one permutation: the first ``round(r_f n)`` eyes lose the
  fundus, the next ``round(r_o n)`` lose the OCT. If ``r_f + r_o > 1`` both cannot be met without
  removing both modalities; the eyes are then shared in proportion to the rates (logged).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rima_core.atomic import atomic_file
from rima_core.config import (
    MAIN_SCENARIOS,
    MEAN_SCENARIO,
    ConfigError,
    MissingConfig,
    Scenario,
    scenario_names,
)
from rima_core.core.data.store import open_store
from rima_core.core.data.types import SPLITS

log = logging.getLogger(__name__)

MASK_COLUMNS = ("case_id", "split", "scenario", "has_fundus", "has_oct")


def selection_scenarios(name: str) -> list[str]:
    """The validation scenarios a selection rule named ``name`` looks at: ``mean`` = all of
    :data:`MAIN_SCENARIOS` (their metrics averaged), any other name = that scenario alone."""
    return list(MAIN_SCENARIOS) if name == MEAN_SCENARIO else [name]


def _check(cfg: MissingConfig) -> None:
    rates = [cfg.rate, *cfg.mixed, *cfg.sweep]
    if len(cfg.mixed) != 2:
        raise ConfigError(f"missing.mixed must be [r_fundus, r_oct], got {cfg.mixed}")
    bad = [r for r in rates if not 0.0 <= float(r) <= 1.0]
    if bad:
        raise ConfigError(f"missing-modality rates must lie in [0, 1], got {bad}")


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from names and numbers, identical in every process and Python version."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _rates(scenario: str, cfg: MissingConfig) -> tuple[str, float, float]:
    """scenario -> (family, fundus rate, OCT rate)."""
    parsed = Scenario.parse(scenario)
    family = parsed.family
    if family == "complete":
        return "complete", 0.0, 0.0
    if family == "mixed":
        return "mixed", float(cfg.mixed[0]), float(cfg.mixed[1])
    rate = float(cfg.rate) if parsed.rate is None else parsed.rate
    if family == "fundus_missing":
        return family, rate, 0.0
    if family == "oct_missing":
        return family, 0.0, rate
    raise ValueError(f"unknown scenario {scenario!r}")


def scenario_mask(
    has_fundus: np.ndarray,
    has_oct: np.ndarray,
    split: str,
    scenario: str,
    cfg: MissingConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """Availability of one split's eyes (in store order) under ``scenario``."""
    src_f = np.asarray(has_fundus, bool)
    src_o = np.asarray(has_oct, bool)
    family, r_f, r_o = _rates(scenario, cfg)
    keep_f, keep_o = src_f.copy(), src_o.copy()
    both = np.flatnonzero(src_f & src_o)
    n = len(both)
    if family == "complete" or n == 0:
        return keep_f, keep_o
    order = np.random.default_rng(stable_seed(cfg.seed, family, split)).permutation(both)
    n_f, n_o = round(r_f * n), round(r_o * n)
    if n_f + n_o > n:
        n_f = round(n * r_f / (r_f + r_o))
        n_o = n - n_f
        log.warning(
            "%s on %s: rates %.3g + %.3g exceed 1 over %d eyes with both modalities; "
            "using %d fundus-missing and %d OCT-missing eyes",
            scenario,
            split,
            r_f,
            r_o,
            n,
            n_f,
            n_o,
        )
    keep_f[order[:n_f]] = False
    keep_o[order[n_f : n_f + n_o]] = False
    return keep_f, keep_o


def build_masks(manifest: pd.DataFrame, cfg: MissingConfig) -> pd.DataFrame:
    """The mask table for every split and scenario (rows: scenario order, then store order)."""
    _check(cfg)
    parts = []
    for scenario in scenario_names(cfg):
        for split in SPLITS:
            rows = manifest[manifest["split"] == split]
            if rows.empty:
                continue
            keep_f, keep_o = scenario_mask(
                rows["has_fundus"].to_numpy(bool),
                rows["has_oct"].to_numpy(bool),
                split,
                scenario,
                cfg,
            )
            parts.append(
                pd.DataFrame(
                    {
                        "case_id": rows["case_id"].to_numpy(),
                        "split": split,
                        "scenario": scenario,
                        "has_fundus": keep_f,
                        "has_oct": keep_o,
                    }
                )
            )
    masks = pd.concat(parts, ignore_index=True)
    for col in ("case_id", "split", "scenario"):
        masks[col] = masks[col].astype("string")
    return masks


def _summary(masks: pd.DataFrame, manifest: pd.DataFrame) -> dict[str, Any]:
    """Realised missing rates per scenario, over the eyes that have both modalities."""
    both_ids = manifest.loc[manifest["has_fundus"] & manifest["has_oct"], "case_id"]
    out: dict[str, Any] = {}
    for scenario, rows in masks.groupby("scenario", sort=False):
        rows = rows[rows["case_id"].isin(both_ids)]
        n = len(rows)
        out[str(scenario)] = {
            "eyes_with_both": n,
            "fundus_missing_rate": float((~rows["has_fundus"]).mean()) if n else 0.0,
            "oct_missing_rate": float((~rows["has_oct"]).mean()) if n else 0.0,
        }
    return out


def simulate_missing(store: Path, out: Path, cfg: MissingConfig) -> dict[str, Any]:
    """Write the mask Parquet for ``store`` to ``out``; returns realised rates per scenario."""
    opened = open_store(store)
    manifest = opened.manifest
    masks = build_masks(manifest, cfg)
    meta = {
        "store_content_hash": opened.meta.get("content_hash"),
        "seed": cfg.seed,
        "scenarios": scenario_names(cfg),
    }
    table = pa.Table.from_pandas(masks, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[b"rima"] = json.dumps(meta, sort_keys=True).encode()
    with atomic_file(out) as tmp:
        pq.write_table(table.replace_schema_metadata(metadata), tmp)
    summary = _summary(masks, manifest)
    log.info("masks: %d rows, %d scenarios -> %s", len(masks), len(summary), out)
    return {"masks": str(out), "n_rows": len(masks), **meta, "rates": summary}


def load_masks(masks: str | Path | pd.DataFrame) -> pd.DataFrame:
    """The mask table from a file, or ``masks`` itself if already read, so the datasets of one
    run can share one copy."""
    return masks if isinstance(masks, pd.DataFrame) else read_masks(masks)


def read_masks(path: str | Path) -> pd.DataFrame:
    """Read a mask table, checking its columns."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such mask file")
    masks = pd.read_parquet(path)
    missing = [c for c in MASK_COLUMNS if c not in masks.columns]
    if missing:
        raise ValueError(f"{path}: mask table lacks column(s) {missing}")
    return masks
