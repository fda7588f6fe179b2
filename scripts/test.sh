#!/usr/bin/env bash
# Install the project with its test extras into .venv (created if absent) and run lint + tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
EXTRAS=test source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
ruff check .
python -m pytest -q "$@"
