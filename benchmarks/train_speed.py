"""Training speed per model: seconds per epoch and the OT step's share of a training step.

Run by hand on a store built with the default params (600 synthetic eyes, 64² fundus, 32³ OCT):

    rima data synth --out /tmp/rima_default/raw
    rima prepare --input /tmp/rima_default/raw --out /tmp/rima_default/store
    rima simulate-missing --store /tmp/rima_default/store --out /tmp/rima_default/masks.parquet
    python benchmarks/train_speed.py --store /tmp/rima_default/store \\
        --masks /tmp/rima_default/masks.parquet --epochs 2

Writes ``benchmarks/results/train_speed.json``. The machine's load average is recorded with the
numbers: on a shared machine the wall-clock figures scale with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from rima_core.config import load_config
from rima_core.runs.train import train

RESULTS = Path(__file__).parent / "results" / "train_speed.json"


def measure(store: Path, masks: Path, model: str, epochs: int, params: str) -> dict:
    cfg = load_config(params, overrides=[f"model.name={model}", f"train.epochs={epochs}"])
    cfg.train.patience = 0  # time every epoch asked for
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train(store, masks, Path(tmp), cfg)
        wall = time.perf_counter() - t0
        hist = pd.read_csv(Path(tmp) / "timings.csv")  # per-epoch wall-clock times
    return {
        "model": model,
        "epochs": epochs,
        "n_parameters": summary["n_parameters"],
        "epoch_seconds": hist["epoch_seconds"].round(2).tolist(),
        "train_seconds": hist["train_seconds"].round(2).tolist(),
        "val_seconds": hist["val_seconds"].round(2).tolist(),
        "ot_share": round(summary["ot_share"], 4),
        "wall_seconds_incl_setup": round(wall, 1),
        "loadavg_1min_before": round(load_before, 2),
        "loadavg_1min_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--masks", type=Path, required=True)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--models", nargs="+", default=["rima", "late_fusion_zero"])
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "store": str(args.store),
        "runs": [measure(args.store, args.masks, m, args.epochs, args.params) for m in args.models],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
