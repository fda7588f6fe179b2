"""Optuna tuning on the tiny real-data fixture: pruning, best params, resume, MLflow nesting."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from rima_core.config import Config, ConfigError
from rima_core.pipeline import steps
from rima_core.runs.tune import (
    LINEAR,
    TUNED,
    TuneError,
    search_space,
    study_fingerprint,
    trial_config,
    tune,
)
from tests.conftest import TinyData


def _cfg(tiny_cfg: Config, tmp_path: Path, **tune_values: object) -> Config:
    cfg = copy.deepcopy(tiny_cfg)
    cfg.tune.storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for key, value in tune_values.items():
        setattr(cfg.tune, key, value)
    return cfg


class ScriptedTraining:
    """Stands in for :func:`rima_core.runs.train.train` with a known learning curve, so the search
    and pruning logic is tested exactly and in milliseconds: validation qwk rises with the epoch and
    with the trial's lr, so low-lr trials trail the median from their first epoch."""

    def __init__(self, fail_first: int = 0) -> None:
        self.calls: list[Config] = []
        self.fail_first = fail_first

    @staticmethod
    def curve(cfg: Config, epoch: int) -> float:
        return cfg.train.lr * 100 * epoch / cfg.train.epochs

    def __call__(self, store, masks, out_dir, cfg, epoch_callback=None, **kw):  # type: ignore[no-untyped-def]
        self.calls.append(cfg)
        if len(self.calls) <= self.fail_first:
            raise FloatingPointError("non-finite loss")
        for epoch in range(1, cfg.train.epochs + 1):
            epoch_callback(epoch, {"qwk": self.curve(cfg, epoch)})
        best = self.curve(cfg, cfg.train.epochs)
        return {"best_val_metrics": {"qwk": best}, "best_epoch": cfg.train.epochs}


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> ScriptedTraining:
    import rima_core.runs.train

    fake = ScriptedTraining()
    monkeypatch.setattr(rima_core.runs.train, "train", fake)
    return fake


def test_tuning_prunes_and_writes_best_params(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path, scripted: ScriptedTraining
) -> None:
    cfg = _cfg(tiny_cfg, tmp_path, n_trials=8, epochs=3, pruner_startup_trials=1)
    out = tmp_path / "tune"
    summary = tune(tiny_data.store, tiny_data.masks, out, cfg, track=False)

    assert summary["n_trials"] == 8 and summary["n_failed"] == 0
    assert summary["n_pruned"] >= 1, summary
    trials = pd.read_csv(out / "trials.csv")
    pruned = trials[trials["state"] == "PRUNED"]
    complete = trials[trials["state"] == "COMPLETE"]
    assert len(pruned) == summary["n_pruned"] and (pruned["epochs_run"] < 3).all()
    assert (complete["epochs_run"] == 3).all()
    # every trial trained with its own sampled values, the short budget and tune's target
    assert [c.train.lr for c in scripted.calls] == pytest.approx(list(trials["param:train.lr"]))
    assert {(c.train.epochs, c.train.selection_scenario) for c in scripted.calls} == {
        (3, cfg.tune.scenario)
    }
    # the best trial is the completed one with the highest lr (the scripted curve)
    best = json.loads((out / "best_params.json").read_text())
    assert set(best) == set(TUNED)
    assert best["train.lr"] == pytest.approx(complete["param:train.lr"].max())
    assert summary["best_value"] == pytest.approx(best["train.lr"] * 100)
    for name, (low, high) in search_space(cfg.tune).items():
        assert (trials[f"param:{name}"] >= low).all() and (trials[f"param:{name}"] <= high).all()
    assert json.loads((out / "study.json").read_text()) == summary
    for name in ("optimization_history.png", "intermediate_values.png", "param_importances.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_resume_continues_the_study_up_to_the_budget(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path, scripted: ScriptedTraining
) -> None:
    cfg = _cfg(tiny_cfg, tmp_path, epochs=1)
    out = tmp_path / "tune"
    first = tune(tiny_data.store, tiny_data.masks, out, cfg, n_trials=2, track=False)
    assert first["n_trials"] == 2
    # a bigger budget continues the same study (same name) with the finished trials counted
    second = tune(tiny_data.store, tiny_data.masks, out, cfg, n_trials=3, track=False)
    assert second["study_name"] == first["study_name"]
    assert second["n_trials"] == 3
    # the budget is spent: a rerun adds nothing and rewrites the same result
    third = tune(tiny_data.store, tiny_data.masks, out, cfg, n_trials=3, track=False)
    assert third == second
    trials = pd.read_csv(out / "trials.csv")
    # the resumed sampler does not replay the first proposals
    assert trials["param:train.lr"].nunique() == 3


