"""Harvard FairVision (Harvard-30k AMD / DR / Glaucoma) npz trees, and the synthetic phantom.

Layout (docs/datasets.md §1): ``<root>/<Disease>/<Split>/data_XXXXX.npz`` with split folders spelled
``Training/Validation/Test``, ``train/val/test`` or ``training/validation/test``; ``<root>`` may
also be the disease folder itself. One npz per eye; the npz holds the pixels, the label and the
demographic attributes. The optional summary CSV (``data_summary_<disease>.csv``, in ``ReadMe/``
or beside the disease folders) is only cross-checked and mined for attributes the npz lacks
(age, gender, ...): it is never required, because copies of the dataset ship without it.

Case ids are the npz file stems (``data_00001``), unique across the three splits.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rima_core.core.data.pixels import as_fundus, as_oct
from rima_core.core.data.safe_read import UnsafeInputError, npz_keys, open_regular, read_npz
from rima_core.core.data.sources._common import ScanResult, split_of
from rima_core.core.data.types import CaseError, CaseRef, RawCase, SourceError, read_limits

log = logging.getLogger(__name__)

SOURCE = "fairvision"
DISEASES = ("amd", "dr", "glaucoma", "synthetic")
CLASS_NAMES: dict[str, list[str]] = {
    "amd": ["normal", "early", "intermediate", "late"],
    "dr": ["non_vision_threatening", "vision_threatening"],
    "glaucoma": ["normal", "glaucoma"],
}
_FOLDER_DISEASE = {"amd": "amd", "dr": "dr", "glaucoma": "glaucoma", "synthetic": "synthetic"}

# Literature label maps (docs/datasets.md §1). AMD late = any advanced-atrophic or wet form.
_AMD_MAP = {
    "not.in.icd.table": 0,
    "no.amd.diagnosis": 0,
    "early.dry": 1,
    "intermediate.dry": 2,
}
_AMD_LATE_PREFIXES = ("advanced.atrophic", "wet.amd")
_DR_MAP = {
    "not.in.icd.table": 0,
    "no.dr.diagnosis": 0,
    "mild.npdr": 0,
    "moderate.npdr": 0,
    "severe.npdr": 1,
    "pdr": 1,
}
_GLAUCOMA_WORDS = {"0": 0, "1": 1, "no": 0, "yes": 1, "normal": 0, "glaucoma": 1}

FUNDUS_KEY = "slo_fundus"
OCT_KEY = "oct_bscans"
_LABEL_KEYS = {"amd_condition", "dr_subtype", "dr_class", "glaucoma", "grade", "class_names"}
_RACE_CODES = {"asian": 0, "black": 1, "african american": 1, "white": 2, "caucasian": 2}
# CSV columns that describe the file or its label rather than the patient.
_CSV_SKIP = {"filename", "use", "amd", "dr", "glaucoma", "grade"}


# --- layout -------------------------------------------------------------------------------------


def _split_dirs(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if not folder.is_dir():
        return out
    for child in sorted(folder.iterdir()):
        split = split_of(child.name)
        if child.is_dir() and split is not None:
            if split in out:
                raise SourceError(
                    f"{folder}: two folders for the {split} split: "
                    f"{out[split].name} and {child.name}"
                )
            out[split] = child
    return out


def _has_npz(split_dirs: dict[str, Path]) -> bool:
    return any(next(d.glob("*.npz"), None) is not None for d in split_dirs.values())


def _disease_folders(root: Path) -> dict[str, Path]:
    """Disease sub-folders of ``root`` that hold split folders with npz files."""
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for child in sorted(root.iterdir()):
        if not child.is_dir() or split_of(child.name) is not None:
            continue
        if _has_npz(_split_dirs(child)):
            out[child.name.lower()] = child
    return out


def is_fairvision(root: Path) -> bool:
    """Cheap layout test used by ``detect_source``."""
    root = Path(root)
    return _has_npz(_split_dirs(root)) or bool(_disease_folders(root))


def _disease_of(keys: set[str], dr_subtype: Any = None) -> str | None:
    """The disease an npz's label keys point to (``dr_subtype``'s value settles DR vs AMD)."""
    if "grade" in keys:
        return "synthetic"
    if "amd_condition" in keys:
        return "amd"
    if "glaucoma" in keys:
        return "glaucoma"
    if "dr_class" in keys:
        return "dr"
    if "dr_subtype" in keys:
        value = _text(dr_subtype)
        amd_only = value not in _DR_MAP and (
            value in _AMD_MAP or value.startswith(_AMD_LATE_PREFIXES)
        )
        return "amd" if amd_only else "dr"  # AMD strings under a DR key: seen in docs
    return None


def _disease_from_keys(npz_path: Path) -> str | None:
    """Guess the disease from the label keys of one npz (used when folder names do not say)."""
    limit = read_limits().max_file_bytes
    try:
        keys = set(npz_keys(npz_path))
        sub = (
            read_npz(npz_path, max_bytes=limit, keys={"dr_subtype"}) if "dr_subtype" in keys else {}
        )
    except UnsafeInputError as exc:
        raise SourceError(f"cannot read npz to detect the disease: {exc}") from exc
    return _disease_of(keys, sub.get("dr_subtype"))


def _resolve(root: Path, disease: str) -> tuple[Path, str]:
    """-> (disease folder holding the split folders, disease name)."""
    disease = disease.lower()
    if disease != "auto" and disease not in DISEASES:
        raise SourceError(
            f"unknown FairVision disease {disease!r}; expected one of {DISEASES} or auto"
        )
    if not root.is_dir():
        raise SourceError(f"{root}: no such directory")
    if _has_npz(_split_dirs(root)):  # root is itself a disease folder
        folder = root
    else:
        folders = _disease_folders(root)
        if not folders:
            raise SourceError(
                f"{root}: not a FairVision tree: expected <root>/<AMD|DR|Glaucoma|Synthetic>/"
                "<Training|Validation|Test>/data_XXXXX.npz (or split folders directly under <root>)"
            )
        if disease != "auto":
            if disease not in folders:
                raise SourceError(f"{root}: no {disease} folder; found {sorted(folders)}")
            return folders[disease], disease
        if len(folders) > 1:
            raise SourceError(
                f"{root}: several disease folders {sorted(folders)}; choose one with --disease"
            )
        folder = next(iter(folders.values()))
    named = _FOLDER_DISEASE.get(folder.name.lower())
    if disease == "auto":
        first = next(p for d in _split_dirs(folder).values() for p in sorted(d.glob("*.npz")))
        disease = named or _disease_from_keys(first) or ""
        if not disease:
            raise SourceError(
                f"{first}: cannot tell the disease from the folder or npz keys; pass --disease"
            )
    return folder, disease


def _find_summary(root: Path, folder: Path, disease: str) -> Path | None:
    wanted = f"data_summary_{disease}"
    for base in dict.fromkeys([root, folder, folder.parent]):
        for cand in (
            base,
            *(c for c in base.iterdir() if c.is_dir() and c.name.lower() == "readme"),
        ):
            for f in sorted(cand.glob("*.csv")):
                if f.stem.lower().startswith(wanted):
                    return f
    return None


@functools.lru_cache(maxsize=4)
def _summary_rows(path: str) -> dict[str, dict[str, str]]:
    """filename stem -> CSV row. Cached so each worker process parses the CSV once."""
    rows: dict[str, dict[str, str]] = {}
    with io.TextIOWrapper(open_regular(path), encoding="utf-8-sig", newline="") as fh:
        for row in csv.DictReader(fh):
            norm = {
                str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None
            }
            name = norm.get("filename", "")
            if name:
                rows[Path(name).stem] = norm
    return rows


def _synthetic_class_names(npz_paths: list[Path]) -> list[str]:
    """Class names from the first readable npz (a damaged one is reported by ``load``)."""
    errors = []
    for npz_path in npz_paths:
        try:
            arrays = read_npz(
                npz_path, max_bytes=read_limits().max_file_bytes, keys={"class_names"}
            )
        except UnsafeInputError as exc:
            errors.append(str(exc))
            continue
        if "class_names" in arrays:
            return [str(x) for x in np.asarray(arrays["class_names"]).ravel().tolist()]
        errors.append(f"{npz_path}: synthetic npz without a 'class_names' key")
    raise SourceError(f"no npz gives the class names; first problem: {errors[0]}")


def scan(root: Path, disease: str = "auto") -> ScanResult:
    """List every eye; the label stays in the npz (read by :func:`load`)."""
    root = Path(root)
    folder, disease = _resolve(root, disease)
    summary = _find_summary(root, folder, disease)
    refs: dict[str, CaseRef] = {}
    duplicates: list[CaseRef] = []  # same stem in two splits: prepare reports/quarantines both
    for split, split_dir in sorted(_split_dirs(folder).items()):
        for npz in sorted(split_dir.glob("*.npz")):
            case_id = npz.stem
            paths = {"npz": str(npz)}
            if summary is not None:
                paths["summary"] = str(summary)
            ref = CaseRef(case_id=case_id, paths=paths, label=None, split=split)
            if case_id in refs:
                duplicates.append(ref)
            else:
                refs[case_id] = ref
    if not refs:
        raise SourceError(f"{folder}: split folders hold no npz files")
    notes = _cross_check_summary(summary, refs) if summary is not None else []
    cases = sorted([*refs.values(), *duplicates], key=lambda r: r.case_id)
    if disease == "synthetic":
        class_names = _synthetic_class_names([Path(c.paths["npz"]) for c in cases])
    else:
        class_names = list(CLASS_NAMES[disease])
    log.info("FairVision %s: %d eyes under %s", disease, len(cases), folder)
    return ScanResult(
        class_names=class_names, cases=cases, source=SOURCE, disease=disease, notes=notes
    )


def _cross_check_summary(summary: Path, refs: dict[str, CaseRef]) -> list[str]:
    """Compare the CSV's ``use`` column with the split folders; disagreement is only reported."""
    try:
        rows = _summary_rows(str(summary))
    except (OSError, csv.Error, UnicodeDecodeError, UnsafeInputError) as exc:
        msg = f"{summary}: summary CSV unreadable, ignored: {exc}"
        log.warning(msg)
        return [msg]
    notes = []
    missing = [cid for cid in refs if cid not in rows]
    mismatched = [
        cid
        for cid, ref in refs.items()
        if cid in rows and rows[cid].get("use") and split_of(rows[cid]["use"]) != ref.split
    ]
    if missing:
        notes.append(f"{summary}: {len(missing)} eye(s) not listed, e.g. {missing[:3]}")
    if mismatched:
        notes.append(
            f"{summary}: 'use' disagrees with the split folder for {len(mismatched)} eye(s), "
            f"e.g. {mismatched[:3]}; the folder wins"
        )
    for note in notes:
        log.warning(note)
    return notes


