#!/usr/bin/env bash
# Run the test suite (after `bash setup.sh`): lint, then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
"$PY" -m ruff check atb_llm benchmarks examples tests
"$PY" -m ruff format --check --quiet atb_llm benchmarks examples tests
"$PY" -c "from importlinter.cli import lint_imports_command; lint_imports_command()"  # the floors (pyproject.toml)
"$PY" -m pytest -q "$@"
