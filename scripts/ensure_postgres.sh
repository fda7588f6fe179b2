#!/usr/bin/env bash
# Make sure a PostgreSQL server binary is installed for tests/e2e/test_postgres.py (the tests start
# and stop their own server on 127.0.0.1 in a temporary data directory; nothing is left running).
# As root on Debian/Ubuntu it installs the `postgresql` package when initdb is missing; otherwise
# it only reports. In CI (CI=true) the PostgreSQL tests fail when no server can be started.
set -euo pipefail
find_initdb() {
  command -v initdb 2>/dev/null || ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | tail -n 1
}
if [ -n "$(find_initdb)" ]; then
  echo "PostgreSQL: $("$(find_initdb)" --version)"
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "PostgreSQL: installing the postgresql package"
  apt-get install -y -q postgresql >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q postgresql >/dev/null; }
  # the package starts a cluster of its own on 5432; the tests use their own, so stop it
  (command -v pg_ctlcluster >/dev/null && service postgresql stop >/dev/null 2>&1) || true
  echo "PostgreSQL: $("$(find_initdb)" --version)"
else
  echo "PostgreSQL not installed (apt-get install -y postgresql): tests/e2e/test_postgres.py will" \
    "skip, or fail under CI=true" >&2
fi
