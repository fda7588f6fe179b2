"""Speed of the RIMA optimal-transport step at the paper's shapes, ours vs numpy and POT.

Re-run the OT sections (one line, from the repository root, on an otherwise idle machine):

    .venv/bin/python benchmarks/speed.py --sections ot_step ot

Why: the OT step runs on every training batch. The authors' route (OTT-JAX called eagerly,
numpy round trips, the feature Sinkhorn solved twice in float64) costs ~10 s per batch on a CPU.
This measures ``rima_core.core.ot`` on the paper's shapes — batch 32, fundus features d_f = 2048,
OCT features d_o = 6144, 4 classes of unequal size — on the *same inputs* against

* (section ``ot_step``, ``results/ot_speed.{md,json}``) a plain, independent float32 numpy
  implementation (``benchmarks/ot_reference.py``) with its own natural stopping rule (stop at
  the first iteration whose marginals are within L1 1e-3), for the OT step as
  ``RimaModel._alignment`` runs it (GW fundus->OCT with the library's default stopping rules,
  then the feature coupling), interleaved run by run in one process, at torch's thread count
  and at one thread, at the paper's and at params.yaml's default shapes; both must reach the
  accuracy a training step needs (marginals L1 < 1e-3, GW energy within 2 % of a tight solve),
  and the library's time is broken down by part (target: at most ``TARGET_RATIO`` times the
  numpy time at the paper's shapes);
* POT, labeled GW, each direction (fundus->OCT and OCT->fundus): ours vs
  ``ot.gromov.entropic_fused_gromov_wasserstein`` with a label-mismatch cost
  ``M = 1e3 * [y_i != y_j]``, ``alpha = 0.5`` and ``epsilon_pot = 2 * alpha * epsilon = epsilon``
  (POT's kernel uses the GW gradient ``2 L(T)``, see ``rima_core/core/ot/``). POT runs stock:
  float64 numpy, its own product initialisation, ``tol`` = our outer ``tol`` (POT measures the
  Frobenius norm of the change every 10 outer iterations, ours the L1 norm every iteration),
  inner ``stopThr`` = our inner tolerance.
* POT, feature coupling (6144 × 2048, given the OCT->fundus sample coupling): ours vs
  ``ot.sinkhorn`` (float64 numpy, ``method="sinkhorn"``) on the same max-scaled COOT cost,
  ``reg`` = epsilon, ``stopThr`` = our ``tol`` (POT: L2 of the column marginal every 10
  iterations; ours: L1 of both marginals, every iteration on the CPU at this size).

Features are class-clustered with a shared per-eye latent signal (fundus and OCT of an eye are
two random non-linear views of the same latent), so couplings are not trivially uniform.
Timings are medians over ``--repeats`` runs after ``--warmup`` untimed runs; on a shared machine
they scale with its load, which is recorded. Torch's thread count is the process default except
where a measurement says otherwise; ``rima_core.core.ot`` itself runs small problems (labeled GW at
these shapes) on one thread (its ``num_threads`` policy).

    python benchmarks/speed.py [--device cpu|cuda] [--repeats 7] [--sections ot_step ot train]

Writes one ``.md``/``.json`` pair per section to ``benchmarks/results/``: ``ot_speed`` for
``ot_step``, ``speed_<section>`` for the others (sections are functions registered in
``SECTIONS``, so another measurement can be added beside these).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import ot_reference  # noqa: E402
from rima_core.atomic import write_text  # noqa: E402
from rima_core.core.ot import class_marginals, feature_coupling, gw_energy, labeled_gw  # noqa: E402

log = logging.getLogger("benchmarks.speed")

RESULTS = ROOT / "benchmarks" / "results"

# targets from the issue; reported next to the measurements, never used to fake them
TARGET_GW_MS = 15.0
TARGET_STEP_MS = 300.0
TARGET_RATIO = 1.2  # OT step time / the plain numpy reference's (same accuracy), one process


# ---------------------------------------------------------------------------------------------
# shared helpers


def paper_batch(
    seed: int = 0,
    n: int = 32,
    d_f: int = 2048,
    d_o: int = 6144,
    class_sizes: tuple[int, ...] = (12, 9, 7, 4),
    latent: int = 16,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """A synthetic training batch: post-ReLU features of two modalities sharing a latent per eye."""
    if sum(class_sizes) != n:
        raise ValueError(f"class sizes {class_sizes} do not add up to the batch size {n}")
    g = torch.Generator().manual_seed(seed)
    y = torch.repeat_interleave(torch.arange(len(class_sizes)), torch.tensor(class_sizes))
    y = y[torch.randperm(n, generator=g)]
    centers = 2.0 * torch.randn(len(class_sizes), latent, generator=g)
    s = centers[y] + torch.randn(n, latent, generator=g)  # class signal + per-eye signal
    a_f = torch.randn(latent, d_f, generator=g) / latent**0.5
    a_o = torch.randn(latent, d_o, generator=g) / latent**0.5
    f = torch.relu(s @ a_f + 0.5 * torch.randn(n, d_f, generator=g))
    o = torch.relu(s @ a_o + 0.5 * torch.randn(n, d_o, generator=g))
    return {k: v.to(device) for k, v in {"f": f, "o": o, "y_f": y, "y_o": y.clone()}.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], repeats: int, warmup: int, device: str) -> tuple[Any, list[float]]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; returns (last result, ms)."""
    out = None
    for _ in range(warmup):
        out = fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return out, times


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _ms(times: list[float]) -> dict[str, Any]:
    """Median (the reported figure) plus the minimum: on a loaded machine the minimum is the
    better estimate of the uncontended cost, the median of what a training run sees."""
    return {
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "runs_ms": [round(t, 3) for t in times],
    }


# ---------------------------------------------------------------------------------------------
# OT section


def _scaled_sqdist_np(x: np.ndarray) -> np.ndarray:
    import ot as pot

    c = pot.dist(x, x, metric="sqeuclidean")
    return c / c.max()


def _gw_quality(t: np.ndarray, y_a: np.ndarray, y_b: np.ndarray, cx, cz) -> dict[str, float]:
    """Marginal error against the class-balanced marginals, cross-label mass, GW energy."""
    _, p, q = class_marginals(torch.tensor(y_a), torch.tensor(y_b), "share", torch.float64)
    t64 = torch.tensor(np.asarray(t, dtype=np.float64))
    return {
        "marginal_error_l1": float((t64.sum(1) - p).abs().sum() + (t64.sum(0) - q).abs().sum()),
        "cross_label_mass": float(t64[torch.tensor(y_a[:, None] != y_b[None, :])].sum()),
        "cross_label_max_entry": float(t64[torch.tensor(y_a[:, None] != y_b[None, :])].max()),
        "objective": float(gw_energy(torch.tensor(cx), torch.tensor(cz), t64)),
    }


