#!/usr/bin/env bash
# ModelTest with MindIE's arguments (see README.md here):
#   bash tests/modeltest/run.sh pa_bf16 full_BoolQ 1 qwen2_mlgc [WEIGHT_DIR] 1
#   bash tests/modeltest/run.sh pa_bf16 full_MMLU 5 1 qwen2_mlgc [WEIGHT_DIR] 1
#   bash tests/modeltest/run.sh pa_bf16 full_CEval 5 1 qwen2_mlgc [WEIGHT_DIR] 1 --data CEVAL_DIR
#   bash tests/modeltest/run.sh pa_bf16 performance [[2048,2048],[1024,1024]] [1,8] qwen2_mlgc [WEIGHT_DIR] 1
# Flags: --limit N  --mlgc off|auto|PLAN|streaming|random  --compare hf  --out DIR  --data DIR  --device cpu|cuda
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$HERE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m modeltest "$@"
