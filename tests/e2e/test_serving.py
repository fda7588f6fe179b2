"""The pyfunc model: preprocessing, missing modalities, file inputs, logging/loading, serving.

Fast tests use a tiny untrained model (the numbers need not be good, only computed the way
``prepare`` + the engine compute them); the slow tests serve a real trained model over HTTP.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rima_core.config import Config, ModelConfig, OTConfig
from rima_core.core.models import ModelSpec, RimaConfig, build_model, save_model
from rima_core.ops import serving
from tests.servers import mlflow_test_config, sqlite_uri

CLASSES = ["normal", "early", "late"]


def tiny_model(path: Path, seed: int = 0, name: str = "rima") -> Path:
    torch.manual_seed(seed)
    mcfg = ModelConfig(fundus_dim=16, oct_dim=16, hidden_dim=16, heads=2, dropout=0.0)
    spec = ModelSpec(
        name=name,
        config=RimaConfig.from_sections(mcfg, OTConfig(), name),
        n_classes=3,
        class_names=CLASSES,
        fundus_shape=[16, 16, 3],
        oct_shape=[8, 8, 8],
    )
    save_model(build_model(spec, pretrained=False), spec, path)
    return path


@pytest.fixture(scope="module")
def model_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def predictor(model_pt: Path) -> serving.Predictor:
    return serving.Predictor.from_file(model_pt)


def _rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_outputs_per_row_with_missing_modalities(predictor: serving.Predictor) -> None:
    rng = _rng()
    fundus = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)  # any size: resized like prepare
    grey = rng.integers(0, 256, (20, 20), dtype=np.uint8)
    oct = rng.integers(0, 256, (12, 10, 9), dtype=np.uint8)
    frame = pd.DataFrame(
        {
            "case_id": ["both", "fundus_only", "oct_only", "grey"],
            "fundus": [fundus.tolist(), fundus.tolist(), None, grey.tolist()],
            "oct": [oct.tolist(), np.nan, oct.tolist(), None],
        }
    )
    out = predictor.predict(frame)
    assert list(out.columns) == ["case_id", "p_normal", "p_early", "p_late", "grade", "grade_name"]
    assert out["case_id"].tolist() == frame["case_id"].tolist()
    proba = out[["p_normal", "p_early", "p_late"]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert out["grade"].tolist() == proba.argmax(axis=1).tolist()
    assert out["grade_name"].tolist() == [CLASSES[g] for g in out["grade"]]
    # a missing modality changes the prediction (it is translated, not ignored)
    assert not np.allclose(proba[0], proba[1]) and not np.allclose(proba[0], proba[2])


def test_same_numbers_as_the_model_on_prepared_tensors(predictor: serving.Predictor) -> None:
    from rima_core.core.data.prepare import resize_fundus, resize_oct

    rng = _rng()
    fundus = rng.integers(0, 256, (33, 33, 3), dtype=np.uint8)
    oct = rng.integers(0, 256, (10, 12, 12), dtype=np.uint8)
    got = predictor.predict(pd.DataFrame({"fundus": [fundus], "oct": [oct]}))
    # what training sees for the same eye: prepare's resize, then the dataset's /255 layout
    f = torch.from_numpy(np.array(resize_fundus(fundus, 16))).permute(2, 0, 1)[None].float() / 255
    o = torch.from_numpy(resize_oct(oct, [8, 8, 8]))[None, None].float() / 255
    with torch.inference_mode():
        logits = predictor.model(f, o, torch.tensor([True]), torch.tensor([True])).logits
    want = torch.softmax(logits, dim=1).numpy()[0]
    np.testing.assert_allclose(got[["p_normal", "p_early", "p_late"]].to_numpy()[0], want, 1e-5)
    assert "case_id" not in got.columns


def test_file_inputs_match_array_inputs(predictor: serving.Predictor, tmp_path: Path) -> None:
    import nibabel as nib
    from PIL import Image

    rng = _rng()
    fundus = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    oct = rng.integers(0, 256, (6, 16, 16), dtype=np.uint8)
    Image.fromarray(fundus).save(tmp_path / "f.png")
    np.save(tmp_path / "f.npy", fundus)
    np.savez(tmp_path / "eye.npz", slo_fundus=fundus, oct_bscans=oct, grade=1)
    np.save(tmp_path / "o.npy", oct)
    nib.save(nib.Nifti1Image(oct, np.eye(4)), tmp_path / "o.nii.gz")
    bscans = tmp_path / "bscans"
    bscans.mkdir()
    for i, scan in enumerate(oct):
        Image.fromarray(scan).save(bscans / f"{i + 1}_image.png")
    want = predictor.predict(pd.DataFrame({"fundus": [fundus], "oct": [oct]}))
    frame = pd.DataFrame(
        {
            "fundus": [
                str(tmp_path / p) for p in ("f.png", "f.npy", "eye.npz", "eye.npz", "f.npy")
            ],
            "oct": [str(tmp_path / p) for p in ("o.npy", "o.nii.gz", "eye.npz", "bscans", "o.npy")],
        }
    )
    got = predictor.predict(frame)
    cols = ["p_normal", "p_early", "p_late"]
    np.testing.assert_allclose(
        got[cols].to_numpy(), np.repeat(want[cols].to_numpy(), len(frame), axis=0), rtol=1e-5
    )


def test_missing_columns_are_reindexed(predictor: serving.Predictor) -> None:
    oct = _rng().integers(0, 256, (8, 8, 8), dtype=np.uint8).tolist()
    out = predictor.predict(pd.DataFrame({"oct": [oct, oct]}))
    assert len(out) == 2 and out["grade"].notna().all()


def test_bad_rows_are_named(predictor: serving.Predictor, tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 3), np.uint8).tolist()
    frame = pd.DataFrame({"case_id": ["ok", "empty"], "fundus": [arr, None], "oct": [None, ""]})
    with pytest.raises(serving.InputError, match=r"row 1 \(case_id empty\).*neither a fundus"):
        predictor.predict(frame)
    with pytest.raises(serving.InputError, match=r"row 0: fundus file .*nope.png: does not exist"):
        predictor.predict(pd.DataFrame({"fundus": [str(tmp_path / "nope.png")]}))
    with pytest.raises(serving.InputError, match=r"row 0: oct is not a rectangular array"):
        predictor.predict(pd.DataFrame({"oct": [[[[1, 2]], [[3]]]]}))
    with pytest.raises(serving.InputError, match=r"row 0: oct.*rank 2"):
        predictor.predict(pd.DataFrame({"oct": [np.zeros((4, 4), np.uint8)]}))
    with pytest.raises(serving.InputError, match=r"unexpected column\(s\) \['label'\]"):
        predictor.predict(pd.DataFrame({"fundus": [arr], "label": [1]}))
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(serving.InputError, match=r"unsupported type"):
        predictor.predict(pd.DataFrame({"fundus": [str(tmp_path / "x.txt")]}))


def test_pip_requirements_are_pinned_and_cover_the_serving_imports(model_pt: Path) -> None:
    reqs = serving.pip_requirements()
    assert "torch==2.13.0" in reqs
    assert all("==" in r and "+" not in r for r in reqs)
    # Which rima_core modules does serving load? Ask a fresh interpreter, then list the
    # third-party imports in those modules' source and map them to distributions.
    code = (
        "import sys, json, numpy as np, pandas as pd; from rima_core.ops import serving; "
        # the file readers serving imports lazily
        "from rima_core.core.data.sources import gamma, rima_folders, fairvision, _common; "
        f"p = serving.Predictor.from_file({str(model_pt)!r}); "
        "p.predict(pd.DataFrame({'fundus': [np.zeros((8, 8, 3), np.uint8)]})); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('rima_core'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    import importlib.metadata
    import importlib.util

    top: set[str] = set()
    for name in modules:
        spec = importlib.util.find_spec(name)
        tree = ast.parse(Path(spec.origin).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                top.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                top.add(node.module.split(".")[0])
    dists = importlib.metadata.packages_distributions()
    pinned = {r.split("==")[0].lower() for r in reqs}
    third_party = {t for t in top - set(sys.stdlib_module_names) if t in dists} - {"rima_core"}
    # a module may come from several distributions (mlflow, mlflow-skinny): one pin suffices
    unpinned = [t for t in third_party if not {d.lower() for d in dists[t]} & pinned]
    assert not unpinned, (unpinned, reqs)
    assert {"torch", "mlflow", "PIL", "nibabel"} <= third_party  # the check saw the real imports


def test_log_load_predict_pyfunc(cfg: Config, model_pt: Path, tmp_path: Path) -> None:
    import mlflow

    from rima_core.tracking import mlflow_runs as tracking

    with tracking.start_run(cfg, "register", log_params=False):
        info = serving.log_pyfunc(model_pt.parent, cfg)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "m")))
    reqs = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in reqs and not any("+cpu" in r for r in reqs)
    assert (local / "code" / "rima_core" / "ops" / "serving.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    assert json.loads((local / "artifacts" / "class_names.json").read_text()) == CLASSES
    assert json.loads((local / "artifacts" / "config.json").read_text())["mlflow"]["model_name"]
    assert (local / "serving_input_example.json").is_file()
    model = mlflow.pyfunc.load_model(info.model_uri)
    # no input schema (MLflow would drop unknown columns); the columns are in the metadata
    assert model.metadata.get_input_schema() is None
    assert model.metadata.metadata["rima_input_columns"] == list(serving.INPUT_COLUMNS)
    example = serving.input_example()
    got = model.predict(example)
    want = serving.Predictor.from_file(model_pt).predict(example)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    # only the OCT column: MLflow drops the absent optional columns, predict adds them back
    only_oct = model.predict(example[["oct"]].iloc[[2]])
    assert len(only_oct) == 1
    with pytest.raises(mlflow.exceptions.MlflowException, match="neither a fundus"):
        model.predict(pd.DataFrame({"case_id": ["x"], "fundus": [None], "oct": [None]}))
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"unexpected column.*'fundas'"):
        model.predict(example.rename(columns={"fundus": "fundas"}))


def test_predict_files_csv_relative_paths(cfg: Config, model_pt: Path, tmp_path: Path) -> None:
    from PIL import Image

    from rima_core.tracking import mlflow_runs as tracking

    with tracking.start_run(cfg, "register", log_params=False):
        info = serving.log_pyfunc(model_pt, cfg)
    rng = _rng()
    images = tmp_path / "eyes"
    images.mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(images / "a.jpg")
    np.save(images / "b.npy", rng.integers(0, 256, (5, 9, 9), dtype=np.uint8))
    table = images / "batch.csv"
    table.write_text("case_id,fundus,oct\nA,a.jpg,\nB,,b.npy\nC,a.jpg,b.npy\n")
    out = tmp_path / "preds" / "out.parquet"
    summary = serving.predict_files(info.model_uri, table, out)
    assert summary["rows"] == 3 and summary["out"] == str(out)
    result = pd.read_parquet(out)
    assert result["case_id"].tolist() == ["A", "B", "C"]
    assert sum(summary["grades"].values()) == 3
    assert not list(out.parent.glob(".out.parquet.tmp-*"))
    with pytest.raises(serving.InputError, match=r"row 0 \(case_id A\).*neither"):
        (images / "bad.csv").write_text("case_id,fundus,oct\nA,,\n")
        serving.predict_files(info.model_uri, images / "bad.csv", tmp_path / "bad.csv")
    # local files go through the restricted readers too: a zip bomb is named, nothing written
    bomb_npz(images / "bomb.npz")
    (images / "bomb.csv").write_text("case_id,fundus,oct\nA,a.jpg,\nZ,,bomb.npz\n")
    with pytest.raises(serving.InputError, match=r"bomb.csv: row 1 \(case_id Z\): oct file .*bomb"):
        serving.predict_files(info.model_uri, images / "bomb.csv", tmp_path / "bomb.csv")
    assert not (tmp_path / "bomb.csv").exists()


# --- what a request may read, and how much (issue 10, items 3 and 4) --------------------------


def bomb_png(path: Path, side: int = 10000) -> Path:
    """A real decompression bomb: a side×side grey PNG of zeros (100 Mpx in ~100 KB)."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    z = zlib.compressobj(9)
    row = b"\x00" * (side + 1)  # filter byte + pixels
    rows = range(0, side, 256)
    idat = b"".join(z.compress(row * min(256, side - r)) for r in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def bomb_npz(path: Path, key: str = "oct_bscans", side: int = 320) -> Path:
    """A zip-bombed npz: a side³ uint8 volume of zeros (33 MB) deflated to ~30 KB."""
    import zipfile

    from numpy.lib import format as npformat

    zf = zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED)
    with zf, zf.open(f"{key}.npy", "w", force_zip64=True) as fp:
        header = {"descr": "|u1", "fortran_order": False, "shape": (side, side, side)}
        npformat.write_array_header_1_0(fp, header)
        plane = bytes(side * side)
        for _ in range(side):
            fp.write(plane)
    return path


