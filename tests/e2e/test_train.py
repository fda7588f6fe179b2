"""The training engine on the tiny real-data fixture: determinism, exact resume, model selection."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from rima_core.config import Config
from rima_core.core.metrics import classification_metrics
from rima_core.runs.engine import EngineError, predict
from rima_core.runs.train import epoch_seed, is_timing_column, lr_factor, train
from tests.conftest import TinyData


class _Stop(RuntimeError):
    pass


def _stop_after(last_epoch: int):
    def callback(epoch: int, val_metrics: dict[str, float]) -> None:
        assert "qwk" in val_metrics
        if epoch == last_epoch:
            raise _Stop(f"stopped after epoch {epoch}")

    return callback


def _history(out: Path) -> pd.DataFrame:
    hist = pd.read_csv(out / "history.csv")
    return hist[[c for c in hist.columns if not is_timing_column(c)]]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), f"{key} differs"


@pytest.fixture(scope="module")
def straight_run(tiny_data: TinyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 epochs of RIMA without interruption: the reference for determinism and resume."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny_data.store, tiny_data.masks, out, copy.deepcopy(tiny_data.cfg))
    return out


def test_outputs_and_summary(straight_run: Path, tiny_data: TinyData) -> None:
    for name in ("model.pt", "checkpoint.pt", "history.csv", "train_summary.json"):
        assert (straight_run / name).is_file(), name
    summary = json.loads((straight_run / "train_summary.json").read_text())
    hist = pd.read_csv(straight_run / "history.csv")
    assert list(hist["epoch"]) == [1, 2]
    assert summary["epochs_run"] == 2
    assert summary["selection_split"] == "val"
    # RIMA's OT step runs every training batch and reports its time; wall-clock times live in
    # timings.csv, so history.csv and train_summary.json are identical for identical runs
    timings = pd.read_csv(straight_run / "timings.csv")
    assert list(timings["epoch"]) == [1, 2]
    assert (timings["ot_seconds"] > 0).all()
    assert ((timings["ot_share"] > 0) & (timings["ot_share"] < 1)).all()
    assert not [c for c in hist.columns if is_timing_column(c)]
    assert not {"mean_epoch_seconds", "run_seconds_this_session"} & set(summary)
    assert json.loads((straight_run / "timings.json").read_text())["mean_epoch_seconds"] > 0
    assert np.allclose(hist["train/loss"], hist["train/ce"] + hist["train/aux"])
    assert (hist["train/aux"] > 0).all()
    # the best epoch is the one with the highest validation qwk (first one on ties)
    assert summary["best_epoch"] == int(hist["epoch"][hist["val/mean/qwk"].idxmax()])


def test_same_seed_gives_identical_history_and_weights(
    straight_run: Path, tiny_data: TinyData, tmp_path: Path
) -> None:
    train(tiny_data.store, tiny_data.masks, tmp_path, copy.deepcopy(tiny_data.cfg))
    pd.testing.assert_frame_equal(_history(straight_run), _history(tmp_path))
    _assert_same_weights(straight_run / "model.pt", tmp_path / "model.pt")


def test_resume_after_interruption_is_exact(
    straight_run: Path, tiny_data: TinyData, tmp_path: Path
) -> None:
    cfg = copy.deepcopy(tiny_data.cfg)
    with pytest.raises(_Stop):
        train(tiny_data.store, tiny_data.masks, tmp_path, cfg, epoch_callback=_stop_after(1))
    assert not (tmp_path / "train_summary.json").exists()
    assert len(pd.read_csv(tmp_path / "history.csv")) == 1
    summary = train(tiny_data.store, tiny_data.masks, tmp_path, cfg, resume=True)
    assert summary["epochs_run"] == 2
    pd.testing.assert_frame_equal(_history(straight_run), _history(tmp_path))
    _assert_same_weights(straight_run / "model.pt", tmp_path / "model.pt")
    last_a = torch.load(straight_run / "checkpoint.pt", weights_only=True)["model"]
    last_b = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)


def _legacy_name(name: str) -> str:
    """A history column as versions before the metric-name scheme wrote it."""
    if name in ("train/lr", "train/best_epoch"):
        return name.split("/", 1)[1]
    if name.startswith("train/"):
        return "train_" + name[len("train/") :]
    if name.startswith("val/mean/"):
        return "val_" + name[len("val/mean/") :]
    if name.startswith("val/"):
        _, scenario, metric = name.split("/", 2)
        return f"val_{scenario}_{metric}"
    return name


def test_resume_continues_a_checkpoint_of_an_older_version(
    straight_run: Path, tiny_data: TinyData, tmp_path: Path
) -> None:
    """A checkpoint whose history has the old column names (``train_loss``, ``val_qwk``,
    ``val_complete_qwk``) resumes into the same history.csv as an uninterrupted run."""
    cfg = copy.deepcopy(tiny_data.cfg)
    with pytest.raises(_Stop):
        train(tiny_data.store, tiny_data.masks, tmp_path, cfg, epoch_callback=_stop_after(1))
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt["history"] = [{_legacy_name(k): v for k, v in row.items()} for row in ckpt["history"]]
    assert "val_complete_qwk" in ckpt["history"][0] and "train_loss" in ckpt["history"][0]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    train(tiny_data.store, tiny_data.masks, tmp_path, cfg, resume=True)
    pd.testing.assert_frame_equal(_history(straight_run), _history(tmp_path))


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(
    straight_run: Path, tiny_data: TinyData, tmp_path: Path
) -> None:
    """A real kill (no Python cleanup) in a subprocess right after epoch 1's checkpoint."""
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(tiny_data.cfg.to_dict()))
    out = tmp_path / "run"
    script = textwrap.dedent(
        f"""
        import json, os, signal
        from rima_core.config import config_from_dict
        from rima_core.runs.train import train
        cfg = config_from_dict(json.load(open({str(cfg_path)!r})))
        def kill(epoch, metrics):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        train({str(tiny_data.store)!r}, {str(tiny_data.masks)!r}, {str(out)!r}, cfg,
              epoch_callback=kill)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert len(pd.read_csv(out / "history.csv")) == 1
    train(tiny_data.store, tiny_data.masks, out, copy.deepcopy(tiny_data.cfg), resume=True)
    pd.testing.assert_frame_equal(_history(straight_run), _history(out))
    _assert_same_weights(straight_run / "model.pt", out / "model.pt")


def test_resume_refuses_changed_settings(straight_run: Path, tiny_data: TinyData) -> None:
    cfg = copy.deepcopy(tiny_data.cfg)
    cfg.train.lr = cfg.train.lr * 2
    with pytest.raises(EngineError, match=r"train\.lr"):
        train(tiny_data.store, tiny_data.masks, straight_run, cfg, resume=True)


def test_selection_uses_the_validation_split(
    straight_run: Path, tiny_data: TinyData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation metrics in the history are those of the val split under the selection rule
    (``mean``: each main scenario's metric, and their mean under the plain name), and model.pt
    is the best epoch by that metric."""
    from rima_core.core.data import open_store
    from rima_core.core.data.dataset import EyeDataset, make_loader
    from rima_core.core.data.masks import MAIN_SCENARIOS
    from rima_core.core.models import build_model, load_model
    from rima_core.runs.train import model_spec

    cfg = tiny_data.cfg
    assert cfg.train.selection_scenario == "mean"
    hist = pd.read_csv(straight_run / "history.csv")
    summary = json.loads((straight_run / "train_summary.json").read_text())

    def scored(model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """The shipped predictor, fitted here as training fits it every epoch: path weights
        from the full path alone, then one temperature per availability pattern, both on the
        validation eyes of the selection scenarios."""
        from rima_core.runs.calibration import (
            calibrate_paths,
            fit_temperatures,
            row_temperatures,
            softmax,
        )

        cpu = torch.device("cpu")
        loaders = {}
        for scenario in MAIN_SCENARIOS:
            ds = EyeDataset(tiny_data.store, tiny_data.masks, "val", scenario)
            loaders[scenario] = make_loader(ds, 32, shuffle=False, seed=0, pin_memory=False)
        model.reset_path_weights()
        calibrate_paths(model, loaders, cpu)
        preds = {
            s: predict(model, ld, cpu, progress=False, temperature=1.0) for s, ld in loaders.items()
        }
        logits = np.concatenate([p.logits for p in preds.values()])
        y = np.concatenate([p.y_true for p in preds.values()])
        hf = np.concatenate([p.has_fundus for p in preds.values()])
        ho = np.concatenate([p.has_oct for p in preds.values()])
        overall, per = fit_temperatures(logits, y, hf, ho)
        out = {}
        for scenario, p in preds.items():
            assert p.y_true.shape[0] == summary["n_val"]
            proba = softmax(p.logits, row_temperatures(per, overall, p.has_fundus, p.has_oct))
            out[scenario] = classification_metrics(p.y_true, proba)
        return out

    # last epoch: the checkpoint's weights reproduce the last history row
    model = build_model(model_spec(cfg, open_store(tiny_data.store)), pretrained=False)
    model.load_state_dict(torch.load(straight_run / "checkpoint.pt", weights_only=True)["model"])
    last = scored(model)
    for key in ("accuracy", "qwk", "auc", "nll"):
        for scenario in MAIN_SCENARIOS:
            assert last[scenario][key] == pytest.approx(
                hist[f"val/{scenario}/{key}"].iloc[-1], rel=1e-6, nan_ok=True
            )
        mean = float(np.mean([last[s][key] for s in MAIN_SCENARIOS]))
        assert mean == pytest.approx(hist[f"val/mean/{key}"].iloc[-1], rel=1e-6, nan_ok=True)

    # model.pt: the best epoch's metrics
    best, _ = load_model(straight_run / "model.pt")
    m = scored(best)
    row = hist[hist["epoch"] == summary["best_epoch"]].iloc[0]
    assert float(np.mean([m[s]["qwk"] for s in MAIN_SCENARIOS])) == pytest.approx(
        row["val/mean/qwk"], rel=1e-6
    )


def test_datasets_train_on_train_scenario_and_select_on_val(
    tiny_data: TinyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rima_core.core.data.dataset as dataset_module

    seen: list[tuple[str, str, int, int, int]] = []
    real = dataset_module.EyeDataset

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, store, masks, split, scenario="complete"):  # type: ignore[no-untyped-def]
            super().__init__(store, masks, split, scenario)
            both = int((self.has_fundus & self.has_oct).sum())
            seen.append(
                (split, scenario, int(self.has_fundus.sum()), int(self.has_oct.sum()), both)
            )

    import rima_core.runs.train as train_module

    # patched where training looks it up
    monkeypatch.setattr(train_module, "EyeDataset", Recording)
    cfg = copy.deepcopy(tiny_data.cfg)
    cfg.train.epochs = 1
    cfg.missing.train_scenario = "fundus_missing"  # rate 1.0: no training eye keeps a fundus
    cfg.train.selection_scenario = "oct_missing"
    cfg.model.name = "late_fusion_zero"
    train(tiny_data.store, tiny_data.masks, tmp_path, cfg)
    assert [(s, sc) for s, sc, *_ in seen] == [("train", "fundus_missing"), ("val", "oct_missing")]
    # the masks decide: no training eye keeps both modalities; only an eye whose source lacks the
    # OCT keeps its fundus (never both missing). Likewise on validation with the roles swapped.
    from rima_core.core.data import open_store

    man = open_store(tiny_data.store).manifest
    tr, va = man[man["split"] == "train"], man[man["split"] == "val"]
    assert seen[0][2:] == ((~tr["has_oct"]).sum(), tr["has_oct"].sum(), 0)
    assert seen[1][2:] == (va["has_fundus"].sum(), (~va["has_fundus"]).sum(), 0)


def test_early_stopping_when_validation_does_not_improve(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path
) -> None:
    # lr 0 and a model without running buffers: validation is identical every epoch
    tiny_cfg.model.name = "late_fusion_zero"
    tiny_cfg.train.lr = 0.0
    tiny_cfg.train.epochs = 6
    tiny_cfg.train.patience = 2
    summary = train(tiny_data.store, tiny_data.masks, tmp_path, tiny_cfg)
    assert summary["stopped_early"] is True
    assert summary["epochs_run"] == 3
    assert summary["best_epoch"] == 1


def test_bad_requests_fail_before_training(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path
) -> None:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.selection_metric = "qwkk"
    with pytest.raises(EngineError, match="qwkk"):
        train(tiny_data.store, tiny_data.masks, tmp_path, cfg)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.missing.train_scenario = "no_such_scenario"
    with pytest.raises(EngineError, match="no_such_scenario"):
        train(tiny_data.store, tiny_data.masks, tmp_path, cfg)
    assert not (tmp_path / "model.pt").exists()


def test_lr_schedule_warmup_then_cosine() -> None:
    assert lr_factor(0, 4, 20) == pytest.approx(0.25)
    assert lr_factor(3, 4, 20) == pytest.approx(1.0)
    assert lr_factor(4, 4, 20) == pytest.approx(1.0)
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(19, 4, 20) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 16)))
    assert lr_factor(0, 0, 10) == pytest.approx(1.0)


