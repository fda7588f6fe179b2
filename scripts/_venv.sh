# Sourced by the scripts: create or reuse the project's virtualenv and install the package.
# RIMA_VENV overrides the location; EXTRAS selects optional dependency groups (e.g. "test").
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RIMA_VENV:-$ROOT/.venv}"
PY="$(command -v python3.11 || command -v python3)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
fi
spec="$ROOT"
[ -n "${EXTRAS:-}" ] && spec="$ROOT[$EXTRAS]"
# torch is pinned (==2.13.0) in pyproject.toml: an unpinned torch would pull a multi-GB CUDA build.
log="$(mktemp)"
if ! "$VENV/bin/python" -m pip install -q -e "$spec" >"$log" 2>&1; then
  grep -v '^WARNING: Location' "$log" >&2; rm -f "$log"; exit 1
fi
rm -f "$log"
export PATH="$VENV/bin:$PATH"
export MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1
