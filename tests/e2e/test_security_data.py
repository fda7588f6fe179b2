"""Hostile source data (issue 10, items 1, 5, 6): each attack is a real file or a real process.

Every ``rima prepare`` run here goes through the command line (``rima_core.pipeline.cli.main``, or a
real subprocess for ``kill -9``) and is judged the way a user sees it: the exit code, one error line
naming the case and the reason, no traceback, and either a whole store or none at all.

The second round (at the end) adds what is not a damaged file: FIFOs, sockets, devices and
folders where a file is expected, a folder swapped for a symlink while the server reads, a
source module named by a parameter, the same eye in two splits, a model whose output is NaN,
and params, model files and requests that used to end in a traceback.

The kill test uses this module as a plug-in source (``scan``/``load`` below, addressed by its
module path): its ``load`` announces itself and then blocks, so the test can SIGKILL the parent
while workers are busy.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import types
import zipfile
import zlib
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rima_core.atomic import pid_alive
from rima_core.config import PrepareConfig
from rima_core.core.data import safe_read
from rima_core.core.data.prepare import QUARANTINE_FILE, prepare_store
from rima_core.core.data.sources._common import ScanResult
from rima_core.core.data.store import open_store
from rima_core.core.data.types import CaseError, CaseRef, RawCase, ReadLimits
from rima_core.pipeline.cli import main
from tests.fixtures_sources import write_fairvision, write_rima

REPO = Path(__file__).resolve().parents[2]
HANGING = __name__  # this module is the plug-in source of the kill test
SMALL = ["--set", "prepare.fundus_size=8", "--set", "prepare.oct_shape=[4, 4, 4]"]


# --- helpers --------------------------------------------------------------------------------------


def _prepare(
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    root: Path,
    out: Path,
    *extra: str,
    source: str = "auto",
) -> tuple[int, list[str], str]:
    """Run ``rima prepare`` in-process -> (exit code, ERROR lines, all text printed/logged)."""
    caplog.clear()
    argv = ["prepare", "--input", str(root), "--out", str(out), "--source", source]
    argv += ["--params", str(_params(root.parent)), "--set", "prepare.workers=1"]
    with caplog.at_level(logging.INFO):
        rc = main([*argv, *SMALL, *extra])
    printed = capsys.readouterr()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    text = printed.out + printed.err + caplog.text
    return rc, errors, text


def _params(folder: Path) -> Path:
    """A params file holding only the test's prepare settings (the rest: embedded defaults)."""
    path = folder / "test-params.yaml"
    path.write_text("prepare:\n  fundus_size: 8\n  oct_shape: [4, 4, 4]\n")
    return path


def _assert_refused(rc: int, errors: list[str], text: str, out: Path, *needles: str) -> None:
    """Exit 2, exactly one one-line error holding every needle, no traceback, no store."""
    assert rc == 2, text
    assert len(errors) == 1 and "\n" not in errors[0], errors
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    assert "Traceback" not in text
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a temporary store was left behind"


def _quarantine(out: Path) -> dict[str, str]:
    report = json.loads((out / QUARANTINE_FILE).read_text())
    return {c["case_id"]: c["reason"] for c in report["cases"]}


def _fairvision(root: Path, **kw) -> dict:
    return write_fairvision(root, "amd", n_per_split=1, summary_csv=False, **kw)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG signature + IHDR claiming ``width``×``height``, with a few bytes of IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 2)
    data = chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + data)


def _npz_with_raw_member(path: Path, name: str, header: dict, payload: bytes) -> None:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.npy", buf.getvalue() + payload)


