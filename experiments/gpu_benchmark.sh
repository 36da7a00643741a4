#!/usr/bin/env bash
# The one prepared device check for issue 3: paired-decode speed at Qwen3-4B shape (random bf16
# weights, 64-token prompt, 128 new tokens, 20 alphas over the rows) at 64/256/1024 rows, with the
# HF transformers eager two-model loop measured in the same process. Prints one block per size;
# record them in docs/benchmarks.md with the card the reply names.
#
#   bash experiments/gpu_benchmark.sh                      # on the GPU machine, from the checkout
#   PYTHON=.venv/bin/python PRESET=tiny ROWS=32 DTYPE=float32 bash experiments/gpu_benchmark.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}"
PRESET="${PRESET:-qwen3_4b}"
DTYPE="${DTYPE:-bfloat16}"
REFERENCE="${REFERENCE:-hf}"  # REFERENCE=none skips the HF loop
PYTHON="${PYTHON:-python3}"
for rows in ${ROWS:-64 256 1024}; do
  echo "=== ${PRESET} rows=${rows} dtype=${DTYPE} ==="
  "$PYTHON" experiments/benchmark_decode.py --preset="$PRESET" --rows="$rows" --prompt_len=64 \
    --new_tokens=128 --dtype="$DTYPE" --reference="$REFERENCE" --nologtostderr
done
