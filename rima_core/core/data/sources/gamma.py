"""GAMMA (MICCAI 2021 glaucoma grading): a one-hot label sheet, colour fundus JPEGs, OCT B-scans.

Layout (docs/datasets.md §2)::

    <root>/training/glaucoma_grading_training_GT.xlsx            data, non, early, mid_advanced
    <root>/training/multi-modality_images/<id>/<id>.jpg          colour fundus, any size
    <root>/training/multi-modality_images/<id>/<id>/<n>_image.jpg  grey B-scans, n = 0..255

``<root>`` may also be the ``training`` folder itself, whose name may be capitalised. Ids are
4-digit zero-padded folder names; the sheet stores them as integers. B-scans are stacked in
NUMERIC order of ``n`` (string order would put 10 before 2). GAMMA has no split of its own
(``split=None``): ``prepare`` assigns one. A missing fundus file or OCT folder makes that
modality None; an eye with neither is rejected when loaded.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

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

SOURCE = "gamma"
CLASS_NAMES = ["non", "early", "mid_advanced"]
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_BSCAN_RE = re.compile(r"^(\d+)(?:_image)?$", re.IGNORECASE | re.ASCII)


def _training_dir(root: Path) -> Path | None:
    if child_dir(root, "multi-modality_images") is not None:
        return root
    return child_dir(root, "training")


def _sheet(train_dir: Path) -> Path | None:
    sheets = sorted(p for p in train_dir.glob("*.xlsx") if not p.name.startswith("~$"))
    preferred = [p for p in sheets if "grading" in p.name.lower() or "gt" in p.stem.lower()]
    return (preferred or sheets or [None])[0]


def is_gamma(root: Path) -> bool:
    """Cheap layout test used by ``detect_source``."""
    train_dir = _training_dir(Path(root))
    return train_dir is not None and child_dir(train_dir, "multi-modality_images") is not None


def _fundus_file(case_dir: Path, name: str) -> Path | None:
    for suffix in _IMAGE_SUFFIXES:
        for cand in (case_dir / f"{name}{suffix}", case_dir / f"{name}{suffix.upper()}"):
            if cand.exists():  # a folder or FIFO here is refused by the reader
                return cand
    files = sorted(
        p for p in case_dir.iterdir() if is_entry(p) and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    return files[0] if len(files) == 1 else None


def scan(root: Path, disease: str = "auto") -> ScanResult:
    """Labels come from the sheet; paths from the image folders. ``disease`` is ignored."""
    root = Path(root)
    train_dir = _training_dir(root) if root.is_dir() else None
    images = child_dir(train_dir, "multi-modality_images") if train_dir else None
    if train_dir is None or images is None:
        raise SourceError(
            f"{root}: not a GAMMA tree: expected <root>/training/multi-modality_images/<id>/ "
            "and <root>/training/glaucoma_grading_training_GT.xlsx"
        )
    sheet = _sheet(train_dir)
    if sheet is None:
        raise SourceError(f"{train_dir}: no label sheet (glaucoma_grading_training_GT.xlsx)")
    problems: dict[int, str] = {}  # id -> why the eye is bad (reported/quarantined by prepare)
    _, labels = read_onehot_sheet(
        sheet, "data", CLASS_NAMES, case_name=lambda k: f"{k:04d}", bad=problems
    )

    folders = case_folders(images, problems)
    unlabelled = sorted(set(folders) - set(labels) - set(problems))
    notes = []
    if unlabelled:
        notes.append(
            f"{len(unlabelled)} image folder(s) not in {sheet.name}, skipped: {unlabelled[:5]}"
        )
        log.warning(notes[-1])

    cases = []
    for key in sorted(set(labels) | set(problems)):
        case_id = f"{key:04d}"
        case_dir = folders.get(key, images / case_id)
        paths: dict[str, str] = {"case_dir": str(case_dir)}
        if key in problems:
            cases.append(CaseRef(case_id=case_id, paths=paths, problem=problems[key]))
            continue
        if case_dir.is_dir():
            fundus = _fundus_file(case_dir, case_dir.name)
            if fundus is not None:
                paths["fundus"] = str(fundus)
            oct_dir = case_dir / case_dir.name
            if not oct_dir.is_dir():
                subdirs = [p for p in case_dir.iterdir() if p.is_dir()]
                oct_dir = subdirs[0] if len(subdirs) == 1 else oct_dir
            if oct_dir.is_dir():
                paths["oct_dir"] = str(oct_dir)
        cases.append(CaseRef(case_id=case_id, paths=paths, label=labels[key], split=None))
    log.info("GAMMA: %d eyes under %s", len(cases), train_dir)
    return ScanResult(
        class_names=list(CLASS_NAMES), cases=cases, source=SOURCE, disease="glaucoma", notes=notes
    )


def bscan_files(oct_dir: Path) -> list[Path]:
    """B-scan images sorted by their number (``2_image.jpg`` before ``10_image.jpg``)."""
    numbered = []
    for p in oct_dir.iterdir():
        if is_entry(p) and p.suffix.lower() in _IMAGE_SUFFIXES:
            m = _BSCAN_RE.match(p.stem)
            if m:
                numbered.append((int(m.group(1)), p))
    numbered.sort()
    return [p for _, p in numbered]


def _load_oct(oct_dir: Path, case_id: str) -> np.ndarray | None:
    files = bscan_files(oct_dir)
    if not files:
        log.warning(
            "case %s: OCT folder %s holds no <n>_image.jpg B-scans; OCT treated as missing",
            case_id,
            oct_dir,
        )
        return None
    max_voxels = read_limits().max_volume_voxels
    scans, voxels = [], 0
    for f in files:  # the volume cap is checked as B-scans accumulate, not after stacking
        scans.append(read_image(f, case_id, mode="L"))
        voxels += scans[-1].size
        if voxels > max_voxels:
            raise CaseError(
                case_id,
                f"OCT B-scans exceed {max_voxels} voxels (prepare.max_volume_voxels)",
                str(oct_dir),
            )
    shapes = {s.shape for s in scans}
    if len(shapes) != 1:
        raise CaseError(case_id, f"B-scans differ in size: {sorted(shapes)}", str(oct_dir))
    return as_oct(np.stack(scans, axis=0), case_id, oct_dir)


def load(ref: CaseRef, disease: str | None = None) -> RawCase:
    """Decode one eye: RGB fundus (H×W×3) and the B-scan stack (D×H×W)."""
    if ref.label is None:
        raise CaseError(ref.case_id, "no label from the sheet", ref.paths.get("case_dir"))
    fundus = None
    if "fundus" in ref.paths:
        fundus = as_fundus(
            read_image(Path(ref.paths["fundus"]), ref.case_id, mode="RGB"),
            ref.case_id,
            ref.paths["fundus"],
        )
    oct_ = _load_oct(Path(ref.paths["oct_dir"]), ref.case_id) if "oct_dir" in ref.paths else None
    if fundus is None and oct_ is None:
        raise CaseError(
            ref.case_id, "neither a fundus image nor OCT B-scans", ref.paths.get("case_dir")
        )
    return RawCase(case_id=ref.case_id, label=ref.label, split=None, fundus=fundus, oct=oct_)