# --- decoding -----------------------------------------------------------------------------------


def _text(arr: Any) -> str:
    value = arr.item() if isinstance(arr, np.ndarray) and arr.size == 1 else arr
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip().lower()


def _scalar(arr: np.ndarray) -> Any:
    value = arr.item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value


def _int_label(value: Any, n: int, what: str, case_id: str, path: str) -> int:
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        as_float = float("nan")
    if as_float.is_integer() and 0 <= as_float < n:
        return int(as_float)
    raise CaseError(case_id, f"unknown {what} label {value!r}", path)


def _label(z: Mapping[str, np.ndarray], disease: str, case_id: str, path: str) -> int:
    keys = set(z)
    if disease == "synthetic":
        if "grade" not in keys:
            raise CaseError(case_id, "no 'grade' key in a synthetic npz", path)
        n = len(np.asarray(z["class_names"]).ravel()) if "class_names" in keys else 10**6
        return _int_label(_scalar(z["grade"]), n, "grade", case_id, path)
    if disease == "amd":
        key = (
            "amd_condition"
            if "amd_condition" in keys
            else "dr_subtype"
            if "dr_subtype" in keys
            else None
        )
        if key is None:
            raise CaseError(case_id, "no 'amd_condition' key", path)
        value = _text(z[key])
        if value in _AMD_MAP:
            return _AMD_MAP[value]
        if value.startswith(_AMD_LATE_PREFIXES):
            return 3
        return _int_label(value, 4, f"AMD ({key})", case_id, path)
    if disease == "dr":
        from_class = None
        if "dr_class" in keys:
            from_class = _int_label(_scalar(z["dr_class"]), 2, "dr_class", case_id, path)
        if "dr_subtype" in keys:
            value = _text(z["dr_subtype"])
            if value not in _DR_MAP:
                raise CaseError(case_id, f"unknown DR label dr_subtype={value!r}", path)
            label = _DR_MAP[value]
            if from_class is not None and from_class != label:
                log.warning(
                    "case %s: dr_subtype %r maps to %d but dr_class is %d; using dr_subtype",
                    case_id,
                    value,
                    label,
                    from_class,
                )
            return label
        if from_class is None:
            raise CaseError(case_id, "no 'dr_subtype' or 'dr_class' key", path)
        return from_class
    if disease == "glaucoma":
        if "glaucoma" not in keys:
            raise CaseError(case_id, "no 'glaucoma' key", path)
        raw = _scalar(z["glaucoma"])
        word = _text(np.asarray(raw))
        if word in _GLAUCOMA_WORDS:
            return _GLAUCOMA_WORDS[word]
        return _int_label(raw, 2, "glaucoma", case_id, path)
    raise CaseError(case_id, f"unknown disease {disease!r}", path)


