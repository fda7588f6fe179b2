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
from rima_core.models import (
    MODEL_NAMES,
    MissingModalityError,
    ModelSpec,
    RimaConfig,
    build_model,
    load_model,
    save_model,
)
from rima_core.models.common import modality_dropout
from rima_core.models.encoders import PretrainedWeightsError, build_encoder

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


@pytest.mark.parametrize("name", ["rima", "rima_no_class_ot", "rima_no_feature_ot"])
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
        # encoder gradients large): compare relative to the largest entry
        scale = max(1.0, float(pa.grad.abs().max()))
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5 * scale, rtol=1e-3, msg=pname)


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
    removed. (A model that ignored the translation, or fused the wrong eye's, would fail this.)"""
    model = make_model("rima").eval()
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
    model = make_model("rima").eval()
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

    from rima_core.models import RIMA_VARIANTS

    section_keys = {f.name for f in fields(ModelConfig)} - {"name"} | {
        f.name for f in fields(OTConfig)
    }
    own = {f.name for f in fields(RimaConfig)}
    assert own == section_keys | {"class_ot", "feature_ot", "missing_paths"}
    assert make_spec("rima_no_class_ot").config.class_ot is False
    assert make_spec("rima_no_feature_ot").config.feature_ot is False
    assert make_spec("rima_no_missing_paths").config.missing_paths is False
    for name in MODEL_NAMES:
        off = {
            k
            for k in ("class_ot", "feature_ot", "missing_paths")
            if not getattr(make_spec(name).config, k)
        }
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


def test_load_model_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_model(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable model file"):
        load_model(bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"spec": asdict(make_spec("late_fusion_zero")), "state_dict": {}}, wrong)
    with pytest.raises(ValueError, match="do not fit"):
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
        torch.testing.assert_close(out[1:2], model.head(torch.cat([f, imputed_o], dim=1)))
        o = model.oct_encoder(partial["oct"][2:3])
        imputed_f = _imputed_by_hand(o, model.oct_stats, model.imp_of, model.fundus_stats)
        torch.testing.assert_close(out[2:3], model.head(torch.cat([imputed_f, o], dim=1)))


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
        logits = paths.head(torch.cat([f, imputed_o], dim=1))
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
        f = model.fundus_encoder(b["fundus"])
        o = model.oct_encoder(b["oct"])
        torch.testing.assert_close(out[0], model.teacher(torch.cat([f[:1], o[:1]], 1))[0])
        torch.testing.assert_close(out[1], model.student_f(f[1:2])[0])
        torch.testing.assert_close(out[2], model.student_o(o[2:3])[0])
        model.student_f.net[-1].bias.add_(1.0)
        moved = run(model, b, labels=False).logits
    assert not torch.allclose(moved[1], out[1])
    torch.testing.assert_close(moved[[0, 2]], out[[0, 2]])

    model.train()
    complete = make_batch([1] * 6, [1] * 6)
    out = run(model, complete)
    assert out.stats["distill_kl"] > 0 and out.stats["student_ce"] > 0
    F.cross_entropy(out.logits, complete["label"]).backward()
    # complete eyes: the routed logits are the teacher's; the students learn from aux only
    assert _grads(model.teacher) > 0
    assert _grads(model.student_f) == 0 and _grads(model.student_o) == 0
    model.zero_grad()
    run(model, complete).aux_loss.backward()
    assert _grads(model.student_f) > 0 and _grads(model.student_o) > 0
    assert _grads(model.teacher) == 0  # the teacher's softened prediction is a detached target
    model.zero_grad()
    lone = make_batch([1, 1, 0, 0], [0, 0, 1, 1])
    out = run(model, lone)
    assert float(out.aux_loss.detach()) == 0.0  # nothing to distil without a complete eye
    F.cross_entropy(out.logits, lone["label"]).backward()
    assert _grads(model.student_f) > 0 and _grads(model.student_o) > 0


def test_distillation_kl_term_pulls_students_towards_the_teacher() -> None:
    """Without labels only the KL term remains: a few steps of it bring each student's softened
    prediction closer to the (fixed) teacher's."""
    model = make_model("distillation").train()
    b = make_batch([1] * 6, [1] * 6)
    params = [*model.student_f.parameters(), *model.student_o.parameters()]
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(25):
        out = run(model, b, labels=False)
        first = first if first is not None else out.stats["distill_kl"]
        opt.zero_grad()
        out.aux_loss.backward()
        opt.step()
    assert out.stats["student_ce"] == 0.0
    assert out.stats["distill_kl"] < 0.3 * first
