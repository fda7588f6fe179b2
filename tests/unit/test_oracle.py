"""The phantom's regimes and the Bayes-optimal oracle (rima_core/core/data/oracle.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from rima_core.config import ConfigError, SynthConfig, load_config
from rima_core.core.data import oracle
from rima_core.core.data.synthetic import (
    SITES,
    _apportion,
    _plan,
    focus_xy,
    generate,
    grade_score,
    render_fundus,
    render_oct,
    score_edges,
)

REGIMES = {
    "shared": {"anatomy": "shared"},
    "private_oct": {"private_latent": "oct"},
    "private_fundus": {"private_latent": "fundus"},
}
AMD = {"n_classes": 4, "class_weights": [0.45, 0.3, 0.15, 0.1]}


def _small(**kw) -> SynthConfig:
    base = {"n_eyes": 40, "fundus_size": 48, "oct_shape": [16, 16, 16], "seed": 2}
    base.update(kw)
    return SynthConfig(**base)


def _load(root: Path) -> dict[int, dict[str, np.ndarray]]:
    eyes = {}
    for path in (root / "Synthetic").glob("*/*.npz"):
        with np.load(path) as z:
            eyes[oracle.plan_index(path.stem)] = {k: z[k] for k in z.files}
    return eyes


# --- the oracle ----------------------------------------------------------------------------------


def test_plan_index_and_foreign_ids() -> None:
    assert oracle.plan_index("data_00001") == 0 and oracle.plan_index("data_00600") == 599
    for bad in ("data_0001", "data_00000", "eye_00001", "data_00001.npz", ""):
        with pytest.raises(ValueError, match="not a synthetic phantom eye"):
            oracle.plan_index(bad)
    with pytest.raises(ValueError, match="n_eyes=40"):
        oracle.posterior(_small(), ["data_00041"], [True], [True])


@pytest.mark.parametrize("regime", [{}, *REGIMES.values(), {**REGIMES["shared"], **AMD}])
def test_posterior_rows_are_distributions(regime: dict) -> None:
    cfg = _small(n_eyes=300, **regime)
    ids = [f"data_{i + 1:05d}" for i in range(cfg.n_eyes)]
    rng = np.random.default_rng(0)
    has_f = rng.uniform(size=cfg.n_eyes) < 0.7
    has_o = ~has_f | (rng.uniform(size=cfg.n_eyes) < 0.5)
    p = oracle.posterior(cfg, ids, has_f, has_o)
    assert p.shape == (cfg.n_eyes, cfg.n_classes) and np.isfinite(p).all() and (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    plan = _plan(cfg)
    assert np.mean(oracle.decode_argmax(p) == plan.grade) > 0.6
    has_f[7] = has_o[7] = False
    with pytest.raises(ValueError, match="data_00008"):
        oracle.posterior(cfg, ids, has_f, has_o)


def test_oracle_on_a_generated_phantom_beats_a_noisy_reference(tmp_path: Path) -> None:
    cfg = _small(missing_fundus_fraction=0.1, missing_oct_fraction=0.1)
    generate(tmp_path, cfg)
    eyes = _load(tmp_path)
    ids = [f"data_{i + 1:05d}" for i in sorted(eyes)]
    has_f = [("slo_fundus" in eyes[i]) for i in sorted(eyes)]
    has_o = [("oct_bscans" in eyes[i]) for i in sorted(eyes)]
    grades = np.array([int(eyes[i]["grade"]) for i in sorted(eyes)])
    p = oracle.posterior(cfg, ids, has_f, has_o)
    assert np.mean(oracle.decode_argmax(p) == grades) >= 0.75
    # on many eyes: the oracle beats reading one view with extra noise (a weaker observer)
    big = SynthConfig(n_eyes=6000, seed=4)
    plan = _plan(big)
    ids = [f"data_{i + 1:05d}" for i in range(big.n_eyes)]
    both = np.ones(big.n_eyes, bool)
    p = oracle.posterior(big, ids, both, both)
    noisy = plan.sev_fundus + np.random.default_rng(1).normal(0.0, 0.12, big.n_eyes)
    reference = np.clip(np.floor(noisy * big.n_classes), 0, big.n_classes - 1)
    for decode in (oracle.decode_argmax, oracle.decode_quadratic):
        assert oracle.qwk(plan.grade, decode(p), 3) > oracle.qwk(plan.grade, reference, 3) + 0.05


@pytest.mark.parametrize("regime", [{}, AMD, REGIMES["shared"], REGIMES["private_oct"]])
def test_monte_carlo_agrees_with_the_exact_posterior(regime: dict) -> None:
    cfg = SynthConfig(**regime)
    _, views = oracle.simulate(cfg, 400, seed=5)
    n = 400
    for has_f, has_o in oracle.AVAILABILITY.values():
        args = (cfg, views, np.full(n, has_f), np.full(n, has_o))
        exact = oracle.posterior_from_views(*args)
        mc = oracle.posterior_from_views(*args, method="mc", mc_draws=20_000)
        tol = 0.01 if grade_score(cfg) is None else 0.05  # default: closed form vs MC
        assert np.abs(exact - mc).max() < tol and np.abs(exact - mc).mean() < tol / 5


@pytest.mark.parametrize(
    ("signals", "expected"),
    [
        ({}, (0.857, 0.857, 0.899)),
        ({"fundus_signal": 2.0, "oct_signal": 0.5}, (0.929, 0.706, 0.931)),
    ],
)
def test_ceiling_of_the_known_phantoms(signals: dict, expected: tuple) -> None:
    ceil = oracle.ceiling(SynthConfig(**signals))
    got = tuple(ceil["qwk"][a]["argmax"] for a in ("fundus", "oct", "both"))
    np.testing.assert_allclose(got, expected, atol=0.01)
    for decoding in ("argmax", "quadratic"):
        q = {a: ceil["qwk"][a][decoding] for a in oracle.AVAILABILITY}
        assert q["both"] >= max(q["fundus"], q["oct"]) - 1e-3


@pytest.mark.parametrize("regime", [*REGIMES.values(), {**REGIMES["private_oct"], **AMD}])
def test_regime_ceilings_both_views_best(regime: dict) -> None:
    ceil = oracle.ceiling(SynthConfig(**regime), n_draws=30_000, seed=1)
    for decoding in ("argmax", "quadratic"):
        q = {a: ceil["qwk"][a][decoding] for a in oracle.AVAILABILITY}
        assert q["both"] >= max(q["fundus"], q["oct"]) - 1e-3, q
        assert min(q.values()) > 0.6 and max(q.values()) < 0.98, q
    q = {a: ceil["qwk"][a]["argmax"] for a in oracle.AVAILABILITY}
    if regime.get("private_latent") == "oct":  # the modality that sees the latent reads it best
        assert q["oct"] > q["fundus"] + 0.05, q


def test_decodings() -> None:
    p = np.array([[0.5, 0.0, 0.5], [0.45, 0.1, 0.45], [0.6, 0.4, 0.0], [0.4, 0.0, 0.6]])
    np.testing.assert_array_equal(oracle.decode_argmax(p), [0, 0, 0, 2])
    np.testing.assert_array_equal(oracle.decode_quadratic(p), [1, 1, 0, 1])


# --- regimes: grades, latents, images ------------------------------------------------------------


@pytest.mark.parametrize("regime", [*REGIMES.values(), {**REGIMES["shared"], **AMD}])
def test_regime_grades_keep_their_counts_and_follow_the_score(regime: dict) -> None:
    cfg = SynthConfig(n_eyes=997, seed=7, **regime)
    default = _plan(
        SynthConfig(n_eyes=997, seed=7, **{k: v for k, v in regime.items() if k in AMD})
    )
    plan = _plan(cfg)
    k = cfg.n_classes
    weights = np.asarray(cfg.class_weights or [1.0] * k)
    np.testing.assert_array_equal(np.bincount(plan.grade, minlength=k), _apportion(997, weights))
    # the same eyes, splits, masks and attributes as the default phantom: only latents differ
    np.testing.assert_array_equal(plan.grade, default.grade)
    np.testing.assert_array_equal(plan.split, default.split)
    np.testing.assert_array_equal(plan.has_oct, default.has_oct)
    np.testing.assert_array_equal(plan.site, default.site)
    unit = {"severity": plan.latents["severity"]}
    if "eccentricity" in plan.latents:
        assert plan.latents["eccentricity"].min() >= 0 and plan.latents["eccentricity"].max() <= 0.7
        unit["centrality"] = 1.0 - plan.latents["eccentricity"] / 0.7
    if "private" in plan.latents:
        unit["private"] = plan.latents["private"]
    t = sum(w * unit[name] for name, w in grade_score(cfg))
    edges = score_edges(cfg)
    np.testing.assert_array_equal(
        np.clip(np.searchsorted(edges, t, side="right") - 1, 0, k - 1), plan.grade
    )
    # every modality has a view of every latent; the clear view of the private latent is close
    assert set(plan.views["fundus"]) == set(plan.views["oct"]) == set(plan.latents)
    if "private" in plan.latents:
        clear = cfg.private_latent
        faint = "fundus" if clear == "oct" else "oct"
        err = {
            m: np.std(plan.views[m]["private"] - plan.latents["private"]) for m in (clear, faint)
        }
        assert err[clear] < 0.06 and err[faint] > 0.4


def test_shared_anatomy_places_the_lesions_at_the_focus(tmp_path: Path) -> None:
    cfg = _small(anatomy="shared", missing_fundus_fraction=0.0, missing_oct_fraction=0.0)
    generate(tmp_path, cfg)
    eyes, plan = _load(tmp_path), _plan(cfg)
    fx, fy = focus_xy(plan.latents["eccentricity"], plan.latents["angle"])
    size = cfg.fundus_size
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    field = x**2 + y**2 < 0.85**2
    cx, cy = [], []
    for i in range(cfg.n_eyes):  # centroid of the bright (drusen) pixels outside the disc
        img = eyes[i]["slo_fundus"].astype(float)
        green = img[..., 1] / (np.median(img[..., 1][field]) + 1.0)
        side = 1.0 if plan.right_eye[i] else -1.0
        disc = (x - side * 0.45) ** 2 + y**2 < 0.28**2
        w = np.where((green > 1.5) & field & ~disc, green, 0.0)
        cx.append((w * x).sum() / max(w.sum(), 1e-9))
        cy.append((w * y).sum() / max(w.sum(), 1e-9))
    assert np.corrcoef(cx, fx)[0, 1] > 0.8 and np.corrcoef(cy, fy)[0, 1] > 0.8
    # both modalities put the focus at the same place: fundus (x, y) <-> OCT (column, B-scan)
    for focus in ((0.4, 0.35), (-0.3, 0.45), (0.1, -0.5)):
        far = (-focus[0], -focus[1])
        oct_a = render_oct(np.random.default_rng(1), 0.5, (24, 24, 24), focus=focus)
        oct_b = render_oct(np.random.default_rng(1), 0.5, (24, 24, 24), focus=far)
        fun_a = render_fundus(np.random.default_rng(1), 0.5, 0, True, 48, focus=focus)
        fun_b = render_fundus(np.random.default_rng(1), 0.5, 0, True, 48, focus=far)
        for diff in (
            np.abs(oct_a.astype(float) - oct_b).sum(axis=1),  # (B-scan d, column w)
            np.abs(fun_a.astype(float) - fun_b).sum(axis=2),  # (row y, column x)
        ):
            n = diff.shape[0]
            c = (np.arange(n) + 0.5) / n * 2.0 - 1.0
            rows, cols = np.meshgrid(c, c, indexing="ij")
            near = (cols - focus[0]) ** 2 + (rows - focus[1]) ** 2 < (cols - far[0]) ** 2 + (
                rows - far[1]
            ) ** 2
            w = np.where(near, diff, 0.0)
            centre = ((w * cols).sum() / w.sum(), (w * rows).sum() / w.sum())
            assert np.hypot(centre[0] - focus[0], centre[1] - focus[1]) < 0.15, (focus, centre)


@pytest.mark.parametrize("modality", ["oct", "fundus"])
def test_private_latent_shows_in_the_images(tmp_path: Path, modality: str) -> None:
    cfg = _small(private_latent=modality, missing_fundus_fraction=0.0, missing_oct_fraction=0.0)
    generate(tmp_path, cfg)
    eyes, plan = _load(tmp_path), _plan(cfg)
    size = cfg.fundus_size
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    r2 = sum(a**2 for a in np.meshgrid(c, c, indexing="ij"))
    dark, sheen = [], []
    for i in range(cfg.n_eyes):
        vol = eyes[i]["oct_bscans"].astype(float)
        dark.append(np.mean(vol[:, 4:12, :] < 25))  # fluid cavities in the retina band
        img = eyes[i]["slo_fundus"].astype(float)[..., 1]
        sheen.append(img[r2 < 0.15**2].mean() / img[(r2 > 0.09) & (r2 < 0.25)].mean())
    phi = plan.latents["private"]
    rho = {"oct": stats.spearmanr(dark, phi)[0], "fundus": stats.spearmanr(sheen, phi)[0]}
    assert rho[modality] > 0.35, rho
    # the renderers follow the view monotonically
    levels = (0.0, 0.5, 1.0)
    fundus = [render_fundus(np.random.default_rng(3), 0.3, 0, True, 48, sheen=v) for v in levels]
    centre = [f[20:28, 20:28, 1].mean() for f in fundus]
    assert centre[0] < centre[1] < centre[2]
    octs = [render_oct(np.random.default_rng(3), 0.3, (16, 16, 16), fluid=v) for v in levels]
    cavity = [np.mean(v[:, 3:10, :] < 25) for v in octs]
    assert cavity[0] < cavity[2]


@pytest.mark.parametrize("shift", ["fundus", "oct"])
def test_site_shift_changes_only_the_test_split(tmp_path: Path, shift: str) -> None:
    base = _small(n_eyes=30, missing_fundus_fraction=0.0, missing_oct_fraction=0.0)
    cfg = _small(n_eyes=30, missing_fundus_fraction=0.0, missing_oct_fraction=0.0, site_shift=shift)
    generate(tmp_path / "a", base)
    generate(tmp_path / "b", cfg)
    plan = _plan(cfg)
    a, b = _load(tmp_path / "a"), _load(tmp_path / "b")
    key = "slo_fundus" if shift == "fundus" else "oct_bscans"
    other = "oct_bscans" if shift == "fundus" else "slo_fundus"
    for i in range(cfg.n_eyes):
        np.testing.assert_array_equal(a[i][other], b[i][other])
        if plan.split[i] == "test":
            assert not np.array_equal(a[i][key], b[i][key])
            if shift == "fundus":
                assert int(b[i]["site"]) >= len(SITES)
            else:
                assert int(b[i]["oct_device"]) == 1
                assert b[i][key][:, :2, :].mean() > a[i][key][:, :2, :].mean() + 5  # vitreous
        else:
            assert set(a[i]) <= set(b[i])
            for k in a[i]:
                np.testing.assert_array_equal(a[i][k], b[i][k])
    # the latent views, and so the oracle, are unchanged
    ids = [f"data_{i + 1:05d}" for i in range(cfg.n_eyes)]
    ones = np.ones(cfg.n_eyes, bool)
    np.testing.assert_array_equal(
        oracle.posterior(cfg, ids, ones, ones), oracle.posterior(base, ids, ones, ones)
    )


def test_regime_keys_validated_and_left_out_of_the_metadata_when_off(tmp_path: Path) -> None:
    for bad in (
        {"anatomy": "both"},
        {"site_shift": "test"},
        {"anatomy": "shared", "private_latent": "oct"},
    ):
        with pytest.raises(ConfigError, match="synth"):
            generate(tmp_path / "x", _small(**bad))
    with pytest.raises(ConfigError, match=r"synth\.private_latent"):
        load_config(None, overrides=["synth.anatomy=shared", "synth.private_latent=oct"])
    with pytest.raises(ConfigError, match=r"synth\.anatomy"):
        load_config(None, overrides=["synth.anatomy=everywhere"])
    generate(tmp_path / "d", _small(n_eyes=6))
    meta = json.loads((tmp_path / "d" / "SYNTHETIC.json").read_text())["config"]
    assert not {"anatomy", "private_latent", "site_shift"} & set(meta)
    generate(tmp_path / "s", _small(n_eyes=6, anatomy="shared", site_shift="oct"))
    meta = json.loads((tmp_path / "s" / "SYNTHETIC.json").read_text())["config"]
    assert meta["anatomy"] == "shared" and meta["site_shift"] == "oct"
    assert "private_latent" not in meta
