#!/usr/bin/env bash
# Download the wheels benchmarks/gpu_check.py needs on the GPU machine (CPython 3.12, manylinux
# x86_64, no registry there) into wheels/gpu/ (ignored by git; carried by the device tool).
# Usage: bash scripts/gpu_wheels.sh [DEST]      (needs pip and PyPI; ~2 MB)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DEST="${1:-$ROOT/wheels/gpu}"
PY="${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
mkdir -p "$DEST"
"$PY" -m pip download --only-binary=:all: --no-deps --platform manylinux2014_x86_64 \
  --python-version 3.12 --implementation cp -d "$DEST" -r "$ROOT/benchmarks/gpu_wheels.txt"
# everything that travels must fit in 64 MiB; the wheels should be a small part of it
du -sh "$DEST"
if [ "$(du -sk "$DEST" | cut -f1)" -gt 32768 ]; then
  echo "error: $DEST is over 32 MiB: too much to carry to the GPU machine" >&2
  exit 1
fi
