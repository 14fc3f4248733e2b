#!/usr/bin/env bash
# bash examples/models/qwen2_5_mlgc/calibrate.sh -m WEIGHT_DIR [--kv_budget 0.25] [--float_levels] [--full_ratio R]
#      [--sink 64] [--recent 1024] [--block_size 128] [-o PLAN]          (options: --help)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
cd "$ROOT"
exec "$PY" -m atb_llm.entrypoints.calibrate "$@"
