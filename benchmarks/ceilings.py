"""Population Bayes ceilings of every phantom regime of the missing-modality benchmark.

Why: a benchmark table says how good a model is only next to what the data allows. For each
phantom regime (``benchmarks/bench_grid.py``) this draws eyes from the generator's latent model
(no images) and grades them with the Bayes posterior given the latent views of the fundus only,
the OCT only and both (``rima_core.core.data.oracle.ceiling``), under both decodings: the posterior
argmax and the grade of least expected quadratic cost. The benchmark's oracle rows are the same
posterior on each dataset's own test eyes; these are the population values they scatter around.

    python benchmarks/ceilings.py            # -> benchmarks/results/ceilings.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_grid import PHANTOM_REGIMES  # noqa: E402
from rima_core.atomic import write_text  # noqa: E402
from rima_core.config import load_config  # noqa: E402
from rima_core.core.data.oracle import ceiling  # noqa: E402
from rima_core.progress import progress  # noqa: E402

log = logging.getLogger("benchmarks.ceilings")
AVAILABILITY = ("fundus", "oct", "both")


def regime_ceilings(params: str, n_draws: int, seed: int) -> dict[str, dict]:
    """``{regime: ceiling(...)}`` for every phantom regime."""
    out = {}
    for regime, spec in progress(PHANTOM_REGIMES.items(), desc="ceilings", unit="regime"):
        cfg = load_config(params, overrides=list(spec.overrides))
        out[regime] = ceiling(cfg.synth, n_draws=n_draws, seed=seed)
    return out


def render(ceilings: dict[str, dict], n_draws: int) -> str:
    lines = [
        "# Bayes ceilings of the phantom regimes (test QWK)",
        "",
        f"{n_draws:,} eyes drawn from each regime's latent model; argmax / expected-quadratic-cost "
        "decoding. Written by `python benchmarks/ceilings.py`.",
        "",
        "| regime | fundus only | OCT only | both | fusion headroom (both − best single) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for regime, c in ceilings.items():
        q = c["qwk"]
        cells = [f"{q[a]['argmax']:.3f} / {q[a]['quadratic']:.3f}" for a in AVAILABILITY]
        headroom = q["both"]["argmax"] - max(q["fundus"]["argmax"], q["oct"]["argmax"])
        lines.append(f"| `{regime}` | " + " | ".join(cells) + f" | {headroom:+.3f} |")
    return "\n".join([*lines, ""])


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--draws", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    result = regime_ceilings(args.params, args.draws, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_text(args.out / "ceilings.json", json.dumps(result, indent=2) + "\n")
    write_text(args.out / "ceilings.md", render(result, args.draws))
    log.info("wrote %s", args.out / "ceilings.md")


if __name__ == "__main__":
    main()
