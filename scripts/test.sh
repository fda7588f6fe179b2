#!/usr/bin/env bash
# Install the project with its test extras into .venv (created if absent) and run lint + tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
EXTRAS=test source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
ruff check .
# the documentation site (mkdocs.yml), strict: a broken link or anchor or a page missing from nav
# fails. Built into a temporary folder, so nothing lands in the tree.
SITE_DIR="$(mktemp -d)"
trap 'rm -rf "$SITE_DIR"' EXIT
mkdocs build --strict --quiet --site-dir "$SITE_DIR"
python -m pytest -q "$@"
