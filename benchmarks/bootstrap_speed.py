"""Seconds for the scores.csv bootstrap: 1000 resamples x 14 scenarios on a 120-eye test split.

``rima evaluate`` computes a percentile interval for six metrics of every scenario of two splits.
The resamples are scored all at once from per-eye count weights
(:func:`rima_core.core.metrics.resampled_metrics`: a few matrix products per metric) instead of
calling :func:`rima_core.core.metrics.classification_metrics` once per resample; this measures both
for the same inputs and checks they agree. Target: a few seconds for the vectorised path.

    python benchmarks/bootstrap_speed.py [--eyes 120] [--scenarios 14] [--resamples 1000]

Prints a JSON line; writes nothing (the lead records results in benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rima_core.core.metrics import (
    BOOT_METRICS,
    bootstrap_counts,
    bootstrap_scores,
    classification_metrics,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eyes", type=int, default=120)
    ap.add_argument("--scenarios", type=int, default=14)
    ap.add_argument("--resamples", type=int, default=1000)
    ap.add_argument("--loop-resamples", type=int, default=100, help="for the per-resample loop")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = [
        (rng.integers(0, 3, args.eyes), rng.dirichlet(np.ones(3), args.eyes))
        for _ in range(args.scenarios)
    ]
    t0 = time.perf_counter()
    for y, p in data:
        bootstrap_scores(y, p, args.resamples, 0)
    vectorised = time.perf_counter() - t0

    y, p = data[0]
    counts = bootstrap_counts(args.eyes, args.loop_resamples, 0)
    idx = np.random.default_rng(0).integers(0, args.eyes, (args.loop_resamples, args.eyes))
    t0 = time.perf_counter()
    for b in range(args.loop_resamples):
        classification_metrics(y[idx[b]], p[idx[b]])
    loop_per_resample = (time.perf_counter() - t0) / args.loop_resamples
    assert (counts.sum(axis=1) == args.eyes).all()
    print(
        json.dumps(
            {
                "eyes": args.eyes,
                "scenarios": args.scenarios,
                "resamples": args.resamples,
                "metrics": list(BOOT_METRICS),
                "vectorised_seconds": round(vectorised, 3),
                "loop_seconds_estimate": round(
                    loop_per_resample * args.resamples * args.scenarios, 1
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
