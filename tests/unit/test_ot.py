"""Tests for rima_core.core.ot: labeled entropic GW and the feature-wise coupling.

The reference solves use POT (float64 numpy) on the same inputs: labeled GW is POT's entropic
*fused* GW with ``alpha = 0.5`` and a label-mismatch cost ``M = 1e3 * [y_i != y_j]``. POT's
kernel is ``exp(-(2 alpha L(T) + (1 - alpha) M) / eps_pot)`` (its GW gradient carries a factor
2), so ``eps_pot = 2 * alpha * epsilon = epsilon`` gives ``exp(-L(T)/epsilon - 500 M'/epsilon)``:
our masked kernel, with the mismatched entries underflowing to exactly 0 in float64.
"""

from __future__ import annotations

import warnings

import numpy as np
import ot as pot
import pytest
import torch

from rima_core.core import ot as ot_module
from rima_core.core.ot import (
    SOLVER_LOG_KEYS,
    OTInputError,
    Workspace,
    clear_workspace,
    feature_cost,
    feature_coupling,
    gw_energy,
    labeled_gw,
    sinkhorn,
)
from rima_core.core.ot import kernel as ot_kernel


def _clusters(
    seed: int, n_x: int = 14, n_z: int = 11, d_x: int = 6, d_z: int = 4, k: int = 3
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class-clustered point clouds of different dimension with every class on both sides."""
    rng = np.random.default_rng(seed)
    lx = np.concatenate([np.arange(k), rng.integers(0, k, n_x - k)])
    lz = np.concatenate([np.arange(k), rng.integers(0, k, n_z - k)])
    x = (rng.normal(size=(k, d_x)) * 2.0)[lx] + rng.normal(size=(n_x, d_x))
    z = (rng.normal(size=(k, d_z)) * 2.0)[lz] + rng.normal(size=(n_z, d_z))
    return x, lx, z, lz


def _scaled_cost(x: np.ndarray) -> np.ndarray:
    c = pot.dist(x, x, metric="sqeuclidean")
    return c / c.max()


def _share_marginals(lx: np.ndarray, lz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The documented "share" rule, written out per class: w_c = mean of the two class shares."""
    shared = np.intersect1d(lx, lz)
    in_x = np.isin(lx, shared)
    in_z = np.isin(lz, shared)
    p = np.zeros(len(lx))
    q = np.zeros(len(lz))
    for c in shared:
        nxc, nzc = (lx == c).sum(), (lz == c).sum()
        w = 0.5 * (nxc / in_x.sum() + nzc / in_z.sum())
        p[lx == c] = w / nxc
        q[lz == c] = w / nzc
    return p, q


def _pot_labeled_gw(x, lx, z, lz, epsilon: float) -> np.ndarray:
    cx, cz = _scaled_cost(x), _scaled_cost(z)
    p, q = _share_marginals(lx, lz)
    same = lx[:, None] == lz[None, :]
    m = 1e3 * (~same).astype(np.float64)
    # same start as ours (product coupling inside each class block): GW is non-convex, and a
    # common start makes both runs follow the same mirror-descent path
    w = same @ q
    g0 = np.where(same, p[:, None] * q[None, :] / np.where(w > 0, w, 1.0)[:, None], 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pot.gromov.entropic_fused_gromov_wasserstein(
            m,
            cx,
            cz,
            p,
            q,
            epsilon=epsilon,
            alpha=0.5,
            G0=g0,
            max_iter=2000,
            tol=1e-10,
            numItermax=20000,
            stopThr=1e-12,
        )


# The solvers' former defaults, far tighter than a training step needs (see
# test_default_stopping_rules_meet_the_training_accuracy): tests of exact class masses use them.
TIGHT = {"tol": 1e-5, "inner_tol": 1e-6}


def _energy(x: np.ndarray, z: np.ndarray, t: np.ndarray) -> float:
    """GW energy written as the quadruple sum (float64, independent of the solver's algebra)."""
    cx, cz = _scaled_cost(x), _scaled_cost(z)
    diff = (cx[:, None, :, None] - cz[None, :, None, :]) ** 2  # [i, j, k, l]
    return float(np.einsum("ijkl,ij,kl->", diff, t, t))


# ---------------------------------------------------------------------------------------------
# labeled GW


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("epsilon", [5e-3, 2e-2, 1e-1])
def test_objective_matches_pot_reference(seed: int, epsilon: float) -> None:
    x, lx, z, lz = _clusters(seed)
    t, info = labeled_gw(
        torch.tensor(x, dtype=torch.float32), torch.tensor(lx),
        torch.tensor(z, dtype=torch.float32), torch.tensor(lz),
        epsilon=epsilon,
    )  # fmt: skip
    ref = _pot_labeled_gw(x, lx, z, lz, epsilon)
    ours = _energy(x, z, t.double().numpy())
    theirs = _energy(x, z, ref)
    assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
    assert abs(info["objective"] - ours) <= 1e-3 * ours  # info reports the same energy
    assert np.abs(t.double().numpy() - ref).sum() < 1e-2  # and the same coupling
    assert info["converged"]


def test_marginals_within_tolerance_and_zero_cross_label_mass() -> None:
    x, lx, z, lz = _clusters(3, n_x=20, n_z=16)
    t, info = labeled_gw(x.astype(np.float32), lx, z.astype(np.float32), lz, **TIGHT)
    p, q = _share_marginals(lx, lz)
    assert np.abs(t.sum(1) - p).sum() < 1e-5
    assert np.abs(t.sum(0) - q).sum() < 1e-5
    assert info["marginal_error"] < 1e-5
    cross = t[lx[:, None] != lz[None, :]]
    assert cross.size > 0 and np.all(cross == 0.0)
    assert info["n_shared_classes"] == 3


def test_uniform_class_mass_rule() -> None:
    x, lx, z, lz = _clusters(4, n_x=18, n_z=9)
    t, _ = labeled_gw(x, lx, z, lz, class_mass="uniform", **TIGHT)
    for c in range(3):
        assert abs(t[lx == c].sum() - 1 / 3) < 1e-6
        assert abs(t[:, lz == c].sum() - 1 / 3) < 1e-6
        # uniform within the class on each side
        np.testing.assert_allclose(t[lx == c].sum(1), 1 / 3 / (lx == c).sum(), rtol=1e-4)


def test_class_absent_on_one_side_gets_zero_mass() -> None:
    x, lx, z, lz = _clusters(5, n_x=16, n_z=12)
    lx = lx.copy()
    lx[:4] = 7  # class 7 exists only in x
    lz = np.where(lz == 2, 1, lz)  # class 2 now exists only in x as well
    t, info = labeled_gw(x, lx, z, lz, **TIGHT)
    absent = ~np.isin(lx, lz)
    assert absent.sum() >= 4
    assert np.all(t[absent] == 0.0)
    assert abs(t.sum() - 1.0) < 1e-6  # still a feasible coupling of the shared classes
    p, q = _share_marginals(lx, lz)
    assert np.abs(t.sum(1) - p).sum() + np.abs(t.sum(0) - q).sum() < 1e-5
    assert np.all(t[lx[:, None] != lz[None, :]] == 0.0)
    assert info["n_shared_classes"] == 2 and info["converged"]


def test_no_shared_class_gives_zero_coupling() -> None:
    x, lx, z, lz = _clusters(6)
    t, info = labeled_gw(x, lx, z, lz + 10)
    assert t.shape == (len(lx), len(lz)) and np.all(t == 0.0)
    assert info["n_shared_classes"] == 0
    t, info = labeled_gw(x[:0], lx[:0], z, lz)
    assert t.shape == (0, len(lz))


def test_recovers_planted_isometry_across_dimensions() -> None:
    """z is x embedded isometrically in a bigger space and shuffled: GW finds the shuffle."""
    rng = np.random.default_rng(7)
    x, lx, _, _ = _clusters(7, n_x=15, d_x=5)
    basis, _ = np.linalg.qr(rng.normal(size=(9, 5)))  # 9x5, orthonormal columns
    perm = rng.permutation(len(lx))
    z = (x @ basis.T)[perm]
    t, _ = labeled_gw(x.astype(np.float32), lx, z.astype(np.float32), lx[perm], epsilon=1e-3)
    np.testing.assert_array_equal(t.argmax(1), np.argsort(perm))


@pytest.mark.parametrize("epsilon", [1e-5, 1e-7])
def test_tiny_epsilon_has_no_nan(epsilon: float) -> None:
    x, lx, z, lz = _clusters(8, n_x=24, n_z=20)
    t, info = labeled_gw(torch.tensor(x, dtype=torch.float32), lx, torch.tensor(z).float(), lz,
                         epsilon=epsilon)  # fmt: skip
    assert torch.isfinite(t).all()
    # columns are exact after the last Sinkhorn update; rows converge slowly as epsilon -> 0
    _, q = _share_marginals(lx, lz)
    assert np.abs(t.sum(0).double().numpy() - q).sum() < 1e-4
    if epsilon >= 1e-5:
        assert info["marginal_error"] < 1e-3
    assert torch.all(t[torch.tensor(lx[:, None] != lz[None, :])] == 0.0)


def test_log_domain_path_agrees_with_kernel_path() -> None:
    x, lx, z, lz = _clusters(9)
    t_kernel, i_kernel = labeled_gw(x, lx, z, lz, epsilon=1e-2, log_domain=False)
    t_log, i_log = labeled_gw(x, lx, z, lz, epsilon=1e-2, log_domain=True)
    assert i_log["log_domain"] and not i_kernel["log_domain"]
    assert np.abs(t_kernel - t_log).sum() < 1e-5
    assert np.all(t_log[lx[:, None] != lz[None, :]] == 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_torch_dtype_and_device_preserved(dtype: torch.dtype) -> None:
    x, lx, z, lz = _clusters(10)
    xt, zt = torch.tensor(x, dtype=dtype), torch.tensor(z, dtype=dtype)
    t, info = labeled_gw(xt, torch.tensor(lx, dtype=torch.int32), zt, torch.tensor(lz))
    assert isinstance(t, torch.Tensor) and t.dtype == dtype and t.device == xt.device
    assert t.shape == (len(lx), len(lz))
    tv = feature_coupling(xt, zt, t)
    assert isinstance(tv, torch.Tensor) and tv.dtype == dtype and tv.shape == (6, 4)
    assert isinstance(info["objective"], float) and isinstance(info["iterations"], int)


def test_numpy_in_numpy_out() -> None:
    x, lx, z, lz = _clusters(11)
    t, _ = labeled_gw(x, lx, z, lz)
    assert isinstance(t, np.ndarray) and t.dtype == np.float64
    t32, _ = labeled_gw(x.astype(np.float32), lx, z.astype(np.float32), lz)
    assert t32.dtype == np.float32
    tv = feature_coupling(x, z, t)
    assert isinstance(tv, np.ndarray) and tv.dtype == np.float64


def test_deterministic() -> None:
    x, lx, z, lz = _clusters(12, n_x=30, n_z=25, d_x=40, d_z=30)
    xt, zt = torch.tensor(x, dtype=torch.float32), torch.tensor(z, dtype=torch.float32)
    t1, i1 = labeled_gw(xt, lx, zt, lz)
    t2, i2 = labeled_gw(xt, lx, zt, lz)
    assert torch.equal(t1, t2) and i1 == i2
    assert torch.equal(feature_coupling(xt, zt, t1), feature_coupling(xt, zt, t2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stays_on_device() -> None:
    x, lx, z, lz = _clusters(13)
    xt = torch.tensor(x, dtype=torch.float32, device="cuda")
    zt = torch.tensor(z, dtype=torch.float32, device="cuda")
    t, info = labeled_gw(xt, torch.tensor(lx, device="cuda"), zt, torch.tensor(lz))
    assert info["converged"]
    assert t.is_cuda and t.dtype == torch.float32
    t_cpu, _ = labeled_gw(xt.cpu(), lx, zt.cpu(), lz)
    assert (t.cpu() - t_cpu).abs().sum() < 1e-4
    assert torch.all(t[torch.tensor(lx[:, None] != lz[None, :], device="cuda")] == 0.0)
    tv = feature_coupling(xt, zt, t)
    assert tv.is_cuda and tv.shape == (6, 4)


def test_bad_inputs_raise_clear_errors() -> None:
    x, lx, z, lz = _clusters(14)
    with pytest.raises(OTInputError, match="labels_x"):
        labeled_gw(x, lx[:-1], z, lz)
    with pytest.raises(OTInputError, match="integers"):
        labeled_gw(x, lx.astype(float), z, lz)
    with pytest.raises(OTInputError, match="epsilon"):
        labeled_gw(x, lx, z, lz, epsilon=0.0)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(OTInputError, match="NaN"):
        labeled_gw(bad, lx, z, lz)
    with pytest.raises(OTInputError, match="2-d"):
        labeled_gw(x[0], lx, z, lz)
    with pytest.raises(OTInputError, match="shape"):
        feature_coupling(x, z, np.ones((3, 3)))


# ---------------------------------------------------------------------------------------------
# feature coupling


def test_feature_coupling_matches_pot_on_the_coot_cost() -> None:
    """Cost = sum_ab (x_ai - z_bj)^2 T_ab (written as an explicit sum), then ot.sinkhorn."""
    x, lx, z, lz = _clusters(15, d_x=7, d_z=5)
    t, _ = labeled_gw(x, lx, z, lz)
    cost = np.einsum("aibj,ab->ij", (x[:, :, None, None] - z[None, None, :, :]) ** 2, t)
    cost /= cost.max()
    eps = 2e-2
    ref = pot.sinkhorn(np.full(7, 1 / 7), np.full(5, 1 / 5), cost, eps, stopThr=1e-12,
                       numItermax=100000)  # fmt: skip
    tv = feature_coupling(x, z, t, epsilon=eps, tol=1e-10, max_iter=100000)
    assert np.abs(tv - ref).sum() < 1e-6


def test_feature_coupling_marginals_and_shape() -> None:
    rng = np.random.default_rng(16)
    x = rng.normal(size=(20, 48)).astype(np.float32)
    z = rng.normal(size=(20, 32)).astype(np.float32)
    t = np.full((20, 20), 1 / 400, dtype=np.float32)
    tv, info = feature_coupling(x, z, t, log=True)
    assert tv.shape == (48, 32)
    assert np.abs(tv.sum(1) - 1 / 48).sum() <= 1e-3
    assert np.abs(tv.sum(0) - 1 / 32).sum() <= 1e-5  # exact after the last column update
    assert info["converged"] and info["marginal_error"] <= 1e-3


def test_feature_coupling_recovers_planted_permutation() -> None:
    rng = np.random.default_rng(17)
    n, d = 40, 16
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
    perm = rng.permutation(d)
    z = x[:, perm] + 0.01 * rng.normal(size=(n, d))
    t = np.eye(n) / n
    tv = feature_coupling(torch.tensor(x, dtype=torch.float32), torch.tensor(z).float(),
                          torch.tensor(t).float())  # fmt: skip
    # feature j of z is feature perm[j] of x
    np.testing.assert_array_equal(tv.argmax(0).numpy(), perm)
    assert tv.max(0).values.sum() > 0.9  # nearly all mass on the planted matches


@pytest.mark.parametrize("epsilon", [1e-5, 1e-7])
def test_feature_coupling_tiny_epsilon_has_no_nan(epsilon: float) -> None:
    rng = np.random.default_rng(18)
    x = rng.normal(size=(12, 30)).astype(np.float32)
    z = rng.normal(size=(12, 20)).astype(np.float32)
    t = np.eye(12, dtype=np.float32) / 12
    tv, info = feature_coupling(x, z, t, epsilon=epsilon, log=True)
    assert np.all(np.isfinite(tv)) and abs(tv.sum() - 1.0) < 1e-4
    assert np.isfinite(info["marginal_error"])
    assert np.abs(tv.sum(0) - 1 / 20).sum() < 1e-4


def test_energy_helper_matches_quadruple_sum() -> None:
    x, lx, z, lz = _clusters(19)
    t, _ = labeled_gw(x, lx, z, lz)
    cx, cz = torch.tensor(_scaled_cost(x)), torch.tensor(_scaled_cost(z))
    assert abs(float(gw_energy(cx, cz, torch.tensor(t))) - _energy(x, z, t)) < 1e-12


def test_over_relaxed_and_plain_sinkhorn_agree() -> None:
    rng = np.random.default_rng(20)
    x = rng.normal(size=(16, 40)).astype(np.float32)
    z = (x[:, :25] @ rng.normal(size=(25, 25))).astype(np.float32)
    t = np.eye(16, dtype=np.float32) / 16
    plain, i_plain = feature_coupling(x, z, t, relax=1.0, tol=1e-6, log=True)
    fast, i_fast = feature_coupling(x, z, t, relax=1.5, tol=1e-6, log=True)
    assert i_plain["converged"] and i_fast["converged"]
    assert np.abs(plain - fast).sum() < 1e-4
    assert i_fast["iterations"] <= i_plain["iterations"]
    with pytest.raises(OTInputError, match="relax"):
        feature_coupling(x, z, t, relax=2.0)


def test_feature_coupling_output_does_not_alias_the_reused_workspace() -> None:
    rng = np.random.default_rng(21)
    x = torch.tensor(rng.normal(size=(10, 24)), dtype=torch.float32)
    z = torch.tensor(rng.normal(size=(10, 12)), dtype=torch.float32)
    t = torch.eye(10) / 10
    first = feature_coupling(x, z, t)
    kept = first.clone()
    second = feature_coupling(2.0 * x + 1.0, z, t)  # same shapes: the scratch buffers are reused
    assert torch.equal(first, kept)
    assert not torch.equal(first, second)
    clear_workspace()
    assert torch.equal(feature_coupling(x, z, t), kept)


def test_feature_coupling_log_domain_path_agrees() -> None:
    rng = np.random.default_rng(22)
    x = rng.normal(size=(12, 18))
    z = rng.normal(size=(12, 9))
    t = np.eye(12) / 12
    kw = {"epsilon": 5e-2, "tol": 1e-10, "max_iter": 20000, "relax": 1.0, "log": True}
    kernel, i_kernel = feature_coupling(x, z, t, log_domain=False, **kw)
    logd, i_log = feature_coupling(x, z, t, log_domain=True, **kw)
    assert i_kernel["converged"] and i_log["converged"]
    assert i_log["log_domain"] and not i_kernel["log_domain"]
    assert np.abs(kernel - logd).sum() < 1e-8


# --------------------------------------------------------------------------------------------
# public API: sinkhorn, cost helpers, log dicts, thread policy, workspace


def test_sinkhorn_matches_pot_and_its_potentials_rebuild_the_coupling() -> None:
    rng = np.random.default_rng(30)
    a = rng.random(9) + 0.1
    a /= a.sum()
    b = rng.random(7) + 0.1
    b /= b.sum()
    cost = rng.random((9, 7))
    eps = 5e-2
    ref = pot.sinkhorn(a, b, cost, eps, stopThr=1e-13, numItermax=100000)
    ours, log = sinkhorn(a, b, cost, eps, tol=1e-12, max_iter=100000, log=True)
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float64
    assert np.abs(ours - ref).sum() < 1e-9
    assert log["converged"] and not log["log_domain"]
    rebuilt = np.exp((log["f"][:, None] + log["g"][None, :] - cost) / eps)
    assert np.abs(rebuilt - ours).max() < 1e-12


def test_sinkhorn_forbidden_pairs_and_log_domain_route() -> None:
    """``+inf`` costs are exact zeros; the log-domain route gives the same coupling."""
    rng = np.random.default_rng(31)
    cost = torch.tensor(rng.random((6, 6)))
    cost[0, 1:] = torch.inf  # row 0 may only go to column 0
    a = torch.full((6,), 1 / 6, dtype=torch.float64)
    kw = {"tol": 1e-11, "max_iter": 100000}
    kernel = sinkhorn(a, a, cost, 1e-1, log_domain=False, **kw)
    logd, log = sinkhorn(a, a, cost, 1e-1, log_domain=True, log=True, **kw)
    assert isinstance(kernel, torch.Tensor) and log["log_domain"]
    assert torch.all(kernel[0, 1:] == 0.0) and torch.all(logd[0, 1:] == 0.0)
    assert (kernel - logd).abs().sum() < 1e-9


def test_sinkhorn_rejects_bad_inputs() -> None:
    a = np.full(3, 1 / 3)
    with pytest.raises(OTInputError, match="expected a"):
        sinkhorn(a, a, np.zeros((3, 4)), 0.1)
    with pytest.raises(OTInputError, match="NaN"):
        sinkhorn(a, a, np.full((3, 3), np.nan), 0.1)
    with pytest.raises(OTInputError, match="epsilon"):
        sinkhorn(a, a, np.zeros((3, 3)), 0.0)


def test_every_solver_returns_the_common_log_keys_only_when_asked() -> None:
    x, lx, z, lz = _clusters(32)
    t_gw, gw_log = labeled_gw(x, lx, z, lz, log=True)
    assert isinstance(labeled_gw(x, lx, z, lz, log=False), np.ndarray)
    _, fc_log = feature_coupling(x, z, t_gw, log=True)
    assert isinstance(feature_coupling(x, z, t_gw), np.ndarray)
    a, b = np.full(4, 0.25), np.full(3, 1 / 3)
    _, s_log = sinkhorn(a, b, np.random.default_rng(0).random((4, 3)), 0.1, log=True)
    assert isinstance(sinkhorn(a, b, np.ones((4, 3)), 0.1), np.ndarray)
    for log in (gw_log, fc_log, s_log):
        assert set(SOLVER_LOG_KEYS) <= set(log)
        assert isinstance(log["iterations"], int) and isinstance(log["converged"], bool)
    assert {"sinkhorn_iterations", "objective", "n_shared_classes"} <= set(gw_log)
    assert "absorptions" in fc_log and {"f", "g", "absorptions"} <= set(s_log)


def test_feature_cost_is_the_coot_sum() -> None:
    x, lx, z, lz = _clusters(33, d_x=5, d_z=3)
    t, _ = labeled_gw(x, lx, z, lz)
    explicit = np.einsum("aibj,ab->ij", (x[:, :, None, None] - z[None, None, :, :]) ** 2, t)
    ours = feature_cost(torch.tensor(x), torch.tensor(z), torch.tensor(t))
    assert np.abs(ours.numpy() - explicit).max() < 1e-12


def test_thread_policy_restores_torch_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small problems run on one thread; torch's setting is restored, also after an error."""
    seen: list[int] = []
    real_solve = ot_kernel._solve

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_solve(*args, **kwargs)

    # patched where labeled_gw's Sinkhorn solves look it up (ot.kernel._solve_shifted)
    monkeypatch.setattr(ot_kernel, "_solve", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, lx, z, lz = _clusters(34)
        labeled_gw(x, lx, z, lz)
        assert seen and set(seen) == {1}
        seen.clear()
        labeled_gw(x, lx, z, lz, num_threads=2)
        assert set(seen) == {2}
        assert torch.get_num_threads() == 2
        with pytest.raises(OTInputError):
            labeled_gw(x, lx, z, lz, num_threads=0)
        monkeypatch.setattr(ot_kernel, "_solve", lambda *a, **k: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            labeled_gw(x, lx, z, lz)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_explicit_workspace_is_reused_and_a_busy_one_is_not_shared() -> None:
    rng = np.random.default_rng(35)
    x = torch.tensor(rng.normal(size=(8, 16)), dtype=torch.float32)
    z = torch.tensor(rng.normal(size=(8, 10)), dtype=torch.float32)
    t = torch.eye(8) / 8
    ws = Workspace()
    first = feature_coupling(x, z, t, workspace=ws)
    buf = ws.matrix("feature_kernel", (16, 10), torch.float32, x.device)
    assert torch.equal(feature_coupling(x, z, t, workspace=ws), first)
    assert ws.matrix("feature_kernel", (16, 10), torch.float32, x.device) is buf
    with ws.lease() as held:  # another call holds it: this one must work in its own memory
        assert held is ws
        with ws.lease() as other:
            assert other is not ws
        assert torch.equal(feature_coupling(x, z, t, workspace=ws), first)
        assert ws.matrix("feature_kernel", (16, 10), torch.float32, x.device) is buf


def test_numpy_benchmark_reference_solves_the_same_problem() -> None:
    """``benchmarks/ot_reference.py`` is the speed yardstick: it must reach the same accuracy
    (its own stopping rule, so not the same iterations) on the same problem."""
    from benchmarks import ot_reference

    x, lx, z, lz = _clusters(36, n_x=12, n_z=12, d_x=40, d_z=24)
    x, z = np.abs(x).astype(np.float32), np.abs(z).astype(np.float32)
    t, _ = labeled_gw(x, lx, z, lz)
    t_ref, _ = ot_reference.labeled_gw(x, lx, z, lz)
    p, q = _share_marginals(lx, lz)
    for coupling in (t, t_ref):
        assert np.abs(coupling.sum(1) - p).sum() + np.abs(coupling.sum(0) - q).sum() < 1e-3
    e, e_ref = _energy(x, z, t), _energy(x, z, t_ref)
    assert abs(e - e_ref) <= 0.02 * e_ref
    assert ot_reference.gw_energy(_scaled_cost(x), _scaled_cost(z), t) == pytest.approx(e)
    assert np.abs(t - t_ref).sum() < 1e-2
    tv = feature_coupling(x, z, t)
    tv_ref, _ = ot_reference.feature_coupling(x, z, t)
    for coupling in (tv, tv_ref):
        row, col = coupling.sum(1) - 1 / 40, coupling.sum(0) - 1 / 24
        assert np.abs(row).sum() + np.abs(col).sum() < 1e-3
    assert np.abs(tv - tv_ref).sum() < 1e-2


@pytest.mark.parametrize("seed", [40, 41, 42, 43])
def test_default_stopping_rules_meet_the_training_accuracy(seed: int) -> None:
    """What a training step needs, with the default stopping rules: every coupling within L1
    1e-3 of its marginals, and a GW energy within 2 % of a tight (float64) solve."""
    rng = np.random.default_rng(seed)
    n, k = 32, 4
    labels = rng.integers(0, k, n)
    labels[:k] = np.arange(k)
    latent = (2.0 * rng.normal(size=(k, 8)))[labels] + rng.normal(size=(n, 8))
    x = np.maximum(latent @ rng.normal(size=(8, 96)) + 0.5 * rng.normal(size=(n, 96)), 0)
    z = np.maximum(latent @ rng.normal(size=(8, 64)) + 0.5 * rng.normal(size=(n, 64)), 0)
    lz = labels[rng.permutation(n)] if seed % 2 else labels  # unequal class sizes per side
    x32, z32 = torch.tensor(x, dtype=torch.float32), torch.tensor(z, dtype=torch.float32)
    t, info = labeled_gw(x32, labels, z32, lz)
    _, tight = labeled_gw(x, labels, z, lz, tol=1e-10, inner_tol=1e-11, max_iter=1000,
                                inner_max_iter=20000)  # fmt: skip
    p, q = _share_marginals(labels, lz)
    t64 = t.double().numpy()
    assert np.abs(t64.sum(1) - p).sum() + np.abs(t64.sum(0) - q).sum() < 1e-3
    assert info["converged"] and info["marginal_error"] < 1e-3
    assert abs(_energy(x, z, t64) - tight["objective"]) <= 0.02 * tight["objective"]
    assert np.all(t64[labels[:, None] != lz[None, :]] == 0.0)
    tv, tv_info = feature_coupling(x32, z32, t, log=True)
    tv64 = tv.double().numpy()
    row, col = np.abs(tv64.sum(1) - 1 / 96).sum(), np.abs(tv64.sum(0) - 1 / 64).sum()
    assert row + col < 1e-3 and tv_info["converged"]
    assert row + col <= tv_info["marginal_error"] + 1e-6  # the reported error bounds the true one
    assert col < 1e-5  # the solve ends on an exact column update


def test_default_step_is_bit_identical_run_to_run() -> None:
    """Same inputs, same bits: the GW coupling, its log and the feature coupling (which is
    written into fresh, numpy-allocated memory and computed in a reused workspace)."""
    rng = np.random.default_rng(44)
    x = torch.tensor(np.abs(rng.normal(size=(32, 300))), dtype=torch.float32)
    z = torch.tensor(np.abs(rng.normal(size=(32, 500))), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 3, 32))
    runs = []
    for _ in range(3):
        t, info = labeled_gw(x, labels, z, labels)
        tv = feature_coupling(z, x, t.T)
        runs.append((t, info, tv))
    for t, info, tv in runs[1:]:
        assert torch.equal(t, runs[0][0]) and info == runs[0][1]
        assert torch.equal(tv, runs[0][2])


def test_check_interval_defaults_by_device() -> None:
    """None = test every iteration for large CPU problems (a test costs no sync there), every
    3rd for small ones, every few on an accelerator; an explicit interval is kept, and a solve
    tested every iteration stops at the first one that meets its tolerance."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big, small = 6144 * 2048, 32 * 32
    assert ot_module._check_interval(None, cpu, "feature_coupling", big) == 1
    assert ot_module._check_interval(None, cpu, "labeled_gw", small) == 3
    assert ot_module._check_interval(None, cuda, "feature_coupling", big) == 10
    assert ot_module._check_interval(None, cuda, "labeled_gw", small) == 5
    assert ot_module._check_interval(2, cuda, "labeled_gw", small) == 2
    rng = np.random.default_rng(45)
    x = rng.normal(size=(20, 48)).astype(np.float32)
    z = rng.normal(size=(20, 32)).astype(np.float32)
    t = np.full((20, 20), 1 / 400, dtype=np.float32)
    _, every_1 = feature_coupling(x, z, t, check_every=1, log=True)
    _, every_10 = feature_coupling(x, z, t, check_every=10, log=True)
    assert every_1["iterations"] <= every_10["iterations"]
    assert every_10["iterations"] % 10 == 0
    assert every_1["marginal_error"] <= 1e-3 and every_10["marginal_error"] <= 1e-3


def test_large_cpu_matrices_live_in_numpy_memory_with_the_same_values() -> None:
    """Large CPU scratch and result matrices are numpy-allocated (huge pages); values do not
    depend on where the memory came from, and small or non-float ones stay plain torch."""
    big = ot_module._empty((1024, 1024), torch.float32, torch.device("cpu"))
    assert big.shape == (1024, 1024) and big.dtype == torch.float32
    small = ot_module._empty((8, 8), torch.float32, torch.device("cpu"))
    assert small.shape == (8, 8)
    h = -torch.rand(3000, 700, dtype=torch.float32) * 80
    k = h.clone()
    ot_module._exp_(k)
    assert torch.allclose(k, torch.exp(h), rtol=1e-6, atol=0)
    assert torch.equal(ot_module._col_min(h), h.amin(dim=0))
