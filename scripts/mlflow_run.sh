#!/usr/bin/env bash
# `mlflow run` of this project into its experiment (mlflow.experiment of the effective params:
# params.yaml, -P params=, -P profile=, -P set=) with a run name saying what ran
# (<entry point>[-<profile>]-seed<seed>, e.g. train-tiny-seed0). A plain `mlflow run .` lands in
# MLflow's Default experiment: the experiment must be chosen before `mlflow run` creates its run.
#
#   scripts/mlflow_run.sh -e train --env-manager local -P profile=configs/tiny.yaml
#
# Every argument is passed on to `mlflow run <repo>`; --experiment-name/--experiment-id,
# MLFLOW_EXPERIMENT_NAME/_ID or --run-name given by you are kept. See rima_core/tracking/mlproject.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RIMA_VENV:-$ROOT/.venv}"
if [[ -x "$VENV/bin/python" ]]; then
  export PATH="$VENV/bin:$PATH"  # the entry points' `rima` commands (--env-manager local)
fi
PYTHON="$(command -v python3 || command -v python)"
exec "$PYTHON" -m rima_core.tracking.mlproject "$@"
