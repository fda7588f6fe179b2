"""The synthetic retina phantom: layout, determinism, bookkeeping, and that it carries signal."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from rima_core.config import ConfigError, SynthConfig
from rima_core.core.data.sources import detect_source, fairvision
from rima_core.core.data.synthetic import generate


def _tiny(**kw) -> SynthConfig:
    base = {"n_eyes": 40, "fundus_size": 32, "oct_shape": [12, 16, 20], "seed": 3}
    base.update(kw)
    return SynthConfig(**base)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_byte_identical_for_the_same_seed(tmp_path: Path) -> None:
    cfg = _tiny()
    generate(tmp_path / "a", cfg)
    generate(tmp_path / "b", cfg)
    a, b = _hashes(tmp_path / "a"), _hashes(tmp_path / "b")
    assert len(a) == 40 + 2 and a == b
    generate(tmp_path / "c", _tiny(seed=4))
    c = _hashes(tmp_path / "c")
    changed = [k for k in a if k.endswith(".npz") and a[k] != c.get(k)]
    assert len(changed) > 30


def test_layout_keys_and_bookkeeping(tmp_path: Path) -> None:
    cfg = _tiny(
        n_eyes=60,
        class_weights=[3.0, 2.0, 1.0],
        missing_fundus_fraction=0.1,
        missing_oct_fraction=0.2,
        split_fractions=[0.5, 0.25, 0.25],
    )
    summary = generate(tmp_path, cfg)
    assert summary["classes"] == {"normal": 30, "early": 20, "advanced": 10}
    assert summary["splits"] == {"train": 30, "val": 15, "test": 15}
    assert summary["split_classes"]["train"] == {"normal": 15, "early": 10, "advanced": 5}
    assert (summary["missing_fundus"], summary["missing_oct"]) == (6, 12)

    files = sorted((tmp_path / "Synthetic").glob("*/*.npz"))
    assert {p.parent.name for p in files} == {"Training", "Validation", "Test"}
    no_fundus = no_oct = 0
    for p in files:
        with np.load(p) as z:  # no pickle needed
            assert {"grade", "class_names", "race", "male", "hispanic"} <= set(z.files)
            assert "maritalstatus" in z.files and "language" in z.files
            has_f, has_o = "slo_fundus" in z.files, "oct_bscans" in z.files
            assert has_f or has_o
            no_fundus += not has_f
            no_oct += not has_o
            if has_f:
                assert z["slo_fundus"].shape == (32, 32, 3) and z["slo_fundus"].dtype == np.uint8
            if has_o:
                assert z["oct_bscans"].shape == (12, 16, 20) and z["oct_bscans"].dtype == np.uint8
            assert list(z["class_names"]) == ["normal", "early", "advanced"]
    assert (no_fundus, no_oct) == (6, 12)

    with open(tmp_path / "ReadMe" / "data_summary_synthetic.csv") as fh:
        rows = list(csv.DictReader(fh))
    header = ["filename", "age", "gender", "race", "ethnicity", "language", "maritalstatus"]
    assert list(rows[0]) == [*header, "grade", "use"]
    assert len(rows) == 60 and {r["use"] for r in rows} == {"training", "validation", "test"}
    meta = json.loads((tmp_path / "SYNTHETIC.json").read_text())
    assert meta["config"]["n_eyes"] == 60 and "version" in meta


def test_other_class_counts_get_generic_names(tmp_path: Path) -> None:
    summary = generate(tmp_path, _tiny(n_eyes=20, n_classes=5))
    assert summary["class_names"] == [f"grade_{k}" for k in range(5)]
    assert sorted(summary["classes"].values()) == [4, 4, 4, 4, 4]


def test_read_back_through_the_fairvision_loader(tmp_path: Path) -> None:
    generate(tmp_path, _tiny(missing_fundus_fraction=0.1, missing_oct_fraction=0.1))
    assert detect_source(tmp_path) == "fairvision"
    result = fairvision.scan(tmp_path)
    assert result.disease == "synthetic" and result.class_names == ["normal", "early", "advanced"]
    assert result.notes == []  # the CSV's `use` agrees with the folders
    cases = [fairvision.load(ref, result.disease) for ref in result.cases]
    assert len(cases) == 40 and {c.split for c in cases} == {"train", "val", "test"}
    assert sum(c.fundus is None for c in cases) == 4 and sum(c.oct is None for c in cases) == 4
    first = cases[0]
    (path,) = (tmp_path / "Synthetic").glob(f"*/{first.case_id}.npz")
    with np.load(path) as z:
        assert first.label == int(z["grade"])
        if first.fundus is not None:
            np.testing.assert_array_equal(first.fundus, z["slo_fundus"])
    assert {"age", "gender", "race", "site"} <= set(first.attributes)


def test_replaces_an_existing_output(tmp_path: Path) -> None:
    generate(tmp_path / "out", _tiny(n_eyes=12))
    (tmp_path / "out" / "stale.txt").write_text("old")
    generate(tmp_path / "out", _tiny(n_eyes=10))
    assert not (tmp_path / "out" / "stale.txt").exists()
    assert len(list((tmp_path / "out" / "Synthetic").glob("*/*.npz"))) == 10
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary leftovers


@pytest.mark.parametrize(
    "bad",
    [
        {"fundus_signal": 0.0},
        {"oct_signal": -1.0},
        {"n_classes": 1},
        {"class_weights": [1.0, 2.0]},
        {"split_fractions": [0.5, 0.5, 0.5]},
        {"missing_fundus_fraction": 0.7, "missing_oct_fraction": 0.5},
        {"oct_shape": [4, 16, 16]},
    ],
)
def test_rejects_bad_config(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError, match="synth"):
        generate(tmp_path / "out", _tiny(**bad))
    assert not (tmp_path / "out").exists()


# --- signal: each modality alone beats chance; both together beat each alone ---------------------


def _fundus_features(img: np.ndarray, field: np.ndarray) -> np.ndarray:
    """Colour quantiles relative to the eye's own median: bright disc/cup/exudates, dark bleeds.
    Dividing by the median removes the site's colour cast and brightness."""
    rel = (img.astype(float) + 1.0) / np.median(img[field].astype(float) + 1.0, axis=0)
    red, green, blue = rel[..., 0][field], rel[..., 1][field], rel[..., 2][field]
    return np.concatenate(
        [
            np.quantile(green, [0.01, 0.05, 0.5, 0.9, 0.95, 0.98, 0.995]),
            np.quantile(blue, [0.9, 0.98, 0.995]),
            np.quantile(red, [0.01, 0.03, 0.1]),
        ]
    )


