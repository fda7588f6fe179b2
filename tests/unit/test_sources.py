"""Source loaders on tiny fixture trees written in the real layouts (tests/fixtures_sources.py)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rima_core.config import PrepareConfig
from rima_core.core.data.prepare import prepare_store
from rima_core.core.data.sources import detect_source, fairvision, gamma, get_source, rima_folders
from rima_core.core.data.types import CaseError, SourceError
from tests.fixtures_sources import (
    SPLIT_SPELLINGS,
    Expected,
    write_fairvision,
    write_gamma,
    write_rima,
)


def _tiny_prepare_cfg() -> PrepareConfig:
    return PrepareConfig(fundus_size=8, oct_shape=[4, 4, 4], workers=1)


def _load_all(module, root: Path, disease: str = "auto"):
    result = module.scan(root, disease)
    return result, {ref.case_id: module.load(ref, result.disease) for ref in result.cases}


def _assert_case(case, exp: Expected, jpeg: bool = False) -> None:
    assert case.label == exp.label
    assert case.split == exp.split
    for got, want in ((case.fundus, exp.fundus), (case.oct, exp.oct)):
        if want is None:
            assert got is None
            continue
        assert got is not None and got.dtype == np.uint8 and got.shape == want.shape
        if jpeg:
            assert np.abs(got.astype(int) - want.astype(int)).max() <= 4
        else:
            np.testing.assert_array_equal(got, want)


# --- FairVision ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("disease", "spelling", "classes"),
    [
        ("amd", "Capital", ["normal", "early", "intermediate", "late"]),
        ("dr", "short", ["non_vision_threatening", "vision_threatening"]),
        ("glaucoma", "long", ["normal", "glaucoma"]),
    ],
)
def test_fairvision_round_trip(
    tmp_path: Path, disease: str, spelling: str, classes: list[str]
) -> None:
    expected = write_fairvision(
        tmp_path, disease, n_per_split=2, split_names=SPLIT_SPELLINGS[spelling]
    )
    assert detect_source(tmp_path) == "fairvision"
    result, cases = _load_all(fairvision, tmp_path)
    assert (result.source, result.disease, result.class_names) == ("fairvision", disease, classes)
    assert sorted(cases) == sorted(expected)
    for case_id, exp in expected.items():
        _assert_case(cases[case_id], exp)
        assert cases[case_id].attributes == exp.attributes
    assert {c.split for c in cases.values()} == {"train", "val", "test"}


def test_fairvision_label_maps_cover_every_rule(tmp_path: Path) -> None:
    expected = write_fairvision(tmp_path, "amd", n_per_split=2, summary_csv=False)
    _, cases = _load_all(fairvision, tmp_path)
    # wet, advanced atrophic, not.in.icd.table, early, intermediate, no.amd.diagnosis
    assert [cases[c].label for c in sorted(cases)] == [0, 1, 2, 3, 0, 3]
    assert [cases[c].label for c in sorted(cases)] == [expected[c].label for c in sorted(expected)]


def test_fairvision_string_race_rgb_and_missing_modality(tmp_path: Path) -> None:
    expected = write_fairvision(
        tmp_path,
        "glaucoma",
        n_per_split=2,
        race_as_string=True,
        rgb_fundus=True,
        missing={1: "fundus", 4: "oct"},
    )
    _, cases = _load_all(fairvision, tmp_path)
    for case_id, exp in expected.items():
        _assert_case(cases[case_id], exp)
        assert cases[case_id].attributes["race"] == exp.attributes["race"]  # "White" -> 2, ...
    assert cases["data_00002"].fundus is None and cases["data_00002"].oct is not None
    assert cases["data_00005"].oct is None and cases["data_00005"].fundus.shape == (16, 16, 3)


def test_fairvision_disease_folder_as_root_detected_from_keys(tmp_path: Path) -> None:
    expected = write_fairvision(tmp_path, "dr", disease_folder="copy_of_harvard", summary_csv=False)
    root = tmp_path / "copy_of_harvard"
    assert detect_source(root) == "fairvision"
    result, cases = _load_all(fairvision, root)
    assert result.disease == "dr"
    for case_id, exp in expected.items():
        _assert_case(cases[case_id], exp)


def test_fairvision_several_diseases_need_a_choice(tmp_path: Path) -> None:
    write_fairvision(tmp_path, "amd", summary_csv=False)
    write_fairvision(tmp_path, "glaucoma", summary_csv=False)
    with pytest.raises(SourceError, match="several disease folders"):
        fairvision.scan(tmp_path, "auto")
    result = fairvision.scan(tmp_path, "glaucoma")
    assert result.disease == "glaucoma" and len(result.cases) == 6
    with pytest.raises(SourceError, match="no dr folder"):
        fairvision.scan(tmp_path, "dr")


def test_fairvision_dr_class_only_and_amd_under_dr_subtype_key(tmp_path: Path) -> None:
    d = tmp_path / "DR" / "Training"
    d.mkdir(parents=True)
    np.savez(d / "data_00001.npz", dr_class=np.array(1), oct_bscans=np.zeros((2, 4, 4), np.uint8))
    case = fairvision.load(fairvision.scan(tmp_path).cases[0], "dr")
    assert case.label == 1 and case.fundus is None
    a = tmp_path / "other" / "Test"
    a.mkdir(parents=True)
    np.savez(
        a / "data_00002.npz",
        dr_subtype=np.array("intermediate.dry"),
        slo_fundus=np.zeros((4, 4), np.uint8),
    )
    result = fairvision.scan(tmp_path / "other")
    assert result.disease == "amd"
    assert fairvision.load(result.cases[0], result.disease).label == 2


def test_fairvision_summary_csv_is_optional_and_only_cross_checked(tmp_path: Path) -> None:
    write_fairvision(tmp_path, "amd", n_per_split=1)
    csv = tmp_path / "ReadMe" / "data_summary_amd.csv"
    csv.write_text(csv.read_text().replace(",training\n", ",test\n"))
    result = fairvision.scan(tmp_path)
    assert any("'use' disagrees" in note for note in result.notes)
    assert {r.case_id: r.split for r in result.cases}["data_00001"] == "train"  # the folder wins
    csv.unlink()
    result, cases = _load_all(fairvision, tmp_path)
    assert result.notes == [] and "age" not in cases["data_00001"].attributes


def test_fairvision_truncated_npz(tmp_path: Path) -> None:
    expected = write_fairvision(tmp_path, "amd", n_per_split=1, summary_csv=False)
    path = expected["data_00002"].path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refs = {r.case_id: r for r in fairvision.scan(tmp_path).cases}
    with pytest.raises(CaseError, match="unreadable or truncated") as err:
        fairvision.load(refs["data_00002"], "amd")
    assert err.value.case_id == "data_00002" and err.value.path == str(path)
    fairvision.load(refs["data_00001"], "amd")  # the others still load


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        (
            {"amd_condition": np.array("banana.dry"), "slo_fundus": np.zeros((4, 4), np.uint8)},
            "unknown AMD",
        ),
        (
            {"amd_condition": np.array("early.dry"), "oct_bscans": np.zeros((4, 4), np.uint8)},
            "rank 2",
        ),
        (
            {
                "amd_condition": np.array("early.dry"),
                "slo_fundus": np.zeros((2, 4, 4, 4), np.uint8),
            },
            "fundus has shape",
        ),
        ({"amd_condition": np.array("early.dry"), "race": np.array(1)}, "neither"),
    ],
)
def test_fairvision_bad_case_names_case_and_reason(
    tmp_path: Path, arrays: dict, reason: str
) -> None:
    d = tmp_path / "AMD" / "Training"
    d.mkdir(parents=True)
    np.savez(d / "data_00007.npz", **arrays)
    ref = fairvision.scan(tmp_path).cases[0]
    with pytest.raises(CaseError, match=reason) as err:
        fairvision.load(ref, "amd")
    assert "data_00007" in str(err.value)


def test_fairvision_duplicate_ids_across_splits(tmp_path: Path) -> None:
    expected = write_fairvision(tmp_path, "amd", n_per_split=1, summary_csv=False)
    shutil.copy(expected["data_00001"].path, tmp_path / "AMD" / "Test" / "data_00001.npz")
    # scan lists both copies (so prepare --skip-bad can quarantine them and keep the rest)
    dup = [r for r in fairvision.scan(tmp_path).cases if r.case_id == "data_00001"]
    assert sorted(r.split for r in dup) == ["test", "train"]
    with pytest.raises(CaseError, match="duplicate case id") as err:
        prepare_store("fairvision", tmp_path, tmp_path / "store", _tiny_prepare_cfg())
    assert err.value.case_id == "data_00001"
    assert not (tmp_path / "store").exists()


# --- GAMMA ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["training", "Training"])
def test_gamma_round_trip_sizes_and_numeric_bscan_order(tmp_path: Path, folder: str) -> None:
    expected = write_gamma(
        tmp_path, fundus_sizes=((299, 200), (196, 193), (20, 24)), training_folder=folder
    )
    assert detect_source(tmp_path) == "gamma"
    result, cases = _load_all(gamma, tmp_path)
    assert result.class_names == ["non", "early", "mid_advanced"] and result.source == "gamma"
    assert sorted(cases) == ["0001", "0004", "0007"]
    for case_id, exp in expected.items():
        _assert_case(cases[case_id], exp, jpeg=True)
        assert cases[case_id].split is None
    assert cases["0001"].fundus.shape == (200, 299, 3) and cases["0004"].fundus.shape == (
        193,
        196,
        3,
    )
    levels = cases["0001"].oct[:, 4, 5].astype(int)
    np.testing.assert_allclose(
        levels, 10 + 15 * np.arange(12), atol=2
    )  # 0, 1, ..., 11 (not 0, 1, 10, 11, 2)


def test_gamma_bscans_sorted_numerically_not_as_strings(tmp_path: Path) -> None:
    for n in (0, 1, 2, 10, 11, 100):
        (tmp_path / f"{n}_image.jpg").write_bytes(b"")
    assert [p.name for p in gamma.bscan_files(tmp_path)] == [
        f"{n}_image.jpg" for n in (0, 1, 2, 10, 11, 100)
    ]
    assert sorted(p.name for p in tmp_path.iterdir())[:3] == [
        "0_image.jpg",
        "100_image.jpg",
        "10_image.jpg",
    ]


def test_gamma_training_folder_as_root_and_missing_modalities(tmp_path: Path) -> None:
    expected = write_gamma(
        tmp_path, fundus_sizes=((12, 10), (10, 12), (11, 11)), missing={0: "fundus", 1: "oct"}
    )
    _, cases = _load_all(gamma, tmp_path / "training")
    for case_id, exp in expected.items():
        _assert_case(cases[case_id], exp, jpeg=True)
    assert cases["0001"].fundus is None and cases["0004"].oct is None


def test_gamma_truncated_jpeg_and_neither_modality(tmp_path: Path) -> None:
    expected = write_gamma(tmp_path, fundus_sizes=((64, 48), (12, 10)))
    jpg = expected["0001"].path / "0001.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    refs = {r.case_id: r for r in gamma.scan(tmp_path).cases}
    with pytest.raises(CaseError, match="truncated") as err:
        gamma.load(refs["0001"])
    assert err.value.case_id == "0001" and err.value.path == str(jpg)
    shutil.rmtree(expected["0004"].path)
    refs = {r.case_id: r for r in gamma.scan(tmp_path).cases}
    with pytest.raises(CaseError, match="neither"):
        gamma.load(refs["0004"])


def test_gamma_sheet_errors(tmp_path: Path) -> None:
    write_gamma(tmp_path, fundus_sizes=((12, 10), (10, 12)))
    sheet = tmp_path / "training" / "glaucoma_grading_training_GT.xlsx"
    df = pd.read_excel(sheet)
    pd.concat([df, df.iloc[[0]]]).to_excel(sheet, index=False)
    # a bad row is a bad eye (ref.problem), not a bad tree: prepare reports or quarantines it
    problems = {r.case_id: r.problem for r in gamma.scan(tmp_path).cases}
    assert "duplicate id" in problems["0001"] and problems["0004"] is None
    df.drop(columns=["early"]).to_excel(sheet, index=False)
    with pytest.raises(SourceError, match="missing one-hot column"):
        gamma.scan(tmp_path)
    df.assign(non=0, early=0, mid_advanced=0).to_excel(sheet, index=False)
    problems = {r.case_id: r.problem for r in gamma.scan(tmp_path).cases}
    assert all("no unique maximum" in p for p in problems.values()) and len(problems) == 2
    with pytest.raises(CaseError, match="no unique maximum") as err:
        prepare_store("gamma", tmp_path, tmp_path / "store", _tiny_prepare_cfg())
    assert err.value.case_id == "0001"


# --- RIMA-style folders -------------------------------------------------------------------------


def test_rima_round_trip(tmp_path: Path) -> None:
    expected = write_rima(tmp_path, n=4)
    assert detect_source(tmp_path) == "rima"
    result, cases = _load_all(rima_folders, tmp_path)
    assert result.class_names == ["normal", "early", "late"] and result.source == "rima"
    assert sorted(cases) == ["100", "101", "102", "103"]  # "not_a_case" is skipped
    for case_id, exp in expected.items():
        _assert_case(cases[case_id], exp)
        assert cases[case_id].fundus.ndim == 2  # grey stays grey; prepare replicates it


def test_rima_plain_nii_name_float_volume_and_split_sheets(tmp_path: Path) -> None:
    expected = write_rima(tmp_path, n=6, oct_name="plain", oct_dtype="float", extra_sheets=True)
    _, cases = _load_all(rima_folders, tmp_path)
    for case_id, exp in expected.items():
        _assert_case(cases[case_id], exp)  # 0..1 floats come back as the same uint8 values
    assert {c.split for c in cases.values()} == {"train", "val", "test"}


def test_rima_missing_modality_and_errors(tmp_path: Path) -> None:
    import nibabel as nib

    expected = write_rima(tmp_path, n=4, missing={0: "oct", 1: "fundus"})
    _, cases = _load_all(rima_folders, tmp_path)
    assert cases["100"].oct is None and cases["101"].fundus is None
    nii = expected["102"].path / "processed_data_102.nii"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.uint8), np.eye(4)), str(nii))
    nii3 = expected["103"].path / "processed_data_103.nii"
    nii3.write_bytes(nii3.read_bytes()[:400])
    (expected["100"].path / "data_100_fundus.png").unlink()
    refs = {r.case_id: r for r in rima_folders.scan(tmp_path).cases}
    with pytest.raises(CaseError, match="rank 2") as err:
        rima_folders.load(refs["102"])
    assert err.value.case_id == "102"
    with pytest.raises(CaseError, match="unreadable or truncated NIfTI"):
        rima_folders.load(refs["103"])
    with pytest.raises(CaseError, match="neither"):
        rima_folders.load(refs["100"])


def test_rima_duplicate_id_across_sheets(tmp_path: Path) -> None:
    write_rima(tmp_path, n=3)
    pd.DataFrame([{"data": 100, "normal": 1, "early": 0, "late": 0}]).to_excel(
        tmp_path / "test.xlsx", index=False
    )
    refs = {r.case_id: r for r in rima_folders.scan(tmp_path).cases}
    assert "duplicate id: in test and train sheets" in refs["100"].problem
    assert refs["101"].problem is None and refs["101"].label is not None
    with pytest.raises(CaseError, match="duplicate id") as err:
        prepare_store("rima", tmp_path, tmp_path / "store", _tiny_prepare_cfg())
    assert err.value.case_id == "100"
    summary = prepare_store(
        "rima", tmp_path, tmp_path / "store", _tiny_prepare_cfg(), skip_bad=True
    )
    assert summary["n_cases"] == 2 and summary["n_quarantined"] == 1


def test_rima_unicode_digit_folder_is_not_a_case(tmp_path: Path) -> None:
    # "²".isdigit() is True and int("²") raises: such a folder must be skipped, not crash
    write_rima(tmp_path, n=3)
    (tmp_path / "Image" / "²").mkdir()
    (tmp_path / "Image" / "١٢").mkdir()  # Arabic-Indic digits: int() accepts them, we don't
    result = rima_folders.scan(tmp_path)
    assert sorted(r.case_id for r in result.cases) == ["100", "101", "102"]


# --- dispatch ------------------------------------------------------------------------------------


def test_unrecognisable_trees_raise_source_error(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="Expected one of"):
        detect_source(tmp_path)
    for module in (fairvision, gamma, rima_folders):
        with pytest.raises(SourceError, match="expected"):
            module.scan(tmp_path)
    with pytest.raises(SourceError, match="unknown source"):
        get_source("dicom")
    assert get_source("rima") is rima_folders and get_source("fairvision") is fairvision


def test_refs_and_cases_pickle(tmp_path: Path) -> None:
    write_gamma(tmp_path, fundus_sizes=((12, 10),))
    ref = gamma.scan(tmp_path).cases[0]
    again = pickle.loads(pickle.dumps(ref))
    case = pickle.loads(pickle.dumps(gamma.load(again)))
    assert case.case_id == "0001" and case.oct.shape == (12, 8, 10)


def test_config_accepts_exactly_the_registered_sources_and_diseases() -> None:
    """``params.data.source``/``data.disease`` are checked by their own lists in
    ``rima_core.config.RULES``; they must name what the source registry and the FairVision loader
    know, or a valid source is refused (or an unknown one let through to prepare)."""
    from rima_core.config import RULES
    from rima_core.core.data.sources import SOURCES

    source_rule, disease_rule = RULES["data.source"], RULES["data.disease"]
    for name in [*SOURCES, "auto"]:
        assert source_rule(name) is None, f"config refuses registered source {name!r}"
    assert source_rule("not_a_source") is not None
    for disease in [*fairvision.DISEASES, "auto"]:
        assert disease_rule(disease) is None, f"config refuses disease {disease!r}"
    assert disease_rule("cataract") is not None
