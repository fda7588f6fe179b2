"""Models: interface, availability handling, per-sample order, T_v buffer, persistence, weights.

Tiny shapes throughout (16² fundus, 8³ OCT, feature sizes 32/24) so the whole file runs in
seconds on a CPU.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rima_core.config import ModelConfig, OTConfig
from rima_core.core.models import (
    MODEL_NAMES,
    MissingModalityError,
    ModelSpec,
    RimaConfig,
    build_model,
    load_model,
    save_model,
)
from rima_core.core.models.common import Inputs, modality_dropout
from rima_core.core.models.encoders import PretrainedWeightsError, build_encoder

K = 3
MCFG = ModelConfig(
    fundus_dim=32, oct_dim=24, hidden_dim=16, heads=4, dropout=0.0, modality_dropout=0.0
)


def make_spec(name: str = "rima", ot: OTConfig | None = None, **model_kw) -> ModelSpec:
    return ModelSpec(
        name=name,
        config=RimaConfig.from_sections(replace(MCFG, **model_kw), ot or OTConfig(), name),
        n_classes=K,
        class_names=["a", "b", "c"],
        fundus_shape=[16, 16, 3],
        oct_shape=[8, 8, 8],
    )


def make_model(name: str = "rima", seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(make_spec(name, **kw))


def make_batch(has_f: list[int], has_o: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    """Random images with a class-dependent brightness; absent modalities are zeros."""
    g = torch.Generator().manual_seed(seed)
    n = len(has_f)
    labels = torch.arange(n) % K
    level = (labels.float() + 1) / (K + 1)
    fundus = (0.5 * torch.rand(n, 3, 16, 16, generator=g) + level.view(n, 1, 1, 1) * 0.5).clamp(
        0, 1
    )
    oct = (0.5 * torch.rand(n, 1, 8, 8, 8, generator=g) + level.view(n, 1, 1, 1, 1) * 0.5).clamp(
        0, 1
    )
    hf = torch.tensor(has_f, dtype=torch.bool)
    ho = torch.tensor(has_o, dtype=torch.bool)
    fundus[~hf] = 0
    oct[~ho] = 0
    return {"fundus": fundus, "oct": oct, "has_fundus": hf, "has_oct": ho, "label": labels}


MIXED = ([1, 1, 0, 1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 0, 1, 1, 1, 1])
PATTERNS = {
    "mixed": MIXED,
    "complete": ([1] * 6, [1] * 6),
    "fundus_only": ([1] * 6, [0] * 6),
    "oct_only": ([0] * 6, [1] * 6),
}


def run(model: nn.Module, b: dict[str, torch.Tensor], labels: bool = True):
    return model(
        b["fundus"], b["oct"], b["has_fundus"], b["has_oct"], labels=b["label"] if labels else None
    )


# -------------------------------------------------------------------------------------------
# interface


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_every_model_runs_every_availability_pattern(name: str, pattern: str) -> None:
    model = make_model(name, modality_dropout=0.5)
    b = make_batch(*PATTERNS[pattern])
    model.train()
    out = run(model, b)
    assert out.logits.shape == (len(b["label"]), K)
    assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss)
    assert all(isinstance(v, float) for v in out.stats.values())
    (F.cross_entropy(out.logits, b["label"]) + out.aux_loss).backward()
    model.eval()
    with torch.no_grad():
        out = run(model, b, labels=False)
    assert out.logits.shape == (len(b["label"]), K) and torch.isfinite(out.logits).all()
    assert float(out.aux_loss.detach()) == 0.0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eye_with_neither_modality_is_an_error(name: str) -> None:
    model = make_model(name).eval()
    b = make_batch([1, 0, 1, 0], [1, 0, 0, 0])
    with pytest.raises(MissingModalityError, match=r"\[1, 3\]") as err:
        run(model, b, labels=False)
    assert err.value.positions == [1, 3]
    assert isinstance(err.value, ValueError)


def test_spec_rejects_unknown_model_and_bad_heads() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        make_spec("rima_v2")
    with pytest.raises(ValueError, match="divisible"):
        build_model(make_spec("rima", heads=5))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['depth'\]"):
        ModelSpec.from_dict(
            {**asdict(make_spec()), "config": {**asdict(make_spec().config), "depth": 3}}
        )
    no_paths = build_model(make_spec("rima_no_missing_paths", modality_dropout=0.5))
    assert no_paths.modality_dropout == 0 and no_paths.path_weight == 0
    assert build_model(make_spec("rima", modality_dropout=0.5)).modality_dropout == 0.5
    assert build_model(make_spec("late_fusion_zero", modality_dropout=0.5)).modality_dropout == 0
    assert (
        build_model(make_spec("late_fusion_dropout", modality_dropout=0.5)).modality_dropout == 0.5
    )


# -------------------------------------------------------------------------------------------
# per-sample order


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_permuting_the_batch_permutes_the_logits_in_eval(name: str) -> None:
    model = make_model(name).eval()
    b = make_batch(*MIXED)
    perm = torch.randperm(len(b["label"]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = run(model, b, labels=False).logits
        out = run(model, {k: v[perm] for k, v in b.items()}, labels=False).logits
    torch.testing.assert_close(out, ref[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name",
    ["rima", "rima_no_class_ot", "rima_no_feature_ot", "rima_no_translators", "rima_flat_coupling"],
)
def test_training_step_is_permutation_equivariant(name: str) -> None:
    """With dropout off, a training step with OT must not depend on the batch order: per-eye
    logits follow the permutation, and the batch-level quantities (aux loss, the updated T_v,
    the gradients) are the same. This is what the authors' label-grouping bug broke."""
    model_a = make_model(name)
    model_b = copy.deepcopy(model_a)
    model_a.train()
    model_b.train()
    b = make_batch(*MIXED)
    perm = torch.randperm(len(b["label"]), generator=torch.Generator().manual_seed(4))
    out_a = run(model_a, b)
    out_b = run(model_b, {k: v[perm] for k, v in b.items()})
    assert float(out_a.aux_loss.detach()) > 0
    torch.testing.assert_close(out_b.logits, out_a.logits[perm], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_b.aux_loss, out_a.aux_loss, atol=1e-5, rtol=1e-4)
    if hasattr(model_a, "T_v"):
        torch.testing.assert_close(model_b.T_v, model_a.T_v, atol=1e-7, rtol=1e-3)
    for out, y in ((out_a, b["label"]), (out_b, b["label"][perm])):
        (F.cross_entropy(out.logits, y) + out.aux_loss).backward()
    for (pname, pa), (_, pb) in zip(
        model_a.named_parameters(), model_b.named_parameters(), strict=True
    ):
        # float error scales with the gradient's magnitude (standardised features can make
        # encoder gradients large): compare relative to the largest entry. Summation-order noise
        # in T_v (~4e-7) reaches the encoders through the missing paths at ~1.3e-5 of that
        # entry; a wrong eye pairing differs at order 1
        scale = max(1.0, float(pa.grad.abs().max()))
        torch.testing.assert_close(pb.grad, pa.grad, atol=3e-5 * scale, rtol=1e-3, msg=pname)


