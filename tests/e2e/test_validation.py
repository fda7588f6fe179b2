"""The Great Expectations suite: a clean store passes, each injected defect is caught by name."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rima_core.config import ValidateConfig
from rima_core.core.data.store import TENSORS_FILE, StoreWriter, write_manifest
from rima_core.core.data.validation import validate_store
from tests.data_helpers import build_store, make_arrays, make_manifest

N = 40


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One clean store validated once (GX import is slow); tests read its result and report."""
    root = tmp_path_factory.mktemp("clean")
    store = build_store(root / "store", n=N, missing_every=9)
    result = validate_store(store, root / "report.json", ValidateConfig())
    return store, result, json.loads((root / "report.json").read_text())


def _failed_checks(result):
    return {line.split(" ", 1)[0] for line in result["failures"]}


def _validate(tmp_path, **store_kw):
    store_kw.setdefault("n", N)
    store = build_store(tmp_path / "store", **store_kw)
    result = validate_store(store, tmp_path / "report.json", ValidateConfig())
    return result, json.loads((tmp_path / "report.json").read_text())


def test_clean_store_passes_and_report_lists_every_expectation(clean):
    _, result, report = clean
    assert result["success"], result["failures"]
    assert result["failures"] == []
    assert report["success"] and report["n_cases"] == N
    checks = {e["check"] for e in report["expectations"]}
    assert {
        "manifest_rows_match_tensors",
        "case_id_unique",
        "case_id_not_null",
        "label_in_range",
        "eye_has_a_modality",
        "every_split_has_every_class",
        "split_fraction_at_least_minimum",
        "pixel_min_in_uint8_range",
        "pixel_max_in_uint8_range",
        "mean_intensity_in_range",
        "image_not_constant",
        "absent_modality_is_zeros",
        "store_integrity",
    } <= checks
    assert all(e["success"] for e in report["expectations"])


def test_duplicate_case_id(tmp_path):
    manifest = make_manifest(N)
    manifest.loc[5, "case_id"] = manifest.loc[4, "case_id"]
    result, report = _validate(tmp_path, manifest=manifest)
    assert _failed_checks(result) == {"case_id_unique"}
    entry = next(e for e in report["expectations"] if e["check"] == "case_id_unique")
    assert {o["case_id"] for o in entry["offending"]} == {"eye0004"}
    assert not report["success"]


def test_label_out_of_range(tmp_path):
    manifest = make_manifest(N)
    manifest.loc[7, "label"] = 3
    result, _ = _validate(tmp_path, manifest=manifest)
    assert _failed_checks(result) == {"label_in_range"}
    assert "eye0007" in result["failures"][0]


def test_eye_with_no_modality(tmp_path):
    manifest = make_manifest(N)
    manifest.loc[2, ["has_fundus", "has_oct"]] = False
    result, _ = _validate(tmp_path, manifest=manifest)
    assert _failed_checks(result) == {"eye_has_a_modality"}
    assert "eye0002" in result["failures"][0]


def test_class_missing_from_a_split(tmp_path):
    manifest = make_manifest(N)
    val_class2 = (manifest["split"] == "val") & (manifest["label"] == 2)
    manifest.loc[val_class2, "label"] = 1
    result, report = _validate(tmp_path, manifest=manifest)
    assert _failed_checks(result) == {"every_split_has_every_class"}
    entry = next(e for e in report["expectations"] if e["check"] == "every_split_has_every_class")
    assert [(o["split"], o["class_name"]) for o in entry["offending"]] == [("val", "class2")]


def test_constant_image(tmp_path):
    fundus, _ = make_arrays(N)
    fundus[11] = 128
    result, _ = _validate(tmp_path, fundus=fundus)
    assert _failed_checks(result) == {"image_not_constant"}
    assert "eye0011" in result["failures"][0] and "fundus" in result["failures"][0]


def test_wrong_split_fraction(tmp_path):
    # 100 eyes, val holds 3 (3 % < 5 %) but still every class
    manifest = make_manifest(100)
    manifest.loc[manifest["split"] == "val", "split"] = "train"
    manifest.loc[[60, 61, 62], "split"] = "val"
    result, report = _validate(tmp_path, manifest=manifest)
    assert _failed_checks(result) == {"split_fraction_at_least_minimum"}
    entry = next(
        e for e in report["expectations"] if e["check"] == "split_fraction_at_least_minimum"
    )
    assert entry["offending"][0]["split"] == "val"


def test_dark_image_and_absent_modality_not_zero(tmp_path):
    n = 30
    manifest = make_manifest(n)
    manifest.loc[3, "has_oct"] = False  # but pixels are written below
    fundus, oct = make_arrays(n)
    fundus[4] = np.random.default_rng(0).integers(0, 4, size=fundus[4].shape, dtype=np.uint8)
    with StoreWriter(tmp_path / "store", fundus.shape[1:], oct.shape[1:]) as writer:
        for i in range(n):
            writer.append(fundus[i], oct[i])
        digest = writer.close()
    write_manifest(
        tmp_path / "store",
        manifest,
        tensor_digest=digest,
        source="test",
        disease=None,
        class_names=["a", "b", "c"],
        fundus_shape=fundus.shape[1:],
        oct_shape=oct.shape[1:],
    )
    result = validate_store(tmp_path / "store", tmp_path / "r.json", ValidateConfig())
    assert _failed_checks(result) == {"mean_intensity_in_range", "absent_modality_is_zeros"}


def test_tampered_tensors_fail_integrity(tmp_path):
    store = build_store(tmp_path / "store", n=N)
    raw = bytearray((store / TENSORS_FILE).read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the pixel data
    (store / TENSORS_FILE).write_bytes(bytes(raw))
    result = validate_store(store, tmp_path / "r.json", ValidateConfig())
    assert _failed_checks(result) == {"store_integrity"}


def test_strict_config_fails_clean_store(clean, tmp_path):
    store, _, _ = clean
    cfg = ValidateConfig(min_split_fraction={"train": 0.3, "val": 0.3, "test": 0.05})
    result = validate_store(store, tmp_path / "r.json", cfg)
    assert not result["success"]
    assert _failed_checks(result) == {"split_fraction_at_least_minimum"}


def test_identical_images_across_splits_fail_naming_both_cases(tmp_path):
    """An eye copied under a new id into another split leaks it; the same pixels within one
    split (or absent modalities, all zeros) are no leak."""
    from tests.data_helpers import make_manifest

    manifest = make_manifest(N)
    fundus, oct = make_arrays(N)
    last = N - 1  # test split
    assert manifest["split"][0] == "train" and manifest["split"][last] == "test"
    fundus[last], oct[last] = fundus[0], oct[0]  # eye0000 copied as eye0039
    fundus[2] = fundus[1]  # both in train: not a leak
    result, report = _validate(tmp_path, fundus=fundus, oct=oct)
    assert _failed_checks(result) == {"no_identical_image_across_splits"}
    line = next(f for f in result["failures"] if f.startswith("no_identical_image_across_splits"))
    assert "eye0000" in line and "eye0039" in line and "4 offending" in line
    entry = next(
        e for e in report["expectations"] if e["check"] == "no_identical_image_across_splits"
    )
    assert {o["case_id"] for o in entry["offending"]} == {"eye0000", "eye0039"}
    assert any(o["same_as"] == "eye0039 (test)" for o in entry["offending"])
