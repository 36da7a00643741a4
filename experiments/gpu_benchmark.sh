#!/usr/bin/env bash
# The one prepared device check. Step 1 (issue 3): paired-decode speed at Qwen3-4B shape (random
# bf16 weights, 64-token prompt, 128 new tokens, 20 alphas over the rows) at 64/256/1024 rows, with
# the HF transformers eager two-model loop measured in the same process. Step 2 (issue 9): the
# rollout engine vs chunked PairedSampler on a length-skewed workload (slot use, rollouts/s, the
# memory model vs the device peak). Step 3 (issue 9): the main job (estimate.py's draws of 200
# prompts at once on the engine, HarmBench prompt lengths, 512 new tokens, adaptive LPE's draw
# pattern from synthetic verdicts), its draws capped at MAIN_SECONDS, beside one PairedSampler call
# of as many rows as the engine has slots. Step 4 (issue 22): the device judge, a local judge
# model of the same shape scoring JUDGE_ROWS classification questions of JUDGE_TOKENS tokens in
# batches of JUDGE_BATCH on the device (three floats per row back to the host). Step 5 (issue 19):
# the engine step on a Qwen3.5 pair at Qwen3.5-4B shape. Step 6 (issue 18): ms per engine decode
# step with bounded attention (blocks of 64) vs full-length, ATTN_SLOTS slots, 64-token prompt,
# ATTN_NEW_TOKENS token positions, early and late in generation (three engines' state at once: 64
# slots at Qwen3-4B bf16 hold ~33 GB). Step 7 (issue 20): the low-rank pair beside the two-model
# pair, the same paired-decode run as step 1 with the variant the original abliterated along a
# random direction: held whole (two models) vs as low-rank deltas on the original's weights (the
# engine decodes both as 2B rows through one weight copy), pair-tokens/s at LOW_RANK_ROWS rows.
# Prints one block per step; record them in docs/benchmarks.md with the card the reply names.
#
#   bash experiments/gpu_benchmark.sh                      # on the GPU machine, from the checkout
#   PYTHON=.venv/bin/python PRESET=tiny ROWS=32 DTYPE=float32 ENGINE_SLOTS=16 ENGINE_PROMPTS=4 \
#     ENGINE_ROWS=8 ENGINE_NEW_TOKENS=32 MAIN_PROMPTS=8 MAIN_NEW_TOKENS=32 MAIN_SLOTS=32 \
#     MAIN_SECONDS=30 JUDGE_TOKENS=64 JUDGE_BATCH=4 JUDGE_ROWS=8 JUDGE_MODES=device,host \
#     QWEN35_PRESET=qwen3_5_tiny \
#     ATTN_SLOTS=8 ATTN_NEW_TOKENS=48 ATTN_LATE=24 ATTN_REPS=1 LOW_RANK_ROWS=32 \
#     bash experiments/gpu_benchmark.sh                      # CPU dry run
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
# Engine: 32 prompts x 32 rows (HarmBench-like prompt lengths 16..64), lengths skewed by prompt.
echo "=== engine ${PRESET} dtype=${DTYPE} slots=${ENGINE_SLOTS:-256} ==="
"$PYTHON" experiments/benchmark_engine.py --preset="$PRESET" --dtype="$DTYPE" \
  --slots="${ENGINE_SLOTS:-256}" --prompts="${ENGINE_PROMPTS:-32}" \
  --rows_per_prompt="${ENGINE_ROWS:-32}" --block_rows="${ENGINE_ROWS:-32}" \
  --max_new_tokens="${ENGINE_NEW_TOKENS:-256}" --nologtostderr
# Main job: estimate.py's draw pattern for MAIN_PROMPTS prompts, all in flight; ~3 minutes.
echo "=== main job ${PRESET} dtype=${DTYPE} ==="
"$PYTHON" experiments/benchmark_main_job.py --model="$PRESET" --dtype="$DTYPE" \
  --prompts="${MAIN_PROMPTS:-200}" --prompts_in_flight="${MAIN_PROMPTS:-200}" --n_fit=100 \
  --max_new_tokens="${MAIN_NEW_TOKENS:-512}" --max_seconds="${MAIN_SECONDS:-60}" \
  ${MAIN_SLOTS:+--max_rows="$MAIN_SLOTS"} --parts=full,ideal --nologtostderr
# Device judge: the engine's model shape as the judge (the original model with a classification
# prompt is the cheapest judge); ~1 minute. JUDGE_MODES=device,host adds the [B, T, V] path.
echo "=== device judge ${PRESET} dtype=${DTYPE} ==="
"$PYTHON" experiments/benchmark_device_judge.py --preset="$PRESET" --dtype="$DTYPE" \
  --question_tokens="${JUDGE_TOKENS:-800}" --batch_size="${JUDGE_BATCH:-32}" \
  --rows="${JUDGE_ROWS:-256}" --modes="${JUDGE_MODES:-device}" --nologtostderr
# Qwen3.5 (issue 19): the engine on a hybrid Gated DeltaNet pair at Qwen3.5-4B shape (random
# weights; the shape is qwen35.PRESETS' assumed one, see there), same workload as the Qwen3 engine
# step above: rollouts/s, slot use, and the memory model (fixed linear state + full-attention K/V)
# vs the device peak. QWEN35_PRESET=qwen3_5_tiny for the CPU dry run.
echo "=== engine ${QWEN35_PRESET:-qwen3_5_4b} dtype=${DTYPE} slots=${ENGINE_SLOTS:-256} ==="
"$PYTHON" experiments/benchmark_engine.py --preset="${QWEN35_PRESET:-qwen3_5_4b}" --dtype="$DTYPE" \
  --slots="${ENGINE_SLOTS:-256}" --prompts="${ENGINE_PROMPTS:-32}" \
  --rows_per_prompt="${ENGINE_ROWS:-32}" --block_rows="${ENGINE_ROWS:-32}" \
  --max_new_tokens="${ENGINE_NEW_TOKENS:-256}" --nologtostderr
# Bounded vs full-length attention in the engine's decode step; ~1 minute.
echo "=== attention ${PRESET} dtype=${DTYPE} slots=${ATTN_SLOTS:-64} ==="
"$PYTHON" experiments/benchmark_attention.py --preset="$PRESET" --dtype="$DTYPE" \
  --slots="${ATTN_SLOTS:-64}" --max_new_tokens="${ATTN_NEW_TOKENS:-512}" \
  --late="${ATTN_LATE:-480}" --reps="${ATTN_REPS:-5}" --blocks=64 --nologtostderr
# Low-rank pair vs two models (issue 20), both the same abliterated variant; ~2 minutes per row
# count (as_low_rank factors the 4B variant on the host once per run).
for rows in ${LOW_RANK_ROWS:-64 256}; do
  for variant in abliterated low_rank; do
    echo "=== low rank: ${PRESET} rows=${rows} dtype=${DTYPE} variant=${variant} ==="
    "$PYTHON" experiments/benchmark_decode.py --preset="$PRESET" --rows="$rows" --prompt_len=64 \
      --new_tokens=128 --dtype="$DTYPE" --variant="$variant" --reference=none --nologtostderr
  done
done
