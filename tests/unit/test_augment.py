"""Training-time augmentation: what each transform does to a batch, and its seeding."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from rima_core.config import Config, ConfigError, load_config
from rima_core.core.augment import STREAM, augment_batch


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator training draws an epoch's augmentation from (train._Run.epoch)."""
    from rima_core.runs.train import epoch_seed

    return torch.Generator().manual_seed(epoch_seed(seed, epoch, STREAM))


def _batch(n: int = 16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    has_f = torch.tensor([i % 4 != 3 for i in range(n)])
    has_o = torch.tensor([i % 4 != 2 for i in range(n)])
    fundus = torch.rand(n, 3, 8, 8, generator=g) * has_f[:, None, None, None]
    oct_ = torch.rand(n, 1, 4, 6, 8, generator=g) * has_o[:, None, None, None, None]
    return {
        "fundus": fundus,
        "oct": oct_,
        "has_fundus": has_f,
        "has_oct": has_o,
        "label": torch.arange(n) % 3,
    }


def test_flip_mirrors_both_modalities_of_the_same_eyes() -> None:
    b = _batch()
    out = augment_batch(b, ["flip"], epoch_generator(0, 1))
    f_flipped = [bool(torch.equal(out["fundus"][i], b["fundus"][i].flip(-1))) for i in range(16)]
    f_same = [bool(torch.equal(out["fundus"][i], b["fundus"][i])) for i in range(16)]
    o_flipped = [bool(torch.equal(out["oct"][i], b["oct"][i].flip(-1))) for i in range(16)]
    present = b["has_fundus"] & b["has_oct"]
    for i in map(int, present.nonzero().flatten()):
        assert f_flipped[i] != f_same[i]  # random images are not mirror-symmetric
        assert o_flipped[i] == f_flipped[i]  # the eye is mirrored as a whole
    assert 0 < sum(f_flipped[i] for i in range(16) if present[i]) < int(present.sum())
    assert torch.equal(out["label"], b["label"]) and out["fundus"].shape == b["fundus"].shape
    absent = ~b["has_fundus"]
    assert not out["fundus"][absent].any() and not out["oct"][~b["has_oct"]].any()


def test_intensity_jitters_present_fundus_photos_only_within_range() -> None:
    b = _batch()
    out = augment_batch(b, ["intensity"], epoch_generator(0, 1))
    present = b["has_fundus"]
    assert not out["fundus"][~present].any()  # an absent fundus stays zeros
    assert not torch.equal(out["fundus"][present], b["fundus"][present])
    assert out["fundus"].min() >= 0 and out["fundus"].max() <= 1
    assert torch.equal(out["oct"], b["oct"])  # the OCT encoder standardises each volume
    # an affine map about each photo's mean: per-eye correlation with the original stays ~1
    for i in map(int, present.nonzero().flatten()):
        x, y = b["fundus"][i].flatten(), out["fundus"][i].flatten()
        assert torch.corrcoef(torch.stack([x, y]))[0, 1] > 0.95


def test_seeded_per_run_and_epoch_and_off_by_default() -> None:
    b = _batch()
    kinds = ["flip", "intensity"]
    again = augment_batch(b, kinds, epoch_generator(3, 2))
    assert torch.equal(augment_batch(b, kinds, epoch_generator(3, 2))["fundus"], again["fundus"])
    assert not torch.equal(
        augment_batch(b, kinds, epoch_generator(3, 5))["fundus"], again["fundus"]
    )
    assert not torch.equal(
        augment_batch(b, kinds, epoch_generator(4, 2))["fundus"], again["fundus"]
    )
    assert augment_batch(b, [], epoch_generator(0, 1)) is b
    assert Config().train.augment == []


def test_config_rejects_an_unknown_augmentation() -> None:
    cfg = load_config(None, overrides=["train.augment=[flip,intensity]"])
    assert cfg.train.augment == ["flip", "intensity"]
    with pytest.raises(ConfigError, match=r"train\.augment"):
        load_config(None, overrides=["train.augment=[rotate]"])


def test_training_with_augmentation_is_reproducible(tiny_data, tmp_path: Path) -> None:
    from rima_core.runs.train import train

    cfg = copy.deepcopy(tiny_data.cfg)
    cfg.train.epochs = 1
    cfg.train.augment = ["flip", "intensity"]
    plain = copy.deepcopy(cfg)
    plain.train.augment = []
    for out, c in (("r0", cfg), ("r1", cfg), ("plain", plain)):
        train(tiny_data.store, tiny_data.masks, tmp_path / out, c)
    files = [(tmp_path / d / "model.pt").read_bytes() for d in ("r0", "r1", "plain")]
    assert files[0] == files[1]  # byte-identical run to run
    assert files[0] != files[2]  # and the augmentation changed what was learned