class _Marker:
    """Unpickling this runs ``os.system("touch <marker>")`` — what a hostile npz does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalMarker(_Marker):
    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


# --- item 1: code execution from a dataset --------------------------------------------------


@pytest.mark.parametrize("payload", [_Marker, _EvalMarker])
def test_pickled_npz_runs_no_code_and_names_the_case(tmp_path, caplog, capsys, payload) -> None:
    root = tmp_path / "raw"
    expected = _fairvision(root)
    marker = tmp_path / "PWNED"
    victim = expected["data_00002"].path
    with np.load(victim, allow_pickle=True) as z:  # our own fixture file, then poisoned
        arrays = dict(z)
    arrays["race"] = np.array([payload(marker)], dtype=object)
    np.savez(victim, **arrays)

    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    _assert_refused(rc, errors, text, out, "data_00002", "refused")
    assert not marker.exists(), "the pickle ran code"

    rc, errors, text = _prepare(caplog, capsys, root, out, "--skip-bad")
    assert rc == 0 and "Traceback" not in text
    assert "refused" in _quarantine(out)["data_00002"]
    assert len(open_store(out).manifest) == 2
    assert not marker.exists()


def test_restricted_unpickler_keeps_strings_and_refuses_other_globals(tmp_path) -> None:
    path = tmp_path / "strings.npz"
    np.savez(
        path,
        label=np.array("early.dry", dtype=object),
        words=np.array([["a", "bb"], ["c", "d"]], dtype=object),
        ints=np.array([1, 2], dtype=object),
        mixed=np.array([1, 2.5], dtype=object),
        fortran=np.asfortranarray(np.arange(6.0).reshape(2, 3)),
    )
    got = safe_read.read_npz(path)
    assert got["label"].dtype.kind == "U" and got["label"].item() == "early.dry"
    assert got["words"].tolist() == [["a", "bb"], ["c", "d"]]
    assert got["ints"].dtype == np.int64 and got["mixed"].dtype == np.float64
    np.testing.assert_array_equal(got["fortran"], np.arange(6.0).reshape(2, 3))
    # any global outside numpy's array reconstruction and str/int/float is refused, unexecuted
    for module, name in [
        ("posix", "system"),
        ("builtins", "eval"),
        ("subprocess", "Popen"),
        ("numpy", "load"),
        ("builtins", "getattr"),
    ]:
        blob = f"c{module}\n{name}\n(S'x'\ntR.".encode()  # protocol 0: GLOBAL, MARK, STRING, TUPLE
        with pytest.raises(pickle.UnpicklingError, match=f"{module}.{name}: refused"):
            safe_read.RestrictedUnpickler(io.BytesIO(blob)).load()
    # an object array holding something other than str/int/float (here: a dict) is refused
    np.savez(path, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(safe_read.UnsafeInputError, match="only str, int or float"):
        safe_read.read_npz(path)


# --- item 5: hostile sizes, degenerate images, odd names ------------------------------------------


def test_png_decompression_bomb_is_refused_and_skip_bad_survives(tmp_path, caplog, capsys) -> None:
    root = tmp_path / "raw"
    expected = write_rima(root, n=4)
    _png_header_only(expected["101"].path / "data_101_fundus.png", 60_000, 60_000)
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    _assert_refused(rc, errors, text, out, "case 101", "pixels")

    rc, errors, text = _prepare(caplog, capsys, root, out, "--skip-bad")
    assert rc == 0 and "Traceback" not in text
    assert list(_quarantine(out)) == ["101"]
    assert len(open_store(out).manifest) == 3


def test_image_pixel_cap_is_ours_not_only_pils(tmp_path, caplog, capsys) -> None:
    # 16×16 fundus images pass PIL's own bomb guard; prepare.max_image_pixels=200 must refuse them
    root = tmp_path / "raw"
    write_rima(root, n=3)
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out, "--set", "prepare.max_image_pixels=200")
    _assert_refused(rc, errors, text, out, "case 100", "prepare.max_image_pixels")


@pytest.mark.slow  # spawns worker processes that import torch
def test_limits_reach_the_worker_processes(tmp_path) -> None:
    root = tmp_path / "raw"
    write_rima(root, n=3)
    cfg = PrepareConfig(fundus_size=8, oct_shape=[4, 4, 4], workers=2, max_image_pixels=200)
    with pytest.raises(CaseError, match=r"prepare\.max_image_pixels") as err:
        prepare_store("rima", root, tmp_path / "store", cfg)
    assert err.value.case_id == "100"


def test_npz_header_claiming_a_huge_array_is_refused_before_allocation(
    tmp_path, caplog, capsys
) -> None:
    root = tmp_path / "raw"
    expected = _fairvision(root)
    victim = expected["data_00003"].path
    header = {"descr": "<f8", "fortran_order": False, "shape": (1 << 20, 1 << 20, 1 << 10)}
    _npz_with_raw_member(victim, "oct_bscans", header, b"\0" * 64)
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    _assert_refused(rc, errors, text, out, "data_00003", "over the limit")
    assert "MemoryError" not in text


def test_zip_bombed_npz_is_refused_with_default_limits(tmp_path, caplog, capsys) -> None:
    root = tmp_path / "raw"
    expected = _fairvision(root)
    victim = expected["data_00001"].path
    with np.load(victim, allow_pickle=True) as z:
        arrays = dict(z)
    arrays["oct_bscans"] = np.zeros((384, 384, 384), np.uint8)  # 56.6 MB
    np.savez_compressed(victim, **arrays)
    assert victim.stat().st_size < 100_000
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    _assert_refused(rc, errors, text, out, "data_00001", "zip bomb")
    # and a byte cap below the volume refuses it from the header alone
    rc, errors, text = _prepare(
        caplog, capsys, root, out, "--set", "prepare.max_file_bytes=1000000"
    )
    _assert_refused(rc, errors, text, out, "data_00001", "prepare.max_file_bytes")


def test_safe_read_caps_decompressed_bytes_without_trusting_the_header(tmp_path) -> None:
    # header says 100 bytes but the member inflates to 10 MB of trailing data: refused at the cap
    path = tmp_path / "trailing.npz"
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (100,)}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\1" * 10_000_000)
    with pytest.raises(safe_read.UnsafeInputError, match="trailing data"):
        safe_read.read_npz(path, max_bytes=1_000_000)
    # a payload shorter than its header is a truncated file
    _npz_with_raw_member(path, "x", {"descr": "<f4", "fortran_order": False, "shape": (50,)}, b"")
    with pytest.raises(safe_read.UnsafeInputError, match="truncated"):
        safe_read.read_npz(path)


def test_nifti_header_claiming_a_huge_volume_is_refused(tmp_path, caplog, capsys) -> None:
    import nibabel as nib

    root = tmp_path / "raw"
    expected = write_rima(root, n=3)
    nii = expected["102"].path / "processed_data_102.nii"
    img = nib.load(str(nii))
    header = img.header.copy()
    header.set_data_shape((4096, 4096, 4096))
    raw = bytearray(nii.read_bytes())
    raw[: header.sizeof_hdr] = header.binaryblock  # header only; the data stays 4×8×8
    nii.write_bytes(bytes(raw))
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    _assert_refused(rc, errors, text, out, "case 102", "prepare.max_volume_voxels")


@pytest.mark.parametrize(
    ("key", "array", "needle"),
    [
        ("oct_bscans", np.full((1, 1, 1), 7, np.uint8), "prepare.min_oct_size"),
        ("oct_bscans", np.ones((4, 8, 8), np.complex64), "complex"),
        ("slo_fundus", np.ones((16, 16), np.complex128), "complex"),
        ("slo_fundus", np.full((3, 40), 9, np.uint8), "prepare.min_fundus_size"),
    ],
)
def test_degenerate_images_are_refused(tmp_path, caplog, capsys, key, array, needle) -> None:
    root = tmp_path / "raw"
    expected = _fairvision(root)
    victim = expected["data_00002"].path
    with np.load(victim, allow_pickle=True) as z:
        arrays = dict(z)
    arrays[key] = array
    np.savez(victim, **arrays)
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    _assert_refused(rc, errors, text, out, "data_00002", needle)
    rc, _, text = _prepare(caplog, capsys, root, out, "--skip-bad")
    assert rc == 0 and "Traceback" not in text and list(_quarantine(out)) == ["data_00002"]


def test_non_utf8_file_name_is_reported_not_a_traceback(tmp_path, caplog, capsys) -> None:
    root = tmp_path / "raw"
    expected = _fairvision(root)
    victim = expected["data_00002"].path
    bad_name = os.fsencode(victim.parent) + b"/data_\xff\xfe0002.npz"
    os.rename(os.fsencode(victim), bad_name)
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    _assert_refused(rc, errors, text, out, "data_\\udcff\\udcfe0002", "not valid UTF-8")

    rc, _, text = _prepare(caplog, capsys, root, out, "--skip-bad")
    assert rc == 0 and "Traceback" not in text
    assert "not valid UTF-8" in _quarantine(out)["data_\\udcff\\udcfe0002"]
    assert sorted(open_store(out).manifest["case_id"]) == ["data_00001", "data_00003"]


def test_lone_surrogates_inside_an_npz_string_do_not_break_the_manifest(
    tmp_path, caplog, capsys
) -> None:
    root = tmp_path / "raw"
    expected = _fairvision(root)
    victim = expected["data_00003"].path
    with np.load(victim, allow_pickle=True) as z:
        arrays = dict(z)
    arrays["site"] = np.array("clinic-\udcff")  # numpy 'U' arrays may hold lone surrogates
    np.savez(victim, **arrays)
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    assert rc == 0 and not errors and "Traceback" not in text
    manifest = open_store(out).manifest.set_index("case_id")
    assert manifest.loc["data_00003", "source_site"] == "clinic-\\udcff"


def test_duplicate_ids_under_skip_bad_are_quarantined(tmp_path, caplog, capsys) -> None:
    root = tmp_path / "raw"
    expected = _fairvision(root)
    shutil.copy(expected["data_00001"].path, root / "AMD" / "Test" / "data_00001.npz")
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    _assert_refused(rc, errors, text, out, "data_00001", "duplicate")
    rc, _, text = _prepare(caplog, capsys, root, out, "--skip-bad")
    assert rc == 0 and "Traceback" not in text
    report = json.loads((out / QUARANTINE_FILE).read_text())
    assert [c["case_id"] for c in report["cases"]] == ["data_00001", "data_00001"]
    assert sorted(open_store(out).manifest["case_id"]) == ["data_00002", "data_00003"]


def test_unicode_digit_folder_names_do_not_crash_prepare(tmp_path, caplog, capsys) -> None:
    root = tmp_path / "raw"
    write_rima(root, n=3)
    for name in ("²", "٣", "1²"):
        (root / "Image" / name).mkdir()
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    assert rc == 0 and not errors and "Traceback" not in text
    assert sorted(open_store(out).manifest["case_id"]) == ["100", "101", "102"]


def test_limit_settings_have_one_default_in_config_params_and_loaders() -> None:
    limit_names = [f.name for f in fields(ReadLimits)]
    cfg_fields = {f.name: f.default for f in fields(PrepareConfig)}
    params = yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]
    for name in limit_names:
        assert cfg_fields[name] == getattr(ReadLimits(), name), name
        assert params[name] == getattr(ReadLimits(), name), name


def test_bad_limit_setting_is_a_config_error(tmp_path, caplog, capsys) -> None:
    root = tmp_path / "raw"
    _fairvision(root)
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out, "--set", "prepare.max_file_bytes=0")
    assert rc == 2 and "prepare.max_file_bytes" in errors[0] and "Traceback" not in text


# --- the bounded fuzz ----------------------------------------------------------------------


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flip 1-8 random bytes, truncate, or zero a run — seeded."""
    kind = int(rng.integers(0, 3))
    buf = bytearray(data)
    if kind == 0:
        for pos in rng.integers(0, len(buf), int(rng.integers(1, 9))):
            buf[pos] ^= int(rng.integers(1, 256))
    elif kind == 1:
        buf = buf[: int(rng.integers(0, len(buf)))]
    else:
        start = int(rng.integers(0, len(buf)))
        stop = min(len(buf), start + int(rng.integers(1, 64)))
        buf[start:stop] = bytes(stop - start)
    return bytes(buf)


