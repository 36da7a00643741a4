"""How many engine slots and prompt-table entries fit in device memory, from the model configs.

A slot holds its own generated-token K/V in both models, a copy of its prompt's state, both
models' float32 logits and the temporaries of one step (refills included: `bytes_per_slot`). A
prompt is prefilled once into the table (`bytes_per_prompt`); params are already resident.

Both layer kinds are planned (configs `Qwen3Config` or `Qwen35Config`): `kv_bytes_per_token`
counts K/V of the attention layers only (all of Qwen3's, the full-attention layers of a hybrid
Qwen3.5), and `fixed_state_bytes` the per-row state of the linear (Gated DeltaNet) layers, which
is part of the prompt's state: it lives in the table and in each slot's copy, whatever the
length.
`lpe_jax.decoding.engine.RolloutEngine.compiled_bytes` checks the plan against XLA's memory
analysis.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from lpe_jax.decoding import sharding
from lpe_jax.decoding.sharding import padded_vocab
from lpe_jax.model.low_rank import buffer_key
from lpe_jax.model.qwen3 import Qwen3Config, causal_block_length
from lpe_jax.model.qwen35 import Qwen35Config

ModelConfig = Qwen3Config | Qwen35Config

# [B, V] float32 buffers alive at once in one step: both models' logits, the path logits, the
# sampler's Gumbel noise, and the log-softmax inputs of each model that XLA may not fuse.
LOGIT_BUFFERS = 6
# Auto-sized slot counts stop here: beyond, throughput no longer grows and a step's logits get huge.
MAX_AUTO_ROWS = 2048
# On backends without memory_stats (CPU) the engine decodes this many slots.
DEFAULT_CPU_ROWS = 256
# Share of free device memory the rows may take (XLA needs slack for fragmentation and workspaces).
MEMORY_FRACTION = 0.8


def _activation_bytes(
    cfg: ModelConfig, dtype: Any, prompt_slots: int, new_tokens: int, attention_block: int
) -> int:
    if isinstance(cfg, Qwen35Config):
        return _hybrid_activation_bytes(cfg, dtype, prompt_slots, new_tokens, attention_block)
    itemsize = jax.numpy.dtype(dtype).itemsize
    hidden = (4 * cfg.hidden_size + cfg.mlp_activations_per_token()) * itemsize
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim * itemsize
    heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    return hidden + qkv + _attention_bytes(*heads, prompt_slots, new_tokens, attention_block)


def _attention_bytes(
    heads: int, kv_heads: int, head_dim: int, prompt_slots: int, new_tokens: int, block: int
) -> int:
    """One decode row's attention temporaries in one layer (Qwen3's and gated attention alike)."""
    if not block:  # one softmax over every key: f32 scores and probs, one layer
        return 2 * heads * (prompt_slots + new_tokens) * 4
    # Bounded (qwen3.attend_bounded): the prompt's scores, one block's scores, the block's K/V
    # sliced out of the cache (float32: bf16 is upcast on CPU), and the online softmax's running
    # max, sum and weighted values, in and out of a loop trip.
    block = min(block, new_tokens)
    scores = 2 * heads * (prompt_slots + block) * 4
    kv_block = 2 * kv_heads * block * head_dim * 4
    running = 2 * heads * (head_dim + 2) * 4
    return scores + kv_block + running


def _hybrid_activation_bytes(
    cfg: Qwen35Config, dtype: Any, prompt_slots: int, new_tokens: int, attention_block: int
) -> int:
    """One decode row's temporaries in one Qwen3.5 layer: the residual stream and MLP (dense, or
    the routed and shared experts a token uses), plus the larger of a gated-attention layer's
    (q|gate, k, v, f32 scores, bounded as Qwen3's) and a Gated DeltaNet layer's
    (in-projections, f32 q/k/v per value head, and two f32 delta-state temporaries: the decayed
    state and its update)."""
    itemsize = jax.numpy.dtype(dtype).itemsize
    moe = cfg.moe
    width = cfg.intermediate_size
    if moe is not None:
        width = moe.top_k * moe.expert_intermediate_size + moe.shared_expert_intermediate_size
        width += moe.num_experts  # router logits
    hidden = (4 * cfg.hidden_size + 3 * width) * itemsize
    a, lin = cfg.attention, cfg.linear
    attn = (2 * a.num_heads + 2 * a.num_kv_heads) * a.head_dim * itemsize
    heads = (a.num_heads, a.num_kv_heads, a.head_dim)
    attn += _attention_bytes(*heads, prompt_slots, new_tokens, attention_block)
    delta = lin.num_v_heads * lin.head_k_dim * lin.head_v_dim * 4
    linear = (lin.conv_dim + lin.value_dim + 2 * lin.num_v_heads) * itemsize
    linear += lin.num_v_heads * (2 * lin.head_k_dim + lin.head_v_dim) * 4 + 2 * delta
    return hidden + max(attn, linear)


def bytes_per_row(
    original: ModelConfig,
    variant: ModelConfig,
    original_dtype: Any,
    variant_dtype: Any,
    max_new_tokens: int,
    prompt_slots: int,
    per_token: bool = False,
    attention_block: int = 0,
) -> int:
    """Device bytes one decode row needs (both models), excluding params and the shared prompt.

    = generated-token KV cache of both models (max_new_tokens slots each)
    + LOGIT_BUFFERS float32 [V] buffers + one layer's activations/attention temporaries (larger
      model; attention_block 0: scores over every key; > 0: bounded attention's, one block)
    + the row's loop state (tokens, and per-token log-probs when requested).
    """
    kv = max_new_tokens * (
        original.kv_bytes_per_token(original_dtype) + variant.kv_bytes_per_token(variant_dtype)
    )
    logits = LOGIT_BUFFERS * original.vocab_size * 4
    act = max(
        _activation_bytes(original, original_dtype, prompt_slots, max_new_tokens, attention_block),
        _activation_bytes(variant, variant_dtype, prompt_slots, max_new_tokens, attention_block),
    )
    state = max_new_tokens * 4 * (4 if per_token else 1) + 64
    return kv + logits + act + state


def prompt_bytes(
    original: ModelConfig, variant: ModelConfig, original_dtype: Any, variant_dtype: Any, slots: int
) -> int:
    """Bytes of one prompt's state, both models, at `slots` prompt positions: K/V of the
    attention layers plus the linear layers' fixed state."""
    kv = slots * (
        original.kv_bytes_per_token(original_dtype) + variant.kv_bytes_per_token(variant_dtype)
    )
    return (
        kv + original.fixed_state_bytes(original_dtype) + variant.fixed_state_bytes(variant_dtype)
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
    original: ModelConfig,
    variant: ModelConfig,
    original_dtype: Any,
    variant_dtype: Any,
    max_new_tokens: int,
    prompt_slots: int,
    steps_per_call: int,
    attention_block: int = 0,
) -> int:
    """Device bytes one engine slot needs (both models), excluding params and the prompt table.

    = bytes_per_row (generated-token K/V, logits, activations, row state)
    + the slot's copy of its prompt's state (prompt_slots positions of K/V and the linear layers'
      fixed state, both models; the slot steps that fixed state in place)
    + the refill temporaries: a step gathers up to one prompt per slot from the table (the
      refill cap is at most S) before scattering them into the slots, another prompt's K/V
    + both models' first-token logits read from the table (2 float32 [V])
    + its share of the row queue and of one generate call's output stream.
    attention_block: the engine's (engine_device.DeviceSpec.attention_block).
    """
    row = bytes_per_row(
        original, variant, original_dtype, variant_dtype, max_new_tokens, prompt_slots,
        attention_block=attention_block,
    )  # fmt: skip
    prompt = prompt_bytes(original, variant, original_dtype, variant_dtype, prompt_slots)
    first_logits = 2 * original.vocab_size * 4
    stream = steps_per_call * 40 + QUEUE_ROWS_PER_SLOT * 28
    return row + 2 * prompt + first_logits + stream


def bytes_per_prompt(
    original: ModelConfig,
    variant: ModelConfig,
    original_dtype: Any,
    variant_dtype: Any,
    prompt_slots: int,
) -> int:
    """Bytes of one prompt-table entry: both models' prompt state (`prompt_bytes`) and their
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


# --- per device, on a mesh (rows, tensor, experts); see lpe_jax.decoding.sharding ---


def param_bytes_per_device(cfg: ModelConfig, dtype: Any, mesh_shape: tuple[int, int, int]) -> int:
    """Bytes of one model's parameters on each device of a (rows, tensor, experts) mesh, placed
    by `lpe_jax.decoding.sharding`'s rules: query heads, K/V heads, dense MLP hidden units, each
    expert's hidden units and the vocabulary (embedding, LM head) split over tensor; experts over
    experts; norms, q/k norms and the router whole on every device; all of it copied over rows.
    Qwen3.5 (`_hybrid_param_counts`) adds its Gated DeltaNet layers' key/value heads and the shared
    expert over tensor. The mesh must divide the model (`sharding.check_mesh`)."""
    _, t, e = mesh_shape
    b = jax.numpy.dtype(dtype).itemsize
    if isinstance(cfg, Qwen35Config):
        split, whole = _hybrid_param_counts(cfg, t, e)
        return (split // t + whole) * b
    h, hd, v = cfg.hidden_size, cfg.head_dim, padded_vocab(cfg.vocab_size, t)
    heads, kv = cfg.num_heads, cfg.num_kv_heads
    split = v * h * (1 if cfg.tie_word_embeddings else 2) // t  # embedding (+ LM head)
    whole = h  # the final norm
    for i in range(cfg.num_layers):
        split += h * hd * (2 * heads + 2 * kv) // t
        whole += 2 * hd + 2 * h  # q/k norms, two layer norms
        if cfg.attention_bias:
            split += hd * (heads + 2 * kv) // t
            whole += h
        if cfg.is_sparse(i):
            split += 3 * cfg.num_experts * h * cfg.moe_intermediate_size // (t * e)
            whole += h * cfg.num_experts  # router
        else:
            split += 3 * h * cfg.intermediate_size // t
    return (split + whole) * b


def low_rank_param_bytes_per_device(
    original: Any, variant: Any, mesh_shape: tuple[int, int, int]
) -> int:
    """Both models' parameter bytes on each device of a (rows, tensor, experts) mesh when the
    variant is low rank on the original's arrays (`lpe_jax.model.low_rank`): the original's
    (`param_bytes_per_device`) plus the variant's own arrays, factors and whole tensors, each as
    `sharding.param_shardings` places it (u follows its weight's rows, vt its columns); arrays
    the variant shares with the original are held once. Exact: what the engine places."""
    shared = {buffer_key(a) for a in jax.tree.leaves(nnx.state(original, nnx.Param))}
    own = sharding.param_bytes_on_device(
        nnx.state(variant, nnx.Param), mesh_shape, keep=lambda a: buffer_key(a) not in shared
    )
    return param_bytes_per_device(original.cfg, original.dtype, mesh_shape) + own


def _hybrid_param_counts(cfg: Qwen35Config, tensor: int, experts: int) -> tuple[int, int]:
    """A Qwen3.5 model's parameters as (split over tensor, whole on every device), per device of
    an `experts`-way expert split (expert weights counted already divided by it), the vocabulary
    padded to a multiple of `tensor` (`sharding.pad_vocab`)."""
    h, v = cfg.hidden_size, padded_vocab(cfg.vocab_size, tensor)
    a, lin = cfg.attention, cfg.linear
    split = v * h * (1 if cfg.tie_word_embeddings else 2)  # embedding (+ LM head)
    whole = h  # the final norm
    # gated attention: q_proj (query | gate per head), k/v, o_proj; q/k norms whole
    attn = h * a.head_dim * (2 * a.num_heads + 2 * a.num_kv_heads) + a.num_heads * a.head_dim * h
    # Gated DeltaNet: in_proj_qkv, conv1d, in_proj_z, in_proj_b/a, A_log, dt_bias, out_proj
    linear = h * lin.conv_dim + lin.conv_dim * lin.conv_kernel + 2 * h * lin.value_dim
    linear += 2 * h * lin.num_v_heads + 2 * lin.num_v_heads
    for kind in cfg.layer_types:
        whole += 2 * h  # two layer norms
        if kind == "full_attention":
            split += attn
            whole += 2 * a.head_dim
        else:
            split += linear
            whole += lin.head_v_dim  # the gated RMSNorm's weight
        if cfg.moe is None:
            split += 3 * h * cfg.intermediate_size
            continue
        m = cfg.moe
        split += 3 * m.num_experts * h * m.expert_intermediate_size // experts
        split += 3 * h * m.shared_expert_intermediate_size
        whole += h * m.num_experts + (h if m.shared_expert_intermediate_size else 0)
    return split, whole


@functools.cache
def _total_params(cfg: ModelConfig) -> int:
    """Parameter count (a Qwen3.5 model's from its abstract shape: no memory, a trace)."""
    if isinstance(cfg, Qwen3Config):
        return cfg.num_params()
    from lpe_jax.model.qwen35 import Qwen35  # noqa: PLC0415

    model = nnx.eval_shape(lambda: Qwen35(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def split_over_tensor(nbytes: int, mesh_shape: tuple[int, int, int]) -> int:
    """A slot's or prompt's bytes on one device of the mesh: its K/V (K/V heads), a Qwen3.5
    linear layer's state (conv window by channels, delta state by value heads), logits
    (vocabulary) and one layer's temporaries (heads, MLP hidden units) are split over tensor; the
    residual-stream vectors and the row's scalars, a few KiB, are counted split too."""
    return -(-nbytes // mesh_shape[1])


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """Planned device bytes on each device of a (rows, tensor, experts) mesh: both models'
    weights, the slots on the device's row group (their K/V or state, logits, temporaries,
    `bytes_per_slot`) and the prompt table (`bytes_per_prompt`), per device."""

    mesh_shape: tuple[int, int, int]
    weights: int
    slots: int  # slots on each device (the engine's slots / rows)
    slot_bytes: int  # one slot, on one device
    prompts: int
    prompt_bytes: int  # one prompt-table entry, on one device

    @property
    def total(self) -> int:
        return self.weights + self.slots * self.slot_bytes + self.prompts * self.prompt_bytes

    def fits(self, limit_bytes: int | None) -> bool:
        """Within limit_bytes (a device's memory); True where the backend reports none."""
        return limit_bytes is None or self.total <= limit_bytes

    def summary(self, limit_bytes: int | None = None) -> str:
        """One line: the mesh and each part (and the device's memory when known)."""
        rows, t, e = self.mesh_shape
        line = (
            f"plan per device, mesh rows={rows} tensor={t} experts={e}: weights "
            f"{format_bytes(self.weights)} + {self.slots} slots x "
            f"{format_bytes(self.slot_bytes)} + {self.prompts} prompts x "
            f"{format_bytes(self.prompt_bytes)} = {format_bytes(self.total)}"
        )
        return line if limit_bytes is None else f"{line} of {format_bytes(limit_bytes)}"


def format_bytes(nbytes: int) -> str:
    """nbytes in GiB from 1 GiB up, else in MiB (2 decimals)."""
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def plan_mesh(
    original: ModelConfig,
    variant: ModelConfig | None,
    original_dtype: Any,
    variant_dtype: Any,
    mesh_shape: tuple[int, int, int],
    slots: int,
    prompts: int,
    max_new_tokens: int,
    prompt_slots: int,
    steps_per_call: int = 16,
    attention_block: int = 0,
    weights: int | None = None,
) -> MeshPlan:
    """The per-device plan of an engine with `slots` slots and `prompts` table entries on a mesh
    (variant None: one model). Slots are split over rows (rounded up), weights and the table
    copied over rows; see `param_bytes_per_device` and `split_over_tensor`. weights: both
    models' parameter bytes per device where the configs overstate them (a low-rank variant
    shares the original's arrays); None: from the configs."""
    v_cfg = original.without_layers() if variant is None else variant
    # logits are as wide as the vocabulary padded to the tensor size (sharding.pad_vocab)
    wide = dataclasses.replace(
        original, vocab_size=padded_vocab(original.vocab_size, mesh_shape[1])
    )
    shapes = (wide, v_cfg, original_dtype, variant_dtype)
    if weights is None:
        weights = param_bytes_per_device(original, original_dtype, mesh_shape)
        if variant is not None:
            weights += param_bytes_per_device(variant, variant_dtype, mesh_shape)
    slot = bytes_per_slot(
        *shapes, max_new_tokens, prompt_slots, steps_per_call, attention_block=attention_block
    )
    prompt = bytes_per_prompt(*shapes, prompt_slots)
    return MeshPlan(
        mesh_shape=tuple(mesh_shape),
        weights=weights,
        slots=-(-slots // mesh_shape[0]),
        slot_bytes=split_over_tensor(slot, mesh_shape),
        prompts=prompts,
        prompt_bytes=split_over_tensor(prompt, mesh_shape),
    )


def device_limit_bytes(device: jax.Device) -> int | None:
    """The device's memory (memory_stats' bytes_limit); None where the backend reports none."""
    stats = device.memory_stats()
    return None if not stats or "bytes_limit" not in stats else int(stats["bytes_limit"])


def judge_batch_bytes(cfg: ModelConfig, dtype: Any, batch: int, tokens: int) -> int:
    """Device bytes one batch of the device judge (lpe_jax.judges.device) takes beside its params:
    a full causal pass over token ids [batch, tokens] with no cache kept, then the LM head at one
    position per row.

    = the widest layer's activations for every token (residual stream, q/k/v, the attention's
      output, MLP) and four float32 [heads, b, b] buffers per row (scores, masked, exp,
      probabilities of one block pair; XLA:CPU holds about four), b the block length
      `qwen3.attend_causal` uses (`causal_block_length`: the whole T up to FULL_PASS_BLOCK, so the
      pass never holds [heads, T, T] beyond it)
    + float32 [batch, V] logits at the last positions and their exp for the log-sum-exp
    + the token ids and the [batch, 3] result.
    Never [batch, tokens, V]: only the last position reaches the LM head. Qwen3 and Qwen3-MoE
    judge models only (the device judge runs no Qwen3.5 model): a `Qwen35Config` is refused.
    """
    if batch < 1 or tokens < 1:
        raise ValueError(f"batch and tokens must be >= 1; got {batch}, {tokens}.")
    if isinstance(cfg, Qwen35Config):
        raise ValueError(
            "the device judge runs Qwen3 / Qwen3-MoE judge models only; use a Qwen3 judge "
            "checkpoint or the HTTP judge for a Qwen3.5 one."
        )
    itemsize = jax.numpy.dtype(dtype).itemsize
    heads, hd = cfg.num_heads, cfg.head_dim
    qkv_out = (2 * heads + 2 * cfg.num_kv_heads) * hd
    per_token = (4 * cfg.hidden_size + qkv_out + cfg.mlp_activations_per_token()) * itemsize
    b = causal_block_length(tokens)
    scores = 4 * heads * b * b * 4  # one block pair's scores, masked, exp, probs (XLA keeps ~4)
    per_row = tokens * per_token + scores + 2 * cfg.vocab_size * 4 + tokens * 4 + 3 * 4
    return batch * per_row
