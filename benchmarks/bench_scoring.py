"""Scoring of the missing-modality benchmark: the metrics of one scenario's predictions (one
function for learned models and the oracle), and the oracle itself.

The oracle is the Bayes-optimal grader of the phantom: the posterior over grades given the
generator's latent views of the modalities each test eye has in the scenario
(``rima_core.core.data.oracle``). It bounds what any model can reach from images rendered from those
views, so every table can say how far a model is from what the data allows. Its grade is the
posterior argmax (``qwk``, as for every model), and the expected-quadratic-cost grade is scored
beside it (``qwk_ordinal``), as for every model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rima_core.core.metrics import bootstrap_scores, classification_metrics, ordinal_qwk

ORACLE = "oracle"
# Metrics recorded per (run, scenario). ``*_lo`` / ``*_hi``: 95 % percentile-bootstrap interval
# over the scenario's test eyes (calibration numbers are noisy on ~120 eyes).
METRICS = (
    "qwk",
    "qwk_ordinal",
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "auc",
    "ece",
    "ece_lo",
    "ece_hi",
    "nll",
    "nll_lo",
    "nll_hi",
)
BOOT_INTERVALS = ("ece", "nll")
N_BOOT = 500


def scenario_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """:data:`METRICS` of one scenario's predictions."""
    y = np.asarray(y_true)
    base = classification_metrics(y, proba, class_names)
    out = {m: float(base[m]) for m in METRICS if m in base}
    out["qwk_ordinal"] = ordinal_qwk(y, proba)
    for row in bootstrap_scores(y, proba, n_boot=N_BOOT, seed=seed):
        if row["metric"] in BOOT_INTERVALS:
            out[f"{row['metric']}_lo"] = row["ci_low"]
            out[f"{row['metric']}_hi"] = row["ci_high"]
    return out


def oracle_test_metrics(
    synth_cfg, manifest: pd.DataFrame, masks: pd.DataFrame, seed: int = 0
) -> dict[str, dict[str, float]]:
    """The oracle's :data:`METRICS` on the test split of every scenario in ``masks``.

    ``synth_cfg`` must be the config the phantom behind ``manifest`` was generated with (the
    oracle recomputes the generator's latent views from it). Eyes are those of each scenario's
    test mask rows, with the modalities the mask leaves them.
    """
    from rima_core.core.data.oracle import posterior

    labels = manifest.set_index("case_id")["label"]
    out: dict[str, dict[str, float]] = {}
    test = masks[masks["split"] == "test"]
    for scenario, rows in test.groupby("scenario", sort=False):
        ids = rows["case_id"].astype(str).to_numpy()
        proba = posterior(
            synth_cfg,
            ids,
            rows["has_fundus"].to_numpy(bool),
            rows["has_oct"].to_numpy(bool),
        )
        out[str(scenario)] = scenario_metrics(labels.loc[ids].to_numpy(), proba, seed=seed)
    return out