def test_epoch_seeds_differ_and_repeat() -> None:
    seeds = [epoch_seed(0, e) for e in range(1, 6)]
    assert len(set(seeds)) == 5
    assert seeds == [epoch_seed(0, e) for e in range(1, 6)]
    assert epoch_seed(1, 1) != epoch_seed(0, 1)


def test_tracker_receives_every_epoch(tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path):
    from rima_core.core.data.masks import MAIN_SCENARIOS

    logged: list[tuple[int | None, dict[str, float]]] = []

    class Sink:
        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            logged.append((step, metrics))

    tiny_cfg.train.epochs = 2
    tiny_cfg.model.name = "late_fusion_zero"
    train(tiny_data.store, tiny_data.masks, tmp_path, tiny_cfg, tracker=Sink())
    assert [s for s, _ in logged] == [1, 2]
    for _, metrics in logged:
        # the curves worth watching; the rest (timings, other metrics) stays in the files
        assert set(metrics) == {
            "train/loss",
            "train/ce",
            "train/aux",
            "val/mean/qwk",
            *(f"val/{s}/{m}" for s in MAIN_SCENARIOS for m in ("qwk", "ece")),
        }
    assert os.path.exists(tmp_path / "model.pt")


def test_resume_from_a_corrupt_checkpoint_is_a_clear_error(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path
) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(EngineError, match="unreadable checkpoint"):
        train(tiny_data.store, tiny_data.masks, tmp_path, tiny_cfg, resume=True)


