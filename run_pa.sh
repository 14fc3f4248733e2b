#!/usr/bin/env bash
# bash run_pa.sh [-m WEIGHT_DIR] [run_pa options...]   (no -m: the default model)
# Options: python -m examples.run_pa --help
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
cd "$ROOT"
exec "$PY" -m examples.run_pa "$@"
