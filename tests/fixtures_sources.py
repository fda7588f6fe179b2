"""Writers for tiny source trees in the three real layouts (docs/datasets.md), for any test.

Each writer builds a tree under a directory the caller owns (``tmp_path``) and returns what a
correct loader must produce: ``{case_id: Expected}``. Pixels are drawn from a seeded RNG so the
round trip source -> RawCase can be checked value by value (exactly for npz/PNG/NIfTI, within
JPEG tolerance for GAMMA).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# AMD strings -> grade, covering every rule of the literature map.
AMD_LABELS = [
    ("no.amd.diagnosis", 0),
    ("early.dry", 1),
    ("intermediate.dry", 2),
    ("wet.amd.active.choroidal.neovascularization", 3),
    ("not.in.icd.table", 0),
    ("advanced.atrophic.dry.with.subfoveal.involvement", 3),
]
DR_LABELS = [
    ("no.dr.diagnosis", 0),
    ("severe.npdr", 1),
    ("mild.npdr", 0),
    ("pdr", 1),
    ("moderate.npdr", 0),
    ("not.in.icd.table", 0),
]
SPLIT_SPELLINGS = {
    "Capital": ("Training", "Validation", "Test"),
    "short": ("train", "val", "test"),
    "long": ("training", "validation", "test"),
}
_RACE_WORDS = ("Asian", "Black", "White")


@dataclass
class Expected:
    """What a loader must return for one case."""

    label: int
    split: str | None
    fundus: np.ndarray | None
    oct: np.ndarray | None
    attributes: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None  # the main file / folder of the case (for damaging it in tests)


def _fundus(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, shape, dtype=np.uint8)


def write_fairvision(
    root: Path,
    disease: str = "amd",
    n_per_split: int = 2,
    split_names: tuple[str, str, str] = SPLIT_SPELLINGS["Capital"],
    disease_folder: str | None = None,
    race_as_string: bool = False,
    rgb_fundus: bool = False,
    summary_csv: bool = True,
    missing: dict[int, str] | None = None,
    fundus_shape: tuple[int, int] = (16, 16),
    oct_shape: tuple[int, int, int] = (4, 8, 8),
    seed: int = 0,
) -> dict[str, Expected]:
    """``<root>/<AMD|DR|Glaucoma>/<split>/data_XXXXX.npz`` (+ ReadMe CSV). ``missing``: eye index
    -> ``"fundus"`` or ``"oct"`` (that key is left out of the npz)."""
    rng = np.random.default_rng(seed)
    folder = disease_folder or {"amd": "AMD", "dr": "DR", "glaucoma": "Glaucoma"}[disease]
    missing = missing or {}
    expected: dict[str, Expected] = {}
    csv_rows = []
    i = 0
    for split, split_dir_name in zip(("train", "val", "test"), split_names, strict=True):
        split_dir = root / folder / split_dir_name
        split_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(n_per_split):
            case_id = f"data_{i + 1:05d}"
            arrays: dict[str, Any] = {}
            if disease == "amd":
                text, label = AMD_LABELS[i % len(AMD_LABELS)]
                arrays["amd_condition"] = np.array(text, dtype=object)  # needs allow_pickle
            elif disease == "dr":
                text, label = DR_LABELS[i % len(DR_LABELS)]
                arrays["dr_subtype"] = np.array(text)
                arrays["dr_class"] = np.array(label)
            else:
                label = i % 2
                arrays["glaucoma"] = np.array(label)
                arrays["md"] = np.array(-1.5 * i)
            race = i % 3
            arrays["race"] = (
                np.array(_RACE_WORDS[race], dtype=object) if race_as_string else np.array(race)
            )
            arrays["male"] = np.array(i % 2)
            arrays["hispanic"] = np.array(0)
            arrays["maritalstatus"] = np.array(-1 if i == 0 else 1)
            arrays["language"] = np.array(0)
            fshape = (*fundus_shape, 3) if rgb_fundus else fundus_shape
            fundus = _fundus(rng, fshape)
            oct_ = rng.integers(0, 256, oct_shape, dtype=np.uint8)
            if missing.get(i) != "fundus":
                arrays["slo_fundus"] = fundus
            if missing.get(i) != "oct":
                arrays["oct_bscans"] = oct_
            path = split_dir / f"{case_id}.npz"
            np.savez(path, **arrays)
            attrs = {
                "race": race,
                "male": i % 2,
                "hispanic": 0,
                "maritalstatus": -1 if i == 0 else 1,
                "language": 0,
            }
            if disease == "glaucoma":
                attrs["md"] = -1.5 * i
            if summary_csv:
                attrs["age"] = 50.0 + i
                attrs["gender"] = "male" if i % 2 else "female"
                attrs["ethnicity"] = "non-hispanic"
            expected[case_id] = Expected(
                label=label,
                split=split,
                fundus=None if missing.get(i) == "fundus" else fundus,
                oct=None if missing.get(i) == "oct" else oct_,
                attributes=attrs,
                path=path,
            )
            csv_rows.append(
                (f"{case_id}.npz", 50 + i, attrs.get("gender", ""), split_dir_name.lower())
            )
            i += 1
    if summary_csv:
        readme = root / "ReadMe"
        readme.mkdir(parents=True, exist_ok=True)
        lines = [f"filename,age,gender,race,ethnicity,language,maritalstatus,{disease},use"]
        for name, age, gender, use in csv_rows:
            lines.append(f"{name},{age},{gender},white,non-hispanic,english,married,x,{use}")
        (readme / f"data_summary_{disease}.csv").write_text("\n".join(lines) + "\n")
    return expected


def write_gamma(
    root: Path,
    fundus_sizes: tuple[tuple[int, int], ...] = ((299, 200), (196, 193)),
    n_bscans: int = 12,
    bscan_shape: tuple[int, int] = (8, 10),
    training_folder: str = "training",
    missing: dict[int, str] | None = None,
    seed: int = 0,
) -> dict[str, Expected]:
    """GAMMA layout. One eye per entry of ``fundus_sizes`` (PIL (W, H)) plus the labels cycle
    non/early/mid_advanced. B-scan ``n`` is the constant grey ``10 + 15 n`` so the stacking order
    is visible in the pixels. ``missing``: eye index -> ``"fundus"`` or ``"oct"`` (that file or
    folder is absent)."""
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    missing = missing or {}
    train = root / training_folder
    images = train / "multi-modality_images"
    images.mkdir(parents=True)
    expected: dict[str, Expected] = {}
    rows = []
    for i, (w, h) in enumerate(fundus_sizes):
        num = 3 * i + 1  # non-contiguous ids
        case_id = f"{num:04d}"
        label = i % 3
        case_dir = images / case_id
        case_dir.mkdir()
        fundus = None
        if missing.get(i) != "fundus":
            # smooth content survives JPEG almost exactly
            yy, xx = np.mgrid[0:h, 0:w]
            base = rng.integers(40, 200, 3)
            fundus = np.clip(
                base[None, None, :] + (xx[..., None] * 60 // w) + (yy[..., None] * 40 // h), 0, 255
            ).astype(np.uint8)
            Image.fromarray(fundus).save(case_dir / f"{case_id}.jpg", quality=100, subsampling=0)
        oct_ = None
        if missing.get(i) != "oct":
            oct_dir = case_dir / case_id
            oct_dir.mkdir()
            scans = []
            for n in range(n_bscans):
                scan = np.full(bscan_shape, 10 + 15 * n, dtype=np.uint8)
                Image.fromarray(scan).save(oct_dir / f"{n}_image.jpg", quality=100)
                scans.append(scan)
            oct_ = np.stack(scans)
        onehot = [0, 0, 0]
        onehot[label] = 1
        rows.append({"data": num, "non": onehot[0], "early": onehot[1], "mid_advanced": onehot[2]})
        expected[case_id] = Expected(
            label=label, split=None, fundus=fundus, oct=oct_, path=case_dir
        )
    pd.DataFrame(rows).to_excel(train / "glaucoma_grading_training_GT.xlsx", index=False)
    return expected


def write_rima(
    root: Path,
    n: int = 3,
    class_names: tuple[str, ...] = ("normal", "early", "late"),
    oct_name: str = "processed",
    oct_dtype: str = "uint8",
    fundus_shape: tuple[int, int] = (16, 16),
    oct_shape: tuple[int, int, int] = (4, 8, 8),
    extra_sheets: bool = False,
    missing: dict[int, str] | None = None,
    seed: int = 0,
) -> dict[str, Expected]:
    """RIMA-style folders: ``train.xlsx`` + ``Image/<id>/`` with a grey PNG fundus and a NIfTI
    volume written as D×H×W (the authors' conversion). ``oct_name``: ``processed`` ->
    ``processed_data_<id>.nii``, ``plain`` -> ``data_<id>.nii``. ``oct_dtype="float"`` stores the
    volume scaled to 0..1 (the loader must bring it back to the same uint8 values).
    ``extra_sheets`` splits the eyes over train/val/test sheets."""
    import nibabel as nib
    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(seed)
    missing = missing or {}
    images = root / "Image"
    images.mkdir(parents=True)
    expected: dict[str, Expected] = {}
    sheets: dict[str, list[dict[str, int]]] = {"train": [], "val": [], "test": []}
    for i in range(n):
        case_id = str(100 + i)
        label = i % len(class_names)
        case_dir = images / case_id
        case_dir.mkdir()
        fundus = oct_ = None
        if missing.get(i) != "fundus":
            fundus = _fundus(rng, fundus_shape)
            Image.fromarray(fundus, mode="L").save(case_dir / f"data_{case_id}_fundus.png")
        if missing.get(i) != "oct":
            oct_ = rng.integers(0, 256, oct_shape, dtype=np.uint8)
            oct_[0, 0, 0], oct_[-1, -1, -1] = 0, 255  # full range, so a 0..1 float store is exact
            data = oct_ if oct_dtype == "uint8" else (oct_.astype(np.float32) / 255.0)
            stem = f"processed_data_{case_id}" if oct_name == "processed" else f"data_{case_id}"
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(case_dir / f"{stem}.nii"))
        split = ("train", "val", "test")[i % 3] if extra_sheets else "train"
        row = {"data": int(case_id)}
        row.update({name: int(k == label) for k, name in enumerate(class_names)})
        sheets[split].append(row)
        expected[case_id] = Expected(
            label=label,
            split=split if extra_sheets else None,
            fundus=fundus,
            oct=oct_,
            path=case_dir,
        )
    (images / "not_a_case").mkdir()  # only all-digit folder names are cases
    for split, rows in sheets.items():
        if rows:
            pd.DataFrame(rows).to_excel(root / f"{split}.xlsx", index=False)
    return expected