def test_resume_without_checkpoint_starts_fresh(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path
) -> None:
    tiny_cfg.train.epochs = 1
    tiny_cfg.model.name = "late_fusion_zero"
    summary = train(tiny_data.store, tiny_data.masks, tmp_path, tiny_cfg, resume=True)
    assert summary["epochs_run"] == 1
    # resuming a finished run trains nothing more and gives the same model
    before = _weights(tmp_path / "model.pt")
    again = train(tiny_data.store, tiny_data.masks, tmp_path, tiny_cfg, resume=True)
    assert again["epochs_run"] == 1 and again["best_epoch"] == summary["best_epoch"]
    after = _weights(tmp_path / "model.pt")
    assert all(torch.equal(before[k], after[k]) for k in before)


# --- distillation: teacher first, then students ----------------------------------------------


def _distillation_cfg(tiny_data: TinyData) -> Config:
    cfg = copy.deepcopy(tiny_data.cfg)
    cfg.model.name = "distillation"
    return cfg


@pytest.fixture(scope="module")
def distilled(tiny_data: TinyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distilled")
    train(tiny_data.store, tiny_data.masks, out, _distillation_cfg(tiny_data))
    return out


def test_distillation_trains_the_teacher_first_then_freezes_it(
    distilled: Path, tiny_data: TinyData
) -> None:
    from rima_core.core.models import load_model

    summary = json.loads((distilled / "train_summary.json").read_text())
    teacher = summary["teacher"]
    assert teacher["epochs_run"] == 2 and teacher["best_epoch"] in (1, 2)
    # the teacher learns from (and is selected on) the eyes with both modalities only
    masks = pd.read_parquet(tiny_data.masks)
    from rima_core.core.data.dataset import EyeDataset

    ds = EyeDataset(tiny_data.store, masks, "train", "complete")
    assert teacher["n_train"] == int((ds.has_fundus & ds.has_oct).sum()) < summary["n_train"]
    hist = pd.read_csv(distilled / "teacher" / "history.csv")
    assert list(hist["epoch"]) == [1, 2] and "val/complete/qwk" in hist
    assert "val/mean/qwk" not in hist  # one validation scenario: its numbers are the selection's
    # stage 2 never moved the teacher: the saved model holds the teacher's selected epoch
    ckpt = torch.load(distilled / "teacher" / "checkpoint.pt", weights_only=True)
    best = ckpt["best"]["state_dict"]
    saved = _weights(distilled / "model.pt")
    for key, value in best.items():
        assert torch.equal(saved[f"teacher.{key}"], value), key
    # while the students did train, each with its own encoder
    student = torch.load(distilled / "checkpoint.pt", weights_only=True)["model"]
    assert not torch.equal(
        student["student_f.encoder.proj.weight"], saved["teacher.fundus_encoder.proj.weight"]
    )
    model, _ = load_model(distilled / "model.pt")
    assert model.student_f.encoder is not model.teacher.fundus_encoder
    assert {"train/distill_kl", "train/student_ce"} <= set(pd.read_csv(distilled / "history.csv"))


class _StopTeacher(RuntimeError):
    pass


def test_distillation_resumes_exactly_in_either_stage(
    distilled: Path, tiny_data: TinyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rima_core.runs.epochs import EpochRunner

    cfg = _distillation_cfg(tiny_data)
    # killed in stage 2, after the students' first epoch
    out = tmp_path / "students"
    with pytest.raises(_Stop):
        train(tiny_data.store, tiny_data.masks, out, cfg, epoch_callback=_stop_after(1))
    train(tiny_data.store, tiny_data.masks, out, cfg, resume=True)
    pd.testing.assert_frame_equal(_history(distilled), _history(out))
    _assert_same_weights(distilled / "model.pt", out / "model.pt")

    # killed in stage 1, after the teacher's first epoch
    original = EpochRunner.epoch

    def epoch(self, n, progress, fingerprint):
        metrics = original(self, n, progress, fingerprint)
        if self.model_file is None and n == 1:
            raise _StopTeacher
        return metrics

    out = tmp_path / "teacher"
    monkeypatch.setattr(EpochRunner, "epoch", epoch)
    with pytest.raises(_StopTeacher):
        train(tiny_data.store, tiny_data.masks, out, cfg)
    assert not (out / "history.csv").exists()
    monkeypatch.setattr(EpochRunner, "epoch", original)
    train(tiny_data.store, tiny_data.masks, out, cfg, resume=True)
    pd.testing.assert_frame_equal(_history(distilled / "teacher"), _history(out / "teacher"))
    pd.testing.assert_frame_equal(_history(distilled), _history(out))
    _assert_same_weights(distilled / "model.pt", out / "model.pt")