FUZZ_CASES = 72


@pytest.mark.slow
def test_fuzzed_inputs_give_exit_2_or_quarantine_never_a_traceback(
    tmp_path, caplog, capsys
) -> None:
    """Random byte flips / truncations of npz, png and nii files (seeded, 72 cases)."""
    rng = np.random.default_rng(20261130)
    pristine = {"npz": tmp_path / "fv", "png": tmp_path / "rima", "nii": tmp_path / "rima"}
    fv = _fairvision(pristine["npz"])
    rima = write_rima(pristine["png"], n=3)
    targets = {
        "npz": [(cid, e.path.relative_to(pristine["npz"])) for cid, e in fv.items()],
        "png": [
            (cid, (e.path / f"data_{cid}_fundus.png").relative_to(pristine["png"]))
            for cid, e in rima.items()
        ],
        "nii": [
            (cid, (e.path / f"processed_data_{cid}.nii").relative_to(pristine["nii"]))
            for cid, e in rima.items()
        ],
    }
    outcomes = {"refused": 0, "harmless": 0}
    for i in range(FUZZ_CASES):
        kind = ("npz", "png", "nii")[i % 3]
        case_id, rel = targets[kind][int(rng.integers(0, len(targets[kind])))]
        root = tmp_path / f"case{i}" / "raw"
        shutil.copytree(pristine[kind], root)
        victim = root / rel
        victim.write_bytes(_mutate(victim.read_bytes(), rng))
        out = root.parent / "store"
        n_total = len(targets[kind])
        rc, errors, text = _prepare(caplog, capsys, root, out)
        assert "Traceback" not in text, (i, kind, text)
        if rc == 0:  # the damage left a valid file (e.g. a flipped NIfTI voxel)
            outcomes["harmless"] += 1
            assert len(open_store(out).manifest) == n_total, (i, kind)
            continue
        outcomes["refused"] += 1
        _assert_refused(rc, errors, text, out, case_id)
        rc, errors, text = _prepare(caplog, capsys, root, out, "--skip-bad")
        assert rc == 0 and "Traceback" not in text, (i, kind, text)
        assert list(_quarantine(out)) == [case_id], (i, kind)
        assert len(open_store(out).manifest) == n_total - 1
        shutil.rmtree(root.parent)
    # the fuzz must actually exercise the refusal path, not only harmless flips
    assert outcomes["refused"] >= FUZZ_CASES // 2, outcomes


