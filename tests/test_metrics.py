"""Metrics against hand-computed small cases (and sklearn where it defines the same quantity)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from rima_core.metrics import classification_metrics, expected_calibration_error, is_better


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
