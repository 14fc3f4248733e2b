#!/usr/bin/env bash
# bash examples/models/qwen2_5_mlgc/convert_quant_weight.sh -src WEIGHT_DIR -dst QUANT_DIR \
#      -type w8a16|w4a16|w8a8|w8a8_dynamic|w8a8c8|w8a8s [--calib FILE.jsonl] [--calib-samples N] [--device cpu|npu]
# Quantizes with msModelSlim (installed on first use) and writes "quantize" into QUANT_DIR/config.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m atb_llm.entrypoints.convert_quant_weight "$@"