# -------------------------------------------------------------------------------------------
# the missing-modality path


class _Oracle(nn.Module):
    """A "perfect translator": maps each known source feature to the true target feature."""

    def __init__(self, src: torch.Tensor, tgt: torch.Tensor) -> None:
        super().__init__()
        self.src, self.tgt = src, tgt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tgt[torch.cdist(x, self.src).argmin(dim=1)]


@pytest.mark.parametrize("missing", ["oct", "fundus"])
def test_a_perfect_translation_makes_a_missing_modality_invisible(missing: str) -> None:
    """RIMA replaces a missing feature by its translation on every path, so with translators
    that reproduce the true features an eye's prediction must not change when a modality is
    removed. (A model that ignored the translation, or fused the wrong eye's, would fail this.)
    The fused head alone (``full_path="head"``): the product full path counts the fundus and
    the OCT as two views, which a perfect translation is not (test_product_full_path)."""
    model = make_model("rima", full_path="head").eval()
    b = make_batch([1] * 6, [1] * 6)
    with torch.no_grad():
        f, o = model.encode(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"])
        model.g_fo, model.g_of = _Oracle(f, o), _Oracle(o, f)
        complete = run(model, b, labels=False).logits
        partial = dict(b)
        drop = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)
        key = "has_oct" if missing == "oct" else "has_fundus"
        partial[key] = b[key] & ~drop
        logits = run(model, partial, labels=False).logits
    torch.testing.assert_close(logits, complete, atol=1e-5, rtol=1e-5)


def test_missing_modality_content_is_never_read() -> None:
    """Whatever sits in the tensor of an absent modality must not reach the prediction, and the
    encoder must only see the rows that have the modality."""
    b = make_batch(*MIXED)
    noisy = dict(b)
    noisy["oct"] = torch.where(
        b["has_oct"].view(-1, 1, 1, 1, 1), b["oct"], torch.rand_like(b["oct"])
    )
    noisy["fundus"] = torch.where(
        b["has_fundus"].view(-1, 1, 1, 1), b["fundus"], torch.rand_like(b["fundus"])
    )
    for name in MODEL_NAMES:
        model = make_model(name).eval()
        seen: list[int] = []

        def record(_m: nn.Module, args: tuple, _out: torch.Tensor, seen: list[int] = seen) -> None:
            seen.append(args[0].shape[0])

        for enc in (m for n, m in model.named_children() if "encoder" in n):
            enc.register_forward_hook(record)
        with torch.no_grad():
            ref = run(model, b, labels=False).logits
            out = run(model, noisy, labels=False).logits
        torch.testing.assert_close(out, ref, msg=name)
        expected = {int(b["has_fundus"].sum()), int(b["has_oct"].sum())}
        assert set(seen) <= expected, (name, seen)


def test_translator_feeds_the_missing_oct_in_rima() -> None:
    model = make_model("rima", full_path="head").eval()
    b = make_batch([1, 1], [1, 0])
    with torch.no_grad():
        before = run(model, b, labels=False).logits
        model.g_fo.net[-1].bias.add_(1.0)
        after = run(model, b, labels=False).logits
    # both eyes use g_fo (the "predicted OCT" input); the OCT-less eye also uses it as its OCT
    assert not torch.allclose(before[1], after[1])
    assert (after[1] - before[1]).abs().sum() > (after[0] - before[0]).abs().sum()


def test_baselines_missing_handling() -> None:
    b = make_batch([1, 0, 0, 1], [1, 1, 1, 0])
    model = make_model("fundus_only").eval()
    with torch.no_grad():
        logits = run(model, b, labels=False).logits
        # eyes 1 and 2 have no fundus: both get the learned "missing" prior, identical
        torch.testing.assert_close(logits[1], logits[2])
        model.missing.add_(torch.randn_like(model.missing))
        moved = run(model, b, labels=False).logits
    assert not torch.allclose(moved[1], logits[1])
    torch.testing.assert_close(moved[[0, 3]], logits[[0, 3]])

    model = make_model("late_fusion_zero").eval()
    with torch.no_grad():
        f = model.fundus_encoder(b["fundus"][3:4])
        expected = model.head(torch.cat([f, torch.zeros(1, MCFG.oct_dim)], dim=1))
        torch.testing.assert_close(run(model, b, labels=False).logits[3:4], expected)


def test_modality_dropout_never_drops_both_nor_a_lone_modality() -> None:
    torch.manual_seed(0)
    has_f = torch.rand(2000) < 0.8
    has_o = ~has_f | (torch.rand(2000) < 0.7)
    kf, ko = modality_dropout(has_f, has_o, 0.5)
    assert bool((kf | ko).all())
    assert bool((kf <= has_f).all() and (ko <= has_o).all())  # never restores a modality
    lone = has_f ^ has_o
    assert torch.equal(kf[lone], has_f[lone]) and torch.equal(ko[lone], has_o[lone])
    both = has_f & has_o
    rate = float((~(kf & ko))[both].float().mean())
    assert 0.4 < rate < 0.6
    assert modality_dropout(has_f, has_o, 0.0) == (has_f, has_o)


def test_modality_dropout_only_in_training() -> None:
    model = make_model("late_fusion_dropout", modality_dropout=0.9).eval()
    b = make_batch([1] * 8, [1] * 8)
    with torch.no_grad():
        assert torch.equal(run(model, b).logits, run(model, b).logits)
    model.train()
    out = run(model, b)
    assert out.stats["modality_dropped"] > 0


