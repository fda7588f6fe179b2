"""Path pooling: how a complete eye's RIMA prediction combines its full / fundus-only / OCT-only
paths (models/rima.py, step 7), the fit of the weights on validation (calibration.py) and their
way through training into ``model.pt``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rima_core.core.models import load_model, save_model
from rima_core.core.models.common import Inputs
from rima_core.core.models.rima import DEFAULT_PATH_WEIGHTS, PATHS
from rima_core.ops.model_card import pooling_lines
from rima_core.runs.calibration import (
    MIN_PATH_EYES,
    PATH_WEIGHT_MAX,
    calibrate_paths,
    fit_path_weights,
    path_alternatives,
    pooled_nll,
)
from rima_core.runs.train import train
from tests.conftest import TinyData
from tests.unit.test_models import MIXED, make_batch, make_model, make_spec, run

CPU = torch.device("cpu")


def _log_probs(y: np.ndarray, strength: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """Log-softmax of noisy logits that point at the true class with ``strength``."""
    z = strength * np.eye(k)[y] + rng.normal(size=(len(y), k))
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _paths(n: int = 400, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three paths: pure noise, informative, weakly informative (independent noise each)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    lp = np.stack([_log_probs(y, s, k, rng) for s in (0.0, 3.0, 1.0)])
    return lp, y


def test_fit_moves_weight_from_a_useless_path_to_the_informative_ones() -> None:
    lp, y = _paths()
    start = np.array(DEFAULT_PATH_WEIGHTS)
    w = fit_path_weights(lp, y, start)
    assert w[0] < 0.1 < w[2] < w[1]
    assert ((w >= 0) & (w <= PATH_WEIGHT_MAX)).all()
    assert pooled_nll(lp, y, w) < pooled_nll(lp, y, start) - 0.1
    # the pool of the two informative paths beats the better one alone (independent errors)
    acc = lambda weights: (np.tensordot(weights, lp, axes=1).argmax(1) == y).mean()  # noqa: E731
    assert acc(w) > acc(np.array([0.0, 1.0, 0.0]))


def test_fit_never_leaves_a_worse_nll_than_its_start() -> None:
    lp, y = _paths(seed=1)
    best = fit_path_weights(lp, y, np.array(DEFAULT_PATH_WEIGHTS))
    again = fit_path_weights(lp, y, best)
    assert pooled_nll(lp, y, again) <= pooled_nll(lp, y, best) + 1e-12


def test_fit_rejects_bad_input() -> None:
    lp, y = _paths(n=30)
    with pytest.raises(ValueError, match=r"\(P, n, K\)"):
        fit_path_weights(lp[:, :10], y, np.ones(3))
    with pytest.raises(ValueError, match=r"\(P, n, K\)"):
        fit_path_weights(lp, y, np.ones(2))
    bad = lp.copy()
    bad[1, 3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_path_weights(bad, y, np.ones(3))


def test_default_weights_return_the_full_path_untouched() -> None:
    """Training and older models: the logits are the full path's, bit for bit, in train and
    eval (the fused head alone here, as older models; the product full path in
    test_models.test_product_full_path)."""
    model = make_model("rima", full_path="head").eval()
    b = make_batch(*MIXED)
    assert model.path_weights.tolist() == list(DEFAULT_PATH_WEIGHTS)
    with torch.no_grad():
        f, o = model.encode(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"])
        full = model.fuse(f, o, b["has_fundus"], b["has_oct"])
        assert torch.equal(run(model, b, labels=False).logits, full)
    model.train()
    ref = copy.deepcopy(model)  # a training forward updates running statistics: compare twins
    f, o = ref.encode(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"])
    assert torch.equal(run(model, b).logits, ref.fuse(f, o, b["has_fundus"], b["has_oct"]))


def test_fitted_weights_pool_the_paths_of_complete_eyes_only() -> None:
    model = make_model("rima", full_path="head").eval()  # full path = fuse(f, o), below
    b = make_batch(*MIXED)
    w = torch.tensor([0.3, 1.2, 0.5])
    model.path_weights.copy_(w)
    hf, ho = b["has_fundus"], b["has_oct"]
    both = hf & ho
    with torch.no_grad():
        out = run(model, b, labels=False).logits
        f, o = model.encode(b["fundus"], b["oct"], hf, ho)
        full = model.fuse(f, o, hf, ho)
        ones = torch.ones_like(hf)
        by_path = {
            "full": model.fuse(f, o, ones, ones),
            "fundus_only": model.fuse(f, o, ones, ~ones),
            "oct_only": model.fuse(f, o, ~ones, ones),
        }
    expected = sum(wk * F.log_softmax(by_path[p], dim=1) for wk, p in zip(w, PATHS, strict=True))
    assert torch.allclose(out[both], expected[both], atol=1e-5)
    assert torch.equal(out[~both], full[~both])  # an eye missing a modality has one path
    # the fundus-only path of a complete eye is what an eye without its OCT gets
    fundus_eyes = {k: v[hf] for k, v in b.items()}
    fundus_eyes["has_oct"] = torch.zeros_like(fundus_eyes["has_oct"])
    fundus_eyes["oct"] = torch.zeros_like(fundus_eyes["oct"])
    with torch.no_grad():
        alone = run(model, fundus_eyes, labels=False).logits
    assert torch.allclose(by_path["fundus_only"][hf], alone, atol=1e-5)


def test_weights_are_saved_and_older_models_load_with_the_default(tmp_path: Path) -> None:
    model = make_model("rima")
    model.path_weights.copy_(torch.tensor([0.0, 0.9, 0.4]))
    spec = make_spec("rima")
    save_model(model, spec, tmp_path / "model.pt")
    loaded, _ = load_model(tmp_path / "model.pt")
    assert loaded.path_weights.tolist() == pytest.approx([0.0, 0.9, 0.4])
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    del blob["state_dict"]["path_weights"]
    torch.save(blob, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert old.path_weights.tolist() == list(DEFAULT_PATH_WEIGHTS)


def _loader(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Batches of 8 eyes (a third without OCT), with store indices, as the eval loaders yield."""
    has_f = [1] * n
    has_o = [int(i % 3 != 2) for i in range(n)]
    b = make_batch(has_f, has_o, seed=seed)
    b["index"] = torch.arange(n)
    return [{k: v[i : i + 8] for k, v in b.items()} for i in range(0, n, 8)]


