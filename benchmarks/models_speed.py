"""Model speed at the default (CPU) profile: encoders per eye, RIMA training step, inference.

Run by hand: ``python benchmarks/models_speed.py [--batch 32] [--repeats 10] [--threads N]``.
Writes ``benchmarks/results/models_speed.json`` and prints it. Targets (default profile, 64²
fundus, 32³ OCT): a few ms per eye per encoder; a RIMA training step (OT included) well under a
second at batch 32, so an epoch of the 360-eye synthetic training split takes seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from rima_core.atomic import write_text
from rima_core.config import ModelConfig, OTConfig
from rima_core.core.models import ModelSpec, RimaConfig, build_model
from rima_core.core.models.encoders import build_encoder

OUT = Path(__file__).parent / "results" / "models_speed.json"


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    mcfg, ocfg = ModelConfig(), OTConfig()
    n = args.batch
    fundus = torch.rand(n, 3, 64, 64)
    oct = torch.rand(n, 1, 32, 32, 32)
    labels = torch.arange(n) % 3
    result: dict[str, float | int | str] = {
        "batch": n,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }

    for kind, x, dim in (
        ("small_cnn2d", fundus, mcfg.fundus_dim),
        ("small_cnn3d", oct, mcfg.oct_dim),
    ):
        enc = build_encoder(kind, dim).eval()
        with torch.no_grad():
            sec = timed(lambda enc=enc, x=x: enc(x), args.repeats)
        result[f"{kind}_ms_per_eye"] = 1000 * sec / n

    cfg = RimaConfig.from_sections(mcfg, ocfg, "rima")
    spec = ModelSpec("rima", cfg, 3, ["0", "1", "2"], [64, 64, 3], [32] * 3)
    model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    has_f = torch.rand(n) > 0.3
    has_o = ~has_f | (torch.rand(n) > 0.3)
    ot_seconds: list[float] = []

    def train_step() -> None:
        model.train()
        out = model(fundus, oct, has_f, has_o, labels=labels)
        loss = F.cross_entropy(out.logits, labels) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        ot_seconds.append(out.stats.get("ot_seconds", 0.0))

    result["rima_train_step_ms"] = 1000 * timed(train_step, args.repeats)
    result["rima_ot_ms_median"] = 1000 * statistics.median(ot_seconds)
    model.eval()
    with torch.no_grad():
        sec = timed(lambda: model(fundus, oct, has_f, has_o), args.repeats)
    result["rima_inference_ms_per_eye"] = 1000 * sec / n

    text = json.dumps(result, indent=2)
    write_text(OUT, text + "\n")
    print(text)


if __name__ == "__main__":
    main()