# -------------------------------------------------------------------------------------------
# OT, translation losses and the T_v buffer


def test_feature_coupling_buffer_is_saved_updated_in_training_only() -> None:
    model = make_model("rima")
    state = model.state_dict()
    assert "T_v" in state and state["T_v"].shape == (MCFG.oct_dim, MCFG.fundus_dim)
    uniform = torch.full((MCFG.oct_dim, MCFG.fundus_dim), 1.0 / (MCFG.oct_dim * MCFG.fundus_dim))
    torch.testing.assert_close(model.T_v, uniform)
    b = make_batch(*MIXED)

    model.eval()
    with torch.no_grad():
        run(model, b)  # labels given, but eval: no OT
    torch.testing.assert_close(model.T_v, uniform)
    model.train()
    run(model, b, labels=False)  # training without labels: no OT either
    torch.testing.assert_close(model.T_v, uniform)

    out = run(model, b)
    assert int(model.T_v_updates) == 1
    assert not torch.allclose(model.T_v, uniform)
    # still a coupling with uniform feature marginals
    torch.testing.assert_close(model.T_v.sum(), torch.tensor(1.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        model.T_v.sum(1), torch.full((MCFG.oct_dim,), 1 / MCFG.oct_dim), atol=1e-3, rtol=0.05
    )
    assert out.stats["ot_seconds"] > 0 and out.stats["gw_iterations"] >= 1
    first = model.T_v.clone()
    run(model, make_batch(*MIXED, seed=7))
    assert int(model.T_v_updates) == 2 and not torch.allclose(model.T_v, first)
    assert "T_v" not in make_model("rima_no_feature_ot").state_dict()


def test_unpaired_batch_is_aligned_by_class_ot_but_not_by_pairing() -> None:
    """No eye has both modalities: labeled OT still aligns the two sets by class (the point of
    RIMA), whereas the paired-only ablation has nothing to learn from."""
    b = make_batch([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])
    out = run(make_model("rima").train(), b)
    assert float(out.aux_loss.detach()) > 0 and out.stats["ot_rows_aligned"] == 1.0
    out = run(make_model("rima_no_class_ot").train(), b)
    assert float(out.aux_loss.detach()) == 0.0 and out.stats["ot_skipped"] == 1.0


def test_rows_whose_class_is_absent_on_the_other_side_get_no_loss() -> None:
    # labels 0,1,2,0,1,2: class 2 only has fundus (eyes 2 and 5) -> those rows have no target
    b = make_batch([1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 0])
    for target in ("barycentric", "sample"):
        model = make_model("rima", ot=OTConfig(target=target)).train()
        out = run(model, b)
        assert out.stats["ot_rows_aligned"] == pytest.approx((4 + 4) / (6 + 4))
        assert float(out.aux_loss.detach()) > 0


def test_aux_loss_is_weighted_translation_loss() -> None:
    b = make_batch(*MIXED)
    outs = {}
    for w in (0.5, 2.0):  # missing paths off: only the translation loss is auxiliary
        model = make_model("rima", ot=OTConfig(loss_weight=w), missing_path_weight=0.0)
        outs[w] = run(model.train(), b)
    ratio = float(outs[2.0].aux_loss.detach()) / float(outs[0.5].aux_loss.detach())
    assert ratio == pytest.approx(4.0, rel=1e-4)
    s = outs[0.5].stats
    assert float(outs[0.5].aux_loss.detach()) == pytest.approx(
        0.5 * (s["translation_loss_fo"] + s["translation_loss_of"]), rel=1e-5
    )


def test_ot_runs_in_float32_under_autocast() -> None:
    model = make_model("rima").train()
    b = make_batch(*MIXED)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, b)
    assert torch.isfinite(out.aux_loss.detach()) and float(out.aux_loss.detach()) > 0
    assert model.T_v.dtype == torch.float32 and torch.isfinite(model.T_v).all()


# -------------------------------------------------------------------------------------------
# persistence and training


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_save_load_round_trip_gives_identical_logits(name: str, tmp_path) -> None:
    model = make_model(name).train()
    b = make_batch(*MIXED)
    run(model, b)  # one training forward: moves T_v away from its initial value
    spec = make_spec(name)
    path = tmp_path / "sub" / "model.pt"
    save_model(model, spec, path)
    loaded, spec2 = load_model(path)
    assert spec2 == spec and not loaded.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(run(loaded, b).logits, run(model, b).logits)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left


def test_rima_config_holds_both_sections_and_the_variant_switches() -> None:
    """Every key of the config's model (but name) and ot sections is a RimaConfig field, and the
    switches come from the exact RIMA_VARIANTS table: a new baseline has them all on."""
    from dataclasses import fields

    from rima_core.core.models import RIMA_VARIANTS
    from rima_core.core.models.spec import SWITCHES

    section_keys = {f.name for f in fields(ModelConfig)} - {"name"} | {
        f.name for f in fields(OTConfig)
    }
    own = {f.name for f in fields(RimaConfig)}
    assert own == section_keys | set(SWITCHES)
    assert set(SWITCHES) == {"class_ot", "feature_ot", "missing_paths", "translators", "gw"}
    assert make_spec("rima_no_class_ot").config.class_ot is False
    assert make_spec("rima_no_feature_ot").config.feature_ot is False
    assert make_spec("rima_no_missing_paths").config.missing_paths is False
    no_tr = make_spec("rima_no_translators").config
    assert not (no_tr.translators or no_tr.class_ot or no_tr.feature_ot) and no_tr.gw
    assert make_spec("rima_flat_coupling").config.gw is False
    for name in MODEL_NAMES:
        off = {k for k in SWITCHES if not getattr(make_spec(name).config, k)}
        assert off == set(RIMA_VARIANTS.get(name, {})), name
    # a spec whose switches contradict its name is refused (a loaded model states its variant)
    with pytest.raises(ValueError, match="switches"):
        replace(make_spec("rima"), config=make_spec("rima_no_class_ot").config)


def test_spec_with_the_two_config_sections_still_loads(tmp_path) -> None:
    """model.pt files written before RimaConfig hold the model and ot sections instead."""
    spec = make_spec("rima_no_feature_ot")
    model = build_model(spec)
    path = tmp_path / "model.pt"
    save_model(model, spec, path)
    blob = torch.load(path, weights_only=True)
    old = {k: v for k, v in blob["spec"].items() if k != "config"}
    old["model"] = {**asdict(MCFG), "name": "rima"}
    old["ot"] = asdict(OTConfig())
    torch.save({**blob, "spec": old}, path)
    _, loaded = load_model(path)
    assert loaded == spec and loaded.config.feature_ot is False


