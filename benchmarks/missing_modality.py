"""Paper-style results table: every method under every missing-modality scenario, several seeds.

Why: the product's claim is that RIMA stays accurate when a modality is missing. That claim is
only worth what the comparison behind it is worth, so this script trains RIMA, its ablations and
the baselines with the *same* budget on the *same* data, selects each model on the validation
split only (``train.selection_scenario``), and scores the test split under

* ``complete``; ``fundus_missing`` (100 %); ``oct_missing`` (100 %); ``mixed`` (30 % / 30 %);
* the OCT-missing-rate sweep ``oct_missing@R`` for R in 0, 0.25, 0.5, 0.75, 1
  (``@0`` is ``complete`` and ``@1`` is ``oct_missing``: the masks are the same),

in two training regimes:

* ``complete``: training eyes keep every modality the source has;
* ``incomplete``: half of the training eyes that have both modalities lose one (a ``mixed``
  mask with rates 0.25 / 0.25 on the train split, scenario ``train_incomplete``); on top of the
  5 % + 5 % of eyes the default phantom generates without one modality.

A seed ``s`` fixes the data (``synth.seed``, ``prepare.seed``, ``missing.seed``) *and* the
training (``train.seed``): each seed is a fresh dataset and a fresh initialisation, so the spread
covers both sources of variance. Results are mean ± sample std (ddof 1) over seeds.

Resumable: a run whose ``eval/metrics.json`` exists is skipped, a killed training run continues
from its last checkpoint (``train(..., resume=True)``), data are generated once per seed.

    python benchmarks/missing_modality.py                 # the full benchmark (see --help)
    python benchmarks/missing_modality.py --quick         # smoke run: tiny data, 1 seed, 1 epoch

Writes ``benchmarks/results/missing_modality.{md,csv}`` (``--quick``: into its work directory).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rima_core.atomic import atomic_file, write_text  # noqa: E402
from rima_core.config import Config, MissingConfig, load_config  # noqa: E402

log = logging.getLogger("benchmarks.missing_modality")

RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "rima_bench" / "missing_modality"

# Fused methods first, then the single-modality references.
METHODS = (
    "rima",
    "rima_no_feature_ot",
    "rima_no_class_ot",
    "rima_no_dropout",
    "late_fusion_zero",
    "late_fusion_dropout",
    "fundus_only",
    "oct_only",
)
FUSED = METHODS[:6]
REGIMES = ("complete", "incomplete")
TRAIN_INCOMPLETE = "train_incomplete"
INCOMPLETE_RATES = (0.25, 0.25)  # fundus, OCT missing among training eyes that have both
# (scenario in the masks, column title)
SCENARIOS = (
    ("complete", "complete"),
    ("fundus_missing", "fundus 100%"),
    ("oct_missing", "OCT 100%"),
    ("mixed", "mixed 30/30"),
    ("oct_missing@0.25", "OCT 25%"),
    ("oct_missing@0.5", "OCT 50%"),
    ("oct_missing@0.75", "OCT 75%"),
)
SWEEP = (0.0, 0.25, 0.5, 0.75, 1.0)
METRICS = (("qwk", "quadratic kappa"), ("accuracy", "accuracy"), ("f1_macro", "macro-F1"),
           ("auc", "AUC"))  # fmt: skip
QUICK = {"n_eyes": 90, "epochs": 1, "seeds": [0]}


# ---------------------------------------------------------------------------------------------
# configuration and data


def bench_config(params: str | None, seed: int, epochs: int, overrides: list[str]) -> Config:
    """params.yaml defaults with the benchmark's fixed protocol on top.

    The scenario definitions are pinned here (not read from params.yaml) because the table's
    column titles promise them.
    """
    cfg = load_config(params, overrides=overrides)
    cfg.synth.seed = cfg.prepare.seed = cfg.missing.seed = cfg.train.seed = seed
    cfg.missing.rate = 1.0
    cfg.missing.mixed = [0.3, 0.3]
    cfg.missing.sweep = list(SWEEP)
    cfg.train.epochs = epochs
    return cfg


def incomplete_train_rows(manifest: pd.DataFrame, cfg: MissingConfig) -> pd.DataFrame:
    """Train-split mask rows of the ``incomplete`` regime (scenario ``train_incomplete``).

    The same seeded ``mixed`` construction as the evaluation masks (exact counts, never both
    missing), with the training rates.
    """
    from rima_core.data.masks import scenario_mask

    rows = manifest[manifest["split"] == "train"]
    rates = MissingConfig(seed=cfg.seed, mixed=list(INCOMPLETE_RATES))
    keep_f, keep_o = scenario_mask(
        rows["has_fundus"].to_numpy(bool), rows["has_oct"].to_numpy(bool), "train", "mixed", rates
    )
    return pd.DataFrame(
        {
            "case_id": rows["case_id"].to_numpy(),
            "split": "train",
            "scenario": TRAIN_INCOMPLETE,
            "has_fundus": keep_f,
            "has_oct": keep_o,
        }
    ).astype({"case_id": "string", "split": "string", "scenario": "string"})


def prepare_seed(seed_dir: Path, cfg: Config) -> tuple[Path, Path]:
    """Phantom -> store -> masks for one seed; each product is reused when it exists."""
    from rima_core.data import open_store
    from rima_core.data.masks import build_masks
    from rima_core.data.prepare import prepare_store
    from rima_core.data.synthetic import generate

    raw, store, masks = seed_dir / "raw", seed_dir / "store", seed_dir / "masks.parquet"
    if not (store / "manifest.parquet").exists():
        if not (raw / "SYNTHETIC.json").exists():
            log.info("seed %d: generating %d synthetic eyes", cfg.synth.seed, cfg.synth.n_eyes)
            generate(raw, cfg.synth)
        # The phantom's sizes are the store's sizes: the benchmark runs at the default sizes.
        cfg.prepare.fundus_size = cfg.synth.fundus_size
        cfg.prepare.oct_shape = list(cfg.synth.oct_shape)
        prepare_store("auto", raw, store, cfg.prepare, "auto")
    if not masks.exists():
        manifest = open_store(store).manifest
        table = pd.concat(
            [build_masks(manifest, cfg.missing), incomplete_train_rows(manifest, cfg.missing)],
            ignore_index=True,
        )
        with atomic_file(masks) as tmp:
            table.to_parquet(tmp, index=False)
    return store, masks


# ---------------------------------------------------------------------------------------------
# one run


def run_one(
    store: Path, masks: pd.DataFrame, run_dir: Path, cfg: Config, method: str, regime: str
) -> dict[str, Any]:
    """Train (or resume) and evaluate one (seed, regime, method); returns its run record."""
    from rima_core.evaluate import evaluate
    from rima_core.train import train

    record_path = run_dir / "run.json"
    if record_path.exists() and (run_dir / "eval" / "metrics.json").exists():
        return json.loads(record_path.read_text())
    cfg.model.name = method
    cfg.missing.train_scenario = TRAIN_INCOMPLETE if regime == "incomplete" else "complete"
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    summary = train(store, masks, run_dir / "model", cfg, resume=True)
    t1 = time.perf_counter()
    evaluate(run_dir / "model" / "model.pt", store, masks, run_dir / "eval", cfg)
    record = {
        "method": method,
        "regime": regime,
        "seed": cfg.train.seed,
        "epochs_run": summary["epochs_run"],
        "best_epoch": summary["best_epoch"],
        "best_val_qwk": summary["best_val_metrics"].get("qwk"),
        "mean_epoch_seconds": summary["mean_epoch_seconds"],
        "ot_share": summary["ot_share"],
        "train_seconds": t1 - t0,
        "eval_seconds": time.perf_counter() - t1,
        "loadavg_1min_before": load_before,
    }
    write_text(record_path, json.dumps(record, indent=2) + "\n")
    return record


# ---------------------------------------------------------------------------------------------
# aggregation and report


def collect(work: Path, seeds: list[int], methods: list[str], regimes: list[str]) -> pd.DataFrame:
    """Long table ``regime, method, seed, scenario, metric, value`` from the finished runs."""
    rows = []
    for seed in seeds:
        for regime in regimes:
            for method in methods:
                path = work / f"seed{seed}" / regime / method / "eval" / "metrics.json"
                if not path.exists():
                    continue
                for scenario, values in json.loads(path.read_text()).items():
                    for metric, _ in METRICS:
                        v = values.get(metric)
                        rows.append(
                            {
                                "regime": regime,
                                "method": method,
                                "seed": seed,
                                "scenario": scenario,
                                "metric": metric,
                                "value": np.nan if v is None else float(v),
                            }
                        )
    return pd.DataFrame(rows, columns=["regime", "method", "seed", "scenario", "metric", "value"])


def summarise(long: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (ddof 1; 0 for one seed) and the per-seed values of every cell."""
    out = (
        long.sort_values("seed")
        .groupby(["regime", "method", "scenario", "metric"], sort=False)["value"]
        .agg(
            mean="mean",
            std=lambda v: float(v.std(ddof=1)) if v.notna().sum() > 1 else 0.0,
            n_seeds="count",
            values=lambda v: " ".join(f"{x:.4f}" for x in v),
        )
        .reset_index()
    )
    return out