@pytest.fixture(scope="module")
def eye_files(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An allowed root with a readable eye, bombs, and escapes to a readable file outside it."""
    tmp = tmp_path_factory.mktemp("files")
    root, outside = tmp / "root", tmp / "outside"
    (root / "eye").mkdir(parents=True)
    outside.mkdir()
    rng = _rng()
    oct = rng.integers(0, 256, (8, 12, 12), dtype=np.uint8)
    np.save(root / "eye" / "o.npy", oct)
    np.save(outside / "secret.npy", oct)  # readable: a refusal is the policy, not a bad file
    (root / "alias.npy").symlink_to(root / "eye" / "o.npy")  # a link that stays inside
    (root / "link.npy").symlink_to(outside / "secret.npy")
    (root / "linkdir").symlink_to(outside, target_is_directory=True)
    bomb_png(root / "bomb.png")
    bomb_npz(root / "bomb.npz")
    escapes = {  # every one must get the same answer as a file that does not exist
        "missing": "nope.npy",
        "dotdot": "../outside/secret.npy",
        "absolute dotdot": str(root / "eye" / ".." / ".." / "outside" / "secret.npy"),
        "absolute outside": str(outside / "secret.npy"),
        "symlink": "link.npy",
        "symlinked folder": "linkdir/secret.npy",
        "system file": "/etc/passwd",
    }
    return {"root": root, "oct": oct, "escapes": escapes}


def _policy(root: Path | None = None, **limits: int) -> serving.InputPolicy:
    values = {**asdict(serving.SERVE_LIMITS), **limits}
    return serving.InputPolicy(serving.Limits(**values), file_root=root)


def test_server_policy_refuses_paths_unless_a_root_is_set(
    predictor: serving.Predictor, eye_files: dict
) -> None:
    root, oct = eye_files["root"], eye_files["oct"]
    with pytest.raises(serving.InputError, match=r"row 0: oct is a file path.*arrays only"):
        predictor.predict(pd.DataFrame({"oct": [str(root / "eye" / "o.npy")]}), _policy())
    want = predictor.predict(pd.DataFrame({"oct": [oct]}), _policy())
    inside = ["eye/o.npy", str(root / "eye" / "o.npy"), "alias.npy"]
    got = predictor.predict(pd.DataFrame({"oct": inside}), _policy(root))
    cols = ["p_normal", "p_early", "p_late"]
    np.testing.assert_allclose(
        got[cols].to_numpy(), np.repeat(want[cols].to_numpy(), 3, 0), rtol=1e-5
    )
    messages = set()
    for case, path in eye_files["escapes"].items():
        with pytest.raises(serving.InputError) as err:
            predictor.predict(pd.DataFrame({"oct": [path]}), _policy(root))
        messages.add(str(err.value))
        assert "secret" not in str(err.value) and "exist" not in str(err.value), case
    assert messages == {serving._NEUTRAL.format(row="row 0", modality="oct")}


def test_bombs_are_refused_with_reasons_locally(
    predictor: serving.Predictor, eye_files: dict
) -> None:
    root = eye_files["root"]
    local = serving.InputPolicy.local()
    with pytest.raises(serving.InputError, match=r"row 0: fundus file .*bomb.png: .*(bomb|limit)"):
        predictor.predict(pd.DataFrame({"fundus": [str(root / "bomb.png")]}), local)
    with pytest.raises(serving.InputError, match=r"row 0: oct file .*bomb.npz: .*zip bomb"):
        predictor.predict(pd.DataFrame({"oct": [str(root / "bomb.npz")]}), local)
    neutral = serving._NEUTRAL.format(row="row 0", modality="oct")
    with pytest.raises(serving.InputError, match=re.escape(neutral)):
        predictor.predict(pd.DataFrame({"oct": ["bomb.npz"]}), _policy(root))


def test_size_limits(predictor: serving.Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    small = np.zeros((4, 4, 4), np.uint8).tolist()
    rows = pd.DataFrame({"oct": [small] * 5})
    with pytest.raises(serving.InputError, match=r"5 rows in one request; at most 4 .*MAX_ROWS"):
        predictor.predict(rows, _policy(max_rows=4))
    assert len(predictor.predict(rows, _policy(max_rows=5))) == 5
    big = np.zeros((5, 4, 4), np.uint8)
    for value in (big, big.tolist()):  # an array, and nested JSON lists (checked before np)
        with pytest.raises(
            serving.InputError,
            match=r"row 0: oct has 80 elements, over the limit of 64 per image "
            r"\(RIMA_SERVE_MAX_OCT_ELEMENTS\)",
        ):
            predictor.predict(pd.DataFrame({"oct": [value]}), _policy(max_oct_elements=64))
    fundus = np.zeros((8, 8, 3), np.uint8).tolist()
    with pytest.raises(serving.InputError, match=r"fundus has 192 elements.*FUNDUS_ELEMENTS"):
        predictor.predict(pd.DataFrame({"fundus": [fundus]}), _policy(max_fundus_elements=191))
    # the default server limits refuse the 160³ OCT
    assert serving.SERVE_LIMITS.max_oct_elements < 160**3
    monkeypatch.setenv("RIMA_SERVE_MAX_ROWS", "7")
    monkeypatch.setenv("RIMA_SERVE_MAX_OCT_ELEMENTS", "1000")
    policy = serving.InputPolicy.server()
    assert policy.limits.max_rows == 7 and policy.limits.max_oct_elements == 1000
    assert policy.file_root is None and not policy.files_allowed
    monkeypatch.setenv("RIMA_SERVE_MAX_ROWS", "lots")
    with pytest.raises(ValueError, match=r"RIMA_SERVE_MAX_ROWS='lots': expected a positive"):
        serving.InputPolicy.server()
    monkeypatch.delenv("RIMA_SERVE_MAX_ROWS")
    monkeypatch.setenv("RIMA_SERVE_FILE_ROOT", "relative/dir")
    with pytest.raises(ValueError, match="RIMA_SERVE_FILE_ROOT='relative/dir'"):
        serving.InputPolicy.server()


DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_docs_name_every_serving_setting() -> None:
    security = (DOCS / "security.md").read_text()
    names = [serving.ENV_FILE_ROOT] + [
        prefix + suffix
        for prefix in (serving.SERVE_PREFIX, serving.PREDICT_PREFIX)
        for suffix in serving._LIMIT_ENV.values()
    ]
    assert [n for n in names if n not in security] == []
    # the serving example sends arrays, not a server-side file path
    example = (DOCS / "registry-serving.md").read_text()
    assert re.search(r"-d '(\{.*?\})'", example, re.S), "the curl example is gone"
    assert '"fundus": "/' not in example


# --- the same, against a real `mlflow models serve` -------------------------------------------

SERVER_LIMITS = {
    "RIMA_SERVE_MAX_ROWS": "4",
    "RIMA_SERVE_MAX_FUNDUS_ELEMENTS": str(40 * 40 * 3),
    "RIMA_SERVE_MAX_OCT_ELEMENTS": str(16**3),
}


@pytest.fixture(scope="module")
def logged_model(model_pt: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from rima_core.tracking import mlflow_runs as tracking

    tmp = tmp_path_factory.mktemp("served")
    with pytest.MonkeyPatch.context() as mp:
        cfg = mlflow_test_config(tmp, mp, "rima-serving-http")
        with tracking.start_run(cfg, "register", log_params=False):
            info = serving.log_pyfunc(model_pt.parent, cfg)
    return info.model_uri, cfg.mlflow.tracking_uri, tmp


@pytest.fixture(scope="module")
def default_server(logged_model):  # type: ignore[no-untyped-def]
    from tests.servers import model_server

    uri, tracking_uri, tmp = logged_model
    with model_server(uri, tracking_uri, tmp) as server:
        yield server


@pytest.fixture(scope="module")
def root_server(logged_model, eye_files: dict):  # type: ignore[no-untyped-def]
    from tests.servers import model_server

    uri, tracking_uri, tmp = logged_model
    env = {"RIMA_SERVE_FILE_ROOT": str(eye_files["root"]), **SERVER_LIMITS}
    with model_server(uri, tracking_uri, tmp, env=env) as server:
        yield server


def _post_body(server, body: bytes) -> tuple[int, dict, str]:  # type: ignore[no-untyped-def]
    """POST a raw JSON body to /invocations; (status, JSON body, raw text)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        server.url + "/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, text = resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    return status, json.loads(text), text


def _invoke(server, records: list[dict]) -> tuple[int, dict, str]:  # type: ignore[no-untyped-def]
    """POST dataframe_records; (status, JSON body, raw text). No reply may hold a stack trace."""
    status, body, text = _post_body(server, json.dumps({"dataframe_records": records}).encode())
    assert "Traceback" not in text and "stack_trace" not in text, text[:2000]
    return status, body, text


def _error(body: dict) -> str:
    """The pyfunc's own message (MLflow prefixes it with a repr of the request)."""
    return body["message"].split("Error: ", 1)[-1]


@pytest.mark.slow
def test_served_default_takes_arrays_only_within_limits(
    default_server, predictor: serving.Predictor, eye_files: dict
) -> None:
    oct = eye_files["oct"]
    status, body, _ = _invoke(default_server, [{"case_id": "a", "oct": oct.tolist()}])
    assert status == 200, body
    want = predictor.predict(pd.DataFrame({"oct": [oct]}))
    assert body["predictions"][0]["grade"] == want["grade"][0]
    np.testing.assert_allclose(body["predictions"][0]["p_late"], want["p_late"][0], rtol=1e-5)
    # a path, even one inside what a root would be, is refused: arrays only
    status, body, _ = _invoke(default_server, [{"oct": str(eye_files["root"] / "eye/o.npy")}])
    assert status == 400 and "arrays only" in _error(body)
    for path in ("/etc/passwd", "/nope/x.npy"):
        status, other, _ = _invoke(default_server, [{"oct": path}])
        assert status == 400 and _error(other) == _error(body)
    # too many rows (default 32) and the 160³ OCT in JSON
    status, body, _ = _invoke(default_server, [{"oct": oct.tolist()}] * 33)
    assert status == 400 and "33 rows in one request; at most 32" in _error(body)
    status, body, _ = _invoke(default_server, [{"oct": np.zeros((160,) * 3, np.uint8).tolist()}])
    assert status == 400
    assert f"oct has {160**3} elements, over the limit of {128**3} per image" in _error(body)
    # unknown columns are refused by name, not dropped
    status, body, _ = _invoke(default_server, [{"oct": oct.tolist(), "fundas": [[1, 2]]}])
    assert status == 400 and "unexpected column(s) ['fundas']" in _error(body)
    # the documented curl example (docs/registry-serving.md) works as written
    example = (DOCS / "registry-serving.md").read_text()
    payload = json.loads(re.search(r"-d '(\{.*?\})'", example, re.S).group(1))
    status, body, _ = _invoke(default_server, payload["dataframe_records"])
    assert status == 200 and body["predictions"][0]["case_id"] == "eye1", body


@pytest.mark.slow
def test_served_files_under_the_allowed_root(
    root_server, predictor: serving.Predictor, eye_files: dict
) -> None:
    want = predictor.predict(pd.DataFrame({"oct": [eye_files["oct"]]}))
    rows = [{"case_id": p, "oct": p} for p in ("eye/o.npy", "alias.npy")]
    status, body, _ = _invoke(root_server, rows)
    assert status == 200, body
    for pred in body["predictions"]:
        np.testing.assert_allclose(pred["p_late"], want["p_late"][0], rtol=1e-5)
    neutral = serving._NEUTRAL.format(row="row 0", modality="oct")
    for case, path in eye_files["escapes"].items():
        status, body, _ = _invoke(root_server, [{"oct": path}])
        assert status == 400 and _error(body) == neutral, case
    for row in ({"oct": "bomb.npz"}, {"fundus": "bomb.png"}):
        status, body, _ = _invoke(root_server, [row])
        assert status == 400, row
        assert _error(body) == serving._NEUTRAL.format(row="row 0", modality=next(iter(row)))
    # limits from the server's environment
    status, body, _ = _invoke(root_server, [{"oct": "eye/o.npy"}] * 5)
    assert status == 400 and "at most 4" in _error(body)
    status, body, _ = _invoke(root_server, [{"oct": np.zeros((17, 16, 16), np.uint8).tolist()}])
    assert status == 400 and "over the limit of 4096 per image" in _error(body)
    assert "RIMA_SERVE_MAX_OCT_ELEMENTS" in _error(body)
    status, body, _ = _invoke(root_server, [{"fundus": np.zeros((41, 40, 3)).tolist()}])
    assert status == 400 and "RIMA_SERVE_MAX_FUNDUS_ELEMENTS" in _error(body)
    log = root_server.tail(200_000)
    assert "bomb" in log and "outside" in log  # the reasons go to the server log only


# --- done means: train -> register -> promote -> worse model refused -> serve ------------------


# The first model is trained a little; the "worse" one barely moves from its initialisation.
GOOD_TRAINING = ["train.epochs=6", "train.lr=0.003"]
WORSE_TRAINING = ["train.epochs=1", "train.lr=1e-7"]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_done_means_end_to_end(
    tiny_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import mlflow
    from PIL import Image

    from rima_core.core.data import open_store
    from rima_core.pipeline import cli, steps
    from tests.conftest import clear_mlflow_env, tiny_config
    from tests.servers import model_server

    clear_mlflow_env(monkeypatch)
    uri = sqlite_uri(tmp_path)
    name = "rima-e2e"
    mlflow_sets = [
        f"mlflow.tracking_uri={uri}",
        "mlflow.experiment=rima-e2e",
        f"mlflow.model_name={name}",
        # the deliberately bad model must still be registered, to be refused at promotion
        "promote.register_min_metric=-1",
    ]
    good = tiny_config([*GOOD_TRAINING, *mlflow_sets])
    worse = tiny_config([*WORSE_TRAINING, *mlflow_sets])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(good.to_dict()))
    monkeypatch.chdir(tmp_path)  # nothing may land in the checkout
    store, masks = tiny_data.store, tiny_data.masks

    def train_eval_register(cfg: Config, tag: str) -> dict:
        steps.train(store, masks, tmp_path / tag, cfg)
        steps.evaluate(tmp_path / tag / "model.pt", store, masks, tmp_path / f"eval-{tag}", cfg)
        metrics = json.loads((tmp_path / f"eval-{tag}" / "metrics.json").read_text())
        reg = steps.register(tmp_path / tag, tmp_path / f"eval-{tag}" / "metrics.json", cfg, store)
        return {"metrics": metrics, **reg}

    # 1. train (tiny) -> register -> first promotion
    first = train_eval_register(good, "first")
    assert first["version"] == "1"
    p1 = steps.promote(good)
    assert p1["promoted"] and p1["reason"] == "no champion yet"

    # 2. a worse model: registered as challenger, promotion refused with the reason
    second = train_eval_register(worse, "worse")
    # Promotion decides on the VALIDATION split; on a 90-eye phantom a barely trained model can
    # still edge ahead there, so the gate is made strict (a margin no model can clear) to test
    # the refusal deterministically.
    strict = copy.deepcopy(good)
    strict.promote.margin = 2.0
    params.write_text(yaml.safe_dump(strict.to_dict()))
    assert second["version"] == "2"
    assert cli.main(["promote", "--dry-run", "--params", str(params)]) == 0
    dry = capsys.readouterr().out
    assert "KEEP champion" in dry and "mixed" in dry and "challenger v2 vs champion v1" in dry
    p2 = steps.promote(strict)
    assert not p2["promoted"] and p2["champion_after"] == "1"
    assert "qwk under mixed" in p2["reason"] and "at least 2" in p2["reason"]
    client = mlflow.MlflowClient(uri)
    v2 = client.get_model_version(name, "2")
    assert v2.tags["promotion.decision"] == "refused"
    assert v2.tags["promotion.reason"] == p2["reason"]
    assert v2.tags["train_run_id"] and v2.tags["data_hash"]

    # 3. models:/NAME@champion still gives the first model
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    s = open_store(store)
    test_rows = np.flatnonzero(
        (s.manifest["split"] == "test").to_numpy()
        & s.manifest["has_fundus"].to_numpy()
        & s.manifest["has_oct"].to_numpy()
    )[:3]
    eyes = pd.DataFrame(
        {
            "case_id": ["both", "fundus_only", "oct_only"],
            "fundus": [s.fundus[test_rows[0]], s.fundus[test_rows[1]], None],
            "oct": [s.oct[test_rows[0]], None, s.oct[test_rows[2]]],
        }
    )
    want = serving.Predictor.from_file(tmp_path / "first" / "model.pt").predict(eyes)
    other = serving.Predictor.from_file(tmp_path / "worse" / "model.pt").predict(eyes)
    cols = [c for c in want.columns if c.startswith("p_")]
    got = champion.predict(eyes)
    np.testing.assert_allclose(got[cols].to_numpy(), want[cols].to_numpy(), rtol=1e-5)
    assert not np.allclose(other[cols].to_numpy(), want[cols].to_numpy(), rtol=1e-3)

    # 4. serve the champion over HTTP; rows with both modalities, fundus only and OCT only
    records = {
        "dataframe_split": {
            "columns": ["case_id", "fundus", "oct"],
            "data": [[row.case_id, _list(row.fundus), _list(row.oct)] for row in eyes.itertuples()],
        }
    }
    with model_server(f"models:/{name}@champion", uri, tmp_path) as server:
        status, body = _post(server.url + "/invocations", records)
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])
        assert served["case_id"].tolist() == ["both", "fundus_only", "oct_only"]
        np.testing.assert_allclose(served[cols].to_numpy(), want[cols].to_numpy(), rtol=1e-5)
        assert served["grade_name"].tolist() == want["grade_name"].tolist()
        # only the OCT column present at all; and an eye with nothing -> 400 naming the row
        status, body = _post(
            server.url + "/invocations",
            {"dataframe_records": [{"oct": _list(eyes["oct"][2])}]},
        )
        assert status == 200 and len(body["predictions"]) == 1
        status, body = _post(
            server.url + "/invocations",
            {"dataframe_records": [{"case_id": "empty-eye", "fundus": None, "oct": None}]},
        )
        assert status == 400 and "empty-eye" in body["message"] and "neither" in body["message"]

    # 5. batch prediction from files with the CLI
    files = tmp_path / "batch"
    files.mkdir()
    Image.fromarray(np.asarray(eyes["fundus"][0])).save(files / "both.png")
    np.save(files / "both_oct.npy", np.asarray(eyes["oct"][0]))
    np.save(files / "only_oct.npy", np.asarray(eyes["oct"][2]))
    (files / "eyes.csv").write_text(
        "case_id,fundus,oct\nboth,both.png,both_oct.npy\noct_only,,only_oct.npy\n"
    )
    out = tmp_path / "predictions.csv"
    argv = ["predict", "--params", str(params), "--input", str(files / "eyes.csv")]
    assert cli.main([*argv, "--out", str(out)]) == 0
    batch = pd.read_csv(out)
    assert batch["case_id"].tolist() == ["both", "oct_only"]
    np.testing.assert_allclose(
        batch[cols].to_numpy(), want[cols].to_numpy()[[0, 2]], rtol=1e-4, atol=1e-6
    )


