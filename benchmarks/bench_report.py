"""Aggregation and report of the missing-modality benchmark: the long table, the sweep's
selection, the ceiling and gap tables, calibration, the paired comparisons with Holm-corrected
verdicts, and the acceptance checks.

Everything here is a function of the result records (one JSON line per run), so a report can be
regenerated from a committed ``results.jsonl`` without training anything
(``missing_modality.py --report-from``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmarks.bench_grid import BASE_VARIANT, PHANTOM_REGIMES, TRAINING_REGIMES
from benchmarks.bench_scoring import METRICS, ORACLE
from benchmarks.bench_stats import ALPHA, PairedCell, judge
from rima_core.atomic import atomic_file, write_text

RIMA = "rima"
SINGLES = ("fundus_only", "oct_only")
# the fused methods RIMA must match on every scenario (the ablations and controls are apart)
FUSED_BASELINES = (
    "late_fusion_zero",
    "late_fusion_dropout",
    "imputation",
    "imputation_paths",
    "distillation",
)
MAIN = ("complete", "fundus_missing", "oct_missing", "mixed")
# (scenario in the masks, column title) of the per-setting tables
SCENARIOS = (
    ("complete", "complete"),
    ("fundus_missing", "fundus 100%"),
    ("oct_missing", "OCT 100%"),
    ("mixed", "mixed 30/30"),
    ("fundus_missing@0.5", "fundus 50%"),
    ("oct_missing@0.5", "OCT 50%"),
)
MISSING_MARGIN = 0.02  # rima >= single modality - this, with that modality's partner missing
COMPLETE_GAIN = 0.03  # rima >= best single modality + this, on complete data
FUSED_MARGIN = 0.005  # rima >= every other fused method - this
DIAG_PREFIX = "diag/"
WORST_SCENARIOS = ("fundus_missing", "oct_missing", "mixed")
LAST_EPOCH_LIMIT = 0.20  # the epoch cap is high enough when at most this share ends on it
FAMILIES = ("singles", "fused", "ablations")


def setting_name(regime: str, training: str) -> str:
    return f"{regime}/{training}"


def ablations(methods: list[str]) -> list[str]:
    """RIMA's ablations and controls among ``methods``: every other ``rima_*`` model name."""
    return [m for m in methods if m.startswith(RIMA + "_")]


# ---------------------------------------------------------------------------------------------
# selection of the sweep's candidates


def record_key(rec: dict[str, Any]) -> tuple[str, str, str, int]:
    return (rec["regime"], rec["training"], rec["method"], int(rec["seed"]))


def run_key(rec: dict[str, Any]) -> tuple[str, str, str, int, str]:
    """(regime, training, method, seed, sweep variant): one training run."""
    return (*record_key(rec), rec.get("variant", BASE_VARIANT))