def _cell(summary: pd.DataFrame, regime: str, method: str, scenario: str, metric: str) -> str:
    row = summary[
        (summary["regime"] == regime)
        & (summary["method"] == method)
        & (summary["scenario"] == scenario)
        & (summary["metric"] == metric)
    ]
    if row.empty or not np.isfinite(row["mean"].iloc[0]):
        return "–"
    return f"{row['mean'].iloc[0]:.3f} ± {row['std'].iloc[0]:.3f}"


def _mean(summary: pd.DataFrame, regime: str, method: str, scenario: str, metric: str) -> float:
    row = summary[
        (summary["regime"] == regime)
        & (summary["method"] == method)
        & (summary["scenario"] == scenario)
        & (summary["metric"] == metric)
    ]
    return float(row["mean"].iloc[0]) if len(row) else float("nan")


def shape_checks(long: pd.DataFrame, regimes: list[str], methods: list[str]) -> list[str]:
    """The expected shape, checked per seed on QWK (paired: same data, same seed)."""
    lines: list[str] = []
    qwk = long[long["metric"] == "qwk"].pivot_table(
        index=["regime", "seed", "scenario"], columns="method", values="value"
    )
    singles = [m for m in ("fundus_only", "oct_only") if m in methods]
    for regime in regimes:
        if (regime, "complete") not in {(r, s) for r, _, s in qwk.index}:
            continue
        block = qwk.xs(regime, level="regime")
        complete = block.xs("complete", level="scenario")
        if len(singles) == 2:
            best_single = complete[singles].max(axis=1)
            lines.append(f"- **{regime} training, complete test data: fused > best single?**")
            for m in (m for m in FUSED if m in complete):
                diff = complete[m] - best_single
                lines.append(
                    f"  - `{m}`: QWK − best single modality = {diff.mean():+.3f} ± "
                    f"{diff.std(ddof=1) if len(diff) > 1 else 0.0:.3f} "
                    f"(better in {int((diff > 0).sum())}/{len(diff)} seeds)"
                )
        if {"rima", "late_fusion_zero"} <= set(block.columns):
            lines.append(
                f"- **{regime} training: QWK lost to a missing modality (complete − scenario), "
                "RIMA vs zero-imputation late fusion**"
            )
            for scenario, title in SCENARIOS[1:4]:
                if scenario not in block.index.get_level_values("scenario"):
                    continue
                drop = complete - block.xs(scenario, level="scenario")
                d_r, d_z = drop["rima"], drop["late_fusion_zero"]
                gap = block.xs(scenario, level="scenario")
                win = gap["rima"] - gap["late_fusion_zero"]
                lines.append(
                    f"  - {title}: drop RIMA {d_r.mean():+.3f} vs late_fusion_zero "
                    f"{d_z.mean():+.3f} (RIMA drops less in {int((d_r < d_z).sum())}/{len(d_r)} "
                    f"seeds); QWK RIMA − late_fusion_zero under {title}: {win.mean():+.3f} "
                    f"(RIMA higher in {int((win > 0).sum())}/{len(win)} seeds)"
                )
    return lines


