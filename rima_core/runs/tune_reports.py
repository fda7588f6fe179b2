"""The reports of a tuning study: ``best_params.json``, ``study.json``, ``headline.json``,
``trials.csv``, ``timings.csv`` and ``plots/``.

Apart from :mod:`rima_core.runs.tune` (which re-exports these names) because a report only reads a
finished study: what it writes must be identical for identical inputs (``trials.csv`` is a
committed DVC plot), whoever ran the trials and however long they took.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rima_core.atomic import atomic_dir
from rima_core.config import Config, TuneConfig
from rima_core.runs.tune_study import (
    TuneError,
    ignore_experimental_warnings,
    safe_url,
    study_direction,
)
from rima_core.tracking.headline import HEADLINE_FILE, tune_headline, write_headline

if TYPE_CHECKING:  # pragma: no cover
    import optuna

# the tune step's logger: these lines are the step's, as before this module was split from it
log = logging.getLogger("rima_core.runs.tune")


def write_reports(
    study: optuna.Study | None, out_dir: Path, cfg: Config, trim_to_budget: bool = False
) -> dict[str, Any]:
    """``best_params.json``, ``study.json``, ``trials.csv`` and ``plots/`` into ``out_dir``.

    ``study`` is None when tuning is off (``tune.n_trials`` = 0): the reports are then empty, and
    so is ``best_params.json``, whatever an earlier study holds. ``trim_to_budget``: report the
    study as a run of budget ``tune.n_trials`` sees it (:func:`within_budget`); tune() asks for
    it when one sequential worker ran a study of its own (not a study shared by parallel workers
    or Kubeflow tasks, whose overshoot past the budget is this run's and is reported).
    """
    from optuna.trial import TrialState

    tc = cfg.tune
    if trim_to_budget:
        study = within_budget(study, tc.n_trials)
    trials = study.get_trials(deepcopy=False) if study is not None else []
    states = [t.state for t in trials]
    counts = {s: states.count(s) for s in TrialState}
    complete = counts[TrialState.COMPLETE]
    if study is not None and complete == 0:
        raise TuneError(
            f"study {study.study_name!r}: no trial completed ({counts[TrialState.PRUNED]} pruned, "
            f"{counts[TrialState.FAIL]} failed); raise tune.timeout_s or tune.n_trials, or check "
            "the failures in the log"
        )
    best = study.best_trial if study is not None else None
    best_params = dict(sorted(best.params.items())) if best else {}
    summary = {
        "study_name": study.study_name if study is not None else None,
        "storage": safe_url(tc.storage),
        "direction": study_direction(tc.metric),
        "metric": tc.metric,
        "scenario": tc.scenario,
        "epochs_per_trial": tc.epochs,
        "budget_trials": tc.n_trials,
        "n_trials": len(states),
        "n_complete": complete,
        "n_pruned": counts[TrialState.PRUNED],
        "n_failed": counts[TrialState.FAIL],
        "best_value": best.value if best else None,
        "best_trial": best.number if best else None,
        "best_params": best_params,
    }
    with atomic_dir(out_dir) as tmp:
        (tmp / "best_params.json").write_text(json.dumps(best_params, indent=2) + "\n")
        (tmp / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_headline(tmp / HEADLINE_FILE, tune_headline(summary))
        _trials_table(trials).to_csv(tmp / "trials.csv", index=False)
        # wall-clock durations apart: trials.csv is a DVC output and must not change on a rerun
        _durations_table(trials).to_csv(tmp / TIMINGS_FILE, index=False)
        plots = tmp / "plots"
        plots.mkdir()
        if study is not None:
            _plots(study, plots, tc)
    if best:
        log.info("best trial %d: %s %.4f with %s", best.number, tc.metric, best.value, best_params)
    return summary


def within_budget(study: optuna.Study | None, n_trials: int) -> optuna.Study | None:
    """The study as a run with budget ``n_trials`` sees it: its trials up to the ``n_trials``-th
    completed or pruned one (by number; the budget's count), in an in-memory copy, when the
    stored study holds more.

    The study is keyed by what a trial measures, not by the budget, so an interrupted run
    continues it; but an earlier run with a larger budget leaves more trials in it, and a run
    asked for fewer must not report those (DVC records `tune.n_trials` beside the result). With
    one worker the sampler is seeded and sequential, so these are exactly the trials a fresh
    study with this budget runs; with several workers (processes or Kubeflow tasks) the trials
    past the budget are this run's own overshoot, and :func:`write_reports` keeps them.
    """
    import optuna
    from optuna.trial import TrialState

    if study is None or n_trials <= 0:
        return study
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    counted = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if len(counted) <= n_trials:  # the budget counts these (failed trials do not)
        return study
    last = counted[n_trials - 1].number
    log.info(
        "study %s holds %d finished trials; reporting the first %d (tune.n_trials)",
        study.study_name,
        len(counted),
        n_trials,
    )
    view = optuna.create_study(study_name=study.study_name, directions=study.directions)
    view.add_trials([t for t in trials if t.number <= last and t.state.is_finished()])
    return view


TRIAL_COLUMNS = ["number", "state", "value", "epochs_run", "worker"]


TIMINGS_FILE = "timings.csv"  # per trial: number, duration_s (not a DVC output)


def _trials_table(trials: list[optuna.trial.FrozenTrial]) -> Any:
    import pandas as pd

    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "epochs_run": len(t.intermediate_values),
            "worker": t.user_attrs.get("worker"),
        }
        row.update({f"param:{k}": v for k, v in sorted(t.params.items())})
        rows.append(row)
    return pd.DataFrame(rows, columns=None if rows else TRIAL_COLUMNS)


def _durations_table(trials: list[optuna.trial.FrozenTrial]) -> Any:
    import pandas as pd

    rows = [
        {"number": t.number, "duration_s": t.duration.total_seconds() if t.duration else None}
        for t in trials
    ]
    return pd.DataFrame(rows, columns=["number", "duration_s"])


def _plots(study: optuna.Study, out: Path, tc: TuneConfig) -> None:
    """Optuna's matplotlib plots (plotly is not a dependency). Parameter importances need a few
    completed trials with varied values; when they cannot be computed the plot is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.importance import FanovaImportanceEvaluator
    from optuna.visualization import matplotlib as ovm

    ignore_experimental_warnings()  # the matplotlib backend is "experimental"

    def save(fname: str, draw: Any) -> None:
        try:
            ax = draw()
        except (ValueError, RuntimeError) as exc:
            log.warning("plot %s not drawn: %s", fname, exc)
            plt.close("all")
            return
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close("all")

    save("optimization_history.png", lambda: ovm.plot_optimization_history(study))
    save("intermediate_values.png", lambda: ovm.plot_intermediate_values(study))
    save(
        "param_importances.png",
        lambda: ovm.plot_param_importances(
            study, evaluator=FanovaImportanceEvaluator(seed=tc.seed)
        ),
    )
