"""The model card's per-grade table, its intervals and what it tells a reader first."""

from __future__ import annotations

import pandas as pd
import pytest

from rima_core.ops.model_card import PATHS_MEANING, per_grade_lines, pooling_lines, wilson_interval


def test_wilson_interval_matches_the_formula() -> None:
    # 8 of 10, 95 %: the textbook Wilson interval (0.490, 0.943)
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    # the ends stay inside [0, 1] where a normal interval would leave it
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) != wilson_interval(0, 0)  # nan: no eyes, no estimate


def test_per_grade_sensitivity_and_specificity_from_predictions() -> None:
    frame = pd.DataFrame({"label": [0, 0, 0, 1, 1, 2, 2, 2], "pred": [0, 0, 1, 1, 2, 2, 2, 0]})
    lines = per_grade_lines(frame, ["normal", "early", "advanced"], 0.95)
    assert lines[0] == "| grade | n | sensitivity | specificity |"
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    # normal: 2 of 3 found; 4 of 5 non-normal eyes not called normal
    assert rows["normal"].startswith("| normal | 3 | 0.667 [")
    assert "| 0.800 [" in rows["normal"]
    # advanced: 2 of 3 found; all 5 others not called advanced except one early eye
    assert rows["advanced"].startswith("| advanced | 3 | 0.667 [")
    assert "| 0.800 [" in rows["advanced"]
    assert per_grade_lines(None, ["a", "b"], 0.95) == []


def test_pooling_line_says_what_the_weights_mean() -> None:
    fitted = {
        "fitted": True,
        "n_eyes": 50,
        "weights": {"full": 0.0, "fundus_only": 0.5, "oct_only": 1.0},
        "nll_before": 0.5,
        "nll_after": 0.4,
    }
    (line,) = pooling_lines(fitted, "val")
    assert "full 0.000 / fundus_only 0.500 / oct_only 1.000" in line
    assert PATHS_MEANING in line
    assert "Each path alone" not in line  # older summaries lack the alternatives
    fitted["nll_alternatives"] = {"full": 0.6, "fundus_only": 0.7, "oct_only": 0.65, "singles": 0.5}
    (line,) = pooling_lines(fitted, "val")
    assert "full 0.600, fundus_only 0.700, oct_only 0.650" in line
    assert "no better than the two single paths pooled (0.600 vs 0.500)" in line
    assert "weight of 0 means" in line
    fitted["weights"]["full"] = 0.4
    fitted["nll_alternatives"]["full"] = 0.45
    (line,) = pooling_lines(fitted, "val")
    assert "is better than the two single paths pooled" in line and "weight of 0" not in line
