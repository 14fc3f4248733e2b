#!/usr/bin/env bash
# Qwen2.5 (MLGC) chat / generation: bash examples/models/qwen2_5_mlgc/run_pa.sh -m WEIGHT_DIR [options]
exec bash "$(dirname "${BASH_SOURCE[0]}")/../../../run_pa.sh" "$@"