def _race_code(value: Any) -> int:
    """Race as the dataset's integer code (0 Asian, 1 Black, 2 White); -1 when unknown."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _RACE_CODES:
            return _RACE_CODES[text]
        try:
            return int(float(text))
        except ValueError:
            return -1
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def _attributes(z: Mapping[str, np.ndarray], skip: set[str]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for key in sorted(z):
        if key in skip:
            continue
        arr = z[key]
        if not isinstance(arr, np.ndarray) or arr.ndim != 0:
            continue
        value = _scalar(arr)
        if key == "race":
            value = _race_code(value)
        elif isinstance(value, np.generic):
            value = value.item()
        attrs[key] = value
    return attrs


def load(ref: CaseRef, disease: str | None = "auto") -> RawCase:
    """Decode one npz. ``disease`` is the one ``scan`` resolved (auto re-detects per file)."""
    path = ref.paths["npz"]
    limits = read_limits()
    try:
        z = read_npz(path, max_bytes=limits.max_file_bytes, max_elements=limits.max_volume_voxels)
    except UnsafeInputError as exc:
        raise CaseError(ref.case_id, exc.reason, path) from exc
    disease_name = (disease or "auto").lower()
    if disease_name == "auto":
        disease_name = _disease_of(set(z), z.get("dr_subtype")) or ""
        if not disease_name:
            raise CaseError(ref.case_id, "no known label key to tell the disease", path)
    label = _label(z, disease_name, ref.case_id, path)
    fundus = as_fundus(z[FUNDUS_KEY], ref.case_id, path) if FUNDUS_KEY in z else None
    oct_ = as_oct(z[OCT_KEY], ref.case_id, path) if OCT_KEY in z else None
    attrs = _attributes(z, _LABEL_KEYS | {FUNDUS_KEY, OCT_KEY})
    if fundus is None and oct_ is None:
        raise CaseError(ref.case_id, f"neither '{FUNDUS_KEY}' nor '{OCT_KEY}' in the npz", path)
    summary = ref.paths.get("summary")
    if summary:
        try:
            row = _summary_rows(summary).get(ref.case_id, {})
        except (OSError, csv.Error, UnicodeDecodeError, UnsafeInputError):
            row = {}
        for key, value in row.items():
            if key in _CSV_SKIP or key in attrs or value == "":
                continue
            if key == "race":
                attrs[key] = _race_code(value)
                continue
            try:
                attrs[key] = float(value) if key == "age" else value
            except ValueError:
                attrs[key] = value
    return RawCase(
        case_id=ref.case_id, label=label, split=ref.split, fundus=fundus, oct=oct_, attributes=attrs
    )
