"""Subgroups and equity of an evaluation: metrics per group of every ``source_*`` attribute of the
store, and the equity-scaled AUC (FairVision's ES-AUC) per attribute.

Apart from :mod:`rima_core.runs.evaluate` because it is a question of its own (does the model work
as well for every group of eyes?) with its own rules (what counts as a group, how a numeric
attribute is cut, a missing value kept as its own group), read from the scored predictions only:
it never predicts anything itself.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from rima_core.config import Config
from rima_core.core.metrics import classification_metrics, es_auc, metric_key

# the evaluation's logger: these lines are evaluate's, as before this module was split from it
log = logging.getLogger("rima_core.runs.evaluate")

SUBGROUP_METRICS = ("qwk", "auc", "accuracy", "balanced_accuracy", "ece")
MISSING_GROUP = "<missing>"


def attribute_groups(manifest: pd.DataFrame, max_groups: int) -> dict[str, pd.Series]:
    """``{attribute: group label per store row}`` for every ``source_*`` column of the store.

    Patient identifiers (:data:`rima_core.core.data.prepare.PATIENT_ID_ATTRIBUTES`) are not groups.
    A numeric attribute with more than ``max_groups`` distinct values (age) is cut into
    quartiles; a missing value is its own group (:data:`MISSING_GROUP`), never dropped.
    """
    from rima_core.core.data.prepare import PATIENT_ID_ATTRIBUTES

    out: dict[str, pd.Series] = {}
    for col in manifest.columns:
        if not col.startswith("source_"):
            continue
        name = col.removeprefix("source_")
        if name.lower() in PATIENT_ID_ATTRIBUTES:
            continue
        values = manifest[col]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric and values.nunique(dropna=True) > max_groups:
            q = pd.qcut(values.astype("float64"), 4, duplicates="drop")
            labels = q.map(lambda iv: f"[{iv.left:g}, {iv.right:g}]").astype("object")
        else:
            labels = values.astype("object").map(lambda v: str(v) if not pd.isna(v) else None)
        out[name] = labels.where(labels.notna(), MISSING_GROUP).astype(str).reset_index(drop=True)
    return out


def subgroup_tables(
    scenario: str,
    y: np.ndarray,
    proba: np.ndarray,
    groups: dict[str, np.ndarray],
    auc_overall: float,
    class_names: list[str],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows of ``subgroups.csv`` (one per attribute x group, every group with its ``n``) and of
    ``equity.csv`` (one per attribute: ES-AUC and how many groups had a defined AUC)."""
    sub_rows: list[dict[str, Any]] = []
    eq_rows: list[dict[str, Any]] = []
    for attribute, labels in groups.items():
        aucs = []
        for group in sorted(pd.unique(labels)):
            sel = labels == group
            m = classification_metrics(y[sel], proba[sel], class_names)
            aucs.append(m["auc"])
            sub_rows.append(
                {
                    "scenario": scenario,
                    "attribute": attribute,
                    "group": group,
                    "n": int(sel.sum()),
                    "n_classes_present": len(np.unique(y[sel])),
                    **{k: m[k] for k in SUBGROUP_METRICS},
                    "auc_gap": m["auc"] - auc_overall,
                }
            )
        finite = [abs(a - auc_overall) for a in aucs if math.isfinite(a)]
        eq_rows.append(
            {
                "scenario": scenario,
                "attribute": attribute,
                "auc": auc_overall,
                "es_auc": es_auc(auc_overall, aucs),
                "n_groups": len(aucs),
                "n_groups_scored": len(finite),
                "max_auc_gap": max(finite) if finite else float("nan"),
            }
        )
    return sub_rows, eq_rows


def subgroups_and_equity(
    test: dict[str, Any], manifest: pd.DataFrame, max_groups: int, class_names: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Subgroup metrics and equity of every scenario of the evaluated split, and the attributes
    they group by. The same eyes appear in every scenario, so the groups are fixed once from the
    store's attributes."""
    groups_by_row = attribute_groups(manifest, max_groups)
    sub_rows: list[dict[str, Any]] = []
    eq_rows: list[dict[str, Any]] = []
    for scenario in test["scenarios"]:
        preds = test["raw"][scenario]
        groups = {a: lab.to_numpy()[preds.index] for a, lab in groups_by_row.items()}
        auc = test["metrics"][scenario]["auc"]
        s_rows, e_rows = subgroup_tables(
            scenario, preds.y_true, preds.proba, groups, auc, class_names
        )
        sub_rows += s_rows
        eq_rows += e_rows
    subgroups = pd.DataFrame(
        sub_rows,
        columns=[
            "scenario",
            "attribute",
            "group",
            "n",
            "n_classes_present",
            *SUBGROUP_METRICS,
            "auc_gap",
        ],
    )
    equity = pd.DataFrame(
        eq_rows,
        columns=[
            "scenario",
            "attribute",
            "auc",
            "es_auc",
            "n_groups",
            "n_groups_scored",
            "max_auc_gap",
        ],
    )
    return subgroups, equity, list(groups_by_row)


def add_equity_headline(
    metrics: dict[str, dict[str, float]], equity: pd.DataFrame, cfg: Config
) -> str:
    """Add ``es_auc/<attribute>`` of ``evaluate.equity_attributes`` to the metrics of the
    promotion scenario (evaluate checked the masks have it); return that scenario."""
    headline = cfg.promote.scenario
    for attribute in cfg.evaluate.equity_attributes:
        row = equity[(equity["scenario"] == headline) & (equity["attribute"] == attribute)]
        if row.empty:
            log.info("store has no attribute %r: no ES-AUC headline for it", attribute)
            continue
        metrics[headline][f"es_auc/{metric_key(attribute)}"] = float(row["es_auc"].iloc[0])
    return headline
