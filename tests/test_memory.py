"""memory.py: what a slot and a prompt-table entry cost, and how the engine's sizes are planned."""

import jax.numpy as jnp
import pytest

from lpe_jax.decoding import memory
from lpe_jax.model import qwen3

Q4B = qwen3.PRESETS["qwen3_4b"]
BF16 = jnp.bfloat16


def test_slot_and_prompt_bytes_at_qwen3_4b():
    # DESIGN.md: 147,456 bytes of K/V per token per model in bf16.
    assert Q4B.kv_bytes_per_token(BF16) == 147_456
    kv = 147_456 * 2  # both models
    slot = memory.bytes_per_slot(Q4B, Q4B, BF16, BF16, 512, 128, 16)
    # K/V dominates: the slot's own 512 generated and 128 prompt positions, and one more prompt
    # copy (the refill temporary); logits etc. add < 3%.
    assert (512 + 2 * 128) * kv <= slot <= 1.03 * (512 + 2 * 128) * kv
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


MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.mark.parametrize(
    "attention_block, moe",
    [(0, {}), (8, {}), (8, MOE)],
    ids=["full_length", "bounded", "bounded_qwen3_moe"],
)
def test_engine_plan_covers_xla_memory_analysis(attention_block, moe):
    # Every slot refilled each step (refill cap = S) with long prompts: the step gathers S prompt
    # copies from the table. The plan must cover XLA's compiled generate call (arguments +
    # outputs - donated aliases + temporaries), and it does so only by counting those copies.
    # Attention over all 32 token positions, or bounded in blocks of 8 (a loop in the step).
    from lpe_jax.decoding.engine import RolloutEngine

    cfg = qwen3.Qwen3Config(512, 64, 2, 4, 2, 16, 128, **moe)
    m_o, m_v = qwen3.init_random(cfg, seed=0), qwen3.init_random(cfg, seed=1)
    e = RolloutEngine(
        m_o, m_v, "linear", 32, [1], slots=64, max_prompts=4, max_prompt_len=128,
        refills_per_step=64, attention_block=attention_block,
    )  # fmt: skip
    plan, compiled = e.planned_bytes(), e.compiled_bytes()
    assert compiled <= plan["total"] <= 1.5 * compiled, (plan, compiled)
    copies = e.slots * memory.prompt_bytes(cfg, cfg, jnp.float32, jnp.float32, e.prompt_slots)
    assert plan["total"] - copies < compiled  # without the refill temporaries: short


def test_hybrid_slot_bytes_count_kv_of_full_attention_layers_and_fixed_linear_state():
    from lpe_jax.model.qwen35 import PRESETS

    q9 = PRESETS["qwen3_5_9b"]  # 8 full-attention layers of 4 kv heads x 256, 24 linear layers
    assert q9.kv_bytes_per_token(BF16) == 2 * 8 * 4 * 256 * 2
    conv, delta = (2 * 16 * 128 + 32 * 128) * 3 * 2, 32 * 128 * 128 * 4
    assert q9.fixed_state_bytes(BF16) == 24 * (conv + delta)
    # The prompt state is K/V over its positions plus the fixed state, in the table and in each
    # slot (which steps its copy); the slot's own tokens add K/V only.
    per_model = q9.fixed_state_bytes(BF16) + 128 * q9.kv_bytes_per_token(BF16)
    assert memory.bytes_per_prompt(q9, q9, BF16, BF16, 128) == 2 * per_model + 2 * 248320 * 4
    slot = memory.bytes_per_slot(q9, q9, BF16, BF16, 512, 128, 16)
    floor = 2 * (2 * per_model + 512 * q9.kv_bytes_per_token(BF16))
    assert floor <= slot <= 1.05 * floor


def test_hybrid_engine_plan_covers_xla_memory_analysis():
    from flax import nnx

    from lpe_jax.decoding.engine import RolloutEngine
    from lpe_jax.model.qwen35 import PRESETS, Qwen35

    cfg = PRESETS["qwen3_5_tiny"]
    assert cfg.layer_types == ("linear_attention", "full_attention")
    m_o, m_v = (Qwen35(cfg, rngs=nnx.Rngs(s)) for s in (0, 1))
    e = RolloutEngine(
        m_o, m_v, "linear", 32, [1], slots=64, max_prompts=4, max_prompt_len=128,
        refills_per_step=64,
    )  # fmt: skip
    plan, compiled = e.planned_bytes(), e.compiled_bytes()
    assert compiled <= plan["total"] <= 1.5 * compiled, (plan, compiled)
