#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run):
#   1. everything not marked vllm, in .venv (infra/setup-venv.sh);
#   2. the tests marked vllm, on vLLM's CPU build in .venv-vllm (infra/setup-vllm.sh): the
#      real engine, not stand-ins. Both environments are made once and reused.
# The quick subset: .venv/bin/python -m pytest -m "not slow and not vllm".
# pytest's exit 5 ("no tests ran") is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."

run_pytest() {
  "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "no tests ran ($*): failing" >&2
    rc=1
  fi
  return "$rc"
}

bash infra/setup-venv.sh || exit 1
run_pytest .venv/bin/python -m pytest -q -m "not vllm"
main=$?
bash infra/setup-vllm.sh || exit 1
run_pytest .venv-vllm/bin/python -m pytest -q -m vllm
engine=$?
echo "tests: $([ $main -eq 0 ] && echo passed || echo FAILED) in .venv, $([ $engine -eq 0 ] && echo passed || echo FAILED) on vLLM's CPU build (.venv-vllm)"
[ "$main" -eq 0 ] && [ "$engine" -eq 0 ]
