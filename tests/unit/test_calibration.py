"""Temperature scaling: fitting, saving with the model, applying in predict (evaluate/serving)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rima_core.config import ModelConfig, OTConfig
from rima_core.core.models import (
    MODEL_NAMES,
    ModelOutput,
    ModelSpec,
    RimaConfig,
    build_model,
    load_model,
    save_model,
)
from rima_core.runs.calibration import (
    T_MAX,
    T_MIN,
    calibrate_model,
    calibrate_paths,
    calibration_report,
    fit_temperature,
    nll,
    reliability_bins,
    softmax,
)
from rima_core.runs.engine import model_temperature, predict, set_model_temperature


def _sampled(n: int, k: int, true_t: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_t): the right T is true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, (n, k))
    p = softmax(logits, true_t)
    y = (p.cumsum(axis=1) > rng.uniform(size=(n, 1))).argmax(axis=1)
    return logits, y


def test_softmax_and_nll_hand_computed() -> None:
    z = np.array([[0.0, math.log(3.0)]])
    assert softmax(z) == pytest.approx(np.array([[0.25, 0.75]]))
    assert softmax(z, 2.0) == pytest.approx(np.array([[1 / (1 + 3**0.5), 3**0.5 / (1 + 3**0.5)]]))
    assert nll(z, np.array([1])) == pytest.approx(-math.log(0.75))


def test_fit_recovers_the_temperature_and_keeps_every_prediction() -> None:
    for true_t in (0.5, 2.0):
        logits, y = _sampled(20000, 3, true_t)
        t = fit_temperature(logits, y)
        assert t == pytest.approx(true_t, rel=0.08)
        assert (softmax(logits, t).argmax(axis=1) == logits.argmax(axis=1)).all()
        report = calibration_report(logits, y, t)
        assert report["nll_after"] <= report["nll_before"]
        assert report["ece_after"] < report["ece_before"]
    # already calibrated: T stays near 1 and never makes NLL worse
    logits, y = _sampled(20000, 3, 1.0, seed=1)
    t = fit_temperature(logits, y)
    assert t == pytest.approx(1.0, rel=0.08)
    assert nll(logits, y, t) <= nll(logits, y)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_temperature(np.array([[0.0, np.nan]]), np.array([0]))


def test_reliability_bins() -> None:
    proba = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    y = np.array([0, 1, 0, 1])
    b = reliability_bins(y, proba, n_bins=10)
    assert b["count"].sum() == 4 and b["count"][9] == 2 and b["count"][5] == 2
    assert b["accuracy"][9] == pytest.approx(0.5) and b["confidence"][9] == pytest.approx(0.95)
    assert b["accuracy"][5] == pytest.approx(1.0)


class _Fixed(nn.Module):
    """Returns the logits it was given for each row index: predict's softmax under test."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, fundus, oct, has_fundus, has_oct):  # type: ignore[no-untyped-def]
        return ModelOutput(logits=self.logits[fundus[:, 0].long()], aux_loss=None, stats={})


def test_predict_applies_the_model_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0]])
    model = _Fixed(logits)
    batch = {
        "fundus": torch.tensor([[0.0], [1.0]]),
        "oct": torch.zeros(2, 1),
        "has_fundus": torch.tensor([True, True]),
        "has_oct": torch.tensor([True, True]),
        "label": torch.tensor([0, 1]),
        "index": torch.tensor([0, 1]),
    }
    cpu = torch.device("cpu")
    assert model_temperature(model) == 1.0
    plain = predict(model, [batch], cpu, progress=False)
    set_model_temperature(model, 2.5)
    scaled = predict(model, [batch], cpu, progress=False)
    assert plain.proba == pytest.approx(softmax(logits.numpy()))
    assert scaled.proba == pytest.approx(softmax(logits.numpy(), 2.5))
    assert scaled.logits == pytest.approx(logits.numpy())  # raw logits, before scaling
    assert (scaled.y_pred == plain.y_pred).all()
    # an explicit temperature wins over the model's
    assert predict(model, [batch], cpu, progress=False, temperature=1.0).proba == pytest.approx(
        plain.proba
    )


