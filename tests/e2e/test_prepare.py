"""prepare_store: resizing, splits, bad-case handling, atomicity and worker-count determinism.

Error paths use a plug-in source defined in this module (``scan``/``load`` below, addressed by
its module path), so each test decides exactly which case is damaged and how; the happy path also
runs on the synthetic FairVision tree through the real loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rima_core.config import PrepareConfig, SynthConfig
from rima_core.core.data.prepare import (
    QUARANTINE_FILE,
    prepare_store,
    resize_fundus,
    resize_oct,
    stratified_split,
)
from rima_core.core.data.sources._common import ScanResult
from rima_core.core.data.store import MANIFEST_FILE, TENSORS_FILE, open_store
from rima_core.core.data.types import CaseError, CaseRef, RawCase, SourceError

FAKE = __name__  # this module is the plug-in source


# --- the plug-in source: <root>/cases.json + one npz per case -------------------------------


def scan(root: Path, disease: str = "auto") -> ScanResult:
    listing = json.loads((Path(root) / "cases.json").read_text())
    cases = [
        CaseRef(
            c["case_id"],
            {"npz": str(Path(root) / c["file"])},
            c["label"],
            c.get("split"),
            problem=c.get("problem"),
        )
        for c in listing["cases"]
    ]
    return ScanResult(listing["class_names"], cases, source="fake", disease=None)


def load(ref: CaseRef, disease: str | None) -> RawCase:
    with np.load(ref.paths["npz"]) as z:
        if "boom" in z.files:  # a loader bug, not a CaseError: must still be this case's failure
            raise RuntimeError("loader bug")
        fundus = z.get("fundus")
        oct = z.get("oct")
    return RawCase(ref.case_id, ref.label, ref.split, fundus, oct, {"site": len(ref.case_id)})


def _write_tree(root: Path, n: int = 24, k: int = 3, splits: bool = False, **special) -> Path:
    """``special``: case index -> dict of npz arrays (or b"..." raw bytes) replacing the default."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(n):
        cid = f"c{i:03d}"
        arrays = {
            "fundus": rng.integers(20, 230, (20, 16), dtype=np.uint8),
            "oct": rng.integers(20, 230, (6, 10, 12), dtype=np.uint8),
        }
        repl = special.get(cid)
        if isinstance(repl, bytes):
            (root / f"{cid}.npz").write_bytes(repl)
        else:
            np.savez(root / f"{cid}.npz", **(arrays if repl is None else repl))
        split = ["train", "train", "train", "val", "test"][i % 5] if splits else None
        cases.append({"case_id": cid, "file": f"{cid}.npz", "label": i % k, "split": split})
    names = [f"g{j}" for j in range(k)]
    (root / "cases.json").write_text(json.dumps({"class_names": names, "cases": cases}))
    return root


def _cfg(**kw) -> PrepareConfig:
    base = {"fundus_size": 8, "oct_shape": [4, 5, 6], "workers": 1}
    return PrepareConfig(**{**base, **kw})


# --- resizing -------------------------------------------------------------------------------


def test_resize_fundus_grey_to_three_channels():
    grey = np.tile(np.arange(0, 200, 10, dtype=np.uint8), (20, 1))
    out = resize_fundus(grey, 5)
    assert out.shape == (5, 5, 3) and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert (np.diff(out[0, :, 0].astype(int)) > 0).all()  # the gradient survives
    colour = np.zeros((30, 40, 3), np.uint8)
    colour[..., 0] = 200
    out = resize_fundus(colour, 7)
    assert out.shape == (7, 7, 3) and (out[..., 0] == 200).all() and not out[..., 1:].any()