def test_a_smaller_budget_reports_what_a_fresh_study_of_that_budget_runs(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path, scripted: ScriptedTraining
) -> None:
    """An earlier run with a bigger budget leaves more trials in the study: a run asked for
    fewer reports only its first n_trials, exactly what a fresh study with that budget gives."""
    cfg = _cfg(tiny_cfg, tmp_path, epochs=1)
    fresh = tune(tiny_data.store, tiny_data.masks, tmp_path / "a", cfg, n_trials=2, track=False)
    fresh_trials = pd.read_csv(tmp_path / "a" / "trials.csv")
    (tmp_path / "other").mkdir()
    other = _cfg(tiny_cfg, tmp_path / "other", epochs=1)  # its own storage: a separate study
    tune(tiny_data.store, tiny_data.masks, tmp_path / "b", other, n_trials=5, track=False)
    calls = len(scripted.calls)
    again = tune(tiny_data.store, tiny_data.masks, tmp_path / "c", other, n_trials=2, track=False)
    assert len(scripted.calls) == calls  # nothing trained: the study already holds the trials
    assert again["budget_trials"] == 2 and again["n_trials"] == 2
    assert again["best_params"] == fresh["best_params"]
    assert again["best_value"] == fresh["best_value"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "c" / "trials.csv"), fresh_trials)


def test_study_name_follows_what_a_trial_measures(tiny_cfg: Config, tiny_data: TinyData) -> None:
    base = study_fingerprint(tiny_cfg, "hash", tiny_data.masks)
    budget = copy.deepcopy(tiny_cfg)
    budget.tune.n_trials, budget.tune.workers, budget.tune.timeout_s = 99, 4, 60.0
    budget.ot.gw_epsilon = 0.04  # tuned: its params.yaml value is never read by a trial
    assert study_fingerprint(budget, "hash", tiny_data.masks) == base
    changed = copy.deepcopy(tiny_cfg)
    changed.tune.epochs += 1
    assert study_fingerprint(changed, "hash", tiny_data.masks) != base
    model = copy.deepcopy(tiny_cfg)
    model.model.hidden_dim += 1
    assert study_fingerprint(model, "hash", tiny_data.masks) != base
    assert study_fingerprint(tiny_cfg, "other-data", tiny_data.masks) != base


def test_trial_config_uses_the_tuning_target(tiny_cfg: Config) -> None:
    tiny_cfg.tune.scenario, tiny_cfg.tune.metric, tiny_cfg.tune.epochs = "oct_missing", "auc", 2
    params = {
        "ot.gw_epsilon": 0.01,
        "ot.feature_epsilon": 0.02,
        "ot.loss_weight": 1.5,
        "train.lr": 1e-3,
    }
    cfg = trial_config(tiny_cfg, params)
    assert (cfg.ot.gw_epsilon, cfg.ot.feature_epsilon, cfg.ot.loss_weight) == (0.01, 0.02, 1.5)
    assert cfg.train.lr == 1e-3
    assert (cfg.train.epochs, cfg.train.selection_scenario, cfg.train.selection_metric) == (
        2,
        "oct_missing",
        "auc",
    )
    assert tiny_cfg.ot.gw_epsilon != 0.01  # the original is untouched


@pytest.mark.parametrize("bounds", [[0.0, 0.1], [0.1, 0.01], [0.1], [0.01, math.inf]])
def test_bad_search_range_is_a_clear_error(tiny_cfg: Config, bounds: list[float]) -> None:
    tiny_cfg.tune.loss_weight_range = bounds
    with pytest.raises(ConfigError, match=r"tune\.loss_weight_range"):
        search_space(tiny_cfg.tune)


def test_unknown_scenario_fails_before_any_trial(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path
) -> None:
    cfg = _cfg(tiny_cfg, tmp_path, scenario="no_such_scenario")
    with pytest.raises(ValueError, match="no_such_scenario"):
        tune(tiny_data.store, tiny_data.masks, tmp_path / "tune", cfg, track=False)
    assert not (tmp_path / "tune").exists()


def test_zero_budget_means_no_tuning(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path, scripted: ScriptedTraining
) -> None:
    """tune.n_trials = 0 writes an empty best_params.json, even when the study already holds
    trials: train then uses the params.yaml values (how to train with hand-set values)."""
    cfg = _cfg(tiny_cfg, tmp_path)
    out = tmp_path / "tune"
    tune(tiny_data.store, tiny_data.masks, out, cfg, n_trials=2, track=False)
    assert json.loads((out / "best_params.json").read_text()) != {}
    cfg.tune.n_trials = 0
    summary = tune(tiny_data.store, tiny_data.masks, out, cfg)
    assert summary["n_trials"] == 0 and summary["best_params"] == {}
    assert json.loads((out / "best_params.json").read_text()) == {}
    assert list(pd.read_csv(out / "trials.csv").columns)[:2] == ["number", "state"]
    assert steps.apply_best_params(cfg, out / "best_params.json") == cfg
    assert len(scripted.calls) == 2