def _list(value: object) -> object:
    return None if value is None else np.asarray(value).tolist()


# --- one line, never a traceback: shapes, nesting, MLflow's echo -------------------------------


def test_served_eyes_meet_the_prepare_shape_minimums(predictor: serving.Predictor) -> None:
    """A 1×1×1 OCT (or a 3-pixel-wide fundus) is refused as in prepare, not graded."""
    for column, value, needle in (
        ("oct", np.full((1, 1, 1), 7, np.uint8), "below the minimum axis of 2"),
        ("fundus", np.full((3, 40, 3), 9, np.uint8), "below the minimum side of 8"),
    ):
        with pytest.raises(serving.InputError, match=needle):
            predictor.predict(pd.DataFrame({column: [value]}), serving.InputPolicy.server())


def _fake_model(error: Exception | None = None):  # type: ignore[no-untyped-def]
    import types

    def predict(data, params=None):  # type: ignore[no-untyped-def]
        if error is not None:
            raise error
        return pd.DataFrame({"grade": [0] * len(data)})

    return types.SimpleNamespace(metadata=None, predict=predict)


def test_scoring_server_replies_are_one_line() -> None:
    """Through MLflow's own request handler: JSON nested 3,000 deep (an HTTP 500 with a
    RecursionError before) is a one-line 400; a model's message is not wrapped in MLflow's echo
    of the input table; a parse error does not echo the body; no stack trace travels."""
    from mlflow.exceptions import MlflowException
    from mlflow.pyfunc import scoring_server

    handler = serving._one_line_invocations(scoring_server.invocations)
    deep = '{"dataframe_records": ' + "[" * 3000 + "]" * 3000 + "}"
    with pytest.raises(MlflowException) as err:
        handler(deep, "application/json", _fake_model(), None)
    assert err.value.get_http_status_code() == 400
    assert err.value.message == "the request is nested too deeply to be a table of eyes"
    rows = json.dumps(
        {"dataframe_records": [{"case_id": f"eye{i}", "oct": None} for i in range(50)]}
    )
    model_error = MlflowException("row 3 (case_id eye3): oct is not a rectangular array")
    with pytest.raises(MlflowException) as err:
        handler(rows, "application/json", _fake_model(model_error), None)
    assert err.value.message == "row 3 (case_id eye3): oct is not a rectangular array"
    with pytest.raises(MlflowException) as err:
        handler('{"dataframe_records": [1, 2,', "application/json", _fake_model(), None)
    body = json.loads(err.value.serialize_as_json())
    assert "\n" not in body["message"] and "Input" not in body["message"]
    assert "stack_trace" not in body and err.value.get_http_status_code() == 400
    with pytest.raises(MlflowException) as err:
        handler(rows, "application/json", _fake_model(RuntimeError("boom\nsecret")), None)
    body = json.loads(err.value.serialize_as_json())
    assert "\n" not in body["message"] and "stack_trace" not in body
    assert serving.one_line_reply("a\nb") == "a" and len(serving.one_line_reply("x" * 5000)) == 500


@pytest.mark.slow
def test_served_errors_are_one_line_400s(default_server) -> None:  # type: ignore[no-untyped-def]
    def post(body: bytes) -> tuple[int, dict, str]:
        return _post_body(default_server, body)

    deep = b'{"dataframe_records": ' + b"[" * 3000 + b"]" * 3000 + b"}"
    status, body, text = post(deep)
    assert status == 400 and "nested too deeply" in body["message"], text[:500]
    rows = [{"case_id": f"eye{i}", "oct": np.full((1, 1, 1), 5).tolist()} for i in range(3)]
    status, body, text = post(json.dumps({"dataframe_records": rows}).encode())
    assert status == 400 and "\n" not in body["message"] and "stack_trace" not in body
    assert body["message"].startswith("row 0 (case_id eye0): oct of shape (1, 1, 1) is below")
    status, body, text = post(b'{"dataframe_records": [1, 2,')
    assert status == 400 and "\n" not in body["message"] and "dataframe_records" not in text