def render(
    summary: pd.DataFrame,
    long: pd.DataFrame,
    runs: list[dict[str, Any]],
    args: argparse.Namespace,
    regimes: list[str],
    methods: list[str],
) -> str:
    seeds = sorted(long["seed"].unique().tolist()) if len(long) else []
    wall = sum(r["train_seconds"] + r["eval_seconds"] for r in runs)
    lines = [
        "# Missing-modality benchmark (synthetic phantom, default sizes)",
        "",
        f"Command: `{args.command}`",
        "",
        f"Seeds {seeds} (each seed = its own generated dataset *and* training seed); "
        f"{args.n_eyes} eyes per dataset (60/20/20 split), 64² fundus, 32³ OCT, CPU, "
        f"{args.threads} torch thread(s); every method "
        f"trained for at most {args.epochs} epochs (same budget for all; early stopping patience "
        f"{args.patience}), model selection on the **validation** split under `mixed` by QWK; "
        "scores on the **test** split. Cells: mean ± sample std over seeds. "
        f"Training regimes: `complete` (all training eyes keep what the source has) and "
        f"`incomplete` (of the training eyes with both modalities, {INCOMPLETE_RATES[0]:.0%} "
        f"lose the fundus and {INCOMPLETE_RATES[1]:.0%} lose the OCT). Sweep columns are "
        "OCT-missing rates; `OCT 100%` = the 1.0 end of the sweep, `complete` = its 0 end.",
        "",
        f"{len(runs)} runs, {wall / 60:.1f} min of training + evaluation "
        f"(mean 1-min load average when runs started: "
        f"{np.mean([r['loadavg_1min_before'] for r in runs]) if runs else float('nan'):.1f} "
        f"on {os.cpu_count()} CPUs).",
        "",
        "## Expected shape, checked per seed (QWK)",
        "",
        *shape_checks(long, regimes, methods),
        "",
    ]
    for regime in regimes:
        for metric, title in METRICS:
            lines += [
                f"## {title} — {regime} training data",
                "",
                "| method | " + " | ".join(t for _, t in SCENARIOS) + " |",
                "| --- |" + " ---: |" * len(SCENARIOS),
            ]
            for method in methods:
                cells = [_cell(summary, regime, method, s, metric) for s, _ in SCENARIOS]
                lines.append(f"| `{method}` | " + " | ".join(cells) + " |")
            lines.append("")
    lines += [
        "## Runs",
        "",
        "| regime | method | mean epochs run | mean best epoch | mean s/epoch | OT share |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    frame = pd.DataFrame(runs)
    if len(frame):
        for (regime, method), g in frame.groupby(["regime", "method"], sort=False):
            lines.append(
                f"| {regime} | `{method}` | {g['epochs_run'].mean():.1f} | "
                f"{g['best_epoch'].mean():.1f} | {g['mean_epoch_seconds'].mean():.2f} | "
                f"{g['ot_share'].mean():.1%} |"
            )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    ap.add_argument("--epochs", type=int, default=12, help="training budget, every method")
    ap.add_argument("--patience", type=int, default=None, help="default: params.yaml")
    ap.add_argument("--n-eyes", type=int, default=None, help="default: params.yaml synth.n_eyes")
    ap.add_argument(
        "--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
        help="extra config override for every run (recorded in the report)",
    )  # fmt: skip
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="data, models, evaluations")
    ap.add_argument("--out", type=Path, default=None, help="default: benchmarks/results")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: on a shared 2-core machine threaded ops stall; see speed_train)",
    )  # fmt: skip
    ap.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    args = ap.parse_args(argv)
    args.command = "python benchmarks/missing_modality.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    if args.quick:
        args.seeds, args.epochs = QUICK["seeds"], QUICK["epochs"]
        args.n_eyes = args.n_eyes or QUICK["n_eyes"]
        args.work = args.work / "quick"
        args.out = args.out or args.work
    args.out = args.out or RESULTS
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("rima_core").setLevel(logging.WARNING)
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_config(args.params, overrides=args.overrides)
    args.n_eyes = args.n_eyes or base.synth.n_eyes
    args.patience = base.train.patience if args.patience is None else args.patience
    overrides = [*args.overrides, f"synth.n_eyes={args.n_eyes}", f"train.patience={args.patience}"]

    plan = [(s, r, m) for s in args.seeds for r in args.regimes for m in args.methods]
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    done_before = 0
    for k, (seed, regime, method) in enumerate(plan, 1):
        cfg = bench_config(args.params, seed, args.epochs, overrides)
        store, masks_path = prepare_seed(args.work / f"seed{seed}", cfg)
        masks = pd.read_parquet(masks_path)
        run_dir = args.work / f"seed{seed}" / regime / method
        fresh = not (run_dir / "run.json").exists()
        record = run_one(store, masks, run_dir, cfg, method, regime)
        runs.append(record)
        if not fresh:
            done_before += 1
            log.info("[%d/%d] seed %d %s %s: done earlier", k, len(plan), seed, regime, method)
            continue
        elapsed = time.perf_counter() - t_start
        new = k - done_before
        log.info(
            "[%d/%d] seed %d %s %s: best val QWK %.3f at epoch %s/%s, %.0f s (ETA %.0f min)",
            k,
            len(plan),
            seed,
            regime,
            method,
            record["best_val_qwk"] or float("nan"),
            record["best_epoch"],
            record["epochs_run"],
            record["train_seconds"] + record["eval_seconds"],
            elapsed / new * (len(plan) - k) / 60,
        )

    long = collect(args.work, args.seeds, args.methods, args.regimes)
    summary = summarise(long)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out / "missing_modality.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6g")
    write_text(
        args.out / "missing_modality.md",
        render(summary, long, runs, args, args.regimes, args.methods),
    )
    print(args.out / "missing_modality.md")


if __name__ == "__main__":
    main()
