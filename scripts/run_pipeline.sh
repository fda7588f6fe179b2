#!/usr/bin/env bash
# The README's main command: the whole pipeline with `dvc repro` on params.yaml (embedded
# defaults: synthetic data, SQLite-backed MLflow and Optuna, CPU).
#
#   bash scripts/run_pipeline.sh                               # params.yaml as it is
#   bash scripts/run_pipeline.sh --profile configs/paper.yaml  # a profile, as a DVC experiment
#   bash scripts/run_pipeline.sh --force                       # other arguments go to dvc repro
#
# 1. create/reuse .venv and install the project (scripts/_venv.sh; puts .venv/bin on PATH, which
#    is where the stages' `rima` commands come from);
# 2. materialise the raw data that data.dvc tracks, if absent: from the local DVC cache, else from
#    the DVC remote when one is configured, else by regenerating the synthetic phantom (its output
#    is byte-identical for a given seed and generator version);
# 3. refuse to go on unless the data is what data.dvc records (then `dvc status` is clean);
# 4. `dvc repro` (or `dvc exp run -S ...` with the profile's keys when --profile is given);
# 5. when the stages ran with the committed params (no profile, and every stage's params in
#    dvc.lock as in HEAD's), `rima check-repro`: do the results reproduce the committed ones
#    (exactly, or within the committed bootstrap intervals on another processor)? Its verdict is
#    printed, not the exit status: this script exits non-zero only when the pipeline itself
#    failed, so CI can tell a broken pipeline from results that moved. Run `rima check-repro`
#    (exit 0 reproduced, 1 not reproduced, 2 cannot compare) where the verdict should gate.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"

profile=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="${2:?--profile needs a file}"; shift 2 ;;
    --profile=*) profile="${1#--profile=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done

raw=data/raw  # the path data.dvc tracks
if [ ! -d "$raw" ]; then
  if dvc checkout -q data.dvc >/dev/null 2>&1 && [ -d "$raw" ]; then
    echo "run_pipeline: restored $raw from the local DVC cache"
  elif [ -n "$(dvc remote list)" ]; then
    rm -rf "$raw"
    echo "run_pipeline: pulling $raw from the DVC remote"
    dvc pull data.dvc
  else
    rm -rf "$raw"
    echo "run_pipeline: no DVC remote; regenerating the synthetic data into $raw"
    rima data synth --out "$raw" >/dev/null
  fi
fi

# `dvc status` cannot judge data that is not in the cache yet (a fresh clone's cache is empty and
# it reports "not in cache" whatever the data), so hash the data into the cache with
# `dvc commit` and compare the hash that leaves in data.dvc with the recorded one.
recorded_md5() {
  python -c 'import yaml; print(yaml.safe_load(open("data.dvc"))["outs"][0].get("md5"))'
}
expected="$(recorded_md5)"
backup="$(mktemp)"
cp data.dvc "$backup"
dvc commit -q -f data.dvc
found="$(recorded_md5)"
if [ "$found" != "$expected" ]; then
  cp "$backup" data.dvc && rm -f "$backup"  # leave the recorded version in place
  cat >&2 <<EOF
run_pipeline: $raw does not match data.dvc (recorded $expected, found $found).
  - new data on purpose?  record it: dvc commit data.dvc (then git commit data.dvc; dvc push)
  - regenerated synthetic data differs (the generator or synth.* params changed)?  the same
    dvc commit data.dvc records the new version
  - otherwise remove $raw and run this again to restore the recorded version
EOF
  exit 1
fi
rm -f "$backup"
status="$(dvc status data.dvc --json)"
if [ "$status" != "{}" ]; then
  echo "run_pipeline: dvc status data.dvc is not clean: $status" >&2
  exit 1
fi

start=$SECONDS
if [ -n "$profile" ]; then
  sets=()
  while IFS= read -r kv; do sets+=(-S "$kv"); done < <(rima params overrides "$profile")
  echo "run_pipeline: dvc exp run with the $((${#sets[@]} / 2)) keys of $profile (dvc exp show)"
  dvc exp run "${sets[@]}" "${args[@]}"
else
  dvc repro "${args[@]}"
fi
echo "run_pipeline: done in $((SECONDS - start)) s; results: dvc metrics show, dvc plots show"

# the params every stage ran with (dvc.lock) as committed? Otherwise there is nothing to reproduce.
params_as_committed() {
  python - <<'EOF'
import subprocess, sys, yaml
head = subprocess.run(["git", "show", "HEAD:dvc.lock"], capture_output=True)
if head.returncode != 0:
    sys.exit(1)
def params(lock):
    return {name: s.get("params") for name, s in ((lock or {}).get("stages") or {}).items()}
sys.exit(0 if params(yaml.safe_load(head.stdout)) == params(yaml.safe_load(open("dvc.lock"))) else 1)
EOF
}
if [ -z "$profile" ] && params_as_committed; then
  verdict=0
  rima check-repro || verdict=$?
  if [ "$verdict" -eq 1 ]; then
    echo "run_pipeline: the pipeline ran; its results do not reproduce HEAD's (above)" >&2
  elif [ "$verdict" -ne 0 ]; then
    echo "run_pipeline: the pipeline ran; check-repro could not compare (above)" >&2
  fi
else
  echo "run_pipeline: params differ from HEAD's dvc.lock: no reproduction check"
fi