def test_spec_saved_before_the_newer_keys_still_loads(tmp_path) -> None:
    """A model.pt whose RimaConfig predates the OT-control switches and the distillation keys
    loads with the values it was trained with (spec.ADDED_KEYS)."""
    from rima_core.core.models.spec import ADDED_KEYS

    spec = make_spec("rima_no_class_ot", full_path="head")  # what older models computed
    spec = replace(spec, config=replace(spec.config, bank_size=0))  # the batch alone
    path = tmp_path / "model.pt"
    save_model(build_model(spec), spec, path)
    blob = torch.load(path, weights_only=True)
    for key in ADDED_KEYS:
        del blob["spec"]["config"][key]
    torch.save(blob, path)
    _, loaded = load_model(path)
    assert loaded == spec
    assert loaded.config.translators and loaded.config.gw
    assert (loaded.config.distill_alpha, loaded.config.distill_temperature) == (0.5, 2.0)
    assert loaded.config.full_path == "head"
    assert loaded.config.bank_size == 0


def test_load_model_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable model file"):
        load_model(bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"spec": asdict(make_spec("late_fusion_zero")), "state_dict": {}}, wrong)
    with pytest.raises(ValueError, match=r"do not fit|refused before allocating"):
        load_model(wrong)


def test_tiny_overfit_reduces_the_loss() -> None:
    model = make_model("rima", modality_dropout=0.2).train()
    b = make_batch(*MIXED)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = run(model, b)
        ce = F.cross_entropy(out.logits, b["label"])
        loss = ce + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((float(ce.detach()), float(out.aux_loss.detach())))
    ce0, aux0 = losses[0]
    ce_end = sum(c for c, _ in losses[-5:]) / 5
    aux_end = sum(a for _, a in losses[-5:]) / 5
    assert ce_end < 0.5 * ce0
    assert aux_end < aux0  # the translators learn their OT targets


# -------------------------------------------------------------------------------------------
# paper backbones and pretrained weights


@pytest.mark.slow  # ~9 s: MONAI import + a 24M-parameter Res2Net-50
def test_paper_backbones_build_and_run() -> None:
    torch.manual_seed(0)
    model = build_model(
        make_spec("rima", fundus_encoder="res2net50", oct_encoder="resnet10_3d", fundus_dim=64)
    )
    assert model.fundus_encoder.backbone.out_dim == 2048
    assert model.oct_encoder.backbone.out_dim == 512
    # MedicalNet layout: type-B shortcuts without bias
    keys = model.oct_encoder.backbone.net.state_dict()
    assert "layer2.0.downsample.0.weight" in keys and "layer2.0.downsample.0.bias" not in keys
    n = 4
    b = {
        "fundus": torch.rand(n, 3, 32, 32),
        "oct": torch.rand(n, 1, 16, 16, 16),
        "has_fundus": torch.tensor([1, 1, 1, 0], dtype=torch.bool),
        "has_oct": torch.tensor([1, 0, 1, 1], dtype=torch.bool),
        "label": torch.tensor([0, 1, 0, 1]),
    }
    out = run(model.train(), b)
    (F.cross_entropy(out.logits, b["label"]) + out.aux_loss).backward()
    with torch.no_grad():
        assert run(model.eval(), b, labels=False).logits.shape == (n, K)


def test_pretrained_weights_load_from_a_local_file(tmp_path) -> None:
    torch.manual_seed(1)
    source = build_encoder("small_cnn2d", 32)
    state = {f"module.{k}": v for k, v in source.backbone.state_dict().items()}
    state["module.fc.weight"] = torch.zeros(10, 128)  # a classifier head is ignored
    path = tmp_path / "fundus.pth"
    torch.save({"state_dict": state}, path)

    torch.manual_seed(2)
    model = build_model(make_spec("rima", fundus_weights=str(path)))
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.fundus_encoder.backbone.state_dict()[key], value), key
    # load_model does not need the weights file any more
    save_model(model, make_spec("rima", fundus_weights=str(path)), tmp_path / "m.pt")
    path.unlink()
    loaded, _ = load_model(tmp_path / "m.pt")
    assert torch.equal(
        loaded.fundus_encoder.backbone.blocks[0][0].weight, source.backbone.blocks[0][0].weight
    )


def test_medicalnet_style_checkpoint_loads_into_resnet10_3d(tmp_path) -> None:
    from monai.networks.nets import resnet10

    torch.manual_seed(3)
    net = resnet10(
        spatial_dims=3,
        n_input_channels=1,
        shortcut_type="B",
        feed_forward=False,
        conv1_t_stride=2,
        bias_downsample=False,
    )
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    enc = build_encoder("resnet10_3d", 24, weights=path)
    assert torch.equal(enc.backbone.net.conv1.weight, net.conv1.weight)