def _spec(temperature: float = 1.0) -> ModelSpec:
    mcfg = ModelConfig(fundus_dim=16, oct_dim=16, hidden_dim=16, heads=2, dropout=0.0)
    return ModelSpec(
        name="late_fusion_zero",
        config=RimaConfig.from_sections(mcfg, OTConfig(), "late_fusion_zero"),
        n_classes=3,
        class_names=["a", "b", "c"],
        fundus_shape=[16, 16, 3],
        oct_shape=[8, 8, 8],
        temperature=temperature,
    )


def test_temperature_is_saved_with_the_model(tmp_path: Path) -> None:
    spec = _spec(1.7)
    save_model(build_model(spec, pretrained=False), spec, tmp_path / "model.pt")
    model, loaded = load_model(tmp_path / "model.pt")
    assert loaded.temperature == pytest.approx(1.7)
    assert model_temperature(model) == pytest.approx(1.7)
    # a model saved before the field existed loads as uncalibrated
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    del blob["spec"]["temperature"]
    torch.save(blob, tmp_path / "old.pt")
    model, loaded = load_model(tmp_path / "old.pt")
    assert loaded.temperature == 1.0 and model_temperature(model) == 1.0
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            _spec(bad)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_is_calibrated_and_the_fused_ones_pool_their_paths(name: str) -> None:
    """Training fits the temperature of every model (calibrate_model is model-agnostic) and
    the path weights of every model whose complete eyes have three paths: the RIMA family and
    the imputation baselines (calibrate_paths returns None for the others)."""
    from tests.unit.test_models import make_model
    from tests.unit.test_path_pooling import CPU, _loader

    model = make_model(name)
    loader = _loader(48, seed=3)
    report = calibrate_model(model, {"val": loader}, CPU)
    assert T_MIN <= report["temperature"] <= T_MAX
    assert report["nll_after"] <= report["nll_before"] + 1e-9
    pooling = calibrate_paths(model, {"val": loader}, CPU)
    pools = name.startswith("rima") or name.startswith("imputation")
    assert (pooling is not None) == pools, name
    if pools:
        assert pooling["n_eyes"] == 32 and pooling["fitted"]


# --- one temperature per availability pattern, and the ordinal decoding ----------------------


def test_each_availability_pattern_gets_its_own_temperature() -> None:
    """Complete eyes over-confident by 3, fundus-only by 1.5, OCT-only too few to fit alone:
    each fitted pattern recovers its own T, the small one takes the T of all eyes."""
    from rima_core.runs.calibration import MIN_TEMPERATURE_EYES, availability, fit_temperatures

    lc, yc = _sampled(3000, 4, 3.0, seed=1)
    lf, yf = _sampled(3000, 4, 1.5, seed=2)
    lo, yo = _sampled(MIN_TEMPERATURE_EYES - 1, 4, 0.5, seed=3)
    logits = np.concatenate([lc, lf, lo])
    y = np.concatenate([yc, yf, yo])
    hf = np.r_[np.ones(3000 + 3000, bool), np.zeros(len(yo), bool)]
    ho = np.r_[np.ones(3000, bool), np.zeros(3000, bool), np.ones(len(yo), bool)]
    assert list(np.unique(availability(hf, ho))) == ["complete", "fundus_only", "oct_only"]
    overall, per = fit_temperatures(logits, y, hf, ho)
    assert per["complete"] == pytest.approx(3.0, rel=0.1)
    assert per["fundus_only"] == pytest.approx(1.5, rel=0.1)
    assert per["oct_only"] == overall == pytest.approx(fit_temperature(logits, y))
    # per pattern is never worse in likelihood than one T for all
    from rima_core.runs.calibration import row_temperatures

    rows = row_temperatures(per, overall, hf, ho)
    assert nll(logits, y, rows) < nll(logits, y, overall)