def _oct_features(vol: np.ndarray) -> np.ndarray:
    """Mean reflectivity per depth (averaged over B-scans and A-scans): layer positions."""
    profile = vol.astype(float).mean(axis=(0, 2))
    return (profile - profile.mean()) / (profile.std() + 1e-6)


def test_each_modality_informative_and_both_better(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    size = 48
    cfg = SynthConfig(
        n_eyes=480,
        seed=0,
        fundus_size=size,
        oct_shape=[24, 24, 24],
        missing_fundus_fraction=0.0,
        missing_oct_fraction=0.0,
    )
    generate(tmp_path, cfg)
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    field = (yy - centre) ** 2 + (xx - centre) ** 2 < (0.8 * size / 2) ** 2
    feats_f, feats_o, labels = [], [], []
    for path in sorted((tmp_path / "Synthetic").glob("*/*.npz")):
        with np.load(path) as z:
            feats_f.append(_fundus_features(z["slo_fundus"], field))
            feats_o.append(_oct_features(z["oct_bscans"]))
            labels.append(int(z["grade"]))
    x_f, x_o, y = np.array(feats_f), np.array(feats_o), np.array(labels)
    cv = StratifiedKFold(5, shuffle=True, random_state=0)

    def accuracy(x: np.ndarray) -> float:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
        return float(cross_val_score(model, x, y, cv=cv).mean())

    acc_f, acc_o, acc_both = accuracy(x_f), accuracy(x_o), accuracy(np.hstack([x_f, x_o]))
    chance = 1.0 / cfg.n_classes
    assert acc_f > chance + 0.25, (acc_f, acc_o, acc_both)
    assert acc_o > chance + 0.25, (acc_f, acc_o, acc_both)
    assert acc_both > max(acc_f, acc_o) + 0.03, (acc_f, acc_o, acc_both)


# --- per-modality signal strength ----------------------------------------------------------------

# Digest of the tree written by generator 1.0 *before* the signal keys existed (computed once from
# that commit's synthetic.py with _tiny(missing_fundus_fraction=0.1, missing_oct_fraction=0.1)).
# The default signals must reproduce it byte for byte: data.dvc records the default phantom.
# Recomputed once since, when the generator's module moved (SYNTHETIC.json names it as
# rima_core.core.data.synthetic; every image and label unchanged).
_UNCHANGED_DIGEST = "f8474b95ba98843b2d88c880783f0e84007dca2cbf97fde927458dfc83d51a2d"


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for name, digest in _hashes(root).items():
        h.update(f"{Path(name).as_posix()} {digest}\n".encode())
    return h.hexdigest()


def test_default_signals_leave_the_output_unchanged(tmp_path: Path) -> None:
    cfg = _tiny(missing_fundus_fraction=0.1, missing_oct_fraction=0.1)
    assert (cfg.fundus_signal, cfg.oct_signal) == (1.0, 1.0)
    generate(tmp_path, cfg)
    assert _tree_digest(tmp_path) == _UNCHANGED_DIGEST
    meta = json.loads((tmp_path / "SYNTHETIC.json").read_text())
    assert "fundus_signal" not in meta["config"] and "oct_signal" not in meta["config"]


def test_signal_scales_only_that_modalitys_noise() -> None:
    from rima_core.core.data.synthetic import MODALITY_NOISE, _plan, modality_noise

    base_cfg = SynthConfig(n_eyes=4000, seed=5)
    strong = SynthConfig(n_eyes=4000, seed=5, fundus_signal=2.0, oct_signal=0.5)
    assert modality_noise(strong, "fundus") == MODALITY_NOISE / 2.0
    assert modality_noise(strong, "oct") == MODALITY_NOISE * 2.0
    base, plan = _plan(base_cfg), _plan(strong)
    np.testing.assert_array_equal(plan.severity, base.severity)  # same eyes, same grades
    np.testing.assert_array_equal(plan.grade, base.grade)
    noise_f, noise_o = plan.sev_fundus - plan.severity, plan.sev_oct - plan.severity
    # the same standard-normal draws, scaled by 1/signal
    np.testing.assert_allclose(noise_f, 0.5 * (base.sev_fundus - base.severity), atol=1e-12)
    np.testing.assert_allclose(noise_o, 2.0 * (base.sev_oct - base.severity), atol=1e-12)
    assert abs(noise_f.std() - 0.06) < 0.004 and abs(noise_o.std() - 0.24) < 0.015
    # a stronger fundus signal: its view of the severity predicts the grade better than OCT's
    k = strong.n_classes
    acc_f = np.mean(np.clip(np.floor(plan.sev_fundus * k), 0, k - 1) == plan.grade)
    acc_o = np.mean(np.clip(np.floor(plan.sev_oct * k), 0, k - 1) == plan.grade)
    assert acc_f > acc_o + 0.2, (acc_f, acc_o)


def test_signal_changes_only_that_modalitys_images(tmp_path: Path) -> None:
    generate(tmp_path / "a", _tiny(n_eyes=12))
    generate(tmp_path / "b", _tiny(n_eyes=12, fundus_signal=3.0))
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.npz"))
    changed = 0
    for rel in files:
        with np.load(tmp_path / "a" / rel) as za, np.load(tmp_path / "b" / rel) as zb:
            if "oct_bscans" in za.files:
                np.testing.assert_array_equal(za["oct_bscans"], zb["oct_bscans"])
            if "slo_fundus" in za.files:
                changed += not np.array_equal(za["slo_fundus"], zb["slo_fundus"])
    assert changed >= 6
    meta = json.loads((tmp_path / "b" / "SYNTHETIC.json").read_text())
    assert meta["config"]["fundus_signal"] == 3.0 and "oct_signal" not in meta["config"]
