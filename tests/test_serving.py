"""The pyfunc model: preprocessing, missing modalities, file inputs, logging/loading, serving.

Fast tests use a tiny untrained model (the numbers need not be good, only computed the way
``prepare`` + the engine compute them); the slow tests serve a real trained model over HTTP.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rima_core import serving
from rima_core.config import Config, ModelConfig, OTConfig
from rima_core.models import ModelSpec, build_model, save_model
from tests.servers import mlflow_test_config, sqlite_uri

CLASSES = ["normal", "early", "late"]


def tiny_model(path: Path, seed: int = 0, name: str = "rima") -> Path:
    torch.manual_seed(seed)
    mcfg = ModelConfig(fundus_dim=16, oct_dim=16, hidden_dim=16, heads=2, dropout=0.0)
    spec = ModelSpec(
        name=name,
        model=asdict(mcfg),
        ot=asdict(OTConfig()),
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
    from rima_core.data.prepare import resize_fundus, resize_oct

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
    with pytest.raises(serving.InputError, match=r"row 0: fundus file .*nope.png does not exist"):
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
        "import sys, json, numpy as np, pandas as pd; from rima_core import serving; "
        # the file readers serving imports lazily
        "from rima_core.data.sources import gamma, rima_folders, fairvision, _common; "
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


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Config:
    return mlflow_test_config(tmp_path, monkeypatch, "rima-serving-test", "rima-serving-test")


def test_log_load_predict_pyfunc(cfg: Config, model_pt: Path, tmp_path: Path) -> None:
    import mlflow

    from rima_core import tracking

    with tracking.start_run(cfg, "register", log_params=False):
        info = serving.log_pyfunc(model_pt.parent, cfg)
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "m")))
    reqs = (local / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in reqs and not any("+cpu" in r for r in reqs)
    assert (local / "code" / "rima_core" / "serving.py").is_file()
    assert not list((local / "code").rglob("__pycache__"))
    assert json.loads((local / "artifacts" / "class_names.json").read_text()) == CLASSES
    assert json.loads((local / "artifacts" / "config.json").read_text())["mlflow"]["model_name"]
    assert (local / "serving_input_example.json").is_file()
    model = mlflow.pyfunc.load_model(info.model_uri)
    assert [c.name for c in model.metadata.get_input_schema().inputs] == list(serving.INPUT_COLUMNS)
    example = serving.input_example()
    got = model.predict(example)
    want = serving.Predictor.from_file(model_pt).predict(example)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    # only the OCT column: MLflow drops the absent optional columns, predict adds them back
    only_oct = model.predict(example[["oct"]].iloc[[2]])
    assert len(only_oct) == 1
    with pytest.raises(mlflow.exceptions.MlflowException, match="neither a fundus"):
        model.predict(pd.DataFrame({"case_id": ["x"], "fundus": [None], "oct": [None]}))


def test_predict_files_csv_relative_paths(cfg: Config, model_pt: Path, tmp_path: Path) -> None:
    from PIL import Image

    from rima_core import tracking

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

    from rima_core import cli, steps
    from rima_core.data import open_store
    from tests.conftest import tiny_config
    from tests.servers import model_server

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(key, raising=False)
    uri = sqlite_uri(tmp_path)
    name = "rima-e2e"
    mlflow_sets = [
        f"mlflow.tracking_uri={uri}",
        "mlflow.experiment=rima-e2e",
        f"mlflow.model_name={name}",
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
    q1, q2 = first["metrics"]["mixed"]["qwk"], second["metrics"]["mixed"]["qwk"]
    assert q2 < q1, f"precondition: the 'worse' model must be worse on mixed qwk ({q2} vs {q1})"
    assert cli.main(["promote", "--dry-run", "--params", str(params)]) == 0
    dry = capsys.readouterr().out
    assert "KEEP champion" in dry and "mixed" in dry and "challenger v2 vs champion v1" in dry
    p2 = steps.promote(good)
    assert not p2["promoted"] and p2["champion_after"] == "1"
    assert "qwk under mixed changes by -" in p2["reason"]
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
