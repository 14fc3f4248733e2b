#!/usr/bin/env bash
# Branch coverage of atb_llm (the server included) by the tests:
#   bash tests/coverage.sh                 # the fast loop (-m "not slow"), a few minutes
#   bash tests/coverage.sh -m ""           # every test, the slow ones too
# Processes the tests start (servers, tensor-parallel ranks, Ray replicas) are measured too.
# Prints the per-file table (files fully covered omitted) and writes coverage.md beside this script.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
cd "$ROOT"
ARGS=("$@")
[ ${#ARGS[@]} -gt 0 ] || ARGS=(-m "not slow")
"$PY" -m coverage erase
status=0
"$PY" -m coverage run -m pytest -q -p no:cacheprovider "${ARGS[@]}" || status=$?
"$PY" -m coverage combine -q
"$PY" -m coverage report
"$PY" -m coverage report --format=markdown -m > tests/coverage.md
exit $status
