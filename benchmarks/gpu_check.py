"""One short run that answers the GPU questions: paper-profile step speed and memory with AMP vs
fp32, the OT step on the GPU vs the CPU, the normal engine end to end on CUDA, torch.compile.

Why one prepared script: the GPU machine that can be borrowed is bare (no MLflow, DVC, KFP,
Optuna, POT, Great Expectations; MONAI travels as a wheel, see ``benchmarks/gpu_wheels.txt``) and
lent for about 15 minutes in all, so every question has to be answered by one run that is known to
work before it gets there. ``--device cpu --tiny`` runs the same code at tiny sizes here
(``tests/e2e/test_gpu_check.py``), so it cannot rot.

Parts (each in its own process, with its own time budget, so a hang or a crash in one part, or a
compile that outruns its budget, still leaves the others' results):

* ``paper_train``: training steps of the ``configs/paper.yaml`` model (Res2Net-50 at 384², 3D
  ResNet-10 at 96³, batch 32) on synthetic tensors, with AMP (bf16 where the GPU has it) and in
  fp32 (and AMP with cuDNN autotuning, if time is left): eyes/s, peak memory, losses finite.
* ``ot``: the OT step at the paper's shapes (batch 32, d_f 2048, d_o 6144): labeled GW in both
  directions + the feature coupling, on the device and on the CPU, with the quality checks (zero
  cross-label mass, marginals, device vs CPU agreement) on the device's result.
* ``engine``: a small synthetic store (``rima_core.core.data.synthetic`` -> prepare -> masks)
trained
  a few epochs through ``rima_core.runs.train.train`` on the device, interrupted after epoch 2 and
  resumed from its checkpoint, compared with an uninterrupted run, and evaluated under every
  scenario (``rima_core.runs.evaluate``).
* ``compile``: training steps of the paper model eager vs ``torch.compile`` (the encoders, then
  the whole model); a compile that fails is recorded as skipped, with the reason.

Results: ``gpu_check.json`` and ``gpu_check.md`` (rewritten after every part, so a run cut short
still leaves what it measured) and ``gpu_check.log`` (the parts' output) in ``--out`` (default
``$OUT`` when set, else ``benchmarks/results/gpu_check/``).

    bash scripts/gpu_check.sh                       # on the GPU machine (installs wheels/gpu)
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gpu_check   # here
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rima_core.atomic import write_text  # noqa: E402

log = logging.getLogger("benchmarks.gpu_check")

RESULT_NAME = "gpu_check"
PARAMS = ROOT / "params.yaml"
PAPER_PROFILE = ROOT / "configs" / "paper.yaml"
TINY_PROFILE = ROOT / "configs" / "tiny.yaml"
# Where each pyproject dependency stands on the GPU machine
# (tests/contracts/test_import_isolation.py checks that every dependency is in exactly one place:
# here, or as a wheel in benchmarks/gpu_wheels.txt). In its image (its own versions; Python 3.12,
# torch 2.11 with CUDA):
ON_GPU_MACHINE = (
    "torch",
    "numpy",
    "scipy",
    "pandas",
    "pyarrow",
    "scikit-learn",
    "matplotlib",
    "PyYAML",
    "tqdm",
    "pillow",
)
# Absent there, and the check must not need them (distribution -> import name): the isolation
# tests block these imports; the results record whether any was importable.
ABSENT_ON_GPU_MACHINE = {
    "mlflow": "mlflow",
    "dvc": "dvc",
    "dvc-s3": "dvc_s3",
    "kfp": "kfp",
    "kfp-kubernetes": "kfp",
    "optuna": "optuna",
    "great_expectations": "great_expectations",
    "POT": "ot",
    "nibabel": "nibabel",
    "openpyxl": "openpyxl",
    "SQLAlchemy": "sqlalchemy",
    "boto3": "boto3",
    "botocore": "botocore",
}
# Quality thresholds of the OT part: what a training step needs (marginals within L1 1e-3, the
# stopping rule of rima_core.core.ot.labeled_gw; see benchmarks/results/ot_speed.md).
GW_MARGINAL_MAX = 1e-3
FEATURE_MARGINAL_MAX = 1e-2
# Device vs CPU: L1 distance between the two couplings (each of total mass 1).
AGREEMENT_MAX = 1e-2


# ---------------------------------------------------------------------------------------------
# small helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ms_summary(times_ms: list[float]) -> dict[str, Any]:
    if not times_ms:
        return {"n": 0}
    return {
        "n": len(times_ms),
        "median_ms": round(statistics.median(times_ms), 3),
        "min_ms": round(min(times_ms), 3),
        "max_ms": round(max(times_ms), 3),
    }


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _memory(device: torch.device) -> dict[str, float]:
    """Peak memory since the last reset: CUDA allocator figures on a GPU, the process's RSS else."""
    if device.type == "cuda":
        return {
            "peak_allocated_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1),
        }
    return {"peak_rss_mb": round(_peak_rss_mb(), 1)}


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(name: str) -> bool:
    """Whether ``name`` could be imported, without importing it (a blocking finder may raise)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _absent_importable() -> dict[str, bool]:
    return {n: _importable(n) for n in sorted(set(ABSENT_ON_GPU_MACHINE.values()))}


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            d: _version(d) for d in ("numpy", "pandas", "pyarrow", "scipy", "monai", "pillow")
        },
        "absent_packages_importable": _absent_importable(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info


class Progress:
    """A part's result dict, written to disk after every update (the parent reads it even when it
    had to kill the part)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}

    def update(self, **values: Any) -> None:
        self.data.update(values)
        self.flush()

    def flush(self) -> None:
        write_text(self.path, json.dumps(_jsonable(self.data), indent=2) + "\n")


