"""How many engine slots and prompt-table entries fit in device memory, from the model configs.

A slot holds its own generated-token K/V in both models, a copy of its prompt's K/V, both models'
float32 logits and the temporaries of one step (refills included: `bytes_per_slot`). A prompt is
prefilled once into the table (`bytes_per_prompt`); params are already resident.
`lpe_jax.decoding.engine.RolloutEngine.compiled_bytes` checks the plan against XLA's memory
analysis.
"""

from __future__ import annotations

from typing import Any

import jax

from lpe_jax.model.qwen3 import Qwen3Config

# [B, V] float32 buffers alive at once in one step: both models' logits, the path logits, the
# sampler's Gumbel noise, and the log-softmax inputs of each model that XLA may not fuse.
LOGIT_BUFFERS = 6
# Auto-sized slot counts stop here: beyond, throughput no longer grows and a step's logits get huge.
MAX_AUTO_ROWS = 2048
# On backends without memory_stats (CPU) the engine decodes this many slots.
DEFAULT_CPU_ROWS = 256
# Share of free device memory the rows may take (XLA needs slack for fragmentation and workspaces).
MEMORY_FRACTION = 0.8


def _activation_bytes(cfg: Qwen3Config, dtype: Any, prompt_slots: int, new_tokens: int) -> int:
    itemsize = jax.numpy.dtype(dtype).itemsize
    hidden = (4 * cfg.hidden_size + cfg.mlp_activations_per_token()) * itemsize
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * itemsize
    scores = 2 * cfg.num_heads * (prompt_slots + new_tokens) * 4  # f32 scores and probs, one layer
    return hidden + qkv + scores


def bytes_per_row(
    original: Qwen3Config,
    variant: Qwen3Config,
    original_dtype: Any,
    variant_dtype: Any,
    max_new_tokens: int,
    prompt_slots: int,
    per_token: bool = False,
) -> int:
    """Device bytes one decode row needs (both models), excluding params and the shared prompt.

    = generated-token KV cache of both models (max_new_tokens slots each)
    + LOGIT_BUFFERS float32 [V] buffers + one layer's activations/attention scores (larger model)
    + the row's loop state (tokens, and per-token log-probs when requested).
    """
    kv = max_new_tokens * (
        original.kv_bytes_per_token(original_dtype) + variant.kv_bytes_per_token(variant_dtype)
    )
    logits = LOGIT_BUFFERS * original.vocab_size * 4
    act = max(
        _activation_bytes(original, original_dtype, prompt_slots, max_new_tokens),
        _activation_bytes(variant, variant_dtype, prompt_slots, max_new_tokens),
    )
    state = max_new_tokens * 4 * (4 if per_token else 1) + 64
    return kv + logits + act + state


def prompt_bytes(
    original: Qwen3Config, variant: Qwen3Config, original_dtype: Any, variant_dtype: Any, slots: int
) -> int:
    """Bytes of the shared prompt K/V of both models (stored once per device)."""
    return slots * (
        original.kv_bytes_per_token(original_dtype) + variant.kv_bytes_per_token(variant_dtype)
    )


def device_free_bytes(device: jax.Device) -> int | None:
    """bytes_limit - bytes_in_use from device.memory_stats(); None where the backend has none."""
    stats = device.memory_stats()
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def rows_that_fit(free_bytes: int, row_bytes: int, fixed_bytes: int = 0) -> int:
    """Rows per device that fit MEMORY_FRACTION of free_bytes after fixed_bytes; at least 1,
    rounded down to a power of two (stable across small changes in free memory), <= MAX_AUTO_ROWS.
    """
    if row_bytes <= 0:
        raise ValueError(f"row_bytes must be positive; got {row_bytes}.")
    budget = int(free_bytes * MEMORY_FRACTION) - fixed_bytes
    rows = max(1, min(MAX_AUTO_ROWS, budget // row_bytes))
    return 1 << (rows.bit_length() - 1)


# The engine's device queue holds this many rows per slot (see RolloutEngine).
QUEUE_ROWS_PER_SLOT = 4
# Prompt-table entries sized from memory: at most this many, and at most TABLE_SHARE of the budget.
MAX_TABLE_PROMPTS = 256
TABLE_SHARE = 0.1
# On backends without memory_stats (CPU) the engine holds this many prompts.
DEFAULT_CPU_PROMPTS = 64


def bytes_per_slot(
    original: Qwen3Config,
    variant: Qwen3Config,
    original_dtype: Any,
    variant_dtype: Any,
    max_new_tokens: int,
    prompt_slots: int,
    steps_per_call: int,
) -> int:
    """Device bytes one engine slot needs (both models), excluding params and the prompt table.

    = bytes_per_row (generated-token K/V, logits, activations, row state)
    + the slot's copy of its prompt's K/V (prompt_slots positions, both models)
    + the refill temporaries: a step gathers up to one prompt per slot from the table (the
      refill cap is at most S) before scattering them into the slots, another prompt's K/V
    + both models' first-token logits read from the table (2 float32 [V])
    + its share of the row queue and of one generate call's output stream.
    """
    row = bytes_per_row(
        original, variant, original_dtype, variant_dtype, max_new_tokens, prompt_slots
    )
    prompt = prompt_bytes(original, variant, original_dtype, variant_dtype, prompt_slots)
    first_logits = 2 * original.vocab_size * 4
    stream = steps_per_call * 40 + QUEUE_ROWS_PER_SLOT * 28
    return row + 2 * prompt + first_logits + stream


def bytes_per_prompt(
    original: Qwen3Config,
    variant: Qwen3Config,
    original_dtype: Any,
    variant_dtype: Any,
    prompt_slots: int,
) -> int:
    """Bytes of one prompt-table entry: both models' K/V over prompt_slots positions and their
    float32 next-token logits."""
    kv = prompt_bytes(original, variant, original_dtype, variant_dtype, prompt_slots)
    return kv + 2 * original.vocab_size * 4


def plan_engine(
    free_bytes: int | None,
    slot_bytes: int,
    prompt_bytes: int,
    num_devices: int = 1,
    slots: int | None = None,
    prompts: int | None = None,
) -> tuple[int, int]:
    """(slots, prompt-table entries) for a RolloutEngine; explicit values are kept as given.

    The prompt table is replicated on every device; slots are split over devices. Sizing from
    free_bytes (per device; None on CPU: DEFAULT_CPU_ROWS slots, DEFAULT_CPU_PROMPTS prompts):
    the table takes at most TABLE_SHARE of MEMORY_FRACTION * free (<= MAX_TABLE_PROMPTS), and
    slots fill the rest (rows_that_fit per device, times num_devices).
    """
    if slot_bytes <= 0 or prompt_bytes <= 0:
        raise ValueError(f"byte sizes must be positive; got {slot_bytes}, {prompt_bytes}.")
    if free_bytes is None:
        return slots or DEFAULT_CPU_ROWS, prompts or DEFAULT_CPU_PROMPTS
    if prompts is None:
        share = int(free_bytes * MEMORY_FRACTION * TABLE_SHARE) // prompt_bytes
        prompts = max(1, min(MAX_TABLE_PROMPTS, share))
    if slots is None:
        slots = rows_that_fit(free_bytes, slot_bytes, prompts * prompt_bytes) * num_devices
    return slots, prompts
