"""The benchmark's statistics (benchmarks/bench_stats.py) and its sweep selection, grid and
report tables (benchmarks/bench_grid.py, bench_report.py): paired t-tests, Holm's correction,
better/level/worse verdicts, the validation sweep's choice, the plan of each grid."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from benchmarks.bench_grid import GRIDS, TRAINING_REGIMES, variants
from benchmarks.bench_report import (
    ablation_cells,
    gap_cells,
    last_epoch_share,
    long_table,
    select_variants,
)
from benchmarks.bench_stats import PairedCell, holm, judge, paired_p_value
from benchmarks.missing_modality import bench_config, parse_args, plan_keys

MAIN = ("complete", "fundus_missing", "oct_missing", "mixed")


def test_paired_p_value_is_the_one_sample_t_test() -> None:
    d = [0.02, 0.05, -0.01, 0.04, 0.03]
    assert paired_p_value(d) == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    assert math.isnan(paired_p_value([0.1]))  # one seed: no spread, no test
    assert paired_p_value([0.1, 0.1, 0.1]) == 0.0  # every seed agrees exactly
    assert paired_p_value([0.0, 0.0]) == 1.0


def test_holm_matches_the_step_down_rule() -> None:
    p = [0.01, 0.04, 0.03, 0.005, float("nan")]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> monotone 0.06
    assert holm(p)[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm(p)[4])  # a cell without a test does not count in the family
    assert holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_verdicts_separate_signal_from_noise_after_correction() -> None:
    rng = np.random.default_rng(0)
    clear = PairedCell("f", "s", "complete", "a", list(0.05 + 0.005 * rng.standard_normal(10)))
    noise = PairedCell("f", "s", "mixed", "a", list(0.002 + 0.03 * rng.standard_normal(10)))
    worse = PairedCell("f", "s", "oct_missing", "a", list(-0.04 + 0.005 * rng.standard_normal(10)))
    judge([clear, noise, worse])
    assert (clear.verdict, noise.verdict, worse.verdict) == ("better", "level", "worse")
    # one barely significant cell loses its verdict in a larger family
    d = [0.01, 0.03, 0.02, 0.0, 0.025, 0.015]
    alone = judge([PairedCell("f", "s", "c", "a", d)])[0]
    crowd = judge([PairedCell("f", "s", f"c{i}", "a", d) for i in range(20)])[0]
    assert alone.verdict == "better" and crowd.verdict == "level"
    assert crowd.p_holm == pytest.approx(min(1.0, 20 * alone.p_value))


def _rec(method: str, seed: int, qwk: float, variant: str = "lr1", val: float = 0.5) -> dict:
    return {
        "regime": "default",
        "training": "complete",
        "method": method,
        "seed": seed,
        "variant": variant,
        "test": {s: {"qwk": qwk} for s in MAIN},
        "run": {"best_val_score": val, "best_epoch": 3, "epochs_run": 8},
    }


def test_the_sweep_keeps_the_best_validation_score_never_the_test() -> None:
    records = [
        _rec("fundus_only", 0, 0.30, "lr0.5", val=0.40),
        _rec("fundus_only", 0, 0.90, "lr1", val=0.50),  # best test, not the best validation
        _rec("fundus_only", 0, 0.70, "lr2", val=0.60),
        _rec("fundus_only", 1, 0.80, "lr1", val=0.55),
        _rec("fundus_only", 1, 0.10, "lr2", val=0.55),  # a tie goes to the base learning rate
    ]
    kept = {r["seed"]: r for r in select_variants(records)}
    assert kept[0]["variant"] == "lr2" and kept[0]["n_variants"] == 3
    assert kept[1]["variant"] == "lr1"


def test_gaps_to_the_oracle_and_ablations_are_paired_by_seed() -> None:
    records = [_rec("oracle", s, 0.90) for s in range(5)]
    records += [_rec("rima", s, 0.85 + 0.001 * s) for s in range(5)]
    records += [_rec("rima_no_class_ot", s, 0.85 + 0.001 * s) for s in range(4)]  # 4 seeds
    long = long_table(records)
    gaps = {(c.other, c.scenario): c for c in gap_cells(long, ["rima"], ["default/complete"])}
    assert gaps[("rima", "complete")].mean == pytest.approx(-0.048)
    assert gaps[("rima", "complete")].verdict == "worse"
    abl = ablation_cells(long, ["rima", "rima_no_class_ot"], ["default/complete"])
    assert {c.scenario for c in abl} == set(MAIN)
    assert all(c.n == 4 and c.mean == pytest.approx(0.0) and c.verdict == "level" for c in abl)


def test_last_epoch_share_counts_runs_that_end_on_the_cap() -> None:
    records = [_rec("a", s, 0.5) for s in range(4)]
    records[0]["run"]["best_epoch"] = 16
    share = last_epoch_share(records, 16).set_index("method")
    assert share.loc["a", "share"] == pytest.approx(0.25) and share.loc["a", "n_runs"] == 4


def test_every_method_gets_the_same_learning_rates_and_its_own_knob() -> None:
    base = [v.name for v in variants("rima_no_class_ot", 1e-3)]
    assert base == ["lr0.5", "lr1", "lr2"]
    assert variants("rima", 1e-3)[1].overrides == ()  # the base candidate is params.yaml as is
    assert variants("rima", 1e-3)[2].overrides == ("train.lr=0.002",)
    lfd = variants("late_fusion_dropout", 1e-3)
    assert [v.name for v in lfd[:3]] == base and len(lfd) > 3
    # rima's own knob: validation may pick the pairing coupling of rima_no_class_ot
    rima = variants("rima", 1e-3)
    assert [v.name for v in rima[:3]] == base
    assert [v.overrides for v in rima[3:]] == [("ot.pairing_mix=0.5",), ("ot.pairing_mix=1.0",)]


def test_the_plan_gives_the_ot_family_more_seeds_and_the_curve_point_few_methods() -> None:
    plan = plan_keys(parse_args(["--grid", "full"]))
    seeds = {m: {k[3] for k in plan if k[2] == m} for m in {k[2] for k in plan}}
    assert seeds["rima"] == set(range(10)) == seeds["oracle"] == seeds["rima_no_class_ot"]
    assert seeds["fundus_only"] == set(range(5))
    assert {(k[0], k[1]) for k in plan} == set(GRIDS["full"])
    quick = plan_keys(parse_args(["--quick"]))
    assert {(k[0], k[1]) for k in quick} == set(GRIDS["quick"])
    assert {k[3] for k in quick if k[2] == "rima"} == set(range(5))
    full = plan_keys(parse_args(["--training", "complete_x4"]))
    assert {k[2] for k in full} == {"oracle", *TRAINING_REGIMES["complete_x4"].methods}


def test_the_learning_curve_point_has_four_times_the_training_eyes(tmp_path) -> None:
    from pathlib import Path

    params = str(Path(__file__).resolve().parents[2] / "params.yaml")
    base = bench_config(params, 0, 1, ["synth.n_eyes=600"])
    x4 = bench_config(params, 0, 1, ["synth.n_eyes=600"], train_multiplier=4)
    counts = [round(x4.synth.n_eyes * f) for f in x4.synth.split_fractions]
    assert counts == [1440, 120, 120]
    assert [round(base.synth.n_eyes * f) for f in base.synth.split_fractions] == [360, 120, 120]
    assert sum(x4.synth.split_fractions) == pytest.approx(1.0)


def test_the_complete_data_check_asks_no_more_than_the_ceiling_allows() -> None:
    from benchmarks.bench_report import COMPLETE_GAIN, complete_gain, summarise

    def oracle(both: float, f_missing: float, o_missing: float) -> dict:
        rec = _rec("oracle", 0, 0.0)
        rec["test"] = {
            "complete": {"qwk": both},
            "fundus_missing": {"qwk": f_missing},
            "oct_missing": {"qwk": o_missing},
        }
        return rec

    room = summarise(long_table([oracle(0.95, 0.85, 0.86)]))
    assert complete_gain(room, "default/complete") == COMPLETE_GAIN
    tight = summarise(long_table([oracle(0.931, 0.70, 0.929)]))
    assert complete_gain(tight, "default/complete") == pytest.approx(0.001)
    assert complete_gain(summarise(long_table([])), "default/complete") == COMPLETE_GAIN
