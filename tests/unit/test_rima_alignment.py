"""RIMA's alignment and missing-modality training at the sizes where they must carry signal.

- ``T_v`` recovers a planted feature correspondence from uncentred features at realistic sizes
  (the running standardisation is what makes that possible),
- the translation target is the barycentric projection of the coupling,
- the missing-modality paths are trained (their cross-entropy is in the loss and reaches the
  fusion), and cross-entropy never trains the translators.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rima_core.config import ModelConfig, OTConfig
from rima_core.core.models import ModelSpec, RimaConfig, build_model

K = 3


def make_rima(
    name: str = "rima", d_f: int = 32, d_o: int = 24, ot: OTConfig | None = None, **kw
) -> torch.nn.Module:
    mcfg = ModelConfig(
        fundus_dim=d_f, oct_dim=d_o, hidden_dim=16, heads=4, dropout=0.0, modality_dropout=0.0
    )
    spec = ModelSpec(
        name=name,
        config=RimaConfig.from_sections(replace(mcfg, **kw), ot or OTConfig(), name),
        n_classes=K,
        class_names=["a", "b", "c"],
        fundus_shape=[16, 16, 3],
        oct_shape=[8, 8, 8],
    )
    torch.manual_seed(0)
    return build_model(spec)


def complete_batch(n: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % K
    level = ((labels.float() + 1) / (K + 1)).view(n, 1, 1, 1)
    fundus = (0.5 * torch.rand(n, 3, 16, 16, generator=g) + 0.5 * level).clamp(0, 1)
    oct_ = (0.5 * torch.rand(n, 1, 8, 8, 8, generator=g) + 0.5 * level[..., None]).clamp(0, 1)
    ones = torch.ones(n, dtype=torch.bool)
    return {"fundus": fundus, "oct": oct_, "has_fundus": ones, "has_oct": ones, "label": labels}


def test_feature_coupling_recovers_a_planted_correspondence_from_uncentred_features() -> None:
    """256 eyes, d_f 128, d_o 192: fundus dimension j is a noisy, shifted and scaled copy of OCT
    dimension perm[j]; all features are non-negative with a large common offset, as ReLU encoder
    outputs are. Through the model's own standardisation and T_v update, the OCT dimension with
    the most mass in each column of T_v must be the planted one."""
    d_f, d_o, n = 128, 192, 256
    model = make_rima(d_f=d_f, d_o=d_o).train()
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, d_o))
    o_raw = 3.0 + np.abs(latent) + 0.5 * latent  # uncentred, non-negative, skewed
    perm = rng.permutation(d_o)[:d_f]
    scale = rng.uniform(0.5, 2.0, size=d_f)
    f_raw = 5.0 + scale * o_raw[:, perm] + 0.3 * rng.normal(size=(n, d_f))
    f_raw = np.maximum(f_raw, 0.0)
    f_t = torch.tensor(f_raw, dtype=torch.float32)
    o_t = torch.tensor(o_raw, dtype=torch.float32)
    model.fundus_stats.update(f_t)
    model.oct_stats.update(o_t)
    fd, od = model.fundus_stats(f_t), model.oct_stats(o_t)
    ones = torch.ones(n, dtype=torch.bool)
    T = model._pairing_coupling(ones, ones, torch.float32)
    model._update_feature_coupling(od, fd, T)
    recovered = model.T_v.argmax(dim=0).numpy()
    assert (recovered == perm).mean() >= 0.95
    cols = model.T_v / model.T_v.sum(0, keepdim=True)
    # concentrated: far above the uniform share 1/d_o in every column on average
    assert float(cols.max(0).values.mean()) > 20.0 / d_o


def test_translation_target_is_the_barycentric_projection() -> None:
    model = make_rima()
    T = torch.tensor(
        [[0.1, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.05, 0.15, 0.0]], dtype=torch.float32
    )
    tgt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [9.0, 9.0]])
    target, keep = model.translation_targets(T, tgt)
    assert keep.tolist() == [0, 2]  # row 1 has no mass: no target
    expected = torch.tensor([[0.5, 0.5], [(0.05 * 0 + 0.15 * 2) / 0.2, (0.05 + 0.15 * 2) / 0.2]])
    torch.testing.assert_close(target, expected)


def _align(
    model: torch.nn.Module, labels: list[int], has_f: list[int], has_o: list[int], seed: int
):
    """One alignment step on random standardised features; returns its stats."""
    g = torch.Generator().manual_seed(seed)
    n = len(labels)
    f = torch.randn(n, model.cfg.fundus_dim, generator=g)
    o = torch.randn(n, model.cfg.oct_dim, generator=g)
    stats: dict[str, float] = {}
    model._alignment(
        f, o, torch.tensor(has_f).bool(), torch.tensor(has_o).bool(), torch.tensor(labels), stats
    )
    return stats


@pytest.mark.parametrize("bank_size", [0, 16])
def test_the_bank_gives_a_class_absent_from_one_side_of_the_batch_its_target(
    bank_size: int,
) -> None:
    """Batch B has a fundus photo of grade 2 but no OCT of grade 2: alone, that row has no
    target (nothing of its class to couple to); the bank holds batch A's grade-2 OCT."""
    model = make_rima(ot=OTConfig(bank_size=bank_size)).train()
    _align(model, labels=[0, 1, 2], has_f=[1, 1, 0], has_o=[1, 1, 1], seed=0)  # batch A
    stats = _align(model, labels=[0, 1, 2], has_f=[1, 1, 1], has_o=[1, 1, 0], seed=1)  # B
    rows = 3 + 2  # batch B's fundus and OCT rows
    if bank_size:
        assert stats["ot_rows_aligned"] == 1.0
    else:
        assert stats["ot_rows_aligned"] == pytest.approx((rows - 1) / rows)