def test_diverging_trial_is_failed_and_the_search_goes_on(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rima_core.runs.train

    fake = ScriptedTraining(fail_first=1)
    monkeypatch.setattr(rima_core.runs.train, "train", fake)
    cfg = _cfg(tiny_cfg, tmp_path, n_trials=3, pruner_startup_trials=10)
    summary = tune(tiny_data.store, tiny_data.masks, tmp_path / "tune", cfg, track=False)
    assert summary["n_failed"] == 1
    assert summary["n_complete"] == 3  # failed trials do not count towards the budget
    assert len(fake.calls) == 4


def test_every_trial_failing_is_an_error(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import rima_core.runs.train

    monkeypatch.setattr(rima_core.runs.train, "train", ScriptedTraining(fail_first=100))
    cfg = _cfg(tiny_cfg, tmp_path, n_trials=2)
    with pytest.raises(TuneError, match="no trial completed"):
        tune(tiny_data.store, tiny_data.masks, tmp_path / "tune", cfg, track=False)


def test_real_trials_prune_and_nest_in_mlflow(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path
) -> None:
    """A handful of real training trials: some are pruned, the best params are written and within
    range, and every trial is an MLflow run nested under the study's run with its own values."""
    cfg = _cfg(tiny_cfg, tmp_path, n_trials=5, epochs=2, pruner_startup_trials=1)
    out = tmp_path / "tune"
    summary = tune(tiny_data.store, tiny_data.masks, out, cfg)

    assert summary["n_trials"] == 5
    assert summary["n_pruned"] >= 1, summary
    assert summary["n_complete"] >= 1
    best = json.loads((out / "best_params.json").read_text())
    assert set(best) == set(TUNED)
    for name, (low, high) in search_space(cfg.tune).items():
        assert low <= best[name] <= high
    assert json.loads((out / "study.json").read_text()) == summary
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 5
    pruned = trials[trials["state"] == "PRUNED"]
    assert (pruned["epochs_run"] < cfg.tune.epochs).all()
    best_row = trials[trials["number"] == summary["best_trial"]].iloc[0]
    assert best_row["value"] == pytest.approx(summary["best_value"])
    for name in ("optimization_history.png", "intermediate_values.png"):
        assert (out / "plots" / name).stat().st_size > 1000

    import mlflow

    client = mlflow.MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("step") == "tune"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 5
    by_trial = {int(r.data.tags["optuna_trial"]): r for r in children}
    for _, row in trials.iterrows():
        run = by_trial[int(row["number"])]
        assert float(run.data.params["train.lr"]) == pytest.approx(row["param:train.lr"])
        assert run.data.tags["optuna_state"] == row["state"]
        assert "val/mean/qwk" in run.data.metrics  # per-epoch metrics of the trial's training
        assert "train/loss" in run.data.metrics
        if row["state"] == "COMPLETE":
            assert run.data.metrics["tune/objective"] == pytest.approx(row["value"])
    assert parent.data.metrics["tune/n_pruned"] == summary["n_pruned"]
    assert parent.data.metrics["tune/best_value"] == pytest.approx(summary["best_value"])


def test_workers_share_one_study(tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path) -> None:
    cfg = _cfg(tiny_cfg, tmp_path, n_trials=4, epochs=1)
    summary = tune(tiny_data.store, tiny_data.masks, tmp_path / "tune", cfg, workers=2, track=False)
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv")
    # both processes ran trials; the shared budget may be overshot by the trials in flight
    assert set(trials["worker"]) == {0, 1}
    assert 4 <= summary["n_complete"] + summary["n_pruned"] <= 5


def test_cli_tune(tiny_data: TinyData, tmp_path: Path) -> None:
    from rima_core.pipeline.cli import main

    out = tmp_path / "tune"
    argv = ["tune", "--params", "/nonexistent.yaml"]
    assert main(argv) == 2  # a missing params file is a clear error, not a traceback
    argv = [
        "tune",
        "--store",
        str(tiny_data.store),
        "--masks",
        str(tiny_data.masks),
        "--out",
        str(out),
        "--storage",
        f"sqlite:///{tmp_path / 'o.db'}",
        "--n-trials",
        "0",
        "--no-mlflow",
    ]
    assert main(argv) == 0
    assert json.loads((out / "best_params.json").read_text()) == {}


def test_study_is_named_and_reports_fit_dvc(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path, scripted: ScriptedTraining
) -> None:
    """The dashboard names the objective and shows what the study measured; the tracked reports
    hold no wall-clock times (they go to timings.csv) and the headline numbers only; Optuna's
    experimental-feature warnings stay out of the log."""
    import warnings

    import optuna

    from rima_core.runs.tune import make_storage, objective_name
    from rima_core.tracking.headline import count_numbers

    cfg = _cfg(tiny_cfg, tmp_path, n_trials=3, epochs=2, pruner_startup_trials=1)
    out = tmp_path / "tune"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = tune(tiny_data.store, tiny_data.masks, out, cfg, track=False)
    assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
    study = optuna.load_study(
        study_name=summary["study_name"], storage=make_storage(cfg.tune.storage)
    )
    assert study.metric_names == [objective_name(cfg.tune)] == [f"val/{cfg.tune.scenario}/qwk"]
    assert study.user_attrs["scenario"] == cfg.tune.scenario
    assert study.user_attrs["metric"] == "qwk"
    assert len(study.user_attrs["data_hash"]) >= 16
    trials = pd.read_csv(out / "trials.csv")
    assert not [c for c in trials.columns if "duration" in c or "seconds" in c]
    timings = pd.read_csv(out / "timings.csv")
    assert timings["number"].tolist() == trials["number"].tolist()
    assert (timings["duration_s"] >= 0).all()
    headline = json.loads((out / "headline.json").read_text())
    assert headline["tune/best_value"] == pytest.approx(summary["best_value"])
    assert headline["tune/n_complete"] == summary["n_complete"]
    assert count_numbers(headline) == 2  # the tuned values stay in best_params.json


def test_reports_are_identical_for_identical_inputs(
    tiny_cfg: Config, tiny_data: TinyData, tmp_path: Path, scripted: ScriptedTraining
) -> None:
    """Two studies over the same inputs (fresh storages: what a fresh clone does) write
    byte-identical DVC-tracked reports, so a rerun leaves dvc.lock and git unchanged."""
    outs = []
    for run in ("a", "b"):
        cfg = _cfg(tiny_cfg, tmp_path / run, n_trials=3, epochs=2, pruner_startup_trials=1)
        outs.append(tmp_path / run / "tune")
        tune(tiny_data.store, tiny_data.masks, outs[-1], cfg, track=False)
    for name in ("trials.csv", "headline.json", "best_params.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_one_log_line_per_trial_and_the_trials_training_quiet(
    tiny_cfg: Config,
    tiny_data: TinyData,
    tmp_path: Path,
    scripted: ScriptedTraining,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without -v a study logs one project line per trial (value or pruning, with its values),
    none in Optuna's own format, and a trial's training logs only warnings; after the study the
    training's loggers are as they were."""
    import logging

    import rima_core.runs.train

    train_log = logging.getLogger("rima_core.runs.train")

    def chatty(*args, **kw):  # type: ignore[no-untyped-def]
        train_log.info("epoch line")
        train_log.warning("a real warning")
        return scripted(*args, **kw)

    rima_core.runs.train.train = chatty  # the fixture's monkeypatch restores the original
    cfg = _cfg(tiny_cfg, tmp_path, n_trials=4, epochs=3, pruner_startup_trials=1)
    with caplog.at_level(logging.INFO):
        summary = tune(tiny_data.store, tiny_data.masks, tmp_path / "tune", cfg, track=False)
    messages = [r.getMessage() for r in caplog.records]
    trial_lines = [m for m in messages if m.startswith("trial ")]
    assert len(trial_lines) == summary["n_trials"] == 4
    assert all("train.lr" in m for m in trial_lines)
    assert sum("pruned" in m for m in trial_lines) == summary["n_pruned"]
    assert "epoch line" not in messages
    assert messages.count("a real warning") == 4
    assert not [r for r in caplog.records if r.name.startswith("optuna")]
    assert train_log.level == logging.NOTSET


def test_pairing_mix_is_searched_on_a_linear_range_or_not_at_all(tiny_cfg: Config) -> None:
    """ot.pairing_mix is a share (0 itself is the paper's setting): linear, within [0, 1], and
    a null range leaves it out of the search (and in the study's fingerprint as set)."""
    tc = copy.deepcopy(tiny_cfg.tune)
    assert search_space(tc)["ot.pairing_mix"] == (0.0, 1.0)
    tc.pairing_mix_range = None
    assert "ot.pairing_mix" not in search_space(tc)
    assert set(search_space(tc)) == set(TUNED) - LINEAR
    for bad in ([0.5, 1.5], [0.6, 0.2], [-0.1, 0.5]):
        tc.pairing_mix_range = bad
        with pytest.raises(ConfigError, match=r"tune\.pairing_mix_range"):
            search_space(tc)