def test_bad_pretrained_weights_give_clear_errors(tmp_path) -> None:
    with pytest.raises(PretrainedWeightsError, match="does not exist"):
        build_encoder("small_cnn2d", 32, weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("hello")
    with pytest.raises(PretrainedWeightsError, match="cannot read"):
        build_encoder("small_cnn2d", 32, weights=garbage)
    state = build_encoder("small_cnn2d", 32).backbone.state_dict()
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.3")}, partial)
    with pytest.raises(PretrainedWeightsError, match=r"missing keys \['blocks.3"):
        build_encoder("small_cnn2d", 32, weights=partial)
    extra = tmp_path / "extra.pth"
    torch.save({**state, "blocks.9.weight": torch.zeros(1)}, extra)
    with pytest.raises(PretrainedWeightsError, match=r"unexpected keys \['blocks.9.weight'\]"):
        build_encoder("small_cnn2d", 32, weights=extra)
    wrong_shape = tmp_path / "shape.pth"
    torch.save(build_encoder("small_cnn3d", 32).backbone.state_dict(), wrong_shape)
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        build_encoder("small_cnn2d", 32, weights=wrong_shape)


# -------------------------------------------------------------------------------------------
# imputation and distillation baselines


def _grads(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", ["imputation", "imputation_paths", "distillation"])
def test_new_baselines_train_and_grade_an_eye_missing_either_modality(name: str) -> None:
    model = make_model(name, modality_dropout=0.3).train()
    b = make_batch(*MIXED)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = run(model, b)
        assert float(out.aux_loss.detach()) > 0, name  # complete eyes in every batch
        ce = F.cross_entropy(out.logits, b["label"])
        opt.zero_grad()
        (ce + out.aux_loss).backward()
        opt.step()
        losses.append((float(ce.detach()), float(out.aux_loss.detach())))
    assert sum(c for c, _ in losses[-5:]) / 5 < 0.6 * losses[0][0], losses
    assert sum(a for _, a in losses[-5:]) / 5 < losses[0][1], losses  # the aux objective learns
    model.eval()
    grade = make_batch([1, 0, 1], [0, 1, 1])  # OCT missing, fundus missing, both
    with torch.no_grad():
        out = run(model, grade, labels=False)
    assert out.logits.shape == (3, K) and torch.isfinite(out.logits).all()
    assert float(out.aux_loss) == 0.0


def _imputed_by_hand(feats, src_stats, regressor, dst_stats) -> torch.Tensor:
    """The imputation written out: standardise with the running mean and the pooled running
    variance, regress, map back to the target's raw feature space."""
    src_scale = (src_stats.var.mean() + src_stats.eps).sqrt()
    dst_scale = (dst_stats.var.mean() + dst_stats.eps).sqrt()
    return regressor((feats - src_stats.mean) / src_scale) * dst_scale + dst_stats.mean


def test_imputation_regressors_learn_from_regression_only_and_fill_the_gap() -> None:
    model = make_model("imputation").train()
    b = make_batch([1] * 6, [1] * 6)
    out = run(model, b)
    s = out.stats
    assert float(out.aux_loss.detach()) == pytest.approx(
        s["imputation_loss_fo"] + s["imputation_loss_of"], rel=1e-5
    )
    F.cross_entropy(out.logits, b["label"]).backward()
    # complete eyes: the head reads real features, the regressors get nothing from CE
    assert _grads(model.imp_fo) == 0 and _grads(model.imp_of) == 0
    assert _grads(model.head) > 0 and _grads(model.fundus_encoder) > 0
    model.zero_grad()
    run(model, b).aux_loss.backward()
    assert _grads(model.imp_fo) > 0 and _grads(model.imp_of) > 0
    # inputs and targets are detached: the regression never moves the encoders
    assert _grads(model.fundus_encoder) == 0 and _grads(model.oct_encoder) == 0

    model.zero_grad()
    partial = make_batch([1, 1, 0, 0], [1, 0, 1, 1])  # eye 0 has both: a regression pair
    out = run(model, partial)
    F.cross_entropy(out.logits, partial["label"]).backward()
    # the head reads imputed features detached: still no CE gradient into the regressors
    assert _grads(model.imp_fo) == 0 and _grads(model.imp_of) == 0
    unpaired = make_batch([1, 1, 0], [0, 0, 1])
    assert float(run(model, unpaired).aux_loss.detach()) == 0.0  # no eye with both

    model.eval()
    with torch.no_grad():
        out = run(model, partial, labels=False).logits
        f = model.fundus_encoder(partial["fundus"][1:2])
        imputed_o = _imputed_by_hand(f, model.fundus_stats, model.imp_fo, model.oct_stats)
        torch.testing.assert_close(out[1:2], model._fuse(f, imputed_o))
        o = model.oct_encoder(partial["oct"][2:3])
        imputed_f = _imputed_by_hand(o, model.oct_stats, model.imp_of, model.fundus_stats)
        torch.testing.assert_close(out[2:3], model._fuse(imputed_f, o))


def test_imputation_loss_stays_bounded_with_few_nearly_identical_pairs() -> None:
    """Incomplete training data: a batch may hold two complete eyes with almost the same
    features. Normalising by those two rows' variance made the loss ~10³ and stalled training;
    in the running-standardised spaces the loss does not depend on which rows are paired."""
    model = make_model("imputation").train()
    b = make_batch([1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 1, 1], seed=5)
    normal = run(model, b).stats
    for key in ("fundus", "oct"):
        b[key][1] = b[key][0] + 1e-4  # the two complete eyes: near-identical images
    near = run(model, b).stats
    for key in ("imputation_loss_fo", "imputation_loss_of"):
        # the paired rows' variance is ~1e-9 here: dividing by it would multiply the loss ~1e6
        assert 0 < near[key] < 10 * normal[key], (key, near[key], normal[key])


def test_imputation_loss_is_scale_free_for_uncentred_features() -> None:
    """Encoder features are non-negative with a mean far above their spread. Regressing raw
    features started the loss at ~1 + mean²/variance (10²–10⁴ in benchmark runs), which
    dominated the global gradient clip. Standardised, an offset of 50 changes nothing: the loss
    of an untrained regressor stays near 1 (it predicts about the mean)."""
    b = make_batch(*MIXED)
    losses = {}
    for offset in (0.0, 50.0):
        torch.manual_seed(0)
        model = make_model("imputation").train()
        for encoder in (model.fundus_encoder, model.oct_encoder):
            encoder.register_forward_hook(lambda _m, _i, out, c=offset: out + c)
        s = run(model, b).stats
        losses[offset] = s["imputation_loss_fo"] + s["imputation_loss_of"]
    assert losses[50.0] == pytest.approx(losses[0.0], rel=1e-3), losses
    assert 0.5 < losses[50.0] < 6.0, losses  # two terms, each about 1 (a few pairs per batch)
    # the imputed feature is back in the raw (offset) space the head reads
    model.eval()
    with torch.no_grad():
        f = model.fundus_encoder(b["fundus"])
        imputed = _imputed_by_hand(f, model.fundus_stats, model.imp_fo, model.oct_stats)
    assert float(imputed.mean()) > 25.0


def test_imputation_trains_with_modality_dropout() -> None:
    assert make_model("imputation", modality_dropout=0.4).modality_dropout == 0.4
    model = make_model("imputation", modality_dropout=0.9).train()
    out = run(model, make_batch([1] * 8, [1] * 8))
    assert out.stats["modality_dropped"] > 0 and out.stats["imputed_fraction"] > 0


def test_imputation_paths_trains_each_imputed_path_of_complete_eyes() -> None:
    """The path terms exist only in imputation_paths, come from complete eyes, are RIMA's
    CE + consistency with RIMA's weights, and train the head (not the regressors)."""
    b = make_batch(*MIXED)
    torch.manual_seed(0)
    plain = make_model("imputation").train()
    paths = copy.deepcopy(plain)
    paths.path_weight, paths.consistency_weight = MCFG.missing_path_weight, 0.0
    out_plain, out_paths = run(plain, b), run(paths, b)
    s = out_paths.stats
    assert "path_ce_fundus_only" not in out_plain.stats
    regression = s["imputation_loss_fo"] + s["imputation_loss_of"]
    path_ce = s["path_ce_fundus_only"] + s["path_ce_oct_only"]
    share = float((b["has_fundus"] & b["has_oct"]).float().mean())  # 5 complete eyes of 9
    assert float(out_paths.aux_loss.detach()) == pytest.approx(
        regression + share * MCFG.missing_path_weight * path_ce, rel=1e-5
    )
    # by hand: the fundus-only path of the complete eyes is the head on [f, imputed OCT]
    both = b["has_fundus"] & b["has_oct"]
    paths.eval()
    with torch.no_grad():
        f = paths.fundus_encoder(b["fundus"][both])
        imputed_o = _imputed_by_hand(f, paths.fundus_stats, paths.imp_fo, paths.oct_stats)
        logits = paths._fuse(f, imputed_o)
    assert float(F.cross_entropy(logits, b["label"][both])) == pytest.approx(
        s["path_ce_fundus_only"], rel=1e-4
    )
    paths.train()
    paths.zero_grad()
    model = make_model("imputation_paths").train()
    assert (model.path_weight, model.consistency_weight) == (
        MCFG.missing_path_weight,
        MCFG.consistency_weight,
    )
    no_paths = copy.deepcopy(model)
    no_paths.path_weight = no_paths.consistency_weight = 0.0
    complete = make_batch([1] * 6, [1] * 6)
    run(model, complete).aux_loss.backward()
    run(no_paths, complete).aux_loss.backward()
    assert _grads(model.head) > 0 and _grads(no_paths.head) == 0  # the path terms train the head
    # imputed inputs are detached: the regressors get the regression gradient and nothing more
    for name in ("imp_fo", "imp_of"):
        for p, q in zip(
            getattr(model, name).parameters(), getattr(no_paths, name).parameters(), strict=True
        ):
            torch.testing.assert_close(p.grad, q.grad)
    assert "path_ce_oct_only" not in run(model, make_batch([1, 1, 0], [0, 0, 1])).stats


def test_distillation_routes_teacher_or_student_and_distils() -> None:
    model = make_model("distillation").eval()
    b = make_batch([1, 1, 0], [1, 0, 1])
    with torch.no_grad():
        out = run(model, b, labels=False).logits
        teacher = model.teacher(b["fundus"][:1], b["oct"][:1], *(torch.ones(1, dtype=bool),) * 2)
        torch.testing.assert_close(out[0], teacher.logits[0])
        torch.testing.assert_close(
            out[1], model.student_f(b["fundus"][1:2], b["has_fundus"][1:2])[0]
        )
        torch.testing.assert_close(out[2], model.student_o(b["oct"][2:3], b["has_oct"][2:3])[0])
        model.student_f.head.net[-1].bias.add_(1.0)
        moved = run(model, b, labels=False).logits
    assert not torch.allclose(moved[1], out[1])
    torch.testing.assert_close(moved[[0, 2]], out[[0, 2]])


def test_distillation_students_have_their_own_encoders_and_the_frozen_teacher_stays_put() -> None:
    model = make_model("distillation")
    encoders = [
        model.teacher.fundus_encoder,
        model.teacher.oct_encoder,
        model.student_f.encoder,
        model.student_o.encoder,
    ]
    assert len({id(e) for e in encoders}) == 4
    shared = {id(p) for p in model.teacher.parameters()} & {
        id(p) for s in (model.student_f, model.student_o) for p in s.parameters()
    }
    assert not shared
    model.freeze_teacher()
    model.train()
    assert not model.teacher.training and model.student_f.training
    before = copy.deepcopy(model.teacher.state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable}.isdisjoint({id(p) for p in model.teacher.parameters()})
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for pattern in (MIXED, PATTERNS["complete"], PATTERNS["fundus_only"]):
        b = make_batch(*pattern)
        out = run(model, b)
        opt.zero_grad()
        (F.cross_entropy(out.logits, b["label"]) + out.aux_loss).backward()
        assert all(p.grad is None for p in model.teacher.parameters())
        opt.step()
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics included


def test_distillation_loss_is_the_literature_weighting() -> None:
    """On complete eyes each student gets (1 - alpha) CE + alpha T^2 KL(teacher_T || student_T);
    single-modality eyes only get the engine's CE through the routed logits."""
    from rima_core.core.models.common import Inputs

    alpha, t = 0.3, 3.0
    model = make_model("distillation", distill_alpha=alpha, distill_temperature=t)
    model.freeze_teacher()
    model.train()
    ref = copy.deepcopy(model)  # the forward updates the students' running statistics
    b = make_batch([1, 1, 1, 0], [1, 1, 0, 1])
    out = run(model, b)
    hf, ho, y = b["has_fundus"], b["has_oct"], b["label"]
    both = hf & ho
    with torch.no_grad():
        teacher = ref.teacher.grade(Inputs(b["fundus"], b["oct"], both, both, None)).logits
    target = F.log_softmax(teacher[both] / t, dim=1)
    kd = ce = 0.0
    for student in (ref.student_f(b["fundus"], hf), ref.student_o(b["oct"], ho)):
        logp = F.log_softmax(student[both] / t, dim=1)
        kd += F.kl_div(logp, target, log_target=True, reduction="batchmean")
        ce += F.cross_entropy(student[both], y[both])
    expected = 0.5 * (alpha * t * t * kd + (1 - alpha) * ce)  # 2 of the 4 eyes are complete
    assert float(out.aux_loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    torch.testing.assert_close(out.logits[both], teacher[both])
    lone = make_batch([1, 1, 0, 0], [0, 0, 1, 1])
    assert float(run(model, lone).aux_loss.detach()) == 0.0  # nothing to distil


def test_distillation_kl_term_pulls_students_towards_the_teacher() -> None:
    """Without labels only the KL term remains: a few steps of it bring each student's softened
    prediction closer to the (frozen) teacher's."""
    model = make_model("distillation")
    model.freeze_teacher()
    model.train()
    b = make_batch([1] * 6, [1] * 6)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(25):
        out = run(model, b, labels=False)
        first = first if first is not None else out.stats["distill_kl"]
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
    assert out.stats["student_ce"] == 0.0
    assert out.stats["distill_kl"] < 0.3 * first


def test_distillation_saved_before_the_two_stages_still_loads(tmp_path) -> None:
    """model.pt files of the former online distillation (shared encoders) load as that model."""
    from rima_core.core.models.baselines import OnlineDistillation

    spec = make_spec("distillation")
    torch.manual_seed(0)
    old = OnlineDistillation(spec.config, K).eval()
    save_model(old, spec, tmp_path / "model.pt")
    loaded, _ = load_model(tmp_path / "model.pt")
    assert isinstance(loaded, OnlineDistillation)
    b = make_batch(*MIXED)
    with torch.no_grad():
        assert torch.equal(run(loaded, b, labels=False).logits, run(old, b, labels=False).logits)


# -------------------------------------------------------------------------------------------
# fundus_only / oct_only: standardised features


@pytest.mark.parametrize("name", ["fundus_only", "oct_only"])
def test_single_modality_standardises_its_features(name: str, tmp_path) -> None:
    """The head reads per-dimension standardised features (running statistics, updated in
    training only); a model saved before the standardiser existed loads and reads raw ones."""
    model = make_model(name).train()
    b = make_batch(*MIXED)
    run(model, b)
    assert int(model.stats.updates) == 1
    model.eval()
    run(model, b, labels=False)
    assert int(model.stats.updates) == 1
    present = b["has_fundus"] if name == "fundus_only" else b["has_oct"]
    images = b["fundus"] if name == "fundus_only" else b["oct"]
    with torch.no_grad():
        feats = model.encoder(images[present])
        z = model.stats(feats)
        torch.testing.assert_close(run(model, b, labels=False).logits[present], model.head(z))
    spec = make_spec(name)
    save_model(model, spec, tmp_path / "model.pt")
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    blob["state_dict"] = {k: v for k, v in blob["state_dict"].items() if not k.startswith("stats.")}
    torch.save(blob, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")
    assert isinstance(old.stats, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(
            run(old, b, labels=False).logits[present], old.head(old.encoder(images[present]))
        )


# -------------------------------------------------------------------------------------------
# the OT controls: rima_no_translators, rima_flat_coupling


def test_no_translators_has_no_translator_and_uses_learned_tokens() -> None:
    model = make_model("rima_no_translators", full_path="head")  # the head's inputs, below
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    assert not [n for n in names if n.startswith(("g_fo.", "g_of.")) or n.startswith("T_v")]
    assert {"missing_fundus", "missing_oct", "oct_to_fundus.weight", "path_weights"} <= names
    b = make_batch(*MIXED)
    model.train()
    out = run(model, b)
    assert "translation_loss_fo" not in out.stats and "gw_iterations" not in out.stats
    assert "path_ce_fundus_only" in out.stats  # the same path training as rima
    (F.cross_entropy(out.logits, b["label"]) + out.aux_loss).backward()
    assert model.missing_fundus.grad.abs().sum() > 0 and model.missing_oct.grad.abs().sum() > 0
    # at inference an eye missing a modality is graded with that modality's token
    model.eval()
    with torch.no_grad():
        hf, ho = b["has_fundus"], b["has_oct"]
        f, o = model.encode(b["fundus"], b["oct"], hf, ho)
        tok_f = model.missing_fundus.expand_as(f)
        tok_o = model.missing_oct.expand_as(o)
        f_used, o_used = torch.where(hf[:, None], f, tok_f), torch.where(ho[:, None], o, tok_o)
        z_f = model.fundus_branch(f_used, model.oct_to_fundus(o_used), tok_f)
        z_o = model.oct_branch(o_used, tok_o)
        expected = model.head(torch.cat([z_f, z_o], 1))
        torch.testing.assert_close(run(model, b, labels=False).logits, expected)
        model.missing_oct.add_(1.0)
        moved = run(model, b, labels=False).logits
    assert not torch.allclose(moved[~ho], expected[~ho])


def test_no_translators_trains_a_step_and_supports_no_alignment_diagnostics() -> None:
    from rima_core.runs.diagnostics import supports_diagnostics

    model = make_model("rima_no_translators").train()
    assert not supports_diagnostics(model)
    b = make_batch(*MIXED)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = copy.deepcopy(model.state_dict())
    out = run(model, b)
    opt.zero_grad()
    (F.cross_entropy(out.logits, b["label"]) + out.aux_loss).backward()
    opt.step()
    assert not torch.equal(model.missing_fundus, before["missing_fundus"])
    assert not torch.equal(model.head[-1].weight, before["head.2.weight"])


def test_flat_coupling_targets_are_the_class_means() -> None:
    model = make_model("rima_flat_coupling")
    g = torch.Generator().manual_seed(0)
    lf = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    lo = torch.tensor([2, 1, 0, 0, 0, 1, 2, 2])  # class counts differ between the sides
    tgt_o = torch.randn(len(lo), 5, generator=g)
    tgt_f = torch.randn(len(lf), 4, generator=g)
    T = model.flat_coupling(lf, lo, torch.float32)
    assert (T[lf[:, None] != lo[None, :]] == 0).all()
    target, keep = model.translation_targets(T, tgt_o)
    assert keep.tolist() == list(range(len(lf)))
    means_o = torch.stack([tgt_o[lo == c].mean(0) for c in range(3)])
    torch.testing.assert_close(target, means_o[lf])
    target, keep = model.translation_targets(T.T, tgt_f)
    means_f = torch.stack([tgt_f[lf == c].mean(0) for c in range(3)])
    torch.testing.assert_close(target, means_f[lo])
    # the marginals and class masses are GW's (class_marginals), so T is a coupling of them
    from rima_core.core import ot

    _, p, q = ot.class_marginals(lf, lo)
    torch.testing.assert_close(T.sum(1), p)
    torch.testing.assert_close(T.sum(0), q)
    # a class absent on the other side gets no mass
    T = model.flat_coupling(torch.tensor([0, 1, 3]), torch.tensor([0, 1, 1]), torch.float32)
    assert T[2].sum() == 0 and torch.isfinite(T).all()


def test_flat_coupling_trains_the_translators_towards_class_means() -> None:
    model = make_model("rima_flat_coupling").train()
    b = make_batch(*MIXED)
    out = run(model, b)
    assert "gw_iterations" not in out.stats and out.stats["translation_loss_fo"] > 0
    # the loss is the cosine loss towards the class means of the standardised features
    ref = make_model("rima_flat_coupling").train()
    hf, ho, y = b["has_fundus"], b["has_oct"], b["label"]
    f, o = ref.encode(b["fundus"], b["oct"], hf, ho)
    fd, od = f[hf].detach(), o[ho].detach()
    means_o = {int(c): od[y[ho] == c].mean(0) for c in y[ho].unique()}
    target = torch.stack([means_o[int(c)] for c in y[hf]])
    loss = (1 - F.cosine_similarity(ref.g_fo(fd), target, dim=1)).mean()
    assert out.stats["translation_loss_fo"] == pytest.approx(float(loss.detach()), rel=1e-4)
    assert int(model.T_v_updates) == 1  # T_v estimated from the flat coupling


# -------------------------------------------------------------------------------------------
# late fusion / imputation: the head reads standardised features


@pytest.mark.parametrize("name", ["late_fusion_zero", "late_fusion_dropout"])
def test_late_fusion_standardises_and_zeros_a_missing_modality(name: str, tmp_path) -> None:
    model = make_model(name).train()
    b = make_batch(*MIXED)
    run(model, b)
    assert int(model.fundus_stats.updates) == 1 and int(model.oct_stats.updates) == 1
    model.eval()
    hf, ho = b["has_fundus"], b["has_oct"]
    with torch.no_grad():
        f, o = model.encode_both(Inputs(b["fundus"], b["oct"], hf, ho, None))
        zf = torch.where(hf[:, None], model.fundus_stats(f), torch.zeros(()))
        zo = torch.where(ho[:, None], model.oct_stats(o), torch.zeros(()))
        torch.testing.assert_close(
            run(model, b, labels=False).logits, model.head(torch.cat([zf, zo], dim=1))
        )
    save_model(model, make_spec(name), tmp_path / "model.pt")
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    blob["state_dict"] = {k: v for k, v in blob["state_dict"].items() if "_stats." not in k}
    torch.save(blob, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")  # saved before the standardisers: raw features
    assert isinstance(old.fundus_stats, nn.Identity)
    with torch.no_grad():
        f, o = old.encode_both(Inputs(b["fundus"], b["oct"], hf, ho, None))
        torch.testing.assert_close(
            run(old, b, labels=False).logits, old.head(torch.cat([f, o], dim=1))
        )


@pytest.mark.parametrize("name", ["imputation", "imputation_paths"])
def test_imputation_head_reads_standardised_features(name: str, tmp_path) -> None:
    model = make_model(name).train()
    b = make_batch(*PATTERNS["complete"])
    run(model, b)
    model.eval()
    assert bool(model.head_standardised)
    with torch.no_grad():
        f, o = model.encode_both(Inputs(b["fundus"], b["oct"], b["has_fundus"], b["has_oct"], None))
        expected = model.head(torch.cat([model.fundus_stats(f), model.oct_stats(o)], dim=1))
        torch.testing.assert_close(run(model, b, labels=False).logits, expected)
    save_model(model, make_spec(name), tmp_path / "model.pt")
    blob = torch.load(tmp_path / "model.pt", weights_only=True)
    del blob["state_dict"]["head_standardised"]
    torch.save(blob, tmp_path / "old.pt")
    old, _ = load_model(tmp_path / "old.pt")  # saved before: the head reads raw features
    assert not bool(old.head_standardised)
    with torch.no_grad():
        torch.testing.assert_close(
            run(old, b, labels=False).logits, old.head(torch.cat([f, o], dim=1))
        )


@pytest.mark.parametrize("name", ["rima", "rima_no_translators", "rima_no_class_ot"])
def test_product_full_path(name: str) -> None:
    """``full_path="product"``: a complete eye's logits are the fused head's plus the
    log-probabilities of its fundus-only and OCT-only paths, the latter fixed in the full
    path's loss (no gradient reaches the single paths through it); an eye missing a modality keeps
    its one path, the same as with the head alone (same weights); without path training
    (``rima_no_missing_paths``) the full path is the head alone."""
    b = make_batch(*MIXED)
    hf, ho = b["has_fundus"], b["has_oct"]
    both = hf & ho
    product = make_model(name, full_path="product").eval()
    head = make_model(name, full_path="head").eval()
    head.load_state_dict(product.state_dict())
    with torch.no_grad():
        f, o = product.encode(b["fundus"], b["oct"], hf, ho)
        ones = torch.ones_like(hf)
        fused = product.fuse(f, o, ones, ones)
        lf = F.log_softmax(product.fuse(f, o, ones, ~ones), dim=1)
        lo = F.log_softmax(product.fuse(f, o, ~ones, ones), dim=1)
        out = run(product, b, labels=False).logits
        alone = run(head, b, labels=False).logits
    torch.testing.assert_close(out[both], (fused + lf + lo)[both], atol=1e-5, rtol=1e-5)
    # the product is a constant of the full path's loss: its gradient reaches the head only
    product.train()
    product.fundus_branch.block.dropout.p = 0.0
    f, o = product.encode(b["fundus"], b["oct"], hf, ho)
    idx = both.nonzero().flatten()
    singles = product.single_paths(f[idx], o[idx])
    head_logits = product.fuse(f[idx], o[idx], *[torch.ones_like(idx, dtype=torch.bool)] * 2)
    grads = torch.autograd.grad(
        product.full_logits(head_logits, *singles).sum(), singles, allow_unused=True
    )
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)
    torch.testing.assert_close(out[~both], alone[~both])
    torch.testing.assert_close(alone[both], fused[both], atol=1e-5, rtol=1e-5)
    assert not make_model("rima_no_missing_paths", full_path="product").product
    assert not make_model("rima").product  # the default full path is the fused head alone