def test_resize_oct_area_when_shrinking_trilinear_when_growing():
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 256, (32, 16, 8), dtype=np.uint8)
    small = resize_oct(vol, (4, 4, 4))
    assert small.shape == (4, 4, 4) and small.dtype == np.uint8
    # area: each output is the mean of its 8×4×2 block
    expected = vol.reshape(4, 8, 4, 4, 4, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(small, np.rint(expected), atol=1)
    mixed = resize_oct(vol, (8, 32, 8))  # shrink D, grow H, keep W
    assert mixed.shape == (8, 32, 8)
    flat = np.full((3, 3, 3), 77, np.uint8)
    assert (resize_oct(flat, (6, 2, 9)) == 77).all()
    assert resize_oct(vol, vol.shape) is not None and (resize_oct(vol, vol.shape) == vol).all()


# --- splitting ------------------------------------------------------------------------------


def test_stratified_split_is_seeded_and_covers_every_class():
    labels = np.repeat([0, 1, 2], [50, 30, 7])
    a = stratified_split(labels, [0.6, 0.2, 0.2], seed=0)
    assert a == stratified_split(labels, [0.6, 0.2, 0.2], seed=0)
    assert a != stratified_split(labels, [0.6, 0.2, 0.2], seed=1)
    a = np.asarray(a)
    for cls in (0, 1, 2):
        got = {s: int(((labels == cls) & (a == s)).sum()) for s in ("train", "val", "test")}
        assert min(got.values()) >= 1
        n = (labels == cls).sum()
        assert abs(got["train"] - 0.6 * n) <= 1
    assert abs((a == "train").mean() - 0.6) < 0.03


def test_prepare_without_source_split_uses_seeded_split(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=30)
    s1 = prepare_store(FAKE, raw, tmp_path / "a", _cfg(seed=0))
    s2 = prepare_store(FAKE, raw, tmp_path / "b", _cfg(seed=5))
    m1 = open_store(tmp_path / "a").manifest
    m2 = open_store(tmp_path / "b").manifest
    assert s1["split_counts"] == {"train": 18, "val": 6, "test": 6}
    assert (m1.groupby("split")["label"].nunique() == 3).all()
    assert not (m1["split"] == m2["split"]).all()
    assert s1["content_hash"] != s2["content_hash"]


def test_prepare_keeps_the_source_split(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=20, splits=True)
    summary = prepare_store(FAKE, raw, tmp_path / "s", _cfg())
    assert summary["split_counts"] == {"train": 12, "val": 4, "test": 4}
    store = open_store(tmp_path / "s")
    assert store.manifest.set_index("case_id").loc["c003", "split"] == "val"
    assert store.fundus.shape == (20, 8, 8, 3) and store.oct.shape == (20, 4, 5, 6)
    assert "source_site" in store.manifest.columns


def test_partial_source_split_is_an_error(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=10, splits=True)
    listing = json.loads((raw / "cases.json").read_text())
    listing["cases"][4]["split"] = None
    (raw / "cases.json").write_text(json.dumps(listing))
    with pytest.raises(SourceError, match="1 of 10 cases have no split"):
        prepare_store(FAKE, raw, tmp_path / "s", _cfg())


# --- bad cases ------------------------------------------------------------------------------


BAD = {
    "c002": {"fundus": np.zeros((4, 4, 4, 4), np.uint8)},  # wrong rank
    "c005": b"PK\x03\x04 truncated",  # unreadable npz
    "c007": {"other": np.zeros(3)},  # neither modality
}


@pytest.mark.parametrize(
    ("case_id", "reason"),
    [
        ("c002", "fundus has rank 4"),
        ("c005", "unreadable"),
        ("c007", "neither a fundus image nor an OCT volume"),
    ],
)
def test_bad_case_raises_and_leaves_old_store(tmp_path, case_id, reason):
    good = _write_tree(tmp_path / "good", n=15)
    out = tmp_path / "store"
    prepare_store(FAKE, good, out, _cfg())
    before = {f: (out / f).read_bytes() for f in (TENSORS_FILE, MANIFEST_FILE)}
    raw = _write_tree(tmp_path / "raw", n=15, **{case_id: BAD[case_id]})
    with pytest.raises(CaseError, match=reason) as info:
        prepare_store(FAKE, raw, out, _cfg())
    assert info.value.case_id == case_id and case_id in str(info.value)
    assert {f: (out / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "raw", "store"]


def test_bad_case_in_worker_pool_leaves_nothing(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=8, c005=BAD["c005"])
    with pytest.raises(CaseError, match="c005"):
        prepare_store(FAKE, raw, tmp_path / "store", _cfg(workers=2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_label_out_of_range_is_a_case_error(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=6)
    listing = json.loads((raw / "cases.json").read_text())
    listing["cases"][3]["label"] = 9
    (raw / "cases.json").write_text(json.dumps(listing))
    with pytest.raises(CaseError, match=r"c003.*label 9 outside \[0, 3\)"):
        prepare_store(FAKE, raw, tmp_path / "s", _cfg())


def test_skip_bad_quarantines_and_continues(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=30, **BAD)
    summary = prepare_store(FAKE, raw, tmp_path / "s", _cfg(), skip_bad=True)
    assert summary["n_cases"] == 27 and summary["n_quarantined"] == 3
    report = json.loads((tmp_path / "s" / QUARANTINE_FILE).read_text())
    assert [c["case_id"] for c in report["cases"]] == ["c002", "c005", "c007"]
    assert all(c["path"].endswith(f"{c['case_id']}.npz") and c["reason"] for c in report["cases"])
    assert not set(open_store(tmp_path / "s").manifest["case_id"]) & set(BAD)


def test_duplicate_case_ids(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=12)
    listing = json.loads((raw / "cases.json").read_text())
    listing["cases"][6]["case_id"] = "c001"
    (raw / "cases.json").write_text(json.dumps(listing))
    with pytest.raises(CaseError, match=r"c001.*duplicate case id"):
        prepare_store(FAKE, raw, tmp_path / "s", _cfg())
    summary = prepare_store(FAKE, raw, tmp_path / "s", _cfg(), skip_bad=True)
    assert summary["n_quarantined"] == 2 and summary["n_cases"] == 10


def test_all_bad_is_an_error_even_with_skip_bad(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=3, c000=b"x", c001=b"y", c002=b"z")
    with pytest.raises(SourceError, match="all 3 cases are bad"):
        prepare_store(FAKE, raw, tmp_path / "s", _cfg(), skip_bad=True)
    assert not (tmp_path / "s").exists()


def test_missing_input_and_bad_fractions(tmp_path):
    with pytest.raises(FileNotFoundError):
        prepare_store(FAKE, tmp_path / "nope", tmp_path / "s", _cfg())
    raw = _write_tree(tmp_path / "raw", n=5)
    with pytest.raises(ValueError, match="split_fractions"):
        prepare_store(FAKE, raw, tmp_path / "s", _cfg(split_fractions=[0.5, 0.2, 0.2]))


# --- the real loader, and worker-count determinism --------------------------------------------


def test_synthetic_tree_byte_identical_across_worker_counts(tmp_path):
    from rima_core.core.data.synthetic import generate

    generate(tmp_path / "raw", SynthConfig(n_eyes=24, fundus_size=16, oct_shape=[8, 8, 8]))
    one = prepare_store("auto", tmp_path / "raw", tmp_path / "w1", _cfg(workers=1))
    two = prepare_store("fairvision", tmp_path / "raw", tmp_path / "w2", _cfg(workers=2))
    assert one["source"] == "fairvision" and one["n_cases"] == 24
    assert one["content_hash"] == two["content_hash"]
    for name in (TENSORS_FILE, MANIFEST_FILE):
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()
    store = open_store(tmp_path / "w1")
    assert store.meta["disease"] == "synthetic"
    assert store.manifest["has_fundus"].sum() + store.manifest["has_oct"].sum() >= 24


# --- the three real layouts (fixture trees from tests/fixtures_sources.py) ---------------------


@pytest.mark.parametrize("layout", ["fairvision", "gamma", "rima"])
def test_real_layouts_round_trip_into_the_store(tmp_path, layout):
    import tests.fixtures_sources as fx

    raw = tmp_path / "raw"
    if layout == "fairvision":
        expected = fx.write_fairvision(raw, "amd", n_per_split=2, missing={1: "oct", 4: "fundus"})
    elif layout == "gamma":
        expected = fx.write_gamma(raw, missing={1: "oct"})
    else:
        expected = fx.write_rima(raw, n=4, missing={2: "fundus"})
    summary = prepare_store("auto", raw, tmp_path / "s", _cfg(oct_shape=[4, 8, 8]))
    assert summary["source"] == layout and summary["n_cases"] == len(expected)
    store = open_store(tmp_path / "s")
    by_id = store.manifest.set_index("case_id")
    for case_id, exp in expected.items():
        row = by_id.loc[case_id]
        i = int(np.flatnonzero(store.manifest["case_id"] == case_id)[0])
        assert row["label"] == exp.label
        assert bool(row["has_fundus"]) == (exp.fundus is not None)
        assert bool(row["has_oct"]) == (exp.oct is not None)
        if exp.fundus is not None and layout != "gamma":  # npz / PNG are lossless
            np.testing.assert_array_equal(store.fundus[i], resize_fundus(exp.fundus, 8))
        if exp.oct is not None and layout != "gamma":
            np.testing.assert_array_equal(store.oct[i], resize_oct(exp.oct, (4, 8, 8)))
        if exp.fundus is None:
            assert not store.fundus[i].any()


def test_damaged_fairvision_npz_is_named_or_quarantined(tmp_path):
    import tests.fixtures_sources as fx

    expected = fx.write_fairvision(tmp_path / "raw", "amd", n_per_split=3)
    victim = sorted(expected)[4]
    path = expected[victim].path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated download
    with pytest.raises(CaseError, match=victim):
        prepare_store("fairvision", tmp_path / "raw", tmp_path / "s", _cfg())
    summary = prepare_store(
        "fairvision", tmp_path / "raw", tmp_path / "s", _cfg(), disease="amd", skip_bad=True
    )
    assert summary["n_cases"] == len(expected) - 1
    report = json.loads((tmp_path / "s" / QUARANTINE_FILE).read_text())
    assert report["cases"][0]["case_id"] == victim and report["cases"][0]["path"] == str(path)


# --- hostile input (issue 10): any loader failure is the case's, limits reach check_raw_case ---


def test_unexpected_loader_exception_is_a_case_failure_not_a_traceback(tmp_path):
    boom = {"fundus": np.full((20, 16), 9, np.uint8), "boom": np.zeros(1)}
    raw = _write_tree(tmp_path / "raw", n=6, c002=boom)
    with pytest.raises(CaseError, match="RuntimeError: loader bug") as err:
        prepare_store(FAKE, raw, tmp_path / "s", _cfg())
    assert err.value.case_id == "c002" and not (tmp_path / "s").exists()
    summary = prepare_store(FAKE, raw, tmp_path / "s", _cfg(), skip_bad=True)
    assert summary["n_quarantined"] == 1 and summary["n_cases"] == 5


def test_a_case_scan_marked_bad_is_reported_or_quarantined(tmp_path):
    raw = _write_tree(tmp_path / "raw", n=6)
    listing = json.loads((raw / "cases.json").read_text())
    listing["cases"][4]["problem"] = "label row has no unique maximum (row 6)"
    (raw / "cases.json").write_text(json.dumps(listing))
    with pytest.raises(CaseError, match="no unique maximum") as err:
        prepare_store(FAKE, raw, tmp_path / "s", _cfg())
    assert err.value.case_id == "c004"
    prepare_store(FAKE, raw, tmp_path / "s", _cfg(), skip_bad=True)
    report = json.loads((tmp_path / "s" / QUARANTINE_FILE).read_text())
    assert [c["case_id"] for c in report["cases"]] == ["c004"]


@pytest.mark.parametrize(
    ("arrays", "setting", "needle"),
    [
        ({"oct": np.full((1, 6, 6), 5, np.uint8)}, {}, "min_oct_size"),
        ({"fundus": np.full((4, 30), 5, np.uint8)}, {}, "min_fundus_size"),
        ({"oct": np.full((12, 10, 12), 5, np.uint8)}, {"max_volume_voxels": 1000}, "max_volume"),
    ],
)
def test_size_limits_apply_to_every_source(tmp_path, arrays, setting, needle):
    raw = _write_tree(tmp_path / "raw", n=6, c001=arrays)
    with pytest.raises(CaseError, match=needle) as err:
        prepare_store(FAKE, raw, tmp_path / "s", _cfg(**setting))
    assert err.value.case_id == "c001"