def test_calibrate_paths_fits_on_complete_eyes_once_each() -> None:
    model = make_model("rima")
    loader = _loader(48, seed=3)  # 32 complete eyes
    report = calibrate_paths(model, {"complete": loader, "again": loader}, CPU)
    assert report is not None and report["n_eyes"] == 32  # the second loader adds no eye
    assert report["paths"] == list(PATHS)
    assert report["fitted"] and report["nll_after"] <= report["nll_before"]
    weights = [report["weights"][p] for p in PATHS]
    assert model.path_weights.tolist() == pytest.approx(weights)
    assert model.training  # mode restored (build_model returns a model in training mode)
    alt = report["nll_alternatives"]  # each path alone, the singles pooled: none beats all three
    assert set(alt) == {*PATHS, "singles"}
    assert min(alt.values()) >= report["nll_after"] - 1e-9
    assert alt["singles"] <= min(alt["fundus_only"], alt["oct_only"]) + 1e-9


def test_path_alternatives_tell_a_useless_full_path_from_a_useful_one() -> None:
    """The full path's own NLL against the singles pooled: a full path that only adds noise
    is worse than the singles, one that knows the grade is better."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    onehot = np.eye(3)[y]

    def log_probs(signal: float) -> np.ndarray:
        z = signal * onehot + rng.normal(size=(300, 3))
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    singles = [log_probs(1.5), log_probs(1.5)]
    weak = path_alternatives(np.stack([log_probs(0.0), *singles]), y, list(PATHS))
    strong = path_alternatives(np.stack([log_probs(6.0), *singles]), y, list(PATHS))
    assert weak["full"] > weak["singles"] and strong["full"] < strong["singles"]


def test_calibrate_paths_keeps_the_weights_with_too_few_eyes_or_no_paths() -> None:
    model = make_model("rima")
    few = _loader(MIN_PATH_EYES, seed=4)  # 2/3 of them complete: below the minimum
    report = calibrate_paths(model, few, CPU)
    assert report is not None and not report["fitted"]
    assert model.path_weights.tolist() == list(DEFAULT_PATH_WEIGHTS)
    assert calibrate_paths(make_model("late_fusion_zero"), few, CPU) is None


@pytest.mark.parametrize("pool", [True, False])
def test_training_saves_the_fitted_weights(tiny_data: TinyData, tmp_path: Path, pool: bool) -> None:
    cfg = copy.deepcopy(tiny_data.cfg)
    cfg.train.epochs = 1
    cfg.train.pool_paths = pool
    summary = train(tiny_data.store, tiny_data.masks, tmp_path, cfg)
    model, _ = load_model(tmp_path / "model.pt")
    saved = json.loads((tmp_path / "train_summary.json").read_text())
    if not pool:
        assert "path_pooling" not in summary and "path_pooling" not in saved
        assert model.path_weights.tolist() == list(DEFAULT_PATH_WEIGHTS)
        return
    pooling = saved["path_pooling"]
    assert pooling["n_eyes"] > 0 and pooling["paths"] == list(PATHS)
    assert model.path_weights.tolist() == pytest.approx([pooling["weights"][p] for p in PATHS])
    if pooling["fitted"]:
        assert pooling["nll_after"] <= pooling["nll_before"]
    else:
        assert pooling["n_eyes"] < MIN_PATH_EYES


@pytest.mark.parametrize("name", ["imputation", "imputation_paths"])
def test_imputation_pools_its_three_paths_like_rima(name: str) -> None:
    """A complete eye of the imputation baselines has the same three paths (full, fundus +
    imputed OCT, imputed fundus + OCT); fitted weights pool them, the default leaves the full
    path untouched, and an eye missing a modality keeps its one path."""
    model = make_model(name).eval()
    b = make_batch(*MIXED)
    hf, ho = b["has_fundus"], b["has_oct"]
    both = hf & ho
    assert model.path_weights.tolist() == list(DEFAULT_PATH_WEIGHTS)
    assert tuple(model.PATHS) == PATHS
    with torch.no_grad():
        default = run(model, b, labels=False).logits
        f = model.fundus_encoder(b["fundus"]) * hf[:, None]
        o = model.oct_encoder(b["oct"]) * ho[:, None]
        pred_f, pred_o = model.imputed(f, o)
        f_in, o_in = torch.where(hf[:, None], f, pred_f), torch.where(ho[:, None], o, pred_o)
        torch.testing.assert_close(default, model.head(torch.cat([f_in, o_in], 1)))
        by_path = {
            "full": model.head(torch.cat([f, o], 1)),
            "fundus_only": model.head(torch.cat([f, pred_o], 1)),
            "oct_only": model.head(torch.cat([pred_f, o], 1)),
        }
        w = torch.tensor([0.2, 0.9, 0.6])
        model.path_weights.copy_(w)
        pooled = run(model, b, labels=False).logits
        lp, rows = model.complete_eye_log_probs(
            Inputs(b["fundus"], b["oct"], hf, ho, None)  # what calibrate_paths reads
        )
    expected = sum(wk * F.log_softmax(by_path[p], 1) for wk, p in zip(w, PATHS, strict=True))
    torch.testing.assert_close(pooled[both], expected[both], atol=1e-5, rtol=1e-5)
    assert torch.equal(pooled[~both], default[~both])
    assert rows.tolist() == both.nonzero().flatten().tolist()
    for k, p in enumerate(PATHS):
        torch.testing.assert_close(lp[k], F.log_softmax(by_path[p][both], 1), atol=1e-5, rtol=0)
    # the fundus-only path of a complete eye is what an eye without its OCT gets
    torch.testing.assert_close(by_path["fundus_only"][hf & ~ho], default[hf & ~ho])


def test_calibrate_paths_fits_imputation_and_old_models_load(tmp_path: Path) -> None:
    model = make_model("imputation_paths")
    report = calibrate_paths(model, _loader(48, seed=3), CPU)
    assert report is not None and report["fitted"] and report["n_eyes"] == 32
    assert report["nll_after"] <= report["nll_before"]
    assert model.path_weights.tolist() == pytest.approx([report["weights"][p] for p in PATHS])
    spec = make_spec("imputation_paths")
    save_model(model, spec, tmp_path / "model.pt")
    loaded, _ = load_model(tmp_path / "model.pt")
    assert loaded.path_weights.tolist() == pytest.approx(model.path_weights.tolist())
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    del blob["state_dict"]["path_weights"]  # saved before imputation pooled its paths
    torch.save(blob, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert old.path_weights.tolist() == list(DEFAULT_PATH_WEIGHTS)


def test_model_card_states_the_pooling() -> None:
    fitted = {
        "paths": list(PATHS),
        "n_eyes": 106,
        "fitted": True,
        "weights": {"full": 0.0, "fundus_only": 1.04, "oct_only": 0.43},
        "nll_before": 0.61,
        "nll_after": 0.48,
    }
    (line,) = pooling_lines(fitted, "val")
    assert "full 0.000 / fundus_only 1.040 / oct_only 0.430" in line
    assert "106 complete val eyes" in line and "0.610 → 0.480" in line
    kept = {**fitted, "fitted": False, "n_eyes": 12, "weights": dict.fromkeys(PATHS, 0.0)}
    assert "too few" in pooling_lines(kept, "val")[0]
    assert pooling_lines(None, "val") == []


def test_selection_scores_the_predictor_that_ships(
    tiny_data: TinyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each epoch is scored with path weights and temperatures fitted on validation as
    training's end fits them; the shipped model.pt reproduces the selected epoch's validation
    score exactly, and training itself (the checkpoint) runs the full path alone."""
    from rima_core.core.data.dataset import EyeDataset, make_loader
    from rima_core.core.data.masks import load_masks, selection_scenarios
    from rima_core.runs import calibration
    from rima_core.runs.train import validation_metrics

    cfg = copy.deepcopy(tiny_data.cfg)
    cfg.train.epochs = 2
    cfg.train.patience = 0
    cfg.train.pool_paths = True
    cfg.train.selection_metric = "nll"  # a probability metric: calibration matters to it
    # the tiny store has a dozen validation eyes per pattern: fit on them all the same
    monkeypatch.setattr(calibration, "MIN_PATH_EYES", 5)
    monkeypatch.setattr(calibration, "MIN_TEMPERATURE_EYES", 5)
    summary = train(tiny_data.store, tiny_data.masks, tmp_path, cfg)
    model, spec = load_model(tmp_path / "model.pt")
    assert summary["path_pooling"]["fitted"]
    assert model.path_weights.tolist() != list(DEFAULT_PATH_WEIGHTS)
    assert set(spec.temperatures) == {"complete", "fundus_only", "oct_only"}
    masks = load_masks(tiny_data.masks)
    loaders = {
        s: make_loader(EyeDataset(tiny_data.store, masks, "val", s), 64, shuffle=False, seed=0)
        for s in selection_scenarios(cfg.train.selection_scenario)
    }
    shipped = validation_metrics(model, loaders, CPU, None, spec.class_names)
    for key in ("nll", "qwk", "ece"):
        assert shipped[key] == pytest.approx(summary["best_val_metrics"][key], abs=1e-9), key
    # the full path alone scores otherwise: selection did not look at it
    model.reset_path_weights()
    raw = validation_metrics(model, loaders, CPU, None, spec.class_names)
    assert raw["nll"] != pytest.approx(shipped["nll"], abs=1e-9)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["model"]["path_weights"].tolist() == list(DEFAULT_PATH_WEIGHTS)
