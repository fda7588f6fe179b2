"""Eyes/s through a DataLoader: the Arrow store vs decoding the raw FairVision npz files.

Why the store exists: decoding a FairVision eye (np.load of a 200×200 SLO + 128×200×200 OCT,
then resizing) every epoch costs far more than reading the already-resized row from a memory
map. This measures both through the same DataLoader (same batch size, same workers) for the same
eyes, at the default sizes (64² fundus, 32³ OCT) and the paper's (384², 96³).

Raw data: FairVision-shaped npz files written here (AMD layout: ``slo_fundus`` 200×200 grey,
``oct_bscans`` 128×200×200 uint8, ``amd_condition``), uncompressed like ``np.savez`` — the
cheapest raw format to decode, so the measured ratio is a lower bound. The raw path decodes with
the project's FairVision loader and the same resize functions ``prepare`` uses.

Both paths are timed with a warm page cache (one untimed pass first): the comparison is decode
cost, not disk speed.

    python benchmarks/data_loading.py [--eyes 200] [--num-workers 0] [--repeats 3]

Writes ``benchmarks/results/data_loading.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rima_core.atomic import write_text  # noqa: E402
from rima_core.config import PrepareConfig  # noqa: E402
from rima_core.core.data.dataset import EyeDataset, make_loader  # noqa: E402
from rima_core.core.data.prepare import prepare_store, resize_fundus, resize_oct  # noqa: E402
from rima_core.core.data.sources import fairvision  # noqa: E402

log = logging.getLogger("benchmarks.data_loading")

SIZES = {
    "default": {"fundus_size": 64, "oct_shape": [32, 32, 32]},
    "paper": {"fundus_size": 384, "oct_shape": [96, 96, 96]},
}
RAW_FUNDUS = (200, 200)
RAW_OCT = (128, 200, 200)
AMD_LABELS = ("no.amd.diagnosis", "early.dry", "intermediate.dry", "wet.amd.active")


def write_raw(root: Path, n: int, seed: int = 0) -> list[Path]:
    """FairVision AMD-layout npz files with smooth-plus-noise content (not constant images)."""
    rng = np.random.default_rng(seed)
    folder = root / "AMD" / "Training"
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0 : RAW_FUNDUS[0], 0 : RAW_FUNDUS[1]]
    depth = np.linspace(0, 1, RAW_OCT[1], dtype=np.float32)[None, :, None]
    paths = []
    for i in range(n):
        fundus = 120 + 60 * np.sin(xx / (9 + i % 7)) * np.cos(yy / 11)
        fundus = fundus + rng.normal(0, 8, RAW_FUNDUS)
        oct = 90 + 80 * np.sin(depth * (12 + i % 5)) + rng.normal(0, 15, RAW_OCT).astype(np.float32)
        path = folder / f"data_{i + 1:05d}.npz"
        np.savez(
            path,
            slo_fundus=np.clip(fundus, 0, 255).astype(np.uint8),
            oct_bscans=np.clip(oct, 0, 255).astype(np.uint8),
            amd_condition=np.array(AMD_LABELS[i % 4]),
            race=np.array(i % 3),
            male=np.array(i % 2),
        )
        paths.append(path)
    return paths


class RawNpzDataset(Dataset):
    """What training without a store would do: decode + resize each eye on every access."""

    def __init__(self, root: Path, fundus_size: int, oct_shape: list[int]) -> None:
        self.refs = sorted(fairvision.scan(root, "amd").cases, key=lambda r: r.case_id)
        self.fundus_size = fundus_size
        self.oct_shape = oct_shape

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        raw = fairvision.load(self.refs[i], "amd")
        fundus = resize_fundus(raw.fundus, self.fundus_size)
        oct = resize_oct(raw.oct, self.oct_shape)
        return {
            "fundus": torch.from_numpy(fundus).permute(2, 0, 1).float().div_(255.0),
            "oct": torch.from_numpy(oct)[None].float().div_(255.0),
            "has_fundus": torch.tensor(True),
            "has_oct": torch.tensor(True),
            "label": torch.tensor(raw.label, dtype=torch.int64),
            "index": torch.tensor(i, dtype=torch.int64),
        }


def eyes_per_second(
    dataset: Dataset, args: argparse.Namespace, repeats: int, warm_up: bool
) -> dict[str, Any]:
    """Optional warm-up pass, then ``repeats`` timed passes; median and best eyes/s."""
    loader = make_loader(
        dataset, args.batch_size, shuffle=True, num_workers=args.num_workers, seed=0
    )
    if warm_up:  # page cache, worker start-up
        for _ in loader:
            pass
    n = len(dataset)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        seen = 0
        for batch in loader:
            seen += len(batch["label"])
            batch["oct"].sum()  # touch the data so nothing is lazily skipped
        rates.append(seen / (time.perf_counter() - start))
    return {
        "eyes": n,
        "median_eyes_per_s": statistics.median(rates),
        "best_eyes_per_s": max(rates),
    }


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="rima-bench-"))
    results: dict[str, Any] = {
        "eyes": args.eyes,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "raw_fundus_shape": list(RAW_FUNDUS),
        "raw_oct_shape": list(RAW_OCT),
        "sizes": {},
    }
    try:
        raw = work / "raw"
        start = time.perf_counter()
        write_raw(raw, args.eyes)
        log.info(
            "raw npz: %d eyes, %.0f MB in %.1fs",
            args.eyes,
            _dir_mb(raw),
            time.perf_counter() - start,
        )
        results["raw_mb"] = _dir_mb(raw)
        for name in args.sizes:
            size = SIZES[name]
            store = work / f"store-{name}"
            cfg = PrepareConfig(workers=args.prepare_workers, **size)
            start = time.perf_counter()
            prepare_store("fairvision", raw, store, cfg, disease="amd")
            prepare_s = time.perf_counter() - start
            store_rate = eyes_per_second(
                EyeDataset(store, None, "train"), args, args.repeats, warm_up=True
            )
            # prepare has just read every raw file, so they are in the page cache already
            raw_rate = eyes_per_second(
                RawNpzDataset(raw, size["fundus_size"], size["oct_shape"]),
                args,
                args.raw_repeats,
                warm_up=args.num_workers > 0,
            )
            entry = {
                **size,
                "store_mb": _dir_mb(store),
                "prepare_s": prepare_s,
                "prepare_eyes_per_s": args.eyes / prepare_s,
                "store": store_rate,
                "raw": raw_rate,
                "speedup_median": store_rate["median_eyes_per_s"] / raw_rate["median_eyes_per_s"],
            }
            results["sizes"][name] = entry
            log.info(
                "%s: store %.0f eyes/s, raw %.1f eyes/s, %.0fx",
                name,
                store_rate["median_eyes_per_s"],
                raw_rate["median_eyes_per_s"],
                entry["speedup_median"],
            )
            shutil.rmtree(store, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return results


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Data loading: Arrow store vs raw FairVision npz decode",
        "",
        f"Command: `python benchmarks/data_loading.py --eyes {results['eyes']} "
        f"--num-workers {results['num_workers']}`  ",
        f"{results['eyes']} eyes, raw npz {results['raw_fundus_shape']} SLO + "
        f"{results['raw_oct_shape']} OCT (uncompressed, {results['raw_mb']:.0f} MB); DataLoader "
        f"batch {results['batch_size']}, {results['num_workers']} workers, "
        f"{results['torch_threads']} torch threads, {results['cpu_count']} CPUs "
        f"({results['machine']}, Python {results['python']}, torch {results['torch']}; "
        f"1-min load average {results['load_average_at_start']:.1f} at start). "
        "Warm page cache; eyes/s are medians over timed passes. Both paths yield the same "
        "float32 batches (fundus 3×H×W, OCT 1×D×H×W in [0, 1]).",
        "",
        "| sizes | fundus | OCT | store eyes/s | raw decode eyes/s | speed-up | store MB "
        "| prepare eyes/s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, e in results["sizes"].items():
        lines.append(
            f"| {name} | {e['fundus_size']}² | {'×'.join(map(str, e['oct_shape']))} "
            f"| {e['store']['median_eyes_per_s']:.0f} | {e['raw']['median_eyes_per_s']:.1f} "
            f"| {e['speedup_median']:.0f}× | {e['store_mb']:.0f} | {e['prepare_eyes_per_s']:.1f} |"
        )
    lines += [
        "",
        "Target: store ≥ 10× faster than raw decode. "
        + (
            "Met at every size."
            if all(e["speedup_median"] >= 10 for e in results["sizes"].values())
            else "NOT met at every size — see the table."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eyes", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--prepare-workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed passes over the store")
    p.add_argument("--raw-repeats", type=int, default=2, help="timed passes over raw npz")
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--workdir", default=None, help="keep data here (default: a removed temp dir)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="intra-op threads in this process (1: stable timings on a shared host; "
        "DataLoader workers always use 1)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.torch_threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results = run(args)
    out = Path(args.out)
    write_text(out / "data_loading.json", json.dumps(results, indent=2) + "\n")
    write_text(out / "data_loading.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