def _pot_gw(a: np.ndarray, y_a: np.ndarray, b: np.ndarray, y_b: np.ndarray, args) -> np.ndarray:
    """POT's stock entropic FGW with the label-mismatch cost; builds its costs as a user would."""
    import ot as pot

    _, p, q = class_marginals(torch.tensor(y_a), torch.tensor(y_b), "share", torch.float64)
    cx, cz = _scaled_sqdist_np(a), _scaled_sqdist_np(b)
    m = 1e3 * (y_a[:, None] != y_b[None, :]).astype(np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pot.gromov.entropic_fused_gromov_wasserstein(
            m, cx, cz, p.numpy(), q.numpy(), epsilon=args.gw_epsilon, alpha=0.5,
            max_iter=args.gw_max_iter, tol=args.gw_tol, stopThr=args.gw_inner_tol,
        )  # fmt: skip


def _coot_cost_np(x: np.ndarray, z: np.ndarray, t: np.ndarray) -> np.ndarray:
    m = (x * x).T @ t.sum(1)[:, None] + ((z * z).T @ t.sum(0))[None, :] - 2.0 * (x.T @ t @ z)
    np.maximum(m, 0.0, out=m)
    return m / m.max()


def _feature_quality(tv: np.ndarray, cost: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Marginal errors, <M, T_v>, and the L1 distance to a tightly converged solution."""
    tv = np.asarray(tv, dtype=np.float64)
    d_x, d_z = tv.shape
    return {
        "row_marginal_error_l1": float(np.abs(tv.sum(1) - 1 / d_x).sum()),
        "col_marginal_error_l1": float(np.abs(tv.sum(0) - 1 / d_z).sum()),
        "transport_cost": float((tv * cost).sum()),
        "l1_to_converged": float(np.abs(tv - ref).sum()),
        "nan": bool(np.isnan(tv).any()),
    }


def _ours_gw(times, t, info, y_a, y_b, c_a, c_b) -> dict[str, Any]:
    return {
        **_ms(times),
        **_gw_quality(t.cpu().numpy(), y_a, y_b, c_a, c_b),
        "iterations": info["iterations"],
        "sinkhorn_iterations": info["sinkhorn_iterations"],
        "converged": info["converged"],
    }


def _small_matmul_us(n: int = 32, repeats: int = 51) -> float:
    """Median latency of one n×n product: the diagnostic for thread stalls on a loaded machine."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(1e6 * (time.perf_counter() - start))
    return statistics.median(times)


def _time_ours(batch: dict[str, torch.Tensor], gw_kw: dict, fc_kw: dict, args) -> tuple:
    """Time labeled GW both ways, the feature coupling, and the whole step end to end."""
    f, o, y_f, y_o, dev = batch["f"], batch["o"], batch["y_f"], batch["y_o"], args.device
    (t_fo, i_fo), ms_fo = timed(lambda: labeled_gw(f, y_f, o, y_o, **gw_kw), args.repeats,
                                args.warmup, dev)  # fmt: skip
    (t_of, i_of), ms_of = timed(lambda: labeled_gw(o, y_o, f, y_f, **gw_kw), args.repeats,
                                args.warmup, dev)  # fmt: skip
    (t_v, i_v), ms_v = timed(lambda: feature_coupling(o, f, t_of, log=True, **fc_kw),
                             args.repeats, args.warmup, dev)  # fmt: skip

    def step():
        t1, _ = labeled_gw(f, y_f, o, y_o, **gw_kw)
        t2, _ = labeled_gw(o, y_o, f, y_f, **gw_kw)
        return feature_coupling(o, f, t2, **fc_kw), t1

    _, ms_step = timed(step, args.repeats, args.warmup, dev)
    log.info("ours (%d threads): gw f->o %.1f ms, o->f %.1f ms, feature %.1f ms, step %.1f ms",
             torch.get_num_threads(), statistics.median(ms_fo), statistics.median(ms_of),
             statistics.median(ms_v), statistics.median(ms_step))  # fmt: skip
    return (t_fo, i_fo, ms_fo), (t_of, i_of, ms_of), (t_v, i_v, ms_v), ms_step


# ---------------------------------------------------------------------------------------------
# OT step vs the plain numpy reference (section "ot_step": benchmarks/results/ot_speed.{md,json})

# shapes of the comparison: the paper's (ResNet-50 fundus, 3-D OCT features) and params.yaml's
STEP_SHAPES = {"paper": (2048, 6144), "default": (128, 192)}
ACCURACY = {"marginal_l1": 1e-3, "gw_energy_rel": 0.02}  # what a training step needs


def _alignment_step(batch: dict[str, torch.Tensor], gw_eps: float, fc_eps: float) -> Callable:
    """The OT step exactly as ``RimaModel._alignment`` runs it: labeled GW fundus->OCT with the
    library's default stopping rules, then the feature coupling ``T_v`` given ``T.T``."""
    f, o, y_f, y_o = batch["f"], batch["o"], batch["y_f"], batch["y_o"]

    def step() -> tuple[Any, Any]:
        t, info = labeled_gw(f, y_f, o, y_o, epsilon=gw_eps)
        tv, tv_info = feature_coupling(o, f, t.T, epsilon=fc_eps, log=True)
        return (t, tv), {"gw": info, "feature": tv_info}

    return step


def _reference_step(batch: dict[str, torch.Tensor], gw_eps: float, fc_eps: float) -> Callable:
    """The same step in the plain numpy implementation, with its own stopping rule."""
    f, o = batch["f"].cpu().numpy(), batch["o"].cpu().numpy()
    y_f, y_o = batch["y_f"].cpu().numpy(), batch["y_o"].cpu().numpy()

    def step() -> tuple[Any, Any]:
        t, info = ot_reference.labeled_gw(f, y_f, o, y_o, epsilon=gw_eps)
        tv, tv_its = ot_reference.feature_coupling(o, f, t.T, epsilon=fc_eps)
        return (t, tv), {"gw": info, "feature": {"iterations": tv_its}}

    return step


def _step_accuracy(batch: dict[str, torch.Tensor], couplings: dict[str, Any], gw_eps: float,
                   fc_eps: float) -> dict[str, Any]:  # fmt: skip
    """Both solutions against the accuracy criterion and against tight solves (float64)."""
    f, o = batch["f"].double().cpu().numpy(), batch["o"].double().cpu().numpy()
    y_f, y_o = batch["y_f"].cpu().numpy(), batch["y_o"].cpu().numpy()
    t_tight, tight = labeled_gw(f, y_f, o, y_o, epsilon=gw_eps, tol=1e-10, inner_tol=1e-11,
                                max_iter=1000, inner_max_iter=20000)  # fmt: skip
    _, p, q = ot_reference.share_marginals(y_f, y_o)
    cf, co = ot_reference.scaled_sqdist(f), ot_reference.scaled_sqdist(o)
    cost = _coot_cost_np(o, f, np.asarray(t_tight).T)
    tv_tight = feature_coupling(o, f, t_tight.T, epsilon=fc_eps, tol=1e-9, max_iter=20000,
                                relax=1.0)  # fmt: skip
    out: dict[str, Any] = {
        "gw_energy_tight": tight["objective"],
        "feature_cost_tight": float((tv_tight * cost).sum()),
    }
    for who, (t, tv) in couplings.items():
        t = np.asarray(t.cpu().numpy() if isinstance(t, torch.Tensor) else t, np.float64)
        tv = np.asarray(tv.cpu().numpy() if isinstance(tv, torch.Tensor) else tv, np.float64)
        d_x, d_z = tv.shape
        energy = ot_reference.gw_energy(cf, co, t)
        out[who] = {
            "gw_marginal_l1": float(np.abs(t.sum(1) - p).sum() + np.abs(t.sum(0) - q).sum()),
            "gw_energy": energy,
            "gw_energy_rel_to_tight": (energy - tight["objective"]) / tight["objective"],
            "feature_marginal_l1": float(
                np.abs(tv.sum(1) - 1 / d_x).sum() + np.abs(tv.sum(0) - 1 / d_z).sum()
            ),
            # <M, T_v> on the tight GW coupling's cost: informational (T differs slightly)
            "feature_cost_rel_to_tight": float((tv * cost).sum()) / out["feature_cost_tight"] - 1,
        }
        r = out[who]
        r["meets_criterion"] = bool(
            r["gw_marginal_l1"] < ACCURACY["marginal_l1"]
            and r["feature_marginal_l1"] < ACCURACY["marginal_l1"]
            and abs(r["gw_energy_rel_to_tight"]) <= ACCURACY["gw_energy_rel"]
        )
    e_ours, e_ref = out["ours"]["gw_energy"], out["reference"]["gw_energy"]
    out["gw_energy_ours_vs_reference_rel"] = (e_ours - e_ref) / e_ref
    out["both_meet_criterion"] = bool(
        out["ours"]["meets_criterion"] and out["reference"]["meets_criterion"]
        and abs(out["gw_energy_ours_vs_reference_rel"]) <= ACCURACY["gw_energy_rel"]
    )  # fmt: skip
    return out


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _breakdown(batch: dict[str, torch.Tensor], gw_eps: float, fc_eps: float, info: dict,
               repeats: int) -> dict[str, float]:  # fmt: skip
    """Where the library's step time goes, each part timed on its own (median ms).

    GW: the problem set-up (costs, marginals, the constant cost term: once per solve) and the
    mirror-descent loop (all its cost-matrix products ``C_x T C_z``, kernels and Sinkhorn
    iterations). Feature step: the cost product, the shifted log-kernel (row/column minima, max),
    the ``exp`` of the kernel, the Sinkhorn mat-vecs (2 per iteration, times the iterations of
    this solve), the convergence tests (one per ``check_every`` iterations, each ending in a
    host sync), and writing the returned coupling. ``other`` = the step minus the parts.
    """
    from rima_core.core import ot as lib

    f, o, y_f, y_o = batch["f"], batch["o"], batch["y_f"], batch["y_o"]
    with lib._thread_policy(None, 32 * 32, f.device):
        xt, zt, lx, lz, _ = lib._gw_inputs(f, y_f, o, y_o)
        gw_setup = _median_ms(lambda: lib._gw_problem(xt, zt, lx, lz, "share"), repeats)
    gw_total = _median_ms(lambda: labeled_gw(f, y_f, o, y_o, epsilon=gw_eps), repeats)
    t = labeled_gw(f, y_f, o, y_o, epsilon=gw_eps)[0].T.contiguous()
    d_x, d_z = o.shape[1], f.shape[1]
    ws = lib.Workspace()
    m = ws.matrix("c", (d_x, d_z), o.dtype, o.device)
    k = ws.matrix("k", (d_x, d_z), o.dtype, o.device)
    u, v = torch.rand(d_x), torch.rand(d_z)
    p, q = torch.full((d_x,), 1 / d_x), torch.full((d_z,), 1 / d_z)
    its = info["feature"]["iterations"]
    every = lib._check_interval(None, o.device, "feature_coupling", d_x * d_z)
    n_checks = its // every + (its % every != 0)
    floor = float(np.log(np.finfo(np.float32).tiny) + 1.0)

    kv, ktu = k @ v, k.T @ u

    def check() -> list[float]:  # the test of rima_core.core.ot._sinkhorn_kernel
        smallest = torch.minimum(u.min(), v.min())
        return torch.stack([(u * kv - p).abs().sum() + (v * ktu - q).abs().sum(),
                            torch.maximum(u.max(), v.max()), 1.0 / smallest]).tolist()  # fmt: skip

    with lib._thread_policy(None, d_x * d_z, o.device):
        parts = {
            "feature_cost_product": _median_ms(lambda: lib.feature_cost(o, f, t, out=m), repeats),
            # in place: repeats work on an already shifted matrix, the same passes over it
            "feature_log_kernel": _median_ms(lambda: lib._feature_log_kernel(m, fc_eps), repeats),
            "feature_exp": _median_ms(lambda: lib._build_kernel(m, None, None, floor, k), repeats),
            "feature_matvecs": its * _median_ms(lambda: (k @ v, k.T @ u), repeats),
            "feature_checks": n_checks * _median_ms(check, repeats),
            "feature_write_coupling": _median_ms(
                lambda: torch.mul(k, u[:, None], out=lib._empty((d_x, d_z), k.dtype, k.device)),
                repeats,
            ),
        }
    feature_total = _median_ms(lambda: feature_coupling(o, f, t, epsilon=fc_eps), repeats)
    return {
        "gw_total": gw_total,
        "gw_setup": gw_setup,
        "gw_iterations": gw_total - gw_setup,
        "feature_total": feature_total,
        **parts,
        "feature_other": feature_total - sum(parts.values()),
        "feature_check_every": every,
        "feature_n_checks": n_checks,
    }


def _reference_parts(batch: dict[str, torch.Tensor], gw_eps: float, fc_eps: float,
                     repeats: int) -> dict[str, float]:  # fmt: skip
    """The numpy reference's two halves, timed on their own (median ms)."""
    f, o = batch["f"].cpu().numpy(), batch["o"].cpu().numpy()
    y_f, y_o = batch["y_f"].cpu().numpy(), batch["y_o"].cpu().numpy()
    t = np.ascontiguousarray(ot_reference.labeled_gw(f, y_f, o, y_o, epsilon=gw_eps)[0].T)
    return {
        "gw_total": _median_ms(
            lambda: ot_reference.labeled_gw(f, y_f, o, y_o, epsilon=gw_eps), repeats
        ),
        "feature_total": _median_ms(
            lambda: ot_reference.feature_coupling(o, f, t, epsilon=fc_eps), repeats
        ),
    }


def _versus_reference(batch: dict[str, torch.Tensor], args: argparse.Namespace) -> dict:
    """Ours vs the numpy reference, interleaved run by run, at torch's threads and at 1 thread.

    Interleaving (alternating which goes first) makes the comparison fair on a loaded machine:
    both see the same load, and the per-pair ratio cancels slow drifts. numpy's BLAS gets the
    same thread count as torch (threadpoolctl), so "1 thread" means one thread for both.
    """
    from threadpoolctl import threadpool_limits

    gw_eps, fc_eps = args.gw_epsilon, args.feature_epsilon
    ours, ref = _alignment_step(batch, gw_eps, fc_eps), _reference_step(batch, gw_eps, fc_eps)
    (c_ours, i_ours), (c_ref, i_ref) = ours(), ref()
    # determinism: the same inputs give bit-identical couplings
    again = ours()[0]
    out: dict[str, Any] = {
        "shape": {
            "batch": int(batch["f"].shape[0]),
            "d_f": int(batch["f"].shape[1]),
            "d_o": int(batch["o"].shape[1]),
        },
        "iterations_ours": {
            "gw_outer": i_ours["gw"]["iterations"],
            "gw_sinkhorn": i_ours["gw"]["sinkhorn_iterations"],
            "feature_sinkhorn": i_ours["feature"]["iterations"],
        },
        "iterations_reference": {
            "gw_outer": i_ref["gw"]["iterations"],
            "gw_sinkhorn": i_ref["gw"]["sinkhorn_iterations"],
            "feature_sinkhorn": i_ref["feature"]["iterations"],
        },
        "bit_identical_rerun": bool(
            torch.equal(again[0], c_ours[0]) and torch.equal(again[1], c_ours[1])
        ),
        "accuracy": _step_accuracy(batch, {"ours": c_ours, "reference": c_ref}, gw_eps, fc_eps),
        "target_ratio": TARGET_RATIO,
        "by_threads": {},
    }
    default = torch.get_num_threads()
    for threads in dict.fromkeys((default, 1)):
        torch.set_num_threads(threads)
        try:
            with threadpool_limits(threads):
                for _ in range(args.warmup):
                    ours(), ref()
                ms = {"ours": [], "reference": []}
                for rep in range(args.repeats):
                    order = (("ours", ours), ("reference", ref))
                    for name, fn in order if rep % 2 == 0 else order[::-1]:
                        start = time.perf_counter()
                        fn()
                        _sync(args.device)
                        ms[name].append(1e3 * (time.perf_counter() - start))
                reps = max(5, args.repeats // 2)
                breakdown = _breakdown(batch, gw_eps, fc_eps, i_ours, reps)
                ref_parts = _reference_parts(batch, gw_eps, fc_eps, reps)
        finally:
            torch.set_num_threads(default)
        ratios = [a / b for a, b in zip(ms["ours"], ms["reference"], strict=True)]
        out["by_threads"][str(threads)] = {
            "ours": _ms(ms["ours"]),
            "reference": _ms(ms["reference"]),
            "ratio_of_medians": statistics.median(ms["ours"]) / statistics.median(ms["reference"]),
            "ratio_of_minima": min(ms["ours"]) / min(ms["reference"]),
            "median_pairwise_ratio": statistics.median(ratios),
            "breakdown_ms": breakdown,
            "reference_breakdown_ms": ref_parts,
        }
        log.info("OT step %s vs numpy reference, %d thread(s): %.1f vs %.1f ms (ratio %.2f)",
                 out["shape"], threads, statistics.median(ms["ours"]),
                 statistics.median(ms["reference"]), statistics.median(ratios))  # fmt: skip
    return out


def bench_ot_step(args: argparse.Namespace) -> dict[str, Any]:
    """The OT step vs the plain numpy reference at the paper's and the default shapes."""
    res: dict[str, Any] = {
        "config": {"gw_epsilon": args.gw_epsilon, "feature_epsilon": args.feature_epsilon,
                   "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
                   "accuracy": ACCURACY, "command": " ".join(["python", *sys.argv])},
        "shapes": {},
    }  # fmt: skip
    for name, (d_f, d_o) in STEP_SHAPES.items():
        batch = paper_batch(seed=args.seed, d_f=d_f, d_o=d_o, device=args.device)
        res["shapes"][name] = _versus_reference(batch, args)
    return res


_PARTS = (
    ("gw_setup", "GW set-up: costs, marginals, constant cost term (once per solve)"),
    ("gw_iterations", "GW mirror-descent loop: `C_x T C_z` products, kernels, Sinkhorn"),
    ("feature_cost_product", "feature cost product (one `mm` of augmented factors)"),
    ("feature_log_kernel", "feature log-kernel: row/column minima, max, shift"),
    ("feature_exp", "feature kernel `exp` (floored)"),
    ("feature_matvecs", "feature Sinkhorn mat-vecs (2 per iteration)"),
    ("feature_checks", "feature convergence tests (each a host sync)"),
    ("feature_write_coupling", "writing the returned `T_v`"),
    ("feature_other", "feature step, rest (input checks, vector updates, threads)"),
)


def render_ot_step(res: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [
        "# OT step vs a plain numpy implementation",
        "",
        f"Command: `{cfg['command']}` (from the repository root).",
        "",
        "The OT step as `RimaModel._alignment` runs it (labeled GW fundus→OCT with the "
        "library's default stopping rules, then the feature coupling given `T.T`) against "
        "`benchmarks/ot_reference.py`: float32 numpy written from the math, with its own "
        "natural stopping rule (every Sinkhorn solve stops at the first iteration whose L1 "
        "marginal error is ≤ 1e-3, tested every iteration; GW stops when the L1 change of T is "
        "≤ 1e-3). Both run on the same inputs in one process, interleaved run by run (the order "
        f"alternating), {cfg['repeats']} pairs after {cfg['warmup']} warm-up pairs; numpy's BLAS "
        f"gets torch's thread count. Target: ratio ≤ {TARGET_RATIO}.",
        "",
        f"Machine: {machine['device']}, torch {machine['torch']}, {machine['torch_threads']} "
        f"threads, {machine['cpu_count']} CPUs, load average (1/5/15 min) "
        f"{machine.get('load_average_1_5_15')} at the start (a shared machine: wall-clock "
        "numbers move with its load; the interleaved ratio much less).",
        "",
        "| shapes (batch, d_f, d_o) | threads | ours median (ms) | numpy median (ms) "
        "| ratio of medians | median pairwise ratio | ratio of minima |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in res["shapes"].items():
        s = r["shape"]
        for threads, b in r["by_threads"].items():
            lines.append(
                f"| {name} ({s['batch']}, {s['d_f']}, {s['d_o']}) | {threads} "
                f"| {b['ours']['median_ms']:.1f} | {b['reference']['median_ms']:.1f} "
                f"| {b['ratio_of_medians']:.2f} | {b['median_pairwise_ratio']:.2f} "
                f"| {b['ratio_of_minima']:.2f} |"
            )
    lines += [
        "",
        "## Accuracy (criterion: marginals L1 < 1e-3, GW energy within 2 % of a tight solve)",
        "",
        "Tight solve: the library in float64, GW to an L1 change of 1e-10 and inner marginal "
        "error 1e-11, its feature coupling plain Sinkhorn to 1e-9. GW energy: float64, max-scaled "
        "costs, same formula for both.",
        "",
        "| shapes | who | GW marg. L1 | GW energy vs tight | feature marg. L1 "
        "| ⟨M, T_v⟩ vs tight | iterations (GW outer / GW Sinkhorn / feature) | meets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["shapes"].items():
        acc = r["accuracy"]
        for who, its in (("ours", r["iterations_ours"]), ("reference", r["iterations_reference"])):
            a = acc[who]
            lines.append(
                f"| {name} | {who} | {a['gw_marginal_l1']:.1e} "
                f"| {100 * a['gw_energy_rel_to_tight']:+.3f} % | {a['feature_marginal_l1']:.1e} "
                f"| {100 * a['feature_cost_rel_to_tight']:+.3f} % | {its['gw_outer']} / "
                f"{its['gw_sinkhorn']} / {its['feature_sinkhorn']} | {a['meets_criterion']} |"
            )
    lines += [""]
    for name, r in res["shapes"].items():
        acc = r["accuracy"]
        lines.append(
            f"- {name}: GW energy ours vs numpy {100 * acc['gw_energy_ours_vs_reference_rel']:+.3f}"
            f" %; both meet the criterion: {acc['both_meet_criterion']}; a rerun of ours is "
            f"bit-identical: {r['bit_identical_rerun']}."
        )
    lines += [
        "",
        "## Where the library's time goes",
        "",
        "Each part timed on its own (median ms; the Sinkhorn mat-vecs and tests as the time of "
        "one times this solve's count), so the parts need not add up exactly to the totals and "
        "`rest` (total minus parts) can come out negative on a loaded machine, above all with 2 "
        "threads. The numpy reference's two halves are timed the same way.",
        "",
    ]
    for name, r in res["shapes"].items():
        cols = list(r["by_threads"])
        lines += [
            f"### {name} shapes",
            "",
            "| part | " + " | ".join(f"{c} thread(s)" for c in cols) + " |",
            "|---|" + "---|" * len(cols),
            "| **labeled GW (total)** | "
            + " | ".join(f"**{r['by_threads'][c]['breakdown_ms']['gw_total']:.2f}**" for c in cols)
            + " |",
        ]
        for key, label in _PARTS[:2]:
            lines.append(f"| {label} | " + " | ".join(
                f"{r['by_threads'][c]['breakdown_ms'][key]:.2f}" for c in cols) + " |")  # fmt: skip
        lines.append(
            "| **feature coupling (total)** | "
            + " | ".join(
                f"**{r['by_threads'][c]['breakdown_ms']['feature_total']:.2f}**" for c in cols
            )
            + " |"
        )
        for key, label in _PARTS[2:]:
            lines.append(f"| {label} | " + " | ".join(
                f"{r['by_threads'][c]['breakdown_ms'][key]:.2f}" for c in cols) + " |")  # fmt: skip
        for key, label in (
            ("gw_total", "numpy reference: labeled GW"),
            ("feature_total", "numpy reference: feature coupling"),
        ):
            lines.append(
                f"| {label} | "
                + " | ".join(
                    f"{r['by_threads'][c]['reference_breakdown_ms'][key]:.2f}" for c in cols
                )
                + " |"
            )
        b = r["by_threads"][cols[0]]["breakdown_ms"]
        lines += [
            "",
            f"Feature Sinkhorn: {r['iterations_ours']['feature_sinkhorn']} iterations, "
            f"{b['feature_n_checks']} convergence tests (every {b['feature_check_every']}).",
            "",
        ]
    return "\n".join(lines)


def bench_ot(args: argparse.Namespace) -> dict[str, Any]:
    """Labeled GW both directions + feature coupling: ours vs POT at the paper's shapes."""
    import ot as pot

    dev = args.device
    batch = paper_batch(seed=args.seed, device=dev)
    f, o, y_f, y_o = batch["f"], batch["o"], batch["y_f"], batch["y_o"]
    gw_kw = {
        "epsilon": args.gw_epsilon,
        "max_iter": args.gw_max_iter,
        "tol": args.gw_tol,
        "inner_tol": args.gw_inner_tol,
    }
    fc_kw = {"epsilon": args.feature_epsilon, "tol": args.feature_tol}

    (t_fo, info_fo, times_fo), (t_of, info_of, times_of), (t_v, info_v, times_v), times_step = (
        _time_ours(batch, gw_kw, fc_kw, args)
    )
    # On a shared 2-core machine the OpenMP threads of one op wait for each other whenever one
    # is descheduled, so the same code is also timed single-threaded (benchmark only: the
    # library leaves torch's thread count alone).
    single: dict[str, Any] | None = None
    threads = torch.get_num_threads()
    if dev == "cpu" and threads > 1:
        small_mm_us = {threads: _small_matmul_us()}
        torch.set_num_threads(1)
        try:
            r_fo, r_of, r_v, r_step = _time_ours(batch, gw_kw, fc_kw, args)
            small_mm_us[1] = _small_matmul_us()
        finally:
            torch.set_num_threads(threads)
        single = {
            "gw_fundus_to_oct": _ms(r_fo[2]),
            "gw_oct_to_fundus": _ms(r_of[2]),
            "feature_coupling": _ms(r_v[2]),
            "ot_step": _ms(r_step),
            "matmul_32x32_median_us_by_threads": small_mm_us,
        }

    # POT on the same inputs (float64 numpy: its stock usage)
    f64 = f.double().cpu().numpy()
    o64 = o.double().cpu().numpy()
    yf = y_f.cpu().numpy()
    yo = y_o.cpu().numpy()
    c_f, c_o = _scaled_sqdist_np(f64), _scaled_sqdist_np(o64)
    pot_reps = max(1, args.pot_repeats)
    tp_fo, ptimes_fo = timed(lambda: _pot_gw(f64, yf, o64, yo, args), pot_reps, 1, "cpu")
    tp_of, ptimes_of = timed(lambda: _pot_gw(o64, yo, f64, yf, args), pot_reps, 1, "cpu")

    cost_v = _coot_cost_np(o64, f64, np.asarray(t_of.double().cpu().numpy()))
    d_o, d_f = cost_v.shape

    def pot_feature():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return pot.sinkhorn(
                np.full(d_o, 1 / d_o), np.full(d_f, 1 / d_f), cost_v, args.feature_epsilon,
                method="sinkhorn", stopThr=args.feature_tol, numItermax=10000,
            )  # fmt: skip

    tvp, ptimes_v = timed(pot_feature, pot_reps, 0, "cpu")
    log.info("POT: gw f->o %.1f ms, o->f %.1f ms, feature %.1f ms",
             statistics.median(ptimes_fo), statistics.median(ptimes_of),
             statistics.median(ptimes_v))  # fmt: skip

    # converged reference: plain Sinkhorn (POT's algorithm) in float64 to a 1e-9 marginal error
    ref_v, ref_info = feature_coupling(
        torch.from_numpy(o64), torch.from_numpy(f64), torch.from_numpy(t_of.double().cpu().numpy()),
        epsilon=args.feature_epsilon, tol=1e-9, max_iter=20000, relax=1.0, log=True,
    )  # fmt: skip
    ref_v = ref_v.numpy()
    t_v64 = np.asarray(t_v.double().cpu().numpy())
    result = {
        "config": {
            "batch": int(f.shape[0]),
            "d_f": int(f.shape[1]),
            "d_o": int(o.shape[1]),
            "class_sizes": [int((y_f == c).sum()) for c in torch.unique(y_f)],
            "gw_epsilon": args.gw_epsilon,
            "gw_tol": args.gw_tol,
            "gw_inner_tol": args.gw_inner_tol,
            "gw_max_iter": args.gw_max_iter,
            "feature_epsilon": args.feature_epsilon,
            "feature_tol": args.feature_tol,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "pot_repeats": pot_reps,
            "seed": args.seed,
            "pot_version": pot.__version__,
        },
        "targets_ms": {"labeled_gw_per_direction": TARGET_GW_MS, "ot_step": TARGET_STEP_MS},
        "torch_threads": threads,
        "ours_single_thread": single,
        "ours": {
            "gw_fundus_to_oct": _ours_gw(times_fo, t_fo, info_fo, yf, yo, c_f, c_o),
            "gw_oct_to_fundus": _ours_gw(times_of, t_of, info_of, yo, yf, c_o, c_f),
            "feature_coupling": {
                **_ms(times_v),
                **_feature_quality(t_v64, cost_v, ref_v),
                "iterations": info_v["iterations"],
                "converged": info_v["converged"],
            },
            "ot_step": _ms(times_step),
        },
        "pot": {
            "gw_fundus_to_oct": {**_ms(ptimes_fo), **_gw_quality(tp_fo, yf, yo, c_f, c_o)},
            "gw_oct_to_fundus": {**_ms(ptimes_of), **_gw_quality(tp_of, yo, yf, c_o, c_f)},
            "feature_coupling": {**_ms(ptimes_v), **_feature_quality(tvp, cost_v, ref_v)},
            "ot_step_sum_of_medians_ms": statistics.median(ptimes_fo)
            + statistics.median(ptimes_of) + statistics.median(ptimes_v),
        },
        "agreement": {
            "gw_fundus_to_oct_l1": float(np.abs(t_fo.double().cpu().numpy() - tp_fo).sum()),
            "gw_oct_to_fundus_l1": float(np.abs(t_of.double().cpu().numpy() - tp_of).sum()),
            "feature_coupling_l1": float(np.abs(t_v64 - tvp).sum()),
            "feature_reference": {
                "iterations": ref_info["iterations"],
                "converged": ref_info["converged"],
                "transport_cost": float((ref_v * cost_v).sum()),
            },
        },
    }  # fmt: skip
    return result


def render_ot(res: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg, ours, pot_, agr = res["config"], res["ours"], res["pot"], res["agreement"]
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    gw = (
        ("gw_fundus_to_oct", "labeled GW fundus→OCT"),
        ("gw_oct_to_fundus", "labeled GW OCT→fundus"),
    )
    fo, of, fc = ours["gw_fundus_to_oct"], ours["gw_oct_to_fundus"], ours["feature_coupling"]
    lines = [
        "# OT step speed at the paper's shapes",
        "",
        f"Batch {cfg['batch']}, d_f {cfg['d_f']}, d_o {cfg['d_o']}, class sizes "
        f"{cfg['class_sizes']}; GW epsilon {cfg['gw_epsilon']} (tol {cfg['gw_tol']}, inner "
        f"{cfg['gw_inner_tol']}), feature epsilon {cfg['feature_epsilon']} (tol "
        f"{cfg['feature_tol']}). Ours: median (and min) of {cfg['repeats']} runs after "
        f"{cfg['warmup']} warm-up; POT {cfg['pot_version']}, stock float64 numpy: "
        f"{cfg['pot_repeats']} runs after 1 warm-up (none for its Sinkhorn).",
        "",
        f"Machine: {machine['device']}, torch {machine['torch']}, {machine['torch_threads']} "
        f"threads, {machine['cpu_count']} CPUs{gpu}, load average (1/5/15 min) "
        f"{machine.get('load_average_1_5_15')} at the start. Wall-clock numbers scale with the "
        "load of this shared machine; the minimum is the better estimate of the uncontended cost.",
        "",
        "The OT step against a plain numpy implementation (ratio, accuracy, where the time "
        "goes) is `ot_speed.md`, written by `--sections ot_step`.",
        "",
        "## Time (ours vs POT)",
        "",
        "| part | ours median (ms) | ours min (ms) | POT median (ms) | POT min (ms) "
        "| target (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for key, name in gw:
        a, b = ours[key], pot_[key]
        lines.append(
            f"| {name} | {a['median_ms']:.1f} | {a['min_ms']:.1f} | {b['median_ms']:.1f} "
            f"| {b['min_ms']:.1f} | {TARGET_GW_MS:.0f} |"
        )
    b = pot_["feature_coupling"]
    lines += [
        f"| feature coupling {cfg['d_o']}×{cfg['d_f']} | {fc['median_ms']:.1f} "
        f"| {fc['min_ms']:.1f} | {b['median_ms']:.1f} | {b['min_ms']:.1f} | – |",
        f"| **whole OT step** | **{ours['ot_step']['median_ms']:.1f}** "
        f"| {ours['ot_step']['min_ms']:.1f} | {pot_['ot_step_sum_of_medians_ms']:.1f} (sum) | – "
        f"| {TARGET_STEP_MS:.0f} |",
    ]
    single = res.get("ours_single_thread")
    if single:
        lines += [
            "",
            f"The same code with torch limited to 1 thread (default here: {res['torch_threads']}"
            "; the library runs labeled GW on one thread by itself at these shapes):",
            "",
            "| part | ours median (ms) | ours min (ms) | target (ms) |",
            "|---|---|---|---|",
        ]
        for key, name in (
            *gw,
            ("feature_coupling", "feature coupling"),
            ("ot_step", "whole OT step"),
        ):
            target = {"feature_coupling": "–", "ot_step": f"{TARGET_STEP_MS:.0f}"}.get(
                key, f"{TARGET_GW_MS:.0f}"
            )
            lines.append(
                f"| {name} | {single[key]['median_ms']:.1f} | {single[key]['min_ms']:.1f} "
                f"| {target} |"
            )
        mm = single["matmul_32x32_median_us_by_threads"]
        lines += [
            "",
            "Why the two differ: one 32×32 matrix product took a median of "
            + ", ".join(f"{us:.1f} µs with {n} thread(s)" for n, us in mm.items())
            + " during this run. When the machine is oversubscribed, every multi-threaded op "
            "waits for a descheduled worker thread; the feature step's large operations use "
            "torch's thread count.",
        ]
    lines += [
        "",
        "## Quality",
        "",
        "| labeled GW | marginal error (L1) | cross-label mass | largest cross-label entry "
        "| GW objective |",
        "|---|---|---|---|---|",
    ]
    for key, name in gw:
        for who, r in (("ours", ours[key]), ("POT", pot_[key])):
            lines.append(
                f"| {name}, {who} | {r['marginal_error_l1']:.1e} | {r['cross_label_mass']:.1e} "
                f"| {r['cross_label_max_entry']:.1e} | {r['objective']:.6f} |"
            )
    ref = agr["feature_reference"]
    lines += [
        "",
        "| feature coupling | row marg. err (L1) | col marg. err (L1) | ⟨M, T_v⟩ "
        "| L1 to converged T_v |",
        "|---|---|---|---|---|",
    ]
    for who, r in (("ours", fc), ("POT", pot_["feature_coupling"])):
        lines.append(
            f"| {who} | {r['row_marginal_error_l1']:.1e} | {r['col_marginal_error_l1']:.1e} "
            f"| {r['transport_cost']:.6f} | {r['l1_to_converged']:.1e} |"
        )
    lines += [
        f"| converged reference | – | – | {ref['transport_cost']:.6f} | 0 |",
        "",
        f"Ours: GW outer iterations {fo['iterations']} / {of['iterations']} (Sinkhorn "
        f"iterations {fo['sinkhorn_iterations']} / {of['sinkhorn_iterations']}), converged "
        f"{fo['converged']} / {of['converged']}; feature Sinkhorn iterations {fc['iterations']} "
        f"(converged {fc['converged']}). L1 distance between our and POT's couplings: GW "
        f"fundus→OCT {agr['gw_fundus_to_oct_l1']:.1e}, OCT→fundus {agr['gw_oct_to_fundus_l1']:.1e}"
        f", feature coupling {agr['feature_coupling_l1']:.1e}.",
        "",
        "GW objective: the GW energy with the max-scaled costs (float64, same formula for both). "
        "Marginal errors: L1 against the class-balanced marginals both solvers were given. "
        "Converged reference: plain Sinkhorn (POT's algorithm) in float64 to an L1 marginal error "
        f"of 1e-9 ({ref['iterations']} iterations). Stopping rules differ in their norm: ours "
        "tests the L1 error of both marginals (every iteration on the CPU at this size), POT's "
        "Sinkhorn the L2 error of the column marginal every 10 iterations; POT's GW tests the "
        "Frobenius norm of the change of T every 10 outer iterations, ours the L1 norm every "
        "iteration.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# training-throughput section
#
# One training step of a model at the default (CPU) sizes: forward with the OT step, cross-
# entropy, backward, gradient clipping, AdamW — what ``rima_core.runs.train`` does per batch, on
# real phantom batches already in memory (data loading is ``benchmarks/data_loading.py``'s subject).
# Every (model, thread count) runs in a fresh spawned process, so its peak RSS is its own and
# the thread count is set before torch creates its pool.


def _rss_mb() -> float:
    """Current resident set size (Linux ``/proc``; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def train_phantom(work: Path, n_eyes: int, params: str) -> Path:
    """A small phantom store at the params.yaml sizes, built once and reused."""
    from rima_core.config import load_config
    from rima_core.core.data.prepare import prepare_store
    from rima_core.core.data.synthetic import generate

    cfg = load_config(params)
    cfg.synth.n_eyes = n_eyes
    cfg.prepare.fundus_size = cfg.synth.fundus_size
    cfg.prepare.oct_shape = list(cfg.synth.oct_shape)
    store = (
        work / f"store_{n_eyes}_{cfg.synth.fundus_size}_{'x'.join(map(str, cfg.synth.oct_shape))}"
    )
    if not (store / "manifest.parquet").exists():
        generate(work / "raw", cfg.synth)
        prepare_store("auto", work / "raw", store, cfg.prepare, "auto")
    return store


def _train_child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: time ``job['steps']`` training steps of one model."""
    torch.set_num_threads(job["threads"])
    import torch.nn.functional as F

    from rima_core.config import load_config
    from rima_core.core.data import open_store
    from rima_core.core.data.dataset import EyeDataset, make_loader
    from rima_core.core.models import build_model
    from rima_core.runs.engine import amp_dtype, autocast, resolve_device, to_device
    from rima_core.runs.train import model_spec

    cfg = load_config(job["params"], overrides=[f"model.name={job['model']}"])
    device = resolve_device(job["device"])
    dtype = amp_dtype(device, cfg.runtime.amp)
    ds = EyeDataset(job["store"], None, "train")
    loader = make_loader(
        ds, cfg.train.batch_size, True, 0, job["seed"], device.type == "cuda", drop_last=True
    )
    batches = [to_device(b, device) for b in loader]
    torch.manual_seed(job["seed"])
    rss_before = _rss_mb()
    model = build_model(model_spec(cfg, open_store(job["store"])), pretrained=False).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(b: dict[str, torch.Tensor]) -> float:
        with autocast(device, dtype):
            out = model(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"], labels=b["label"])
        loss = F.cross_entropy(out.logits.float(), b["label"]) + out.aux_loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        return float(out.stats.get("ot_seconds", 0.0))

    model.train()
    for i in range(job["warmup"]):
        step(batches[i % len(batches)])
    _sync(job["device"])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    times, ot_times = [], []
    for i in range(job["steps"]):
        start = time.perf_counter()
        ot_s = step(batches[i % len(batches)])
        _sync(job["device"])
        times.append(1e3 * (time.perf_counter() - start))
        ot_times.append(1e3 * ot_s)
    res: dict[str, Any] = {
        "model": job["model"],
        "threads": job["threads"],
        "batch": cfg.train.batch_size,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "step": _ms(times),
        "ot_ms": _ms(ot_times),
        "ot_share": sum(ot_times) / sum(times),
        "eyes_per_s_median": cfg.train.batch_size / (statistics.median(times) / 1e3),
        "eyes_per_s_best": cfg.train.batch_size / (min(times) / 1e3),
        "rss_before_model_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "matmul_32_us": _small_matmul_us(),
        "load_1min": [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    }
    if device.type == "cuda":
        res["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return res


def bench_train(args: argparse.Namespace) -> dict[str, Any]:
    """Training-step throughput of RIMA vs late fusion, 1 thread and the default thread count."""
    import multiprocessing
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    work = Path(tempfile.gettempdir()) / "rima_bench" / "speed_train"
    store = train_phantom(work, args.train_eyes, args.params)
    default_threads = torch.get_num_threads()
    thread_counts = sorted({1, default_threads} if args.device == "cpu" else {default_threads})
    runs = []
    ctx = multiprocessing.get_context("spawn")
    for rep in range(args.train_rounds):  # rounds interleave the configurations
        for threads in thread_counts:
            for model in args.train_models:
                job = {
                    "model": model,
                    "threads": threads,
                    "params": args.params,
                    "store": str(store),
                    "device": args.device,
                    "seed": args.seed,
                    "warmup": args.warmup + 1,
                    "steps": args.train_steps,
                }
                with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                    res = pool.submit(_train_child, job).result()
                res["round"] = rep
                runs.append(res)
                log.info(
                    "train step %s, %d thread(s): median %.0f ms (%.0f eyes/s), OT %.0f%%, "
                    "peak RSS %.0f MB",
                    model,
                    threads,
                    res["step"]["median_ms"],
                    res["eyes_per_s_median"],
                    100 * res["ot_share"],
                    res["peak_rss_mb"],
                )
    return {
        "config": {
            "store": str(store),
            "n_eyes": args.train_eyes,
            "params": args.params,
            "steps": args.train_steps,
            "warmup": args.warmup + 1,
            "rounds": args.train_rounds,
            "models": args.train_models,
            "default_threads": default_threads,
        },
        "runs": runs,
    }


def render_train(res: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = res["config"]
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in res["runs"]:  # per configuration, the round with the fastest median
        key = (r["model"], r["threads"])
        if key not in best or r["step"]["median_ms"] < best[key]["step"]["median_ms"]:
            best[key] = r
    gpu = "cuda_max_allocated_mb" in next(iter(best.values()), {})
    lines = [
        "# Training throughput at the default sizes",
        "",
        f"One training step (forward incl. the OT step, cross-entropy, backward, grad clipping, "
        f"AdamW) on phantom batches of {res['runs'][0]['batch'] if res['runs'] else '?'} eyes "
        f"(64² fundus, 32³ OCT, every eye with both modalities, params.yaml model), already in "
        f"memory. Median and min of {cfg['steps']} steps after {cfg['warmup']} warm-up steps, "
        f"each configuration in a fresh process; {cfg['rounds']} round(s) interleaving the "
        "configurations, the round with the fastest median shown. Peak RSS is the whole "
        "process's (torch, data and model); `RSS before model` is after imports and data.",
        "",
        f"Machine: {machine['device']}, torch {machine['torch']}, {machine['cpu_count']} CPUs, "
        f"default torch threads {cfg['default_threads']}, load average (1/5/15 min) "
        f"{machine.get('load_average_1_5_15')} at the start. Other engineers share this "
        "machine: wall-clock numbers scale with its load (the 1-min load during each run and "
        "the latency of one 32×32 product are given as the contention gauge).",
        "",
        "| model | threads | ms/step median | ms/step min | eyes/s (median) | eyes/s (best) "
        "| OT ms/step | OT share | peak RSS MB | RSS before model MB |"
        + (" CUDA max alloc MB |" if gpu else "")
        + " load 1-min | 32×32 mm µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|" if gpu else "")
        + "---:|---:|",
    ]
    for (model, threads), r in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(
            f"| `{model}` | {threads} | {r['step']['median_ms']:.0f} | {r['step']['min_ms']:.0f} "
            f"| {r['eyes_per_s_median']:.0f} | {r['eyes_per_s_best']:.0f} "
            f"| {r['ot_ms']['median_ms']:.1f} | {r['ot_share']:.1%} | {r['peak_rss_mb']:.0f} "
            f"| {r['rss_before_model_mb']:.0f} |"
            + (f" {r['cuda_max_allocated_mb']:.0f} |" if gpu else "")
            + f" {r['load_1min'][0]:.1f} | {r['matmul_32_us']:.1f} |"
        )
    rima, lf = best.get(("rima", 1)), best.get(("late_fusion_zero", 1))
    if rima and lf:
        lines += [
            "",
            f"Single-threaded, RIMA trains at {rima['eyes_per_s_median']:.0f} eyes/s vs "
            f"{lf['eyes_per_s_median']:.0f} for zero-imputation late fusion "
            f"({rima['step']['median_ms'] / lf['step']['median_ms']:.2f}× the step time); the OT "
            f"step (labeled GW + feature coupling at d_f 128, d_o 192) is "
            f"{rima['ot_share']:.1%} of RIMA's step.",
        ]
    for model in sorted({m for m, _ in best}):
        one = best.get((model, 1))
        many = [r for (m, t), r in best.items() if m == model and t != 1]
        if one and many:
            ratio = many[0]["step"]["median_ms"] / one["step"]["median_ms"]
            lines.append(
                f"\n`{model}`: {many[0]['threads']} threads take {ratio:.2f}× the step time of 1 "
                f"thread ({'1 thread is faster' if ratio > 1 else 'more threads are faster'})."
            )
    lines += [
        "",
        "Threads help only while the cores are free: when another process holds a core, "
        "every multi-threaded op waits for its descheduled OpenMP worker (compare the 32×32 "
        "product latency per row) and 1 thread becomes the faster choice, which is why "
        "`benchmarks/missing_modality.py` trains with 1 thread by default on this shared machine.",
    ]
    lines.append("")
    return "\n".join(lines)


SECTIONS: dict[str, tuple[Callable[[argparse.Namespace], dict[str, Any]], Callable[..., str]]] = {
    "ot": (bench_ot, render_ot),
    "ot_step": (bench_ot_step, render_ot_step),
    "train": (bench_train, render_train),
}


# result files not named speed_<section>
STEMS = {"ot_step": "ot_speed"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--sections", nargs="+", default=["ot_step", "ot"], choices=sorted(SECTIONS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pot-repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gw-epsilon", type=float, default=5e-3)
    ap.add_argument("--gw-tol", type=float, default=1e-3)
    ap.add_argument("--gw-inner-tol", type=float, default=1e-3)
    ap.add_argument("--gw-max-iter", type=int, default=50)
    ap.add_argument("--feature-epsilon", type=float, default=5e-3)
    ap.add_argument("--feature-tol", type=float, default=1e-3)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="train section: sizes")
    ap.add_argument("--train-models", nargs="+", default=["rima", "late_fusion_zero"])
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--train-rounds", type=int, default=2)
    ap.add_argument("--train-eyes", type=int, default=200, help="phantom size (60%% train)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    machine = machine_info(args.device)
    for name in args.sections:
        bench, render = SECTIONS[name]
        result = {"machine": machine, **bench(args)}
        suffix = "" if args.device == "cpu" else f"_{args.device.split(':')[0]}"
        stem = STEMS.get(name, f"speed_{name}") + suffix
        write_text(args.out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
        write_text(args.out / f"{stem}.md", render(result, machine))
        print(args.out / f"{stem}.md")


if __name__ == "__main__":
    main()
