"""The missing-modality benchmark's acceptance checks (benchmarks/missing_modality.py): PASS/FAIL
on the means over seeds, and the margin seed by seed that says whether a verdict is larger than
the seeds' spread; the worst run, which a mean hides."""

from __future__ import annotations

import math

import pytest

from benchmarks.bench_report import (
    FUSED_BASELINES,
    RIMA,
    acceptance_checks,
    long_table,
    summarise,
    within_noise,
    worst_run_lines,
    worst_runs,
)

SETTING = "default/complete"
SCENARIOS = ("complete", "fundus_missing", "oct_missing", "mixed")


def _record(method: str, seed: int, qwk: float) -> dict:
    return {
        "regime": "default",
        "training": "complete",
        "method": method,
        "seed": seed,
        "test": {s: {"qwk": qwk} for s in SCENARIOS},
    }


def _checks(values: dict[str, list[float]]) -> dict[str, object]:
    records = [_record(m, seed, v) for m, vs in values.items() for seed, v in enumerate(vs)]
    long = long_table(records)
    return {c.criterion: c for c in acceptance_checks(summarise(long), [SETTING], long)}


def test_each_check_carries_its_margin_seed_by_seed() -> None:
    values = {
        RIMA: [0.80, 0.90, 0.70],
        "fundus_only": [0.60, 0.60, 0.60],
        "oct_only": [0.75, 0.95, 0.50],
        **{m: [0.82, 0.80, 0.72] for m in FUSED_BASELINES},
    }
    checks = _checks(values)
    fused = checks[f"mixed: rima >= {FUSED_BASELINES[0]} - 0.005"]
    # means 0.800 vs 0.780 - 0.005: PASS, yet rima trails that method on seeds 0 and 2
    assert fused.status == "PASS"
    assert fused.per_seed == pytest.approx([-0.015, 0.105, -0.015])
    assert "per seed -0.015 / +0.105 / -0.015: 1 of 3 clear it" in fused.line()
    # its noise: sample std of the margins (0.0693) over sqrt(3) seeds
    assert fused.standard_error == pytest.approx(0.04)
    assert "paired standard error 0.040" in fused.line()
    # its mean margin +0.025 is within two of those of zero: the PASS is within the seeds' noise
    assert fused in within_noise([fused]) and within_noise([fused], n_se=0.5) == []
    # the best single modality is chosen by its mean (oct_only 0.733 > fundus_only 0.600) and
    # paired with rima seed by seed
    best = checks["complete: rima >= best single modality + 0.030"]
    assert best.reference == pytest.approx(0.7333333)
    assert best.per_seed == pytest.approx([0.02, -0.08, 0.17])
    assert best.status == "PASS"


def test_seeds_are_paired_by_number_and_one_seed_shows_no_spread() -> None:
    values = {RIMA: [0.8], "fundus_only": [0.9], "oct_only": [0.5]}
    values.update({m: [0.7] for m in FUSED_BASELINES})
    checks = _checks(values)
    missing = checks["OCT missing: rima >= fundus_only - 0.02"]
    assert missing.status == "FAIL" and missing.per_seed == pytest.approx([-0.08])
    assert "per seed" not in missing.line()  # a single seed has no spread to show
    assert math.isnan(missing.standard_error) and "standard error" not in missing.line()
    # without the per-seed table the verdicts are the same, with no per-seed margins
    records = [_record(m, 0, v[0]) for m, v in values.items()]
    bare = acceptance_checks(summarise(long_table(records)), [SETTING])
    assert [c.status for c in bare] == [c.status for c in checks.values()]
    assert all(c.per_seed == [] for c in bare)


def test_worst_run_names_the_collapse_a_mean_hides() -> None:
    records = [_record(RIMA, seed, 0.8) for seed in range(5)]
    records += [_record("imputation_paths", seed, 0.85) for seed in range(4)]
    records.append(_record("imputation_paths", 4, 0.15))  # one dataset in five collapses
    long = long_table(records)
    worst = worst_runs(long, [RIMA, "imputation_paths", "distillation"])
    assert set(worst["scenario"]) == {"fundus_missing", "oct_missing", "mixed"}
    row = worst[(worst["method"] == "imputation_paths") & (worst["scenario"] == "oct_missing")]
    assert row["min_qwk"].item() == pytest.approx(0.15) and row["seed"].item() == 4
    assert row["setting"].item() == SETTING and row["n_runs"].item() == 5
    assert "distillation" not in set(worst["method"])  # never ran: no row, no made-up value
    lines = worst_run_lines(long, [RIMA, "imputation_paths"])
    assert f"| `imputation_paths` | 0.150 ({SETTING} seed 4) |" in "\n".join(lines)
    assert worst_run_lines(long_table([]), [RIMA]) == []
