"""memory.py: what a slot and a prompt-table entry cost, and how the engine's sizes are planned."""

import jax.numpy as jnp
import pytest

from lpe_jax import memory, qwen3

Q4B = qwen3.PRESETS["qwen3_4b"]
BF16 = jnp.bfloat16


def test_slot_and_prompt_bytes_at_qwen3_4b():
    # DESIGN.md: 147,456 bytes of K/V per token per model in bf16.
    assert Q4B.kv_bytes_per_token(BF16) == 147_456
    kv = 147_456 * 2  # both models
    slot = memory.bytes_per_slot(Q4B, Q4B, BF16, BF16, 512, 128, 16)
    # The slot's own 512 generated + 128 prompt positions of K/V dominate; logits etc. add < 3%.
    assert (512 + 128) * kv <= slot <= 1.03 * (512 + 128) * kv
    entry = memory.bytes_per_prompt(Q4B, Q4B, BF16, BF16, 128)
    assert entry == 128 * kv + 2 * Q4B.vocab_size * 4


def test_plan_engine_fits_the_budget():
    free, slot, entry = 100 * 2**30, 100 * 2**20, 40 * 2**20
    slots, prompts = memory.plan_engine(free, slot, entry)
    budget = free * memory.MEMORY_FRACTION
    assert prompts * entry <= memory.TABLE_SHARE * budget and prompts <= memory.MAX_TABLE_PROMPTS
    assert slots * slot + prompts * entry <= budget
    assert slots & (slots - 1) == 0  # a power of two per device: stable across runs
    two = memory.plan_engine(free, slot, entry, num_devices=2)
    assert two == (2 * slots, prompts)  # slots split over devices, the table on each


def test_plan_engine_keeps_explicit_sizes_and_cpu_defaults():
    assert memory.plan_engine(2**30, 2**20, 2**20, slots=7, prompts=3) == (7, 3)
    assert memory.plan_engine(None, 2**20, 2**20) == (
        memory.DEFAULT_CPU_ROWS,
        memory.DEFAULT_CPU_PROMPTS,
    )
    assert memory.plan_engine(None, 2**20, 2**20, slots=5) == (5, memory.DEFAULT_CPU_PROMPTS)
    with pytest.raises(ValueError, match="positive"):
        memory.plan_engine(2**30, 0, 2**20)