def _jsonable(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, numpy scalars plain numbers, dtypes strings."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, bool | int | str) or obj is None:
        return obj
    return str(obj)


def _time_left(deadline: float) -> float:
    return deadline - time.time()


def timed_loop(
    fn: Callable[[int], Any],
    device: torch.device,
    warmup: int,
    max_runs: int,
    deadline: float,
    min_runs: int = 2,
) -> tuple[list[float], list[Any]]:
    """``warmup`` untimed calls, then up to ``max_runs`` timed ones (ms) while time is left
    (at least ``min_runs``); returns (times, results). ``fn`` gets the call's index."""
    i = 0
    for _ in range(warmup):
        fn(i)
        i += 1
    _sync(device)
    times, outs = [], []
    while len(times) < max_runs and (len(times) < min_runs or _time_left(deadline) > 0):
        start = time.perf_counter()
        outs.append(fn(i))
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
        i += 1
    return times, outs


# ---------------------------------------------------------------------------------------------
# training steps on synthetic tensors (paper profile)


def _step_counts(device: torch.device, tiny: bool, cuda: tuple[int, int]) -> tuple[int, int]:
    """(warm-up steps, most timed steps): on the tiny CPU run one step proves the path."""
    if device.type == "cuda":
        return cuda
    return (0, 1) if tiny else (1, 3)


def paper_config(tiny: bool) -> Any:
    """``configs/paper.yaml`` over params.yaml; ``tiny`` keeps its encoders at tiny sizes."""
    from rima_core.config import load_config

    overrides = []
    if tiny:  # same backbones (Res2Net-50, MONAI ResNet-10), CPU-sized inputs and features
        overrides = [
            "prepare.fundus_size=32",
            # not 16³: MONAI's ResNet-10 then ends at 1×1×1, where BatchNorm cannot train on a
            # sub-batch of one OCT (modality dropout makes those)
            "prepare.oct_shape=[32, 32, 32]",
            "model.fundus_dim=64",
            "model.oct_dim=96",
            "model.hidden_dim=32",
            "model.heads=2",
            "train.batch_size=4",
        ]
    return load_config(PARAMS, PAPER_PROFILE, overrides)


def build_model_for(cfg: Any, device: torch.device) -> torch.nn.Module:
    from rima_core.core.models import ModelSpec, build_model

    n_classes = cfg.synth.n_classes
    spec = ModelSpec.from_config(
        cfg,
        n_classes=n_classes,
        class_names=[f"grade_{k}" for k in range(n_classes)],
        fundus_shape=[cfg.prepare.fundus_size, cfg.prepare.fundus_size, 3],
        oct_shape=list(cfg.prepare.oct_shape),
    )
    torch.manual_seed(0)
    # no pretrained files on the GPU machine; the step costs the same with random weights
    return build_model(spec, pretrained=False).to(device)


def synthetic_batches(cfg: Any, device: torch.device, n_batches: int = 3) -> list[dict]:
    """Complete eyes (the default ``missing.train_scenario``), uint8-like pixels in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    b, s = cfg.train.batch_size, cfg.prepare.fundus_size
    d, h, w = cfg.prepare.oct_shape
    out = []
    for _ in range(n_batches):
        out.append(
            {
                "fundus": torch.rand(b, 3, s, s, generator=g).to(device),
                "oct": torch.rand(b, 1, d, h, w, generator=g).to(device),
                "has_fundus": torch.ones(b, dtype=torch.bool, device=device),
                "has_oct": torch.ones(b, dtype=torch.bool, device=device),
                "label": torch.randint(0, cfg.synth.n_classes, (b,), generator=g).to(device),
            }
        )
    return out


def make_step(
    model: torch.nn.Module, cfg: Any, device: torch.device, dtype: torch.dtype | None
) -> Callable[[dict], dict[str, float]]:
    """One optimiser step as the engine takes it (autocast, fp32 loss, clip, AdamW)."""
    import torch.nn.functional as F

    from rima_core.runs.engine import autocast

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    def step(b: dict) -> dict[str, float]:
        with autocast(device, dtype):
            out = model(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"], labels=b["label"])
        loss = F.cross_entropy(out.logits.float(), b["label"]) + out.aux_loss.float()
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return {"loss": float(loss.detach()), "ot_seconds": float(out.stats.get("ot_seconds", 0.0))}

    return step


def amp_dtype_for(device: torch.device, tiny: bool) -> torch.dtype | None:
    """The engine's AMP dtype; on the CPU (where the engine never uses AMP) the tiny check still
    runs the bf16 autocast path, so a dtype error in it shows up here rather than on the GPU."""
    from rima_core.runs.engine import amp_dtype

    dtype = amp_dtype(device, True)
    if dtype is None and tiny:
        dtype = torch.bfloat16
    return dtype


@contextlib.contextmanager
def cudnn_flags(benchmark: bool, deterministic: bool) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = benchmark, deterministic
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before


def measure_steps(
    model: torch.nn.Module,
    cfg: Any,
    device: torch.device,
    dtype: torch.dtype | None,
    batches: list[dict],
    deadline: float,
    warmup: int,
    max_steps: int,
) -> dict[str, Any]:
    step = make_step(model, cfg, device, dtype)
    _reset_memory(device)
    model.train()
    results: list[dict[str, float]] = []

    def run(i: int) -> dict[str, float]:
        r = step(batches[i % len(batches)])
        results.append(r)
        return r

    times, outs = timed_loop(run, device, warmup, max_steps, deadline)
    losses = [r["loss"] for r in results]
    med = statistics.median(times)
    return {
        "amp_dtype": str(dtype).replace("torch.", "") if dtype else None,
        "batch_size": cfg.train.batch_size,
        "step": _ms_summary(times),
        "eyes_per_s": round(cfg.train.batch_size / (med / 1e3), 2),
        "ot_ms": _ms_summary([1e3 * o["ot_seconds"] for o in outs]),
        "ot_share": round(sum(o["ot_seconds"] for o in outs) / (sum(times) / 1e3), 4),
        "losses": [round(v, 5) for v in losses],
        "loss_finite": all(math.isfinite(v) for v in losses),
        **_memory(device),
    }


def part_paper_train(device: torch.device, tiny: bool, deadline: float, prog: Progress) -> None:
    cfg = paper_config(tiny)
    prog.update(
        profile=str(PAPER_PROFILE.relative_to(ROOT)),
        model={
            k: getattr(cfg.model, k)
            for k in ("name", "fundus_encoder", "oct_encoder", "fundus_dim", "oct_dim")
        },
        fundus_size=cfg.prepare.fundus_size,
        oct_shape=list(cfg.prepare.oct_shape),
        batch_size=cfg.train.batch_size,
        engine_cudnn="benchmark=False, deterministic=True (as rima_core.runs.train sets on CUDA)",
        matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
        variants={},
    )
    t0 = time.perf_counter()
    model = build_model_for(cfg, device)
    prog.update(
        build_seconds=round(time.perf_counter() - t0, 2),
        n_parameters=sum(p.numel() for p in model.parameters()),
    )
    batches = synthetic_batches(cfg, device)
    amp = amp_dtype_for(device, tiny)
    variants: list[tuple[str, torch.dtype | None, bool]] = [
        ("amp", amp, False),
        ("fp32", None, False),
    ]
    if device.type == "cuda":
        variants.append(("amp_cudnn_benchmark", amp, True))
    warmup, max_steps = _step_counts(device, tiny, (3, 12))
    for k, (name, dtype, bench) in enumerate(variants):
        left = _time_left(deadline)
        if k >= 2 and left < 20:
            prog.data["variants"][name] = {"skipped": f"only {left:.0f} s left in the budget"}
            prog.flush()
            continue
        share = left / (len(variants) - k)  # the variants left share the time left
        with cudnn_flags(benchmark=bench, deterministic=not bench):
            res = measure_steps(
                model, cfg, device, dtype, batches, time.time() + share, warmup, max_steps
            )
        res["cudnn_benchmark"] = bench
        prog.data["variants"][name] = res
        prog.flush()
        log.info(
            "paper_train %s: %.1f eyes/s (median step %.1f ms), peak %s",
            name,
            res["eyes_per_s"],
            res["step"]["median_ms"],
            {k: v for k, v in res.items() if k.startswith("peak")},
        )
    v = prog.data["variants"]
    checks = {
        "loss_finite": all(r.get("loss_finite", False) for r in v.values() if "losses" in r),
    }
    if "eyes_per_s" in v.get("amp", {}) and "eyes_per_s" in v.get("fp32", {}):
        prog.data["amp_speedup_vs_fp32"] = round(
            v["amp"]["eyes_per_s"] / v["fp32"]["eyes_per_s"], 3
        )
    prog.update(checks=checks)


# ---------------------------------------------------------------------------------------------
# OT step at the paper's shapes


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension z-score, as the model standardises features before its OT steps."""
    return (x - x.mean(0)) / (x.std(0) + 1e-5)


def _ot_step(batch: dict[str, torch.Tensor], gw_eps: float, fc_eps: float) -> dict[str, Any]:
    from rima_core.core.ot import feature_coupling, labeled_gw

    f, o, y_f, y_o = batch["f"], batch["o"], batch["y_f"], batch["y_o"]
    t_fo, i_fo = labeled_gw(f, y_f, o, y_o, epsilon=gw_eps)
    t_of, i_of = labeled_gw(o, y_o, f, y_f, epsilon=gw_eps)
    t_v, i_v = feature_coupling(o, f, t_of, epsilon=fc_eps, log=True)
    return {"t_fo": t_fo, "i_fo": i_fo, "t_of": t_of, "i_of": i_of, "t_v": t_v, "i_v": i_v}


def _gw_checks(t: torch.Tensor, y_a: torch.Tensor, y_b: torch.Tensor) -> dict[str, Any]:
    from rima_core.core.ot import class_marginals

    t64 = t.detach().double().cpu()
    ya, yb = y_a.cpu(), y_b.cpu()
    _, p, q = class_marginals(ya, yb, "share", torch.float64)
    cross = ya[:, None] != yb[None, :]
    return {
        "cross_label_mass": float(t64[cross].sum()),
        "marginal_error_l1": float((t64.sum(1) - p).abs().sum() + (t64.sum(0) - q).abs().sum()),
        "finite": bool(torch.isfinite(t64).all()),
    }


def _feature_checks(tv: torch.Tensor) -> dict[str, Any]:
    t64 = tv.detach().double().cpu()
    d_x, d_z = t64.shape
    return {
        "row_marginal_error_l1": float((t64.sum(1) - 1 / d_x).abs().sum()),
        "col_marginal_error_l1": float((t64.sum(0) - 1 / d_z).abs().sum()),
        "finite": bool(torch.isfinite(t64).all()),
    }


def _time_ot(
    batch: dict[str, torch.Tensor], device: torch.device, cfg: Any, deadline: float, tiny: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    from rima_core.core.ot import feature_coupling, labeled_gw

    gw_eps, fc_eps = cfg.ot.gw_epsilon, cfg.ot.feature_epsilon
    f, o, y_f, y_o = batch["f"], batch["o"], batch["y_f"], batch["y_o"]
    warm, runs = (2, 15) if device.type == "cuda" else (1, 3 if tiny else 5)

    # the deadline is shared by four timings: each gets a quarter of what is left
    def part_deadline() -> float:
        return time.time() + _time_left(deadline) / 4

    ms_fo, _ = timed_loop(lambda i: labeled_gw(f, y_f, o, y_o, epsilon=gw_eps), device, warm,
                          runs, part_deadline())  # fmt: skip
    ms_of, _ = timed_loop(lambda i: labeled_gw(o, y_o, f, y_f, epsilon=gw_eps), device, warm,
                          runs, part_deadline())  # fmt: skip
    t_of, _ = labeled_gw(o, y_o, f, y_f, epsilon=gw_eps)
    ms_fc, _ = timed_loop(lambda i: feature_coupling(o, f, t_of, epsilon=fc_eps), device, warm,
                          runs, part_deadline())  # fmt: skip
    ms_step, _ = timed_loop(lambda i: _ot_step(batch, gw_eps, fc_eps), device, warm, runs,
                            time.time() + _time_left(deadline))  # fmt: skip
    res = _ot_step(batch, gw_eps, fc_eps)
    timing = {
        "gw_fundus_to_oct": _ms_summary(ms_fo),
        "gw_oct_to_fundus": _ms_summary(ms_of),
        "feature_coupling": _ms_summary(ms_fc),
        "step": _ms_summary(ms_step),
        "gw_iterations": [res["i_fo"]["iterations"], res["i_of"]["iterations"]],
        "feature_iterations": res["i_v"]["iterations"],
        "converged": {
            "gw_fundus_to_oct": res["i_fo"]["converged"],
            "gw_oct_to_fundus": res["i_of"]["converged"],
            "feature_coupling": res["i_v"]["converged"],
        },
    }
    return timing, res


def part_ot(device: torch.device, tiny: bool, deadline: float, prog: Progress) -> None:
    from benchmarks.speed import paper_batch
    from rima_core.config import load_config

    cfg = load_config(PARAMS)
    if tiny:
        shape = {"n": 16, "d_f": 128, "d_o": 192, "class_sizes": (6, 5, 3, 2)}
    else:
        shape = {"n": 32, "d_f": 2048, "d_o": 6144, "class_sizes": (12, 9, 7, 4)}
    prog.update(
        shape=shape,
        gw_epsilon=cfg.ot.gw_epsilon,
        feature_epsilon=cfg.ot.feature_epsilon,
        features="benchmarks.speed.paper_batch, standardised per dimension",
    )
    cpu = paper_batch(seed=0, **shape)
    cpu = {k: _standardise(v) if k in ("f", "o") else v for k, v in cpu.items()}
    dev = {k: v.to(device) for k, v in cpu.items()}
    # the device first: it is the question; the CPU reference gets what is left
    timing, res = _time_ot(dev, device, cfg, time.time() + 0.6 * _time_left(deadline), tiny)
    prog.update(device_timing=timing, device=str(device))
    quality = {
        "gw_fundus_to_oct": _gw_checks(res["t_fo"], dev["y_f"], dev["y_o"]),
        "gw_oct_to_fundus": _gw_checks(res["t_of"], dev["y_o"], dev["y_f"]),
        "feature_coupling": _feature_checks(res["t_v"]),
    }
    prog.update(quality=quality)
    log.info("ot on %s: step %s", device, timing["step"])
    if device.type != "cpu":
        cpu_timing, cpu_res = _time_ot(cpu, torch.device("cpu"), cfg, deadline, tiny)
        prog.update(cpu_timing=cpu_timing, cpu_threads=torch.get_num_threads())
    else:  # the tiny check on a CPU: the reference is the same computation
        cpu_res = _ot_step(cpu, cfg.ot.gw_epsilon, cfg.ot.feature_epsilon)
    agreement = {
        name: float((res[name].detach().double().cpu() - cpu_res[name].double()).abs().sum())
        for name in ("t_fo", "t_of", "t_v")
    }
    prog.update(device_vs_cpu_l1=agreement)
    if "cpu_timing" in prog.data:
        prog.data["step_speedup_vs_cpu"] = round(
            prog.data["cpu_timing"]["step"]["median_ms"] / timing["step"]["median_ms"], 2
        )
    gw = [quality["gw_fundus_to_oct"], quality["gw_oct_to_fundus"]]
    fc = quality["feature_coupling"]
    checks = {
        "zero_cross_label_mass": all(q["cross_label_mass"] == 0.0 for q in gw),
        "gw_marginals": all(q["marginal_error_l1"] <= GW_MARGINAL_MAX for q in gw),
        "feature_marginals": max(fc["row_marginal_error_l1"], fc["col_marginal_error_l1"])
        <= FEATURE_MARGINAL_MAX,
        "finite": all(q["finite"] for q in [*gw, fc]),
        "device_agrees_with_cpu": all(v <= AGREEMENT_MAX for v in agreement.values()),
    }
    prog.update(checks=checks)


# ---------------------------------------------------------------------------------------------
# the normal engine on a small synthetic store


class _Interrupt(Exception):
    """Raised by the epoch callback to stop a run after a checkpoint, as a kill would."""


class ListTracker:
    """A metrics sink that is not MLflow: it only records what the engine logs."""

    def __init__(self) -> None:
        self.steps: list[int | None] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps.append(step)

    def epochs(self) -> list[int]:
        """The per-epoch logs (the engine may also log run-level metrics without a step)."""
        return [s for s in self.steps if s is not None]


def engine_config(device: torch.device, tiny: bool, epochs: int) -> Any:
    from rima_core.config import load_config

    profile = TINY_PROFILE if tiny else None
    return load_config(PARAMS, profile, [f"runtime.device={device.type}", f"train.epochs={epochs}"])


def _state_diff(a: Path, b: Path) -> float:
    from rima_core.core.models import load_model

    ma, _ = load_model(a)
    mb, _ = load_model(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    if sa.keys() != sb.keys():
        return math.inf
    return max(
        (float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel()),
        default=0.0,
    )


def part_engine(device: torch.device, tiny: bool, deadline: float, prog: Progress) -> None:
    import pandas as pd

    from rima_core.core.data.masks import scenario_names, simulate_missing
    from rima_core.core.data.prepare import prepare_store
    from rima_core.core.data.synthetic import generate
    from rima_core.runs.evaluate import evaluate
    from rima_core.runs.train import is_timing_column, train

    epochs = 3
    cfg = engine_config(device, tiny, epochs)
    work = Path(tempfile.mkdtemp(prefix="rima_gpu_check_"))
    timings: dict[str, float] = {}

    @contextlib.contextmanager
    def timed_stage(name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        timings[name] = round(time.perf_counter() - t0, 2)
        prog.update(seconds=timings)

    try:
        prog.update(
            synth={"n_eyes": cfg.synth.n_eyes, "fundus_size": cfg.synth.fundus_size,
                   "oct_shape": list(cfg.synth.oct_shape)},
            model=cfg.model.name, epochs=epochs, seconds=timings,
        )  # fmt: skip
        raw, store, masks = work / "raw", work / "store", work / "masks.parquet"
        with timed_stage("synth"):
            generate(raw, cfg.synth)
        with timed_stage("prepare"):
            prepare_store("auto", raw, store, cfg.prepare, "auto")
        with timed_stage("masks"):
            simulate_missing(store, masks, cfg.missing)
        _reset_memory(device)

        # run A: interrupted after epoch 2 (checkpoint on disk), then resumed
        tracker_a = ListTracker()

        def stop_after_2(epoch: int, _metrics: dict[str, float]) -> None:
            if epoch == 2:
                raise _Interrupt(f"interrupted after epoch {epoch}")

        run_a = work / "run_a"
        with timed_stage("train_until_interrupt"), contextlib.suppress(_Interrupt):
            train(store, masks, run_a, cfg, epoch_callback=stop_after_2, tracker=tracker_a)
        checkpoint_written = (run_a / "checkpoint.pt").is_file()
        tracker_resume = ListTracker()
        with timed_stage("train_resume"):
            summary = train(store, masks, run_a, cfg, resume=True, tracker=tracker_resume)
        prog.update(
            train_summary=summary,
            tracker_steps={"until_interrupt": tracker_a.steps, "resume": tracker_resume.steps},
            **_memory(device),
        )
        hist_a = pd.read_csv(run_a / "history.csv")

        with timed_stage("evaluate"):
            eval_dir = work / "eval"
            evaluate(run_a / "model.pt", store, masks, eval_dir, cfg)
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        expected = scenario_names(cfg.missing)
        prog.update(
            evaluate={
                "split": cfg.evaluate.split,
                "scenarios": list(metrics),
                "qwk": {s: metrics[s].get("qwk") for s in expected if s in metrics},
                "accuracy": {s: metrics[s].get("accuracy") for s in expected if s in metrics},
            }
        )
        engine_amp = amp_dtype_for(device, False)
        checks: dict[str, Any] = {
            "trained_on_device": summary["device"].startswith(device.type),
            "amp_dtype_as_engine_chooses": summary["amp_dtype"]
            == (str(engine_amp).replace("torch.", "") if engine_amp else None),
            "checkpoint_after_interrupt": checkpoint_written,
            "resume_continued_at_epoch_3": tracker_a.epochs() == [1, 2]
            and tracker_resume.epochs() == [3],
            "epochs_in_history": len(hist_a) == epochs,
            "losses_finite": bool(np.isfinite(hist_a["train/loss"]).all()),
            "every_scenario_evaluated": set(expected) <= set(metrics),
        }
        prog.update(checks=checks)

        # run B: the same run uninterrupted; on a CPU the engine promises identical results
        left = _time_left(deadline)
        need = 1.5 * (timings["train_until_interrupt"] + timings["train_resume"])
        if left < need:
            prog.update(resume_comparison={"skipped": f"{left:.0f} s left, ~{need:.0f} needed"})
            return
        run_b = work / "run_b"
        with timed_stage("train_uninterrupted"):
            train(store, masks, run_b, cfg, tracker=ListTracker())
        hist_b = pd.read_csv(run_b / "history.csv")
        cols = [c for c in hist_a.columns if not is_timing_column(c)]
        same_history = list(hist_a.columns) == list(hist_b.columns) and hist_a[cols].equals(
            hist_b[cols]
        )
        weights_diff = _state_diff(run_a / "model.pt", run_b / "model.pt")
        prog.update(
            resume_comparison={
                "history_identical": bool(same_history),
                "max_abs_weight_diff": weights_diff,
                "note": "bit-identical expected on CPU; CUDA kernels need not be deterministic",
            }
        )
        if device.type == "cpu":
            checks["resume_identical_on_cpu"] = bool(same_history) and weights_diff == 0.0
            prog.update(checks=checks)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# torch.compile on/off


def _compile_encoders(model: torch.nn.Module, backend: str) -> list[str]:
    """Compile every encoder in place (most of the step's FLOPs; no OT, no host syncs inside)."""
    from rima_core.core.models.encoders import Encoder

    names = [n for n, m in model.named_modules() if isinstance(m, Encoder)]
    for name in names:
        model.get_submodule(name).compile(backend=backend)
    return names


def _compile_model(model: torch.nn.Module, backend: str) -> list[str]:
    """Compile the whole model in place (the OT solver's loops and host syncs break the graph)."""
    model.compile(backend=backend)
    return ["<whole model>"]


def _first_step_seconds(step: Callable, batch: dict, device: torch.device) -> float:
    t0 = time.perf_counter()
    step(batch)
    _sync(device)
    return round(time.perf_counter() - t0, 2)


def part_compile(device: torch.device, tiny: bool, deadline: float, prog: Progress) -> None:
    # tiny: the small default model (compiling Res2Net-50 on a 2-core CPU takes minutes); the
    # paper backbones are exercised by paper_train
    cfg = engine_config(device, tiny, 1) if tiny else paper_config(tiny)
    dtype = amp_dtype_for(device, tiny)
    batches = synthetic_batches(cfg, device)
    warmup, max_steps = _step_counts(device, tiny, (2, 8))
    # tiny CPU run: dynamo + AOT autograd without code generation (inductor's C++ build of the
    # step takes minutes on a shared 2-core machine); it still proves the model traces
    backend = "aot_eager" if tiny and device.type == "cpu" else "inductor"
    prog.update(
        backend=backend,
        model={k: getattr(cfg.model, k) for k in ("name", "fundus_encoder", "oct_encoder")},
        amp_dtype=str(dtype).replace("torch.", "") if dtype else None,
        batch_size=cfg.train.batch_size,
        variants={},
    )
    # the same weights for every variant: one model built, its state copied into each
    base_state = build_model_for(cfg, device).state_dict()
    variants = {
        "eager": None,
        "compiled_encoders": _compile_encoders,
        "compiled_model": _compile_model,
    }
    for name, how in variants.items():
        left = _time_left(deadline)
        if name != "eager" and left < 30:
            prog.data["variants"][name] = {"skipped": f"only {left:.0f} s left in the budget"}
            prog.flush()
            continue
        model = build_model_for(cfg, device)
        model.load_state_dict(base_state)
        entry: dict[str, Any] = {}
        try:
            if how is not None:
                entry["compiled"] = how(model, backend)
                step = make_step(model, cfg, device, dtype)
                model.train()
                entry["first_step_seconds_incl_compile"] = _first_step_seconds(
                    step, batches[0], device
                )
            share = time.time() + _time_left(deadline) / (
                len(variants) - len(prog.data["variants"])
            )
            entry.update(
                measure_steps(model, cfg, device, dtype, batches, share, warmup, max_steps)
            )
        except Exception as exc:  # a compile failure is an answer, not a crash of the check
            first_line = str(exc).splitlines()[0][:500] if str(exc) else ""
            entry.update(skipped=f"{type(exc).__name__}: {first_line}")
            log.warning("compile variant %s failed: %s", name, entry["skipped"])
        prog.data["variants"][name] = entry
        prog.flush()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
    v = prog.data["variants"]
    eager = v.get("eager", {}).get("eyes_per_s")
    for name in ("compiled_encoders", "compiled_model"):
        if eager and v.get(name, {}).get("eyes_per_s"):
            v[name]["speedup_vs_eager"] = round(v[name]["eyes_per_s"] / eager, 3)
    prog.update(
        checks={"loss_finite": all(r.get("loss_finite", True) for r in v.values())},
        helps=any(r.get("speedup_vs_eager", 0) > 1.05 for r in v.values()),
    )


# ---------------------------------------------------------------------------------------------
# orchestration: one child process per part, results merged after each


PARTS: dict[str, tuple[Callable[[torch.device, bool, float, Progress], None], float]] = {
    # name: (function, share of the global budget in seconds at the default 420 s)
    "paper_train": (part_paper_train, 130.0),
    "ot": (part_ot, 40.0),
    "engine": (part_engine, 100.0),
    "compile": (part_compile, 150.0),  # inductor compiles of two backbones take a while
}
DEFAULT_BUDGET_S = 420.0
MIN_PART_SECONDS = 20.0  # a part is not started with less than this left


def run_child(part: str, device_name: str, tiny: bool, deadline: float, progress: Path) -> int:
    """Entry point of a part's process: run it, record success or the error, exit 0/1."""
    prog = Progress(progress)
    prog.update(status="running", absent_packages_importable=_absent_importable())
    device = torch.device(device_name)
    fn, _ = PARTS[part]
    t0 = time.perf_counter()
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch sees no CUDA device")
        fn(device, tiny, deadline, prog)
        checks = prog.data.get("checks", {})
        failed = [k for k, ok in checks.items() if ok is not True]
        status = "ok" if not failed else "checks_failed"
        prog.update(status=status, failed_checks=failed)
        code = 0
    except Exception as exc:
        prog.update(
            status="error",
            error=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc().splitlines()[-25:],
        )
        log.exception("part %s failed", part)
        code = 1
    prog.update(seconds_in_part=round(time.perf_counter() - t0, 2))
    return code


def _render_md(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# GPU check",
        "",
        f"`python benchmarks/gpu_check.py {' '.join(results['argv'])}`: "
        f"{m.get('gpu', 'no GPU')} · torch {m['torch']} (CUDA {m.get('cuda')}) · "
        f"Python {m['python']} · {m['cpu_count']} CPUs · status **{results['status']}** "
        f"after {results['elapsed_s']:.0f} s of a {results['budget_s']:.0f} s budget.",
        "",
        "| part | status | seconds | headline |",
        "| --- | --- | ---: | --- |",
    ]
    for name, p in results["parts"].items():
        lines.append(
            f"| {name} | {p.get('status')} | {p.get('wall_seconds', '')} | {_headline(name, p)} |"
        )
    for name, p in results["parts"].items():
        lines += ["", f"## {name}", ""]
        if p.get("error"):
            lines += [f"Error: `{p['error']}`", ""]
        if p.get("failed_checks"):
            lines += [f"Failed checks: {', '.join(p['failed_checks'])}", ""]
        lines += _part_md(name, p)
    return "\n".join(lines) + "\n"


def _headline(name: str, p: dict[str, Any]) -> str:
    try:
        if name == "paper_train":
            v = p["variants"]
            return "; ".join(
                f"{k}: {r['eyes_per_s']} eyes/s, "
                + ", ".join(
                    f"{m} {r[m]} MB" for m in ("peak_allocated_mb", "peak_rss_mb") if m in r
                )
                for k, r in v.items()
                if "eyes_per_s" in r
            )
        if name == "ot":
            s = f"step {p['device_timing']['step']['median_ms']} ms on {p['device']}"
            if "cpu_timing" in p:
                s += f", {p['cpu_timing']['step']['median_ms']} ms on CPU"
            return s
        if name == "engine":
            q = p["evaluate"]["qwk"]
            return f"{len(q)} scenarios evaluated; test QWK complete {q.get('complete')}"
        if name == "compile":
            return "; ".join(
                f"{k}: {r.get('eyes_per_s', 'skipped')}" for k, r in p["variants"].items()
            )
    except (KeyError, TypeError):
        pass
    return ""


def _part_md(name: str, p: dict[str, Any]) -> list[str]:
    body = {k: v for k, v in p.items() if k not in ("traceback", "status", "error")}
    return ["```json", json.dumps(body, indent=1)[:6000], "```"]


def orchestrate(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    budget = float(args.budget)
    scale = budget / DEFAULT_BUDGET_S
    results: dict[str, Any] = {
        "argv": sys.argv[1:],
        "budget_s": budget,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
        "machine": machine_info(args.device),
        "parts": {},
        "status": "running",
        "elapsed_s": 0.0,
    }

    def flush() -> None:
        results["elapsed_s"] = round(time.time() - t_start, 1)
        write_text(out / f"{RESULT_NAME}.json", json.dumps(_jsonable(results), indent=2) + "\n")
        write_text(out / f"{RESULT_NAME}.md", _render_md(_jsonable(results)))

    flush()
    log_path = out / f"{RESULT_NAME}.log"
    log_path.write_text("")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("TQDM_MININTERVAL", "10")  # progress bars: a line now and then in the log
    with tempfile.TemporaryDirectory(prefix="rima_gpu_check_parts_") as tmp:
        for part in args.parts:
            left = budget - (time.time() - t_start)
            if left < MIN_PART_SECONDS:
                results["parts"][part] = {"status": "skipped", "reason": "global budget spent"}
                flush()
                continue
            timeout = min(PARTS[part][1] * scale, left)
            # the part's own loops stop at 85 % of its time, leaving room to write and exit
            soft_deadline = time.time() + 0.85 * timeout
            progress = Path(tmp) / f"{part}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", part,
                   "--device", args.device, "--deadline", f"{soft_deadline:.3f}",
                   "--progress", str(progress), *(["--tiny"] if args.tiny else [])]  # fmt: skip
            log.info("part %s: up to %.0f s", part, timeout)
            t0 = time.time()
            with log_path.open("a") as logf:
                logf.write(f"\n===== part {part} =====\n")
                logf.flush()
                try:
                    proc = subprocess.run(
                        cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout,
                        cwd=ROOT,
                    )  # fmt: skip
                    code: int | None = proc.returncode
                except subprocess.TimeoutExpired:
                    code = None
            entry = json.loads(progress.read_text()) if progress.exists() else {}
            if code is None:
                entry["status"] = "timeout"
                entry["reason"] = f"killed after its {timeout:.0f} s budget"
            elif entry.get("status") in (None, "running"):
                entry["status"] = "error"
                entry["error"] = f"the part's process exited with code {code}"
            entry["wall_seconds"] = round(time.time() - t0, 1)
            results["parts"][part] = entry
            log.info("part %s: %s in %.0f s", part, entry["status"], entry["wall_seconds"])
            flush()
    statuses = [p["status"] for p in results["parts"].values()]
    results["status"] = "ok" if all(s == "ok" for s in statuses) else "incomplete"
    flush()
    log.info("%s -> %s", results["status"], out / f"{RESULT_NAME}.md")
    return 0 if results["status"] == "ok" else 1


def default_out() -> Path:
    return (
        Path(os.environ["OUT"])
        if os.environ.get("OUT")
        else ROOT / "benchmarks" / "results" / RESULT_NAME
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU self-test")
    p.add_argument("--out", type=Path, default=None, help="default: $OUT, else " +
                   f"benchmarks/results/{RESULT_NAME}/")  # fmt: skip
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help="global time budget in seconds; parts get shares of it")  # fmt: skip
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--child", choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--progress", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.out is None:
        args.out = default_out()
    if args.device not in ("cuda", "cpu"):
        p.error(f"--device must be cuda or cpu, got {args.device!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.child:
        return run_child(args.child, args.device, args.tiny, args.deadline, args.progress)
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
