"""Metrics against hand-computed small cases (and sklearn where it defines the same quantity)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from rima_core.core.metrics import classification_metrics, expected_calibration_error, is_better


def _onehot_proba(pred: list[int], k: int, conf: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), k), (1 - conf) / (k - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_binary_hand_computed() -> None:
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])
    m = classification_metrics(y, np.stack([1 - p1, p1], axis=1), class_names=["neg", "pos"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["kappa"] == pytest.approx(0.0)
    # positives {0.4, 0.9} beat negatives {0.1, 0.6} in 3 of 4 pairs
    assert m["auc"] == pytest.approx(0.75)
    assert m["sensitivity/pos"] == pytest.approx(0.5)
    assert m["specificity/pos"] == pytest.approx(0.5)
    # confidences 0.9 (both correct) and 0.6 (both wrong): 0.5*0.1 + 0.5*0.6
    assert m["ece"] == pytest.approx(0.35)
    assert m["n_samples"] == 4


def test_multiclass_hand_computed() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = [0, 1, 1, 2, 2, 2]
    m = classification_metrics(y, _onehot_proba(pred, 3), class_names=["non", "early", "late"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)  # recalls 1/2, 1/2, 1
    assert m["kappa"] == pytest.approx(0.5)  # po 2/3, pe 1/3
    assert m["qwk"] == pytest.approx(0.75)  # weighted observed 1/12, expected 1/3
    assert m["f1_macro"] == pytest.approx((2 / 3 + 0.5 + 0.8) / 3)
    assert m["sensitivity/late"] == pytest.approx(1.0)
    assert m["specificity/late"] == pytest.approx(0.75)
    assert m["sensitivity/non"] == pytest.approx(0.5)
    assert m["specificity/non"] == pytest.approx(1.0)


def test_agrees_with_sklearn_on_random_data() -> None:
    rng = np.random.default_rng(0)
    n, k = 200, 4
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = p.argmax(1)
    m = classification_metrics(y, p)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["kappa"] == pytest.approx(skm.cohen_kappa_score(y, pred))
    assert m["qwk"] == pytest.approx(skm.cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p))
    recall = skm.recall_score(y, pred, average=None)
    for c in range(k):
        assert m[f"sensitivity/{c}"] == pytest.approx(recall[c])


def test_absent_class_is_nan_not_a_made_up_score() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]])
    m = classification_metrics(y, p, class_names=["a", "b", "c"])
    assert math.isnan(m["sensitivity/c"])
    assert m["specificity/c"] == pytest.approx(0.75)
    # OvR over the present classes only: class a: 1.0; class b: 0.75
    auc_a = skm.roc_auc_score(y == 0, p[:, 0])
    auc_b = skm.roc_auc_score(y == 1, p[:, 1])
    assert m["auc"] == pytest.approx((auc_a + auc_b) / 2)
    # F1 macro averages over classes seen in y_true or predictions (c is predicted once)
    assert m["f1_macro"] == pytest.approx(
        skm.f1_score(y, p.argmax(1), labels=[0, 1, 2], average="macro")
    )


def test_single_class_gives_nan_auc_and_kappa() -> None:
    y = np.zeros(5, dtype=int)
    m = classification_metrics(y, _onehot_proba([0] * 5, 3))
    assert m["accuracy"] == 1.0
    assert math.isnan(m["auc"])
    assert math.isnan(m["qwk"])
    assert math.isnan(m["kappa"])


def test_ece_perfectly_calibrated_bins() -> None:
    # 10 samples at confidence 0.7 with 7 correct: calibrated, ECE 0
    y = np.array([0] * 7 + [1] * 3)
    p = np.tile([0.7, 0.3], (10, 1))
    assert expected_calibration_error(y, p) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("y", "p", "match"),
    [
        (np.array([0, 1]), np.ones((3, 2)) / 2, "entries"),
        (np.array([0, 3]), np.ones((2, 2)) / 2, "outside"),
        (np.array([0, 1]), np.array([[np.nan, 1.0], [0.5, 0.5]]), "NaN"),
        (np.array([], dtype=int), np.ones((0, 2)), "empty"),
        (np.array([0, 1]), np.ones(2), "shape"),
    ],
)
def test_bad_input_is_rejected(y: np.ndarray, p: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, p)


def test_is_better_direction_and_nan() -> None:
    assert is_better("qwk", 0.5, 0.4)
    assert not is_better("qwk", 0.4, 0.5)
    assert is_better("ece", 0.1, 0.2)
    assert not is_better("ece", 0.3, 0.2)
    assert is_better("qwk", float("nan"), None)
    assert not is_better("qwk", float("nan"), 0.1)
    assert is_better("qwk", 0.0, float("nan"))


# --- ES-AUC and the bootstrap -------------------------------------------------------------------


def test_es_auc_hand_computed() -> None:
    from rima_core.core.metrics import es_auc
    from rima_core.runs.evaluate import subgroup_tables

    assert es_auc(0.8, [0.7, 0.9]) == pytest.approx(0.8 / 1.2)
    assert es_auc(0.8, [0.8, 0.8]) == pytest.approx(0.8)  # no gap: ES-AUC = AUC
    assert es_auc(0.8, [0.7, float("nan")]) == pytest.approx(0.8 / 1.1)  # undefined group skipped
    assert math.isnan(es_auc(float("nan"), [0.7]))

    # group A: positives {.9, .8} above negatives {.1, .2}: AUC 1.0
    # group B: positives {.4, .7} vs negatives {.6, .3}: 3 of 4 pairs -> 0.75
    # overall: 15 of 16 pairs -> 0.9375; ES-AUC = 0.9375 / (1 + 0.0625 + 0.1875) = 0.75
    y = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    p1 = np.array([0.1, 0.9, 0.2, 0.8, 0.6, 0.4, 0.3, 0.7])
    proba = np.stack([1 - p1, p1], axis=1)
    groups = {"site": np.array(["A"] * 4 + ["B"] * 4), "one": np.array(["x"] * 7 + ["y"])}
    overall = classification_metrics(y, proba)["auc"]
    assert overall == pytest.approx(0.9375)
    sub, eq = subgroup_tables("complete", y, proba, groups, overall, ["neg", "pos"])
    aucs = {(r["attribute"], r["group"]): r["auc"] for r in sub}
    assert aucs[("site", "A")] == pytest.approx(1.0)
    assert aucs[("site", "B")] == pytest.approx(0.75)
    site = next(r for r in eq if r["attribute"] == "site")
    assert site["es_auc"] == pytest.approx(0.75)
    assert site["n_groups"] == site["n_groups_scored"] == 2
    # a one-eye group is reported with its n and an undefined AUC, never dropped
    tiny = next(r for r in sub if r["attribute"] == "one" and r["group"] == "y")
    assert tiny["n"] == 1 and math.isnan(tiny["auc"])
    one = next(r for r in eq if r["attribute"] == "one")
    assert one["n_groups"] == 2 and one["n_groups_scored"] == 1


def test_resampled_metrics_hand_computed() -> None:
    from rima_core.core.metrics import resampled_metrics

    # eye 0: class 0, p1=.2 (right); eye 1: class 1, p1=.6 (right); eye 2: class 1, p1=.4 (wrong)
    y = np.array([0, 1, 1])
    p1 = np.array([0.2, 0.6, 0.4])
    proba = np.stack([1 - p1, p1], axis=1)
    counts = np.array([[1, 1, 1], [3, 0, 0], [0, 2, 1], [1, 0, 2]])
    r = resampled_metrics(y, proba, counts)
    assert r["accuracy"] == pytest.approx([2 / 3, 1.0, 2 / 3, 1 / 3])
    # AUC needs both classes: undefined for rows 2 and 3; row 4: 0.4 > 0.2 for both copies
    assert r["auc"][0] == pytest.approx(1.0)
    assert np.isnan(r["auc"][1]) and np.isnan(r["auc"][2])
    assert r["auc"][3] == pytest.approx(1.0)
    # row 4: recall class 0 = 1, class 1 = 0 (eye 2 twice, predicted 0)
    assert r["balanced_accuracy"][3] == pytest.approx(0.5)
    assert r["nll"][3] == pytest.approx(-(math.log(0.8) + 2 * math.log(0.4)) / 3)
    # row 2: one class only, everything predicted right -> kappa undefined
    assert np.isnan(r["qwk"][1])


def test_percentile_interval_hand_computed() -> None:
    from rima_core.core.metrics import percentile_interval

    values = np.concatenate([np.arange(101) / 100, [np.nan, np.nan]])
    low, high, n = percentile_interval(values, 0.95)
    assert (low, high, n) == (pytest.approx(0.025), pytest.approx(0.975), 101)
    low, high, n = percentile_interval(np.array([np.nan]), 0.95)
    assert math.isnan(low) and math.isnan(high) and n == 0


def test_bootstrap_equals_a_loop_over_resamples() -> None:
    """The vectorised bootstrap is exactly classification_metrics on each resample."""
    from rima_core.core.metrics import BOOT_METRICS, bootstrap_counts, bootstrap_scores

    rng = np.random.default_rng(7)
    n, k, n_boot, seed = 25, 3, 200, 11
    y = rng.integers(0, k, n)
    proba = rng.dirichlet(np.ones(k), n)
    proba[:4] = proba[0]  # ties in every score column
    idx = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    counts = bootstrap_counts(n, n_boot, seed)
    assert (counts.sum(axis=1) == n).all()
    loop = {m: [] for m in BOOT_METRICS}
    for b in range(n_boot):
        assert np.array_equal(np.bincount(idx[b], minlength=n), counts[b])
        m = classification_metrics(y[idx[b]], proba[idx[b]])
        for key in BOOT_METRICS:
            loop[key].append(m[key])
    full = classification_metrics(y, proba)
    rows = {r["metric"]: r for r in bootstrap_scores(y, proba, n_boot, seed, 0.9)}
    for key in BOOT_METRICS:
        values = np.array(loop[key])
        finite = values[np.isfinite(values)]
        low, high = np.percentile(finite, [5, 95])
        assert rows[key]["value"] == pytest.approx(full[key]), key
        assert rows[key]["ci_low"] == pytest.approx(low), key
        assert rows[key]["ci_high"] == pytest.approx(high), key
        assert rows[key]["n_boot"] == finite.size
    # seeded: the same call gives the same interval, another seed another one
    again = {r["metric"]: r for r in bootstrap_scores(y, proba, n_boot, seed, 0.9)}
    other = {r["metric"]: r for r in bootstrap_scores(y, proba, n_boot, seed + 1, 0.9)}
    assert again["qwk"]["ci_low"] == rows["qwk"]["ci_low"]
    assert other["qwk"]["ci_low"] != rows["qwk"]["ci_low"]


def test_paired_bootstrap_difference() -> None:
    from rima_core.core.metrics import bootstrap_counts, paired_bootstrap_difference

    rng = np.random.default_rng(3)
    n = 40
    y = rng.integers(0, 3, n)
    old = rng.dirichlet(np.ones(3), n)
    same = paired_bootstrap_difference(y, old, old, "accuracy", 300, 0)
    assert same == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0, "n_boot": 300}
    new = np.eye(3)[y] * 0.7 + 0.1  # right on every eye
    diff = paired_bootstrap_difference(y, new, old, "accuracy", 300, 0)
    acc_old = (old.argmax(axis=1) == y).astype(float)
    counts = bootstrap_counts(n, 300, 0)
    expected = 1.0 - counts @ acc_old / n  # per resample: 1 - old accuracy on the same eyes
    assert diff["value"] == pytest.approx(1.0 - acc_old.mean())
    assert diff["ci_low"] == pytest.approx(np.percentile(expected, 2.5))
    assert diff["ci_high"] == pytest.approx(np.percentile(expected, 97.5))
    with pytest.raises(ValueError, match="no bootstrap for metric"):
        paired_bootstrap_difference(y, new, old, "f1_macro")


def test_metric_ranges() -> None:
    from rima_core.core.metrics import metric_range

    assert metric_range("qwk") == (-1.0, 1.0)
    assert metric_range("auc") == (0.0, 1.0)
    assert metric_range("accuracy") == (0.0, 1.0)
    assert metric_range("nll")[0] == 0.0 and math.isinf(metric_range("nll")[1])
