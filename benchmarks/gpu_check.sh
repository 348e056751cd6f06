#!/usr/bin/env bash
# The GPU check: one command for anyone with a single CUDA GPU, under 10 minutes.
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine with protege[vllm] installed
#   bash benchmarks/gpu_check.sh --cpu      # the CPU smoke of the same script (tiny model)
#   bash benchmarks/gpu_check.sh --dry-run  # print what it would run; run nothing
#
# 1. the gpu-marked tests (pytest -m gpu); on a GPU machine a skipped one counts as failed,
#    since it checked nothing;
# 2. benchmarks/gpu_check.py: vLLM-vs-HF rollout tokens/s, full and LoRA weight-sync seconds
#    with log-prob parity after each sync (bf16, --atol 1e-3), one training step, on a random
#    model of Qwen2.5-0.5B's shape.
# Results: benchmarks/results/gpu/gpu_check.{json,md} (+ gpu_tests.xml, the pytest report).
# Exit code: 0 when every check held; 1 on any failure or mismatch; 2 on a missing GPU.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
RESULTS=${RESULTS:-benchmarks/results/gpu}
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --dry-run) MODE=dry ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--cpu|--dry-run]" >&2; exit 2 ;;
esac
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} WANDB_MODE=disabled

if [[ $MODE == dry ]]; then
  echo "would run: $PYTHON -m pytest -m gpu tests/ --junitxml=$RESULTS/gpu_tests.xml"
  exec "$PYTHON" benchmarks/gpu_check.py run --dry-run --results "$RESULTS"
fi

if [[ $MODE == gpu ]] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: no CUDA device visible to torch; run on a CUDA machine (or --cpu for the smoke)" >&2
  exit 2
fi

mkdir -p "$RESULTS"
started=$SECONDS
tests_rc=0
if [[ $MODE == gpu ]]; then
  echo "== gpu-marked tests" >&2
  timeout 420 "$PYTHON" -m pytest -q -m gpu -rs tests/ --junitxml="$RESULTS/gpu_tests.xml" \
    || tests_rc=$?
  # pytest's 5 is "no tests collected": gpu_check.py reports it (none ran) from the XML
  JUNIT=(--junit "$RESULTS/gpu_tests.xml")
  CPU=()
else
  JUNIT=()
  CPU=(--cpu)
fi

echo "== measurements" >&2
check_rc=0
"$PYTHON" benchmarks/gpu_check.py run "${CPU[@]}" "${JUNIT[@]}" --results "$RESULTS" || check_rc=$?
echo "== done in $((SECONDS - started)) s; results in $RESULTS" >&2

if (( check_rc != 0 )); then
  exit "$check_rc"
fi
if (( tests_rc != 0 && tests_rc != 5 )); then
  echo "GPU CHECK FAILED: the gpu-marked tests exited $tests_rc" >&2
  exit 1
fi
exit 0
