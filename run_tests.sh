#!/usr/bin/env bash
# Run the test suite (after `bash setup.sh`): lint, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" -m ruff check atb_llm examples tests
"$PY" -m ruff format --check --quiet atb_llm examples tests
"$PY" -m pytest -q "$@"
