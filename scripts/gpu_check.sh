#!/usr/bin/env bash
# On the GPU machine: install the travelling wheels (wheels/gpu/, from scripts/gpu_wheels.sh) into
# a temporary folder and run benchmarks/gpu_check.py with it on PYTHONPATH. Arguments go to the
# check (default --device cuda; results in $OUT, else benchmarks/results/gpu_check/).
# PYTHON overrides the interpreter (default python3, the one that has torch there).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
SITE="$(mktemp -d)"; trap 'rm -rf "$SITE"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  --find-links "$ROOT/wheels/gpu" -r "$ROOT/benchmarks/gpu_wheels.txt"
PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  "$PY" "$ROOT/benchmarks/gpu_check.py" "$@"