def test_predict_applies_each_eyes_pattern_temperature() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 1.0], [1.0, 0.5, 0.0]])
    model = _Fixed(logits)
    batch = {
        "fundus": torch.tensor([[0.0], [1.0], [2.0]]),
        "oct": torch.zeros(3, 1),
        "has_fundus": torch.tensor([True, True, False]),
        "has_oct": torch.tensor([True, False, True]),
        "label": torch.tensor([0, 1, 2]),
        "index": torch.tensor([0, 1, 2]),
    }
    cpu = torch.device("cpu")
    temps = {"complete": 2.0, "fundus_only": 0.5, "oct_only": 4.0}
    set_model_temperature(model, 1.3, temps)
    p = predict(model, [batch], cpu, progress=False)
    z = logits.numpy()
    for row, t in enumerate((2.0, 0.5, 4.0)):
        assert p.proba[row] == pytest.approx(softmax(z[row : row + 1], t)[0])
    # a model with only the one temperature (older files) applies it to every eye
    set_model_temperature(model, 1.3)
    assert predict(model, [batch], cpu, progress=False).proba == pytest.approx(softmax(z, 1.3))


def test_temperatures_and_decoding_are_saved_with_the_model(tmp_path: Path) -> None:
    from dataclasses import replace

    from rima_core.runs.engine import model_decoding, model_temperatures

    temps = {"complete": 1.9, "fundus_only": 1.2, "oct_only": 1.4}
    spec = replace(_spec(1.5), temperatures=temps, decoding="ordinal")
    save_model(build_model(spec, pretrained=False), spec, tmp_path / "model.pt")
    model, loaded = load_model(tmp_path / "model.pt")
    assert loaded.temperatures == pytest.approx(temps)
    assert model_temperatures(model) == pytest.approx(temps)
    assert loaded.decoding == model_decoding(model) == "ordinal"
    # saved before the fields existed: one temperature for every eye, argmax
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    del blob["spec"]["temperatures"], blob["spec"]["decoding"]
    torch.save(blob, tmp_path / "old.pt")
    model, loaded = load_model(tmp_path / "old.pt")
    assert model_temperatures(model) == {} and model_decoding(model) == "argmax"
    with pytest.raises(ValueError, match="temperatures must map"):
        replace(_spec(), temperatures={"complete": 0.0})
    with pytest.raises(ValueError, match="temperatures must map"):
        replace(_spec(), temperatures={"both": 1.0})
    with pytest.raises(ValueError, match="decoding must be one of"):
        replace(_spec(), decoding="median")


def test_ordinal_decoding_minimises_the_expected_quadratic_cost() -> None:
    from rima_core.core.metrics import classification_metrics, decode

    # mass split between the two ends: argmax picks an end, the ordinal grade the middle
    p = np.array([[0.45, 0.1, 0.45 - 1e-3, 1e-3], [0.0, 0.0, 0.2, 0.8]])
    assert decode(p).tolist() == [0, 3]
    assert decode(p, "ordinal").tolist() == [1, 3]
    with pytest.raises(ValueError, match="decoding must be"):
        decode(p, "mode")
    m = classification_metrics([1, 3], p)
    assert m["qwk_ordinal"] == pytest.approx(1.0) and m["qwk"] < 1.0


def test_predictions_grade_with_the_models_decoding() -> None:
    from rima_core.runs.engine import set_model_decoding

    logits = torch.log(torch.tensor([[0.45, 0.1, 0.44, 0.01]]))
    model = _Fixed(logits)
    batch = {
        "fundus": torch.tensor([[0.0]]),
        "oct": torch.zeros(1, 1),
        "has_fundus": torch.tensor([True]),
        "has_oct": torch.tensor([True]),
        "label": torch.tensor([1]),
        "index": torch.tensor([0]),
    }
    cpu = torch.device("cpu")
    assert predict(model, [batch], cpu, progress=False).y_pred.tolist() == [0]
    set_model_decoding(model, "ordinal")
    assert predict(model, [batch], cpu, progress=False).y_pred.tolist() == [1]
    with pytest.raises(ValueError, match="decoding must be"):
        set_model_decoding(model, "mode")
