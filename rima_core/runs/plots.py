"""Plot data for ``dvc plots``: small CSVs shaped for DVC's Vega-Lite templates.

DVC draws one line per (file, column) and labels it with the column name; it has no "colour by
this column" option. The evaluation's ``rate_curve.csv`` is long (one row per scenario kind and
rate), so DVC drew fundus-missing and OCT-missing points in one colour. :func:`missing_rate_table`
makes it wide: one column per kind and metric, named as everywhere else
(:mod:`rima_core.tracking.metric_names`: ``test/fundus_missing/qwk``, ``test/oct_missing/qwk``), so
each kind is its own labelled line.

DVC's confusion template orders classes alphabetically (``advanced, early, normal``);
:func:`confusion_table` prefixes each class with its grade index (``0 normal``, ``1 early``,
``2 advanced``), so the alphabetical order is the grade order.

Both go to ``<evaluate.out_dir>/plots/``, a ``cache: false`` output committed to git so that
``dvc plots diff`` compares commits and experiments.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rima_core.config import SWEPT_FAMILIES
from rima_core.tracking.metric_names import scored

PLOTS_DIR = "plots"
MISSING_RATE_FILE = "missing_rate.csv"
CONFUSION_FILE = "confusion.csv"
# the sweeps drawn (scenario kinds of ``kind@rate`` scenarios) and the metrics they carry
RATE_KINDS = SWEPT_FAMILIES
RATE_METRICS = ("qwk", "auc", "accuracy")


def missing_rate_table(curve: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """Wide form of the rate curve: ``missing_rate`` and ``<split>/<kind>/<metric>`` columns.

    ``curve`` has ``scenario_kind, missing_rate, <metrics>`` (:func:`rima_core.runs.evaluate.
    rate_curve`). Rate 0 of a kind without its own ``@0`` point takes the ``complete`` row.
    """
    columns = ["missing_rate"] + [scored(split, k, m) for k in RATE_KINDS for m in RATE_METRICS]
    if curve.empty:
        return pd.DataFrame(columns=columns)
    rates = sorted(set(curve["missing_rate"].astype(float)))
    table = pd.DataFrame({"missing_rate": rates})
    complete = curve[curve["scenario_kind"] == "complete"]
    for kind in RATE_KINDS:
        part = curve[curve["scenario_kind"] == kind]
        if 0.0 not in set(part["missing_rate"].astype(float)) and len(complete):
            part = pd.concat([complete.assign(scenario_kind=kind), part], ignore_index=True)
        part = part.drop_duplicates("missing_rate").set_index("missing_rate")
        for metric in RATE_METRICS:
            values = part[metric] if metric in part else pd.Series(dtype=float)
            table[scored(split, kind, metric)] = table["missing_rate"].map(values).astype(float)
    return table[columns]


def grade_labels(class_names: Sequence[str]) -> list[str]:
    """``["0 normal", "1 early", ...]``: sorts in grade order as text (zero-padded indices)."""
    width = len(str(max(len(class_names) - 1, 0)))
    return [f"{i:0{width}d} {name}" for i, name in enumerate(class_names)]


def confusion_table(
    labels: np.ndarray, preds: np.ndarray, class_names: Sequence[str]
) -> pd.DataFrame:
    """One row per eye, ``actual`` and ``predicted`` as grade-ordered labels."""
    names = np.asarray(grade_labels(class_names))
    return pd.DataFrame(
        {
            "actual": names[np.asarray(labels, dtype=np.int64)],
            "predicted": names[np.asarray(preds, dtype=np.int64)],
        }
    )


def write_eval_plots(
    out: str | Path,
    curve: pd.DataFrame,
    labels: np.ndarray,
    preds: np.ndarray,
    class_names: Sequence[str],
    split: str = "test",
) -> None:
    """Write the DVC plot tables of an evaluation of ``split`` into the folder ``out``
    (created)."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    missing_rate_table(curve, split).to_csv(folder / MISSING_RATE_FILE, index=False)
    confusion_table(labels, preds, class_names).to_csv(folder / CONFUSION_FILE, index=False)
