"""RIMA-style preprocessed folders, as the method's authors feed their code.

Layout (docs/datasets.md §3)::

    <base>/train.xlsx                              column ``data`` (int id) + one-hot class columns
    <base>/Image/<id>/data_<id>_fundus.png         8-bit grey fundus
    <base>/Image/<id>/processed_data_<id>.nii      OCT volume (some copies: data_<id>.nii[.gz])

Only folder names of ASCII digits are cases (``²`` is a Unicode digit, not a case). Class
names are the one-hot column names. If
``val.xlsx`` / ``test.xlsx`` sit beside ``train.xlsx`` their rows carry that split; with
``train.xlsx`` alone the source has no split of its own (``split=None``) and ``prepare`` makes one.

NIfTI axis convention: the array nibabel returns (voxel axes i, j, k, no reorientation) is taken
as D×H×W, i.e. B-scans along the first voxel axis. That is what the authors' conversion writes
(``nib.Nifti1Image(oct_bscans)`` straight from a FairVision D×H×W array). Copies written with the
ITK/SimpleITK convention (slices on the last axis, x before y) need ``NIFTI_TO_DHW = (2, 1, 0)``.
Intensities: a uint8 volume is kept; any other dtype goes through
:func:`rima_core.core.data.pixels.to_uint8` (0..255 data rounded, 0..1 data times 255,
anything else min-max scaled per volume).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rima_core.core.data import safe_read
from rima_core.core.data.pixels import as_fundus, as_oct
from rima_core.core.data.sources._common import (
    ScanResult,
    case_folders,
    child_dir,
    is_entry,
    read_image,
    read_onehot_sheet,
)
from rima_core.core.data.types import CaseError, CaseRef, RawCase, SourceError, read_limits

log = logging.getLogger(__name__)

SOURCE = "rima"
# Permutation applied to the nibabel array to obtain D×H×W (see module docstring).
NIFTI_TO_DHW: tuple[int, int, int] = (0, 1, 2)
_SHEETS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_FUNDUS_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _sheets(base: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(base.glob("*.xlsx")):
        split = _SHEETS.get(p.stem.lower())
        if split is not None and split not in out:
            out[split] = p
    return out


def _image_dir(base: Path) -> Path | None:
    return child_dir(base, "Image", "Images")


def is_rima(root: Path) -> bool:
    """Cheap layout test used by ``detect_source``."""
    root = Path(root)
    return root.is_dir() and "train" in _sheets(root) and _image_dir(root) is not None


def _find_fundus(case_dir: Path, name: str) -> Path | None:
    for suffix in _FUNDUS_SUFFIXES:
        cand = case_dir / f"data_{name}_fundus{suffix}"
        if cand.exists():  # a folder or FIFO here is refused by the reader
            return cand
    found = sorted(
        p
        for p in case_dir.iterdir()
        if is_entry(p) and "fundus" in p.name.lower() and p.suffix.lower() in _FUNDUS_SUFFIXES
    )
    return found[0] if found else None


def _find_oct(case_dir: Path, name: str) -> Path | None:
    for stem in (f"processed_data_{name}", f"data_{name}"):
        for suffix in (".nii", ".nii.gz"):
            cand = case_dir / f"{stem}{suffix}"
            if cand.exists():  # a folder or FIFO here is refused by the reader
                return cand
    found = sorted(
        p
        for p in case_dir.iterdir()
        if is_entry(p) and p.name.lower().endswith((".nii", ".nii.gz"))
    )
    return found[0] if len(found) == 1 else None


def scan(root: Path, disease: str = "auto") -> ScanResult:
    """Labels from the sheet(s), paths from ``Image/<id>/``. ``disease`` is ignored."""
    base = Path(root)
    sheets = _sheets(base) if base.is_dir() else {}
    images = _image_dir(base) if base.is_dir() else None
    if "train" not in sheets or images is None:
        raise SourceError(
            f"{base}: not a RIMA-style folder: expected <base>/train.xlsx (data + one-hot columns) "
            "and <base>/Image/<id>/data_<id>_fundus.png, processed_data_<id>.nii"
        )
    class_names: list[str] | None = None
    labels: dict[int, tuple[int, str]] = {}
    problems: dict[int, str] = {}  # id -> why the eye is bad (reported/quarantined by prepare)
    for split, sheet in sheets.items():
        sheet_bad: dict[int, str] = {}
        names, sheet_labels = read_onehot_sheet(sheet, "data", bad=sheet_bad)
        if class_names is None:
            class_names = names
        elif names != class_names:
            raise SourceError(
                f"{sheet}: class columns {names} differ from {class_names} in the other sheet(s)"
            )
        for key, reason in sheet_bad.items():
            problems.setdefault(key, f"{sheet.name}: {reason}")
        for key, label in sheet_labels.items():
            if key in labels:
                problems.setdefault(key, f"duplicate id: in {labels[key][1]} and {split} sheets")
            labels[key] = (label, split)
    assert class_names is not None
    single = len(sheets) == 1

    folders = case_folders(images, problems)
    notes = []
    unlabelled = sorted(set(folders) - set(labels) - set(problems))
    if unlabelled:
        notes.append(f"{len(unlabelled)} image folder(s) in no sheet, skipped: {unlabelled[:5]}")
        log.warning(notes[-1])

    cases = []
    for key in sorted(set(labels) | set(problems)):
        label, split = labels.get(key, (None, "train"))
        case_dir = folders.get(key, images / str(key))
        paths: dict[str, str] = {"case_dir": str(case_dir)}
        if key in problems:
            cases.append(CaseRef(case_id=case_dir.name, paths=paths, problem=problems[key]))
            continue
        if case_dir.is_dir():
            fundus = _find_fundus(case_dir, case_dir.name)
            oct_path = _find_oct(case_dir, case_dir.name)
            if fundus is not None:
                paths["fundus"] = str(fundus)
            if oct_path is not None:
                paths["oct"] = str(oct_path)
        cases.append(
            CaseRef(
                case_id=case_dir.name, paths=paths, label=label, split=None if single else split
            )
        )
    log.info("RIMA folders: %d eyes under %s", len(cases), base)
    return ScanResult(
        class_names=class_names, cases=cases, source=SOURCE, disease=None, notes=notes
    )


def _load_nifti(path: Path, case_id: str) -> np.ndarray:
    limits = read_limits()
    try:
        data = safe_read.read_nifti(
            path, max_bytes=limits.max_file_bytes, max_voxels=limits.max_volume_voxels
        )
    except safe_read.UnsafeInputError as exc:
        raise CaseError(case_id, exc.reason, str(path)) from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseError(
            case_id, f"OCT volume has rank {data.ndim} (shape {data.shape}); expected 3", str(path)
        )
    return as_oct(np.transpose(data, NIFTI_TO_DHW), case_id, path)


def load(ref: CaseRef, disease: str | None = None) -> RawCase:
    """Decode one eye: fundus as stored (grey H×W, or RGB) and OCT as D×H×W uint8."""
    if ref.label is None:
        raise CaseError(ref.case_id, "no label from the sheet", ref.paths.get("case_dir"))
    fundus = None
    if "fundus" in ref.paths:
        fpath = Path(ref.paths["fundus"])
        fundus = as_fundus(read_image(fpath, ref.case_id), ref.case_id, fpath)
    oct_ = _load_nifti(Path(ref.paths["oct"]), ref.case_id) if "oct" in ref.paths else None
    if fundus is None and oct_ is None:
        raise CaseError(
            ref.case_id, "neither a fundus image nor an OCT volume", ref.paths.get("case_dir")
        )
    return RawCase(case_id=ref.case_id, label=ref.label, split=ref.split, fundus=fundus, oct=oct_)