def test_the_bank_keeps_the_newest_rows_and_is_emptied_by_train_and_eval() -> None:
    model = make_rima(ot=OTConfig(bank_size=4)).train()
    for seed in range(3):
        _align(model, labels=[0, 1, 2], has_f=[1, 1, 1], has_o=[1, 1, 1], seed=seed)
    feats, labels = model.bank["fundus"]
    assert feats.shape == (4, model.cfg.fundus_dim) and labels.tolist() == [0, 1, 2, 0]
    g = torch.Generator().manual_seed(2)  # the newest batch comes first, standardised as given
    torch.testing.assert_close(feats[:3], torch.randn(3, model.cfg.fundus_dim, generator=g))
    assert not feats.requires_grad
    model.eval()
    assert model.bank == {}
    _align(model.train(), labels=[0, 1], has_f=[1, 1], has_o=[1, 1], seed=0)
    model.train()
    assert model.bank == {}


def _training_aux(model: torch.nn.Module, b: dict[str, torch.Tensor]):
    return model(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"], labels=b["label"])


def test_missing_paths_are_in_the_loss_and_reach_the_head() -> None:
    b = complete_batch()
    for name, expect_paths in (("rima", True), ("rima_no_missing_paths", False)):
        model = make_rima(name).train()
        # alignment weight 0: only the path terms can be auxiliary
        model.cfg = replace(model.cfg, loss_weight=0.0)
        out = _training_aux(model, b)
        aux = out.aux_loss
        if not expect_paths:
            assert float(aux.detach()) == 0.0
            assert "path_ce_fundus_only" not in out.stats
            continue
        assert out.stats["path_ce_fundus_only"] > 0 and out.stats["path_ce_oct_only"] > 0
        aux.backward()
        assert model.head[-1].weight.grad.abs().sum() > 0
        assert model.fundus_encoder.parameters().__next__().grad is not None


def test_a_path_loss_equals_cross_entropy_of_the_fusion_with_one_modality_removed() -> None:
    """The fundus-only path is exactly what the model computes at inference when the OCT is
    missing: so training it trains the OCT-missing prediction."""
    b = complete_batch()
    model = make_rima(consistency_weight=0.0).train()
    model.cfg = replace(model.cfg, loss_weight=0.0)
    model.fundus_branch.block.dropout.p = 0.0
    out = _training_aux(model, b)
    model.eval()
    with torch.no_grad():
        no_oct = model(b["fundus"], b["oct"], b["has_fundus"], torch.zeros_like(b["has_oct"]))
        no_fundus = model(b["fundus"], b["oct"], torch.zeros_like(b["has_fundus"]), b["has_oct"])
    ce_f = F.cross_entropy(no_oct.logits, b["label"])
    ce_o = F.cross_entropy(no_fundus.logits, b["label"])
    # eval uses the running statistics the training call just set; same weights, no dropout
    assert out.stats["path_ce_fundus_only"] == pytest.approx(float(ce_f), rel=1e-4)
    assert out.stats["path_ce_oct_only"] == pytest.approx(float(ce_o), rel=1e-4)


def test_path_terms_weigh_each_complete_eye_like_the_main_cross_entropy() -> None:
    """The path terms are their mean over the complete eyes times the share of the batch's eyes
    that are complete in the data: with 2 complete eyes of 8, 2/8 of the mean. As a mean alone,
    2 eyes weighed as much as the whole batch's cross-entropy, which stalled training on mostly
    unpaired data."""
    b = complete_batch(n=8)
    # complete: eyes 0, 1; fundus only: 2, 3, 7; OCT only: 4, 5, 6
    b["has_fundus"] = torch.tensor([1, 1, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    b["has_oct"] = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    for consistency in (0.0, 0.5):
        model = make_rima(consistency_weight=consistency, missing_path_weight=1.0).train()
        model.cfg = replace(model.cfg, loss_weight=0.0)  # only the path terms are auxiliary
        model.fundus_branch.block.dropout.p = 0.0
        out = _training_aux(model, b)
        s = out.stats
        ce = s["path_ce_fundus_only"] + s["path_ce_oct_only"]
        if consistency == 0.0:
            assert float(out.aux_loss.detach()) == pytest.approx(2 / 8 * ce, rel=1e-5)
        else:  # the KL terms are scaled by the same share: aux - share·CE is share·c·KL >= 0
            assert float(out.aux_loss.detach()) >= 2 / 8 * ce - 1e-6
    # An all-paired batch: the share is 1 even where modality dropout hides a modality (the
    # share counts the data's pairs, as inverted dropout compensates), so the terms are the
    # plain means over the eyes left complete.
    complete = complete_batch(n=16)
    model = make_rima(consistency_weight=0.0, missing_path_weight=1.0, modality_dropout=0.5)
    model.train().cfg = replace(model.cfg, loss_weight=0.0)
    model.fundus_branch.block.dropout.p = 0.0
    out = _training_aux(model, complete)
    s = out.stats
    assert out.stats["modality_dropped"] > 0
    assert float(out.aux_loss.detach()) == pytest.approx(
        s["path_ce_fundus_only"] + s["path_ce_oct_only"], rel=1e-5
    )


def test_cross_entropy_never_trains_the_translators() -> None:
    b = complete_batch()
    model = make_rima().train()
    model.cfg = replace(model.cfg, loss_weight=0.0)
    out = _training_aux(model, b)
    (F.cross_entropy(out.logits, b["label"]) + out.aux_loss).backward()
    for translator in (model.g_fo, model.g_of):
        for p in translator.parameters():
            assert p.grad is None or float(p.grad.abs().sum()) == 0.0
    # ... while the alignment loss does train them
    model.zero_grad(set_to_none=True)
    model.cfg = replace(model.cfg, loss_weight=1.0)
    _training_aux(model, b).aux_loss.backward()
    assert float(model.g_fo.net[-1].weight.grad.abs().sum()) > 0


def test_diagnostics_report_every_number(tiny_data) -> None:
    """On a real (tiny) store, through a model trained for a few steps by the engine."""
    from rima_core.runs.diagnostics import alignment_diagnostics
    from rima_core.runs.train import train

    cfg = tiny_data.cfg
    out = tiny_data.root / "diag_model"
    train(tiny_data.store, tiny_data.masks, out, cfg, tracker=_NoTracker())
    from rima_core.core.models import load_model

    model, _ = load_model(out / "model.pt")
    diag = alignment_diagnostics(model, tiny_data.store, tiny_data.masks, split="test")
    for key in (
        "probe_qwk_fundus",
        "probe_qwk_oct",
        "probe_qwk_fundus_to_oct",
        "probe_qwk_oct_to_fundus",
        "cross_probe_qwk_fundus_to_oct",
        "cross_probe_qwk_oct_to_fundus",
        "centred_cosine_fundus_to_oct",
        "centred_cosine_oct_to_fundus",
        "tv_column_max",
        "gw_row_max",
        "gw_row_max_flat",
    ):
        assert key in diag and np.isfinite(diag[key]), key
    assert -1.0 <= diag["centred_cosine_fundus_to_oct"] <= 1.0
    assert diag["tv_column_max_uniform"] == pytest.approx(1 / cfg.model.oct_dim)
    assert diag["tv_column_max_uniform"] <= diag["tv_column_max"] <= 1.0
    assert alignment_diagnostics(make_rima("fundus_only"), tiny_data.store, tiny_data.masks) == {}

    # the GW concentration is read at the model's own epsilon: a flatter one (large epsilon)
    # spreads each row's mass, so the diagnostic must move with the setting
    model.cfg = replace(model.cfg, gw_epsilon=10.0)
    flat = alignment_diagnostics(model, tiny_data.store, tiny_data.masks, split="test")
    assert flat["gw_row_max"] < diag["gw_row_max"]


class _NoTracker:
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass


def _alignment_loss(model: torch.nn.Module, has_f: list[int], has_o: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    n = len(has_f)
    f = torch.randn(n, model.cfg.fundus_dim, generator=g)
    o = torch.randn(n, model.cfg.oct_dim, generator=g)
    labels = torch.arange(n) % K
    return model._alignment(
        f, o, torch.tensor(has_f).bool(), torch.tensor(has_o).bool(), labels, {}
    )


PARTLY_PAIRED = ([1, 1, 1, 1, 1, 0, 1, 0, 1], [1, 1, 0, 1, 0, 1, 1, 1, 1])


def test_pairing_mix_moves_between_the_paper_and_the_ablation_without_class_ot() -> None:
    """ot.pairing_mix 0 is the class-wise coupling, 1 the pairing coupling of rima_no_class_ot
    (the same loss to the last bit), and a share in between gives a third, different loss."""
    ablation = _alignment_loss(make_rima("rima_no_class_ot").train(), *PARTLY_PAIRED)
    paper = _alignment_loss(make_rima(ot=OTConfig(bank_size=0)).train(), *PARTLY_PAIRED)
    mixed = _alignment_loss(
        make_rima(ot=OTConfig(bank_size=0, pairing_mix=0.5)).train(), *PARTLY_PAIRED
    )
    for bank in (0, 16):
        full = make_rima(ot=OTConfig(bank_size=bank, pairing_mix=1.0)).train()
        assert torch.equal(_alignment_loss(full, *PARTLY_PAIRED), ablation)
        assert full.bank == {}  # the class-wise coupling's bank is not even filled
    assert not torch.isclose(paper, ablation) and not torch.isclose(mixed, paper)
    assert not torch.isclose(mixed, ablation)


def test_mixed_coupling_blends_masses_and_keeps_a_batch_without_pairs() -> None:
    from rima_core.core.models.rima import RIMA

    T = torch.full((5, 6), 1.0 / 30)  # 3 batch rows + 2 bank rows, 4 + 2 columns
    P = torch.zeros(3, 4)
    P[0, 1] = P[2, 3] = 0.5
    m = RIMA.mixed_coupling(T, P, 0.25)
    assert m.shape == T.shape and m.sum().item() == pytest.approx(1.0)
    assert m[0, 1].item() == pytest.approx(0.75 / 30 + 0.125)
    assert m[3:].sum().item() == pytest.approx(0.75 * 12 / 30)  # bank rows: class-wise only
    assert torch.equal(RIMA.mixed_coupling(T, torch.zeros(3, 4), 0.25), T)


def test_diagnostic_numbers_on_known_answers() -> None:
    """The alignment numbers read what they claim: centred cosine 1 for the features
    themselves, -1 for their negation, ~0 for noise; a probe reads noise at chance and class
    means as the grade; class-separated features concentrate the GW rows."""
    from rima_core.runs.diagnostics import _centred_cosine, _gw_concentration, _probe, _qwk

    rng = np.random.default_rng(0)
    n, k = 240, 3
    y = np.arange(n) % k
    real = rng.normal(size=(n, 8)) + 3.0 * np.eye(k, 8)[y]  # class-separated features
    assert _centred_cosine(real, real) == pytest.approx(1.0)
    assert _centred_cosine(-real, real) == pytest.approx(-1.0)
    noise = rng.normal(size=(n, 8))
    assert abs(_centred_cosine(noise, real)) < 0.1

    fit, ev = slice(0, n // 2), slice(n // 2, n)
    probe = _probe(real[fit], y[fit])
    own = _qwk(y[ev], probe.predict(real[ev]), k)
    assert own > 0.9
    assert _qwk(y[ev], probe.predict(noise[ev]), k) < 0.3  # carries no grade
    # a translation to the class means carries the grade but not the eye: the cross-probe reads
    # it, the centred cosine does not call it faithful
    means = np.stack([real[y == c].mean(0) for c in range(k)])[y]
    assert _qwk(y[ev], probe.predict(means[ev]), k) > 0.9
    assert _centred_cosine(means, real) < 0.9

    share, flat = _gw_concentration(real, real, y, epsilon=5e-3, max_eyes=120)
    assert flat == pytest.approx(1 / (120 / k), rel=0.05)  # a row spread over its class
    assert share > flat  # each row concentrates beyond the flat within-class coupling