# --- item 6: kill -9 leaves no workers and no stale temporary store ------------------------------


def scan(root: Path, disease: str = "auto") -> ScanResult:
    """Plug-in source for the kill test: six cases, labels 0/1."""
    cases = [CaseRef(f"h{i}", {"root": str(root)}, i % 2, None) for i in range(6)]
    return ScanResult(["a", "b"], cases, source="hanging", disease=None)


def load(ref: CaseRef, disease: str | None) -> RawCase:
    """Announce this worker, then block (bounded) until the test kills the parent."""
    (Path(ref.paths["root"]) / f"started-{os.getpid()}").touch()
    time.sleep(120)
    raise CaseError(ref.case_id, "hanging source woke up: the test did not kill its parent")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(b")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


@pytest.mark.slow  # spawns worker processes that import torch
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_kill_9_of_prepare_takes_its_workers_and_next_run_cleans_up(tmp_path, caplog, capsys):
    root = tmp_path / "raw"
    root.mkdir()
    out = tmp_path / "store"
    # The CLI's --source takes registered names only, so the parent runs prepare_store itself.
    script = (
        "import logging, sys; from pathlib import Path\n"
        "from rima_core.config import PrepareConfig\n"
        "from rima_core.core.data.prepare import prepare_store\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "cfg = PrepareConfig(fundus_size=8, oct_shape=[4, 4, 4], workers=2)\n"
        f"prepare_store({HANGING!r}, Path(sys.argv[1]), Path(sys.argv[2]), cfg)\n"
    )
    cmd = [sys.executable, "-c", script, str(root), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log_path = tmp_path / "parent.log"
    kids: list[int] = []
    with open(log_path, "wb") as log_file:
        parent = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and len(list(root.glob("started-*"))) < 2:
            assert parent.poll() is None, log_path.read_text()
            time.sleep(0.2)
        workers = [int(p.name.split("-")[1]) for p in root.glob("started-*")]
        assert len(workers) == 2, "workers never started"
        kids = _children(parent.pid)  # the two workers and multiprocessing's resource tracker
        assert set(workers) <= set(kids)
        stale = list(tmp_path.glob(".store.tmp-*"))
        assert len(stale) == 1 and f"p{parent.pid}@" in stale[0].name
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(pid_alive(k) for k in kids):
            time.sleep(0.1)
        assert not [k for k in kids if pid_alive(k)], "processes outlived their parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for pid in kids:  # only if the assertion above failed: never leave them behind
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    assert stale[0].exists()  # SIGKILL gave the parent no chance to clean up
    # a later run for the same output removes the dead owner's temporary store
    fresh = tmp_path / "fv"
    _fairvision(fresh)
    rc, _, text = _prepare(caplog, capsys, fresh, out)
    assert rc == 0, text
    assert not stale[0].exists()
    assert not list(tmp_path.glob(".store.tmp-*"))
    assert len(open_store(out).manifest) == 3


# --- second round: special files, plug-ins, leakage, non-finite models, one-line errors -------


@contextlib.contextmanager
def _deadline(seconds: int):  # type: ignore[no-untyped-def]
    """Fail (instead of hanging the suite) when the block blocks, e.g. on a FIFO."""

    def expired(signum, frame):  # type: ignore[no-untyped-def]
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _special(kind: str, path: Path, outside: Path) -> None:
    """Replace ``path`` with a non-regular file of ``kind`` (the name stays the same)."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "char_device":
        path.symlink_to("/dev/zero")
    elif kind == "fifo_via_symlink":
        outside.mkdir(exist_ok=True)
        os.mkfifo(outside / "pipe")
        path.symlink_to(outside / "pipe")
    elif kind == "folder":
        path.mkdir()
    else:
        raise AssertionError(kind)


SPECIAL_KINDS = ["fifo", "socket", "char_device", "fifo_via_symlink", "folder"]


@pytest.mark.parametrize("kind", SPECIAL_KINDS)
@pytest.mark.parametrize("fmt", ["npz", "png", "nii"])
def test_special_files_in_the_tree_are_refused_not_waited_for(
    tmp_path, caplog, capsys, kind, fmt
) -> None:
    """The hostile-data fuzz over file kinds: a FIFO (or socket, device, folder) named like a
    case's file is refused at once — exit 2 naming the case, or quarantined — never a hang."""
    root = tmp_path / "raw"
    if fmt == "npz":
        victim, case = _fairvision(root)["data_00002"].path, "data_00002"
    else:
        folder = write_rima(root, n=3)["101"].path
        name = "data_101_fundus.png" if fmt == "png" else "processed_data_101.nii"
        victim, case = folder / name, "case 101"
    _special(kind, victim, tmp_path / "outside")
    out = tmp_path / "store"
    with _deadline(60):
        rc, errors, text = _prepare(caplog, capsys, root, out)
        _assert_refused(rc, errors, text, out, case)
        rc, _, text = _prepare(caplog, capsys, root, out, "--skip-bad")
    assert rc == 0 and "Traceback" not in text
    assert len(_quarantine(out)) == 1


def test_safe_read_refuses_every_non_regular_file_by_descriptor(tmp_path) -> None:
    os.mkfifo(tmp_path / "pipe.npy")
    (tmp_path / "dir.npz").mkdir()
    cases = [
        (safe_read.read_npy, tmp_path / "pipe.npy", "FIFO"),
        (safe_read.read_npz, tmp_path / "dir.npz", "folder"),
        (safe_read.read_image, Path("/dev/zero"), "character device"),
        (safe_read.read_nifti, tmp_path / "pipe.npy", "FIFO"),
    ]
    with _deadline(30):
        for reader, path, kind in cases:
            with pytest.raises(safe_read.UnsafeInputError, match=f"{kind}.*not a regular file"):
                reader(path)


def test_fifo_label_sheet_is_a_one_line_error(tmp_path, caplog, capsys) -> None:
    root = tmp_path / "raw"
    write_rima(root, n=3)
    _special("fifo", root / "train.xlsx", tmp_path)
    out = tmp_path / "store"
    with _deadline(60):
        rc, errors, text = _prepare(caplog, capsys, root, out, source="rima")
    _assert_refused(rc, errors, text, out, "train.xlsx", "FIFO")


def test_root_check_is_on_the_descriptor_so_a_swap_race_never_escapes(tmp_path) -> None:
    """A thread swaps a folder under the server's root for a symlink to a folder outside, and
    back, while the server reads a file in it 2,000 times: every read is the inside file or
    the neutral refusal, never the outside file (a name check escaped 5 times in 2,000)."""
    from rima_core.ops import serving

    root, outside = tmp_path / "root", tmp_path / "secret"
    (root / "d").mkdir(parents=True)
    outside.mkdir()
    inside_vol = np.full((4, 8, 8), 10, np.uint8)
    np.save(root / "d" / "x.npy", inside_vol)
    np.save(outside / "x.npy", np.full((4, 8, 8), 250, np.uint8))
    policy = serving.InputPolicy(serving.SERVE_LIMITS, file_root=root.resolve())
    stop = threading.Event()

    def swap() -> None:
        real, link = root / "d_real", root / "d"
        while not stop.is_set():
            os.rename(link, real)
            link.symlink_to(outside)
            link.unlink()
            os.rename(real, link)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    outcomes = {"inside": 0, "refused": 0, "escaped": 0}
    try:
        for _ in range(2000):
            try:
                vol = serving.decode("d/x.npy", "oct", "row 0", policy)
            except serving.InputError as exc:
                assert str(exc) == serving._NEUTRAL.format(row="row 0", modality="oct")
                outcomes["refused"] += 1
                continue
            outcomes["escaped" if int(vol.max()) == 250 else "inside"] += 1
    finally:
        stop.set()
        swapper.join(10)
    assert outcomes["escaped"] == 0, outcomes
    assert outcomes["inside"] > 0, outcomes


def test_server_answers_fifo_paths_at_once_and_keeps_serving(tmp_path) -> None:
    """Six requests naming a FIFO under the root no longer block the server's threads."""
    from concurrent.futures import ThreadPoolExecutor

    from rima_core.ops import serving

    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.npy")
    os.mkfifo(root / "pipe.png")
    policy = serving.InputPolicy(serving.SERVE_LIMITS, file_root=root.resolve())

    def ask(i: int) -> str:
        modality, name = ("oct", "pipe.npy") if i % 2 else ("fundus", "pipe.png")
        try:
            serving.decode(name, modality, f"row {i}", policy)
        except serving.InputError as exc:
            return str(exc)
        return "graded"

    with _deadline(30), ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    assert all("cannot be read" in a for a in answers), answers


# --- plug-in sources are registered, never imported on a parameter's say-so --------------------


@pytest.mark.parametrize("how", ["--source", "--set", "params"])
def test_unregistered_source_module_is_never_imported(tmp_path, caplog, capsys, how) -> None:
    """``data.source: venv.__main__`` used to run venv's command line and exit 0, no store."""
    root = tmp_path / "raw"
    _fairvision(root)
    out = tmp_path / "store"
    sys.modules.pop("venv.__main__", None)
    if how == "--source":
        rc, errors, text = _prepare(caplog, capsys, root, out, source="venv.__main__")
    elif how == "--set":
        rc, errors, text = _prepare(caplog, capsys, root, out, "--set", "data.source=venv.__main__")
    else:
        params = tmp_path / "hostile.yaml"
        params.write_text("data:\n  source: venv.__main__\n")
        caplog.clear()
        argv = ["prepare", "--input", str(root), "--out", str(out), "--params", str(params)]
        with caplog.at_level(logging.INFO):
            rc = main(argv)
        printed = capsys.readouterr()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        text = printed.out + printed.err + caplog.text
    _assert_refused(rc, errors, text, out, "venv.__main__", "not registered")
    assert "venv.__main__" not in sys.modules
    assert not (tmp_path / "venv").exists()


def test_registered_plug_ins_run_and_need_scan_and_load(
    tmp_path, caplog, capsys, monkeypatch
) -> None:
    import importlib.metadata

    root = tmp_path / "raw"
    _fairvision(root)
    out = tmp_path / "store"
    # an allow-listed module without scan()/load() is refused before any file is read
    rc, errors, text = _prepare(
        caplog, capsys, root, out, "--set", "data.plugins=[json.decoder]", source="json.decoder"
    )
    _assert_refused(rc, errors, text, out, "json.decoder", "must define scan() and load()")
    # an allow-listed module with them runs
    fv = "rima_core.core.data.sources.fairvision"
    rc, errors, text = _prepare(
        caplog, capsys, root, out, "--set", f"data.plugins=[{fv}]", source=fv
    )
    assert rc == 0 and not errors, text
    shutil.rmtree(out)
    # a `rima.sources` entry point registers a name for it
    point = importlib.metadata.EntryPoint("lab_fv", fv, "rima.sources")
    real = importlib.metadata.entry_points

    def entry_points(**kw):  # type: ignore[no-untyped-def]
        return [point] if kw.get("group") == "rima.sources" else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    rc, errors, text = _prepare(caplog, capsys, root, out, source="lab_fv")
    assert rc == 0 and not errors, text
    assert len(open_store(out).manifest) == 3


# --- leakage: the same eye in two splits ----------------------------------------------------


@pytest.mark.slow  # prepare + the GX suite twice
def test_identical_eye_copied_into_the_test_split_fails_validation(tmp_path, caplog, capsys):
    root = tmp_path / "raw"
    none = _params(tmp_path)
    synth_params = ["--set", "synth.n_eyes=60", "--set", "synth.fundus_size=16"]
    synth_params += ["--set", "synth.oct_shape=[8, 8, 8]"]
    assert main(["data", "synth", "--out", str(root), "--params", str(none), *synth_params]) == 0
    out, report = tmp_path / "store", tmp_path / "report.json"
    validate = ["validate", "--store", str(out), "--report", str(report), "--params", str(none)]
    rc, _, text = _prepare(caplog, capsys, root, out)
    assert rc == 0, text
    assert main(validate) == 0, capsys.readouterr()
    train = sorted((root).glob("*/Training/*.npz"))[0]
    test_dir = next(root.glob("*/Test"))
    shutil.copy(train, test_dir / "data_09999.npz")  # the same eye under a new id
    shutil.rmtree(out)
    rc, _, text = _prepare(caplog, capsys, root, out)
    assert rc == 0, text  # prepare cannot know; validation must
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(validate) == 2
    line = next(x for x in caplog.text.splitlines() if "no_identical_image_across_splits" in x)
    assert train.stem in line and "data_09999" in line, line
    assert "Traceback" not in caplog.text


# --- non-finite model outputs are errors, never grades ------------------------------------------


class _NaNOnRows(torch.nn.Module):
    """A model whose logits are NaN for the eyes at ``rows`` (positions in the batch)."""

    def __init__(self, rows: set[int], k: int = 3) -> None:
        super().__init__()
        self.rows, self.k = rows, k
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, fundus, oct, has_fundus, has_oct, labels=None):  # type: ignore[no-untyped-def]
        from rima_core.core.models import ModelOutput

        logits = torch.zeros(len(fundus), self.k) + self.w
        for r in self.rows:
            if r < len(fundus):
                logits[r] = float("nan")
        return ModelOutput(logits=logits, aux_loss=None, stats={})


def _nan_predictor(tmp_path: Path, rows: set[int]):  # type: ignore[no-untyped-def]
    from rima_core.ops import serving
    from tests.e2e.test_serving import tiny_model

    spec = serving.Predictor.from_file(tiny_model(tmp_path / "model.pt")).spec
    return serving.Predictor(_NaNOnRows(rows), spec)


def test_non_finite_outputs_are_an_error_naming_the_rows(tmp_path) -> None:
    from rima_core.ops import serving
    from rima_core.runs.engine import NonFiniteOutputError
    from rima_core.runs.engine import predict as engine_predict

    batch = {
        "fundus": torch.zeros(3, 3, 8, 8),
        "oct": torch.zeros(3, 1, 4, 4, 4),
        "has_fundus": torch.ones(3, dtype=torch.bool),
        "has_oct": torch.ones(3, dtype=torch.bool),
        "label": torch.zeros(3, dtype=torch.int64),
        "index": torch.tensor([10, 11, 12]),
    }
    with pytest.raises(NonFiniteOutputError, match=r"row\(s\) 11") as err:
        engine_predict(_NaNOnRows({1}), [batch], torch.device("cpu"), progress=False)
    assert err.value.rows == [11]
    predictor = _nan_predictor(tmp_path, {1})
    vol = np.random.default_rng(0).integers(0, 255, (4, 8, 8), dtype=np.uint8)
    eyes = pd.DataFrame({"case_id": ["ok", "broken"], "oct": [vol, vol]})
    with pytest.raises(serving.ModelOutputError, match=r"case_id broken\): the model's output"):
        predictor.predict(eyes)


def test_rima_predict_with_a_non_finite_model_exits_2_naming_the_row(
    tmp_path, caplog, capsys, monkeypatch
) -> None:
    from rima_core.ops import serving

    predictor = _nan_predictor(tmp_path, {0})
    model = types.SimpleNamespace(
        unwrap_python_model=lambda: types.SimpleNamespace(predictor=predictor)
    )
    monkeypatch.setattr(serving, "load", lambda uri: model)
    np.save(tmp_path / "eye.npy", np.full((4, 8, 8), 90, np.uint8))
    (tmp_path / "eyes.csv").write_text("case_id,oct\nnan-eye,eye.npy\n")
    out = tmp_path / "pred.csv"
    argv = ["predict", "--model", "models:/x@champion", "--input", str(tmp_path / "eyes.csv")]
    argv += ["--out", str(out), "--params", str(_params(tmp_path))]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main(argv)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert rc == 2 and len(errors) == 1 and "\n" not in errors[0], errors
    assert "nan-eye" in errors[0] and "not finite" in errors[0]
    assert not out.exists() and "Traceback" not in capsys.readouterr().err


# --- one line, never a traceback ------------------------------------------------------------


def _cli(caplog, capsys, argv: list[str]) -> tuple[int, list[str], str]:  # type: ignore[no-untyped-def]
    caplog.clear()
    with caplog.at_level(logging.INFO):
        rc = main(argv)
    printed = capsys.readouterr()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return rc, errors, printed.out + printed.err + caplog.text


@pytest.mark.parametrize(
    ("setup", "needle"),
    [
        ("python_tag", "could not determine a constructor"),
        ("non_utf8", "not UTF-8"),
        ("folder", "is a folder"),
        ("duplicate_key", "duplicate key 'lr' on line 4 (first on line 2)"),
    ],
)
def test_bad_params_are_one_line(tmp_path, caplog, capsys, setup, needle) -> None:
    marker = tmp_path / "PWNED"
    params = tmp_path / "params.yaml"
    extra: list[str] = []
    if setup == "python_tag":
        params.write_text("{}\n")
        extra = ["--set", f"train.lr=!!python/object/apply:os.system ['touch {marker}']"]
    elif setup == "non_utf8":
        params.write_bytes(b"train:\n  lr: 0.1 # caf\xe9\n")
    elif setup == "folder":
        params = tmp_path
    else:
        params.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\n")
    rc, errors, text = _cli(caplog, capsys, ["params", "show", "--params", str(params), *extra])
    assert rc == 2 and len(errors) == 1 and "\n" not in errors[0], errors
    assert needle in errors[0]
    assert "Traceback" not in text and not marker.exists()


def test_disk_full_is_one_line(tmp_path, caplog, capsys, monkeypatch) -> None:
    import errno

    import rima_core.core.data.prepare as prepare_module

    def full(directory, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(prepare_module, "write_manifest", full)
    root = tmp_path / "raw"
    _fairvision(root)
    out = tmp_path / "store"
    rc, errors, text = _prepare(caplog, capsys, root, out)
    assert rc == 1 and len(errors) == 1 and "\n" not in errors[0], errors
    assert "No space left on device" in errors[0] and "free some space" in errors[0]
    assert "Traceback" not in text and not out.exists()


def test_model_spec_asking_for_a_huge_layer_is_refused_before_allocating(tmp_path) -> None:
    import tracemalloc

    from rima_core.core.models import load_model
    from tests.e2e.test_serving import tiny_model

    path = tiny_model(tmp_path / "model.pt")
    blob = torch.load(path, weights_only=True)
    blob["spec"]["config"]["hidden_dim"] = 100_000  # a 40 GB layer
    torch.save(blob, path)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="refused before allocating"):
            load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20
    from rima_core.config import load_config
    from rima_core.ops import serving

    with pytest.raises(serving.InputError, match="refused before allocating"):  # rima register
        serving.log_pyfunc(path.parent, load_config(None))
    blob["spec"]["config"]["hidden_dim"] = 16
    blob["spec"]["oct_shape"] = [100_000, 100_000, 100_000]  # the server would allocate this
    torch.save(blob, path)
    with pytest.raises(ValueError, match="oct_shape"):
        load_model(path)