def select_variants(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (setting, method, seed), the sweep candidate with the best validation score.

    The score is the run's own model-selection score on the validation split; ties go to the
    base learning rate, then to the order the candidates were run. The test split is never
    looked at. Each kept record says which variant won and among how many."""
    groups: dict[tuple[str, str, str, int], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(record_key(rec), []).append(rec)
    out = []
    for recs in groups.values():

        def score(r: dict[str, Any]) -> tuple[float, int]:
            v = (r.get("run") or {}).get("best_val_score")
            v = float("-inf") if v is None or not np.isfinite(v) else float(v)
            return (v, int(r.get("variant", BASE_VARIANT) == BASE_VARIANT))

        best = max(recs, key=score)
        out.append({**best, "n_variants": len(recs)})
    return out


# ---------------------------------------------------------------------------------------------
# tables


def long_table(records: list[dict[str, Any]]) -> pd.DataFrame:
    """``regime, training, setting, method, seed, scenario, metric, value`` (test split); the
    diagnostics as scenario ``diagnostics``. The oracle is a method like any other."""
    rows = []
    for rec in records:
        base = {
            "regime": rec["regime"],
            "training": rec["training"],
            "setting": setting_name(rec["regime"], rec["training"]),
            "method": rec["method"],
            "seed": int(rec["seed"]),
        }
        for scenario, values in rec["test"].items():
            for metric in METRICS:
                if metric not in values:
                    continue
                v = values.get(metric)
                rows.append(
                    {
                        **base,
                        "scenario": scenario,
                        "metric": metric,
                        "value": np.nan if v is None else float(v),
                    }
                )
        for name, v in rec.get("diagnostics", {}).items():
            rows.append({**base, "scenario": "diagnostics", "metric": name, "value": float(v)})
    cols = ["regime", "training", "setting", "method", "seed", "scenario", "metric", "value"]
    return pd.DataFrame(rows, columns=cols)


def summarise(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof 1; 0 for one seed), seed count and per-seed values of each cell."""
    keys = ["regime", "training", "setting", "method", "scenario", "metric"]
    return (
        long.sort_values("seed")
        .groupby(keys, sort=False)["value"]
        .agg(
            mean="mean",
            std=lambda v: float(v.std(ddof=1)) if v.notna().sum() > 1 else 0.0,
            n_seeds="count",
            values=lambda v: " ".join(f"{x:.4f}" for x in v),
        )
        .reset_index()
    )


def wide_table(summary: pd.DataFrame, settings: list[str]) -> pd.DataFrame:
    """Mean over seeds: one row per (metric, scenario, method), one column per setting."""
    wide = summary.pivot_table(
        index=["metric", "scenario", "method"], columns="setting", values="mean", sort=False
    )
    return wide.reindex(columns=[s for s in settings if s in wide.columns]).reset_index()


def mean_of(
    summary: pd.DataFrame, setting: str, method: str, scenario: str, metric: str = "qwk"
) -> float:
    row = summary[
        (summary["setting"] == setting)
        & (summary["method"] == method)
        & (summary["scenario"] == scenario)
        & (summary["metric"] == metric)
    ]
    return float(row["mean"].iloc[0]) if len(row) else float("nan")


def qwk_by_seed(long: pd.DataFrame, setting: str, metric: str = "qwk") -> pd.DataFrame:
    """One metric of one setting: index (seed, scenario), one column per method. Rows of one
    seed are the same data and training seed, so differences along a row are paired."""
    qwk = long[(long["metric"] == metric) & (long["setting"] == setting)]
    return qwk.pivot_table(index=["seed", "scenario"], columns="method", values="value")


def seed_values(block: pd.DataFrame, method: str, scenario: str) -> pd.Series:
    """One method's per-seed values in one scenario of a :func:`qwk_by_seed` block (empty when
    the method or scenario did not run)."""
    if method not in block.columns or scenario not in block.index.get_level_values("scenario"):
        return pd.Series(dtype=float)
    return block[method].xs(scenario, level="scenario").dropna()


# ---------------------------------------------------------------------------------------------
# acceptance checks and paired verdicts


@dataclass
class Check:
    setting: str
    criterion: str
    rima: float
    reference: float  # the threshold's reference value (a baseline's mean QWK)
    threshold: float  # rima must reach this
    status: str  # PASS | FAIL | SKIP
    # the margin seed by seed (same data, same training seed): rima - (reference + offset)
    per_seed: list[float] = field(default_factory=list)
    family: str = "fused"
    offset: float = 0.0
    # rima - reference (no tolerance) at the Holm-corrected level of the check's family
    verdict: str = "level"
    p_holm: float = float("nan")

    def line(self) -> str:
        if self.status == "SKIP":
            return f"SKIP {self.setting}: {self.criterion} (a method or scenario did not run)"
        text = (
            f"{self.status} {self.setting}: {self.criterion}: rima {self.rima:.3f} vs "
            f"threshold {self.threshold:.3f} (reference {self.reference:.3f}, "
            f"margin {self.rima - self.threshold:+.3f}"
        )
        if len(self.per_seed) > 1:
            clear = sum(m >= -1e-12 for m in self.per_seed)
            seeds = " / ".join(f"{m:+.3f}" for m in self.per_seed)
            text += (
                f"; per seed {seeds}: {clear} of {len(self.per_seed)} clear it, "
                f"paired standard error {self.standard_error:.3f}; "
                f"rima vs reference: {self.verdict} (Holm p {self.p_holm:.3g})"
            )
        return text + ")"

    @property
    def standard_error(self) -> float:
        """Standard error of the mean paired margin: the seeds' spread of the margin over
        sqrt(seeds)."""
        if len(self.per_seed) < 2:
            return float("nan")
        return float(np.std(self.per_seed, ddof=1) / np.sqrt(len(self.per_seed)))


def within_noise(checks: list[Check], n_se: float = 2.0) -> list[Check]:
    """The checks whose mean margin lies within ``n_se`` paired standard errors of zero. A check
    without a spread (one seed, or skipped) has a NaN standard error and is never among them."""
    return [c for c in checks if abs(c.rima - c.threshold) <= n_se * c.standard_error]


def _check(
    setting: str,
    criterion: str,
    rima: float,
    reference: float,
    offset: float,
    paired: tuple[pd.Series, pd.Series] | None = None,
    family: str = "fused",
) -> Check:
    threshold = reference + offset
    if not (np.isfinite(rima) and np.isfinite(reference)):
        return Check(setting, criterion, rima, reference, threshold, "SKIP", family=family)
    per_seed: list[float] = []
    if paired is not None:
        mine, ref = paired
        both = mine.index.intersection(ref.index)
        per_seed = [float(mine[s] - (ref[s] + offset)) for s in sorted(both)]
    status = "PASS" if rima >= threshold - 1e-12 else "FAIL"
    return Check(setting, criterion, rima, reference, threshold, status, per_seed, family, offset)


def complete_gain(summary: pd.DataFrame, setting: str) -> float:
    """The gain over the best single modality that the complete-data check asks of rima:
    :data:`COMPLETE_GAIN`, or half the fusion headroom the data allows when that is smaller.

    The headroom is the oracle's complete-eye QWK minus its better single-view QWK on the same
    test eyes (fundus missing = OCT view only, OCT missing = fundus view only). Where one
    modality carries nearly everything (the fundus-strong phantom: +0.002), no model can gain
    0.03 by fusing, and a check that demands it only rewards a weak single-modality baseline."""
    both = mean_of(summary, setting, ORACLE, "complete")
    single = max(
        mean_of(summary, setting, ORACLE, "fundus_missing"),
        mean_of(summary, setting, ORACLE, "oct_missing"),
    )
    if not (np.isfinite(both) and np.isfinite(single)):
        return COMPLETE_GAIN
    return float(min(COMPLETE_GAIN, max(both - single, 0.0) / 2.0))


def acceptance_checks(
    summary: pd.DataFrame, settings: list[str], long: pd.DataFrame | None = None
) -> list[Check]:
    """PASS/FAIL against a tolerance on mean test QWK, in every setting; with ``long`` (the
    per-seed table) each check also carries its margin seed by seed and a verdict on the raw
    paired difference at the Holm-corrected level of its family (``singles``: rima against the
    single-modality models; ``fused``: against every fused baseline in every main scenario)."""
    checks: list[Check] = []
    for st in settings:

        def q(method: str, scenario: str, st: str = st) -> float:
            return mean_of(summary, st, method, scenario)

        block = None if long is None else qwk_by_seed(long, st)

        def pair(
            method: str, scenario: str, block: pd.DataFrame | None = block
        ) -> tuple[pd.Series, pd.Series] | None:
            if block is None:
                return None
            return seed_values(block, RIMA, scenario), seed_values(block, method, scenario)

        checks.append(
            _check(
                st,
                f"OCT missing: rima >= fundus_only - {MISSING_MARGIN}",
                q(RIMA, "oct_missing"),
                q("fundus_only", "oct_missing"),
                -MISSING_MARGIN,
                pair("fundus_only", "oct_missing"),
                "singles",
            )
        )
        checks.append(
            _check(
                st,
                f"fundus missing: rima >= oct_only - {MISSING_MARGIN}",
                q(RIMA, "fundus_missing"),
                q("oct_only", "fundus_missing"),
                -MISSING_MARGIN,
                pair("oct_only", "fundus_missing"),
                "singles",
            )
        )
        singles = [q(m, "complete") for m in SINGLES]
        best = max(singles) if all(np.isfinite(singles)) else float("nan")
        best_method = SINGLES[int(np.argmax(singles))] if np.isfinite(best) else SINGLES[0]
        gain = complete_gain(summary, st)
        checks.append(
            _check(
                st,
                f"complete: rima >= best single modality + {gain:.3f}",
                q(RIMA, "complete"),
                best,
                gain,
                pair(best_method, "complete"),
                "singles",
            )
        )
        for scenario in MAIN:
            for other in FUSED_BASELINES:
                checks.append(
                    _check(
                        st,
                        f"{scenario}: rima >= {other} - {FUSED_MARGIN}",
                        q(RIMA, scenario),
                        q(other, scenario),
                        -FUSED_MARGIN,
                        pair(other, scenario),
                    )
                )
    for family in FAMILIES:
        members = [c for c in checks if c.family == family and c.status != "SKIP"]
        cells = judge(
            [
                PairedCell(family, c.setting, c.criterion, "", [m + c.offset for m in c.per_seed])
                for c in members
            ]
        )
        for c, cell in zip(members, cells, strict=True):
            c.verdict, c.p_holm = cell.verdict, cell.p_holm
    return checks


def _paired_cells(
    long: pd.DataFrame,
    settings: list[str],
    pairs: list[tuple[str, str]],
    family: str,
    metric: str = "qwk",
) -> list[PairedCell]:
    """``a − b`` for each (a, b) in ``pairs``, per setting and main scenario, paired by seed,
    judged as one family (Holm over every cell); a cell is named by ``b`` unless ``b`` is the
    oracle, then by ``a``."""
    cells = []
    for st in settings:
        block = qwk_by_seed(long, st, metric)
        for a, b in pairs:
            for scenario in MAIN:
                d = (seed_values(block, a, scenario) - seed_values(block, b, scenario)).dropna()
                if not d.empty:
                    other = a if b == ORACLE else b
                    cells.append(PairedCell(family, st, scenario, other, d.tolist()))
    return judge(cells)


def ablation_cells(
    long: pd.DataFrame, methods: list[str], settings: list[str], metric: str = "qwk"
) -> list[PairedCell]:
    """rima − each ablation/control per setting and main scenario (one family)."""
    return _paired_cells(
        long, settings, [(RIMA, abl) for abl in ablations(methods)], "ablations", metric
    )


def gap_cells(long: pd.DataFrame, methods: list[str], settings: list[str]) -> list[PairedCell]:
    """Each method − the oracle on the same test eyes (paired by seed), per setting and main
    scenario: how far a model is from what the data allows. Judged as one family."""
    return _paired_cells(long, settings, [(m, ORACLE) for m in methods], "gap")


def cells_frame(cells: list[PairedCell]) -> pd.DataFrame:
    cols = ["family", "setting", "scenario", "other", "n", "mean", "se", "p", "p_holm", "verdict"]
    return pd.DataFrame(
        [
            {
                "family": c.family,
                "setting": c.setting,
                "scenario": c.scenario,
                "other": c.other,
                "n": c.n,
                "mean": c.mean,
                "se": c.standard_error,
                "p": c.p_value,
                "p_holm": c.p_holm,
                "verdict": c.verdict,
            }
            for c in cells
        ],
        columns=cols,
    )


def worst_runs(long: pd.DataFrame, methods: list[str]) -> pd.DataFrame:
    """Per method and scenario with a modality missing: the lowest test QWK of any run (every
    setting and seed) and where it happened. A mean over seeds hides a method that collapses on
    one dataset in five; a clinic meets that dataset."""
    qwk = long[(long["metric"] == "qwk") & long["scenario"].isin(WORST_SCENARIOS)].dropna(
        subset=["value"]
    )
    qwk = qwk[qwk["method"].isin(methods)]
    groups = qwk.groupby(["method", "scenario"])["value"]
    low = qwk.loc[groups.idxmin()].set_index(["method", "scenario"])
    low["n_runs"] = groups.size()
    order = [(m, s) for m in methods for s in WORST_SCENARIOS if (m, s) in low.index]
    worst = low.loc[order].reset_index().rename(columns={"value": "min_qwk"})
    worst["seed"] = worst["seed"].astype(int)
    return worst[["method", "scenario", "min_qwk", "setting", "seed", "n_runs"]]


def worst_run_lines(long: pd.DataFrame, methods: list[str]) -> list[str]:
    worst = worst_runs(long, methods)
    if worst.empty:
        return []
    lines = [
        "## Worst run: the lowest test QWK of any setting and seed",
        "",
        "| method | " + " | ".join(WORST_SCENARIOS) + " |",
        "| --- |" + " ---: |" * len(WORST_SCENARIOS),
    ]
    for method, g in worst.groupby("method", sort=False):
        by = {r.scenario: r for r in g.itertuples()}
        cells = [
            f"{by[s].min_qwk:.3f} ({by[s].setting} seed {by[s].seed})" if s in by else "–"
            for s in WORST_SCENARIOS
        ]
        lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
    return [*lines, ""]


def last_epoch_share(records: list[dict[str, Any]], epochs: int) -> pd.DataFrame:
    """Per method: the share of (selected) runs whose selected epoch is the last one allowed.
    Above :data:`LAST_EPOCH_LIMIT` the epoch cap, not the method, decides the result."""
    rows = [
        {"method": r["method"], "last": (r["run"].get("best_epoch") or 0) >= epochs}
        for r in records
        if r["method"] != ORACLE
    ]
    if not rows:
        return pd.DataFrame(columns=["method", "share", "n_runs"])
    frame = pd.DataFrame(rows)
    return (
        frame.groupby("method", sort=False)["last"].agg(share="mean", n_runs="size").reset_index()
    )


# ---------------------------------------------------------------------------------------------
# report


def _cell(
    summary: pd.DataFrame,
    setting: str,
    method: str,
    scenario: str,
    metric: str,
    n_seeds: int | None = None,
) -> str:
    """``mean ± std``; with `` (n=k)`` when the cell has fewer seeds than ``n_seeds``."""
    row = summary[
        (summary["setting"] == setting)
        & (summary["method"] == method)
        & (summary["scenario"] == scenario)
        & (summary["metric"] == metric)
    ]
    if row.empty or not np.isfinite(row["mean"].iloc[0]):
        return "–"
    text = f"{row['mean'].iloc[0]:.3f} ± {row['std'].iloc[0]:.3f}"
    k = int(row["n_seeds"].iloc[0])
    return text if n_seeds is None or k >= n_seeds else f"{text} (n={k})"


def _verdict_cell(c: PairedCell) -> str:
    mark = {"better": "▲", "worse": "▼", "level": "="}[c.verdict]
    se = "" if not np.isfinite(c.standard_error) else f" ± {c.standard_error:.3f}"
    return f"{c.mean:+.3f}{se} {mark} (n={c.n})"


def _cells_table(cells: list[PairedCell], columns: list[str], title_of) -> list[str]:
    """Markdown table: one row per (setting, scenario), one column per ``other``."""
    if not cells:
        return ["(nothing to compare)", ""]
    lines = [
        "| setting | scenario | " + " | ".join(title_of(c) for c in columns) + " |",
        "| --- | --- |" + " ---: |" * len(columns),
    ]
    index: dict[tuple[str, str, str], PairedCell] = {
        (c.setting, c.scenario, c.other): c for c in cells
    }
    rows = list(dict.fromkeys((c.setting, c.scenario) for c in cells))
    for st, scenario in rows:
        row = [
            _verdict_cell(index[(st, scenario, o)]) if (st, scenario, o) in index else "–"
            for o in columns
        ]
        lines.append(f"| {st} | {scenario} | " + " | ".join(row) + " |")
    return [*lines, ""]


def _overrides_text(overrides: tuple[str, ...]) -> str:
    return ", ".join(f"`{o}`" for o in overrides) or "params.yaml as is"


def _verdict_counts(cells: list[PairedCell]) -> str:
    counts = {v: sum(c.verdict == v for c in cells) for v in ("better", "level", "worse")}
    return ", ".join(f"{n} {v}" for v, n in counts.items())


def _planned_lines(
    records: list[dict[str, Any]], plan: list[tuple[str, str, str, int, str]]
) -> list[str]:
    """One line per method whose planned runs (every sweep candidate) are not all in
    ``records``: a cell whose sweep is incomplete kept the best of the candidates that ran."""
    have = {run_key(r) for r in records}
    lacking: dict[str, list[str]] = {}
    for r, t, m, s, v in plan:
        if (r, t, m, s, v) not in have:
            lacking.setdefault(m, []).append(f"{setting_name(r, t)} seed {s} {v}")
    lines = []
    for m, missing in lacking.items():
        shown = ", ".join(missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        lines.append(f"- **not run yet:** `{m}`: {len(missing)} runs ({shown}{more})")
    return [*lines, ""] if lines else []


def render(
    summary: pd.DataFrame,
    long: pd.DataFrame,
    records: list[dict[str, Any]],
    all_records: list[dict[str, Any]],
    checks: list[Check],
    abl: list[PairedCell],
    gaps: list[PairedCell],
    ctx: dict[str, Any],
) -> str:
    """The markdown report. ``ctx``: command, settings, methods, plan, epochs, patience, n_eyes,
    jobs, threads, overrides."""
    settings, methods = ctx["settings"], ctx["methods"]
    learned = [m for m in methods if m != ORACLE]
    runs = [r["run"] for r in all_records if r["method"] != ORACLE]
    wall = sum(r["train_seconds"] + r["eval_seconds"] + r.get("diag_seconds", 0.0) for r in runs)
    n_pass = sum(c.status == "PASS" for c in checks)
    n_fail = sum(c.status == "FAIL" for c in checks)
    judged = [c for c in checks if np.isfinite(c.standard_error)]
    regimes = list(dict.fromkeys(st.split("/")[0] for st in settings))
    trainings = list(dict.fromkeys(st.split("/")[1] for st in settings))
    lines = [
        "# Missing-modality benchmark (synthetic phantom)",
        "",
        f"Command: `{ctx['command']}`",
        "",
        f"{ctx['n_eyes']} eyes per dataset (60/20/20 split unless the training regime says "
        f"otherwise); each seed is its own generated dataset *and* training seed. Every method "
        f"trains for at most {ctx['epochs']} epochs (early-stopping patience "
        f"{ctx['patience']}) under each candidate of the same validation sweep (learning rate × "
        f"{', '.join(f'{f:g}' for f in ctx['lr_factors'])}, plus a method's own knob), and the "
        "candidate with the best **validation** score is kept; scores are on the **test** "
        f"split. Extra overrides: {', '.join(f'`{o}`' for o in ctx['overrides']) or 'none'}.",
        "",
        "Phantom regimes:",
        "",
        *[
            f"- `{r}` ({_overrides_text(PHANTOM_REGIMES[r].overrides)}): "
            f"{PHANTOM_REGIMES[r].property}"
            for r in regimes
        ],
        "",
        "Training regimes:",
        "",
        *[f"- `{t}`: {TRAINING_REGIMES[t].property}" for t in trainings],
        "",
        f"{len(all_records) - sum(r['method'] == ORACLE for r in all_records)} training runs "
        f"(every sweep candidate), {wall / 3600:.1f} h of run time in total, {ctx['jobs']} at a "
        f"time with {ctx['threads']} torch thread(s) each on {os.cpu_count()} CPUs.",
        "",
        *_planned_lines(all_records, ctx["plan"]),
        "## How far from the ceiling: method − oracle, test QWK",
        "",
        "The oracle grades each test eye by the posterior argmax given the generator's latent "
        "views of the modalities the eye has in the scenario (the Bayes ceiling of these eyes; "
        "`rima_core/core/data/oracle.py`). Cells: mean paired gap ± its standard error over seeds; "
        f"▼ = below the ceiling at the Holm-corrected {ALPHA:.0%} level over this table "
        f"({_verdict_counts(gaps)}).",
        "",
        "| setting | scenario | oracle | " + " | ".join(f"`{m}`" for m in learned) + " |",
        "| --- | --- | ---: |" + " ---: |" * len(learned),
    ]
    gap_index = {(c.setting, c.scenario, c.other): c for c in gaps}
    for st in settings:
        for scenario in MAIN:
            oracle = mean_of(summary, st, ORACLE, scenario)
            if not np.isfinite(oracle):
                continue
            row = [
                _verdict_cell(gap_index[(st, scenario, m)])
                if (st, scenario, m) in gap_index
                else "–"
                for m in learned
            ]
            lines.append(f"| {st} | {scenario} | {oracle:.3f} | " + " | ".join(row) + " |")
    lines += [
        "",
        "## Does each OT part contribute? rima − ablation/control, test QWK",
        "",
        f"Paired by seed; ▲ rima better, ▼ worse, = level at the Holm-corrected {ALPHA:.0%} "
        f"level over every cell of this table ({len(abl)} cells: {_verdict_counts(abl)}).",
        "",
        *_cells_table(abl, ablations(methods), lambda a: f"− `{a}`"),
        f"## Acceptance criteria (mean test QWK): {n_pass} pass, {n_fail} fail, "
        f"{len(checks) - n_pass - n_fail} skipped",
        "",
        "PASS/FAIL: the criterion's tolerance on the means over seeds. The verdict after it "
        "(better / level / worse) is rima against the reference on the raw paired difference, "
        f"Holm-corrected within its family; {len(within_noise(judged))} of {len(judged)} "
        "margins are within two standard errors of zero.",
        "",
        *[f"- {c.line()}" for c in checks],
        "",
        *worst_run_lines(long, learned),
    ]
    share = last_epoch_share(records, ctx["epochs"])
    if len(share):
        lines += [
            "## Epoch cap: share of runs that select their last epoch "
            f"(limit {LAST_EPOCH_LIMIT:.0%})",
            "",
            "| method | share | runs |",
            "| --- | ---: | ---: |",
            *[
                f"| `{r.method}` | {r.share:.0%}"
                f"{' over the limit' if r.share > LAST_EPOCH_LIMIT else ''} | {r.n_runs} |"
                for r in share.itertuples()
            ],
            "",
        ]
    for st in settings:
        seeds = int(summary[summary["setting"] == st]["n_seeds"].max() or 0) if len(summary) else 0
        lines += [
            f"## {st}",
            "",
            "Test QWK (argmax) / QWK of the expected-quadratic-cost grade, ECE and NLL with the "
            "mean of their per-run 95 % bootstrap intervals, per scenario (mean ± std over seeds).",
            "",
            "| method | " + " | ".join(t for _, t in SCENARIOS) + " | ordinal QWK (complete) | "
            "ECE complete [95 % CI] | ECE fundus missing | ECE OCT missing | "
            "NLL complete [95 % CI] |",
            "| --- |" + " ---: |" * (len(SCENARIOS) + 5),
        ]
        for method in methods:
            cells = [_cell(summary, st, method, s, "qwk", seeds) for s, _ in SCENARIOS]
            cells.append(_cell(summary, st, method, "complete", "qwk_ordinal", seeds))
            for scenario in ("complete", "fundus_missing", "oct_missing"):
                ece = mean_of(summary, st, method, scenario, "ece")
                lo = mean_of(summary, st, method, scenario, "ece_lo")
                hi = mean_of(summary, st, method, scenario, "ece_hi")
                cells.append(f"{ece:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(ece) else "–")
            nll = mean_of(summary, st, method, "complete", "nll")
            lo = mean_of(summary, st, method, "complete", "nll_lo")
            hi = mean_of(summary, st, method, "complete", "nll_hi")
            cells.append(f"{nll:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite(nll) else "–")
            if all(c == "–" for c in cells):
                continue
            lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
        lines.append("")
    diag = summary[summary["scenario"] == "diagnostics"]
    if len(diag):
        names = list(dict.fromkeys(diag["metric"]))
        lines += [
            "## Alignment diagnostics (test split; mean ± std over seeds)",
            "",
            "| setting | method | " + " | ".join(n.removeprefix(DIAG_PREFIX) for n in names) + " |",
            "| --- | --- |" + " ---: |" * len(names),
        ]
        for (st, method), _ in diag.groupby(["setting", "method"], sort=False):
            cells = [_cell(summary, st, method, "diagnostics", n) for n in names]
            lines.append(f"| {st} | `{method}` | " + " | ".join(cells) + " |")
        lines.append("")
    frame = pd.DataFrame(
        [
            {
                **r["run"],
                "setting": setting_name(r["regime"], r["training"]),
                "method": r["method"],
                "variant": r.get("variant", BASE_VARIANT),
            }
            for r in records
            if r["method"] != ORACLE
        ]
    )
    if len(frame):
        lines += [
            "## Runs (selected candidates)",
            "",
            "Full-path weight: the mean pooling weight of the fused path on complete eyes, and "
            "in how many runs it is above 0; full − singles NLL: the validation NLL of the full "
            "path alone minus that of the two single paths pooled (negative: the fusion alone "
            "beats its parts).",
            "",
            "| setting | method | runs | mean epochs run | mean best epoch | mean s/epoch | "
            "OT share | full-path weight | full − singles NLL | candidates kept |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for (st, method), g in frame.groupby(["setting", "method"], sort=False):
            kept = ", ".join(f"{k} ×{n}" for k, n in g["variant"].value_counts().items())
            lines.append(
                f"| {st} | `{method}` | {len(g)} | {g['epochs_run'].mean():.1f} | "
                f"{g['best_epoch'].mean():.1f} | {g['mean_epoch_seconds'].mean():.2f} | "
                f"{g['ot_share'].astype(float).mean():.1%} | {full_path_cells(g)} | {kept} |"
            )
        lines.append("")
    return "\n".join(lines)


def full_path_cells(runs: pd.DataFrame) -> str:
    """The two pooling cells of the runs table for one (setting, method): "–" where the method
    pools no paths, or where older records lack the NLLs."""
    weights = [w["full"] for w in runs.get("path_weights", []) if isinstance(w, dict)]
    cell = "–"
    if weights:
        above = sum(w > 0 for w in weights)
        cell = f"{np.mean(weights):.2f} ({above}/{len(weights)} > 0)"
    gaps = [
        n["full"] - n["singles"]
        for n in runs.get("path_nll", [])
        if isinstance(n, dict) and "singles" in n
    ]
    return f"{cell} | " + (f"{np.mean(gaps):+.3f}" if gaps else "–")


def runs_table(records: list[dict[str, Any]], selected: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per training run (every sweep candidate): keys, variant, whether the sweep kept
    it, run facts, test QWK per main scenario and diagnostics."""
    kept = {(*record_key(r), r.get("variant", BASE_VARIANT)) for r in selected}
    rows = []
    for rec in records:
        if rec["method"] == ORACLE:
            continue
        variant = rec.get("variant", BASE_VARIANT)
        row = {k: rec[k] for k in ("regime", "training", "method", "seed")}
        row["variant"] = variant
        row["selected"] = (*record_key(rec), variant) in kept
        row.update(rec["run"])
        for scenario in MAIN:
            row[f"qwk/{scenario}"] = (rec["test"].get(scenario) or {}).get("qwk")
        row.update(rec.get("diagnostics", {}))
        rows.append(row)
    return pd.DataFrame(rows)


def write_outputs(all_records: list[dict[str, Any]], out: Path, ctx: dict[str, Any]) -> list[Check]:
    """Select the sweep's candidates, compute every table and write the report files."""
    wanted = set(ctx["plan"])
    all_records = [r for r in all_records if run_key(r) in wanted]
    records = select_variants(all_records)
    settings = ctx["settings"]
    long = long_table(records)
    summary = summarise(long)
    checks = acceptance_checks(summary, settings, long)
    abl = ablation_cells(long, ctx["methods"], settings)
    gaps = gap_cells(long, [m for m in ctx["methods"] if m != ORACLE], settings)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "missing_modality.csv") as tmp:
        wide_table(summary, settings).to_csv(tmp, index=False, float_format="%.6g")
    with atomic_file(out / "missing_modality_long.csv") as tmp:
        long.to_csv(tmp, index=False, float_format="%.6g")
    with atomic_file(out / "missing_modality_runs.csv") as tmp:
        runs_table(all_records, records).to_csv(tmp, index=False, float_format="%.6g")
    with atomic_file(out / "missing_modality_comparisons.csv") as tmp:
        cells_frame(abl + gaps).to_csv(tmp, index=False, float_format="%.6g")
    payload = {
        "checks": [c.__dict__ for c in checks],
        "ablations": cells_frame(abl).to_dict(orient="records"),
        "n_pass": sum(c.status == "PASS" for c in checks),
        "n_fail": sum(c.status == "FAIL" for c in checks),
        "verdicts": {
            fam: {
                v: sum(c.verdict == v and c.family == fam for c in checks)
                for v in ("better", "level", "worse")
            }
            for fam in FAMILIES
            if fam != "ablations"
        }
        | {
            "ablations": {v: sum(c.verdict == v for c in abl) for v in ("better", "level", "worse")}
        },
    }
    write_text(
        out / "missing_modality_checks.json", json.dumps(payload, indent=2, default=float) + "\n"
    )
    write_text(
        out / "missing_modality.md",
        render(summary, long, records, all_records, checks, abl, gaps, ctx),
    )
    return checks
