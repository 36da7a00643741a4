"""Qwen3 decoder in Flax NNX: one model loop with a residual-stream hook and per-layer state.

Numerics follow Hugging Face's `Qwen3ForCausalLM`: RMSNorm in float32 (cast back to the activation
dtype before the weight multiply), q_norm/k_norm on the head dim before rotary embeddings
(rotate-half), softmax in float32, logits returned in float32.

**One loop** (`Qwen3.forward`) serves every entry point: a full pass (`__call__`,
`hidden_states`, `prefill`), a decode step (`decode_step`, `decode`), activation collection and
run-time ablation (`lpe_jax.abliteration.abliterate`) and the direction path
(`lpe_jax.abliteration.direction_path`). An
intervention is a `Hook` on the residual stream, not a copy of the loop. Each layer threads its
own state: `None` in a full pass (the layer returns the context it built: K/V for attention), or
the state it decodes against (`LayerKV` for attention). The loop never looks inside a state, so a
layer kind with another state (a recurrent layer's fixed-size state) fits the same loop.

One attention implementation (`attend`, over one or more key/value segments; `attend_bounded`
computes the same in blocks, reading the rows' tokens only up to the longest row, for a decode
step whose state sets `block`; `attend_causal`, the full pass's, computes a causal softmax in
query x key blocks past `FULL_PASS_BLOCK` tokens, so no [T, T] scores are held). A decode step first
stores each new token's keys/values in the layer's `LayerKV`, then attends over that cache: the
prompt prefix and the row's own tokens, itself included. Writing before reading lets XLA update
the donated cache in place; the reverse order makes it copy the whole cache every step.
- `DecodeKV` (every layer's `LayerKV`) with a batch-1 prefix: one prompt shared by every row,
  read once, not broadcast (what keeps large-batch decode cheap); with a per-row prefix: rows of
  different prompts side by side (`lpe_jax.decoding.engine`). The write index is a scalar (rows in
  lockstep) or one per row.
- `Qwen3.decode(tokens, step, cache)`: `decode_step` on a `KVCache` (one shared prompt, rows in
  lockstep). The prompt may be right-padded to a bucket length: its true length is a traced
  scalar, so prompts of similar length share one compilation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from lpe_jax.model.f32_dot import einsum_f32
from lpe_jax.model.moe import MoEConfig, SparseMoE

Array = jax.Array

Hook = Callable[[int, str, Array], Array]
"""A residual-stream intervention: `hook(layer, site, x) -> x'`, same shape and dtype. Sites:
"embed" (layer 0: the embedding, the stream's first write), "input" (the stream entering `layer`;
what is returned enters it), "attn" and "mlp" (that layer's attention and MLP writes, before they
are added to the stream). Traced inside the pass: it may close over arrays (e.g. a per-row alpha).
"""


def _at(hook: Hook | None, layer: int, site: str, x: Array) -> Array:
    return x if hook is None else hook(layer, site, x)


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Static shape of a Qwen3 or Qwen3-MoE model. `head_dim` is explicit: Qwen3 does not use
    hidden/heads.

    num_experts 0: dense Qwen3 (every MLP a SwiGLU of `intermediate_size`). num_experts > 0:
    Qwen3-MoE, whose layers `is_sparse` selects (HF `decoder_sparse_step`, `mlp_only_layers`)
    have a sparse MoE MLP (`lpe_jax.model.moe.SparseMoE`: `num_experts` SwiGLU experts of
    `moe_intermediate_size`, top `num_experts_per_tok` per token, renormalised when
    `norm_topk_prob`); the others keep the dense MLP.
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_experts:
            self.moe_config()  # checks top-k against the expert count
            if self.decoder_sparse_step < 1 or self.moe_intermediate_size < 1:
                raise ValueError(
                    f"decoder_sparse_step={self.decoder_sparse_step} and moe_intermediate_size="
                    f"{self.moe_intermediate_size} must be >= 1 in a Qwen3-MoE config."
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; grouped-query attention needs whole groups."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings.")

    @property
    def model_type(self) -> str:
        """HF `model_type`: 'qwen3_moe' with experts, else 'qwen3'."""
        return "qwen3_moe" if self.num_experts else "qwen3"

    def is_sparse(self, layer: int) -> bool:
        """Whether `layer` has a sparse MoE MLP, as HF `Qwen3MoeDecoderLayer` decides."""
        return (
            self.num_experts > 0
            and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    def moe_config(self) -> MoEConfig:
        """The sparse MLP's shape (ValueError for a dense config)."""
        if not self.num_experts:
            raise ValueError("a dense Qwen3 config (num_experts=0) has no sparse MoE MLP.")
        return MoEConfig(
            hidden_size=self.hidden_size,
            num_experts=self.num_experts,
            top_k=self.num_experts_per_tok,
            expert_intermediate_size=self.moe_intermediate_size,
            norm_topk_prob=self.norm_topk_prob,
        )

    def mlp_activations_per_token(self) -> int:
        """Elements one token's MLP holds at once in the widest layer: gate, up and their product
        (3 x intermediate_size) in a dense layer; in a sparse one the same for each of its top-k
        experts, plus the router's probabilities and the token's k gathered copies and outputs."""
        dense = 3 * self.intermediate_size
        k = self.num_experts_per_tok
        sparse = 3 * k * self.moe_intermediate_size + 2 * k * self.hidden_size + self.num_experts
        kinds = {self.is_sparse(i) for i in range(self.num_layers)}
        return max((sparse if s else dense for s in kinds), default=0)  # 0 layers: no MLP

    def kv_bytes_per_token(self, dtype: Any) -> int:
        """Bytes of K and V cache one token occupies across all layers (one model)."""
        itemsize = jnp.dtype(dtype).itemsize
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize

    def fixed_state_bytes(self, dtype: Any) -> int:
        """Bytes of per-row state that does not grow with the sequence: none (all attention)."""
        del dtype
        return 0

    def without_layers(self) -> Qwen3Config:
        """This config with no layers: the absent second model of a one-model engine."""
        return dataclasses.replace(self, num_layers=0)

    def empty_prompt_states(self, dtype: Any, n: int, positions: int) -> tuple[Any, ...]:
        """Engine layer-state protocol: zeroed prompt states of `n` rows, one per layer, each
        (k, v) [n, kv, positions, hd] (a prompt-table entry or a slot's copy of its prompt)."""
        return tuple(zip(*empty_kv(self, dtype, n, positions), strict=True))

    def empty_own_states(self, dtype: Any, n: int, capacity: int) -> tuple[Any, ...]:
        """Engine layer-state protocol: zeroed per-row states for `capacity` generated tokens,
        one per layer, each (k, v) [n, kv, capacity, hd]."""
        return tuple(zip(*empty_kv(self, dtype, n, capacity), strict=True))

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * hd * (2 * self.num_heads + 2 * self.num_kv_heads) + 2 * hd
        if self.attention_bias:
            attn += hd * (2 * self.num_heads + self.num_kv_heads) + h
        dense = 3 * h * self.intermediate_size
        sparse = h * self.num_experts * (1 + 3 * self.moe_intermediate_size)
        mlps = sum(sparse if self.is_sparse(i) else dense for i in range(self.num_layers))
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * (attn + 2 * h) + mlps + h + head


PRESETS: dict[str, Qwen3Config] = {
    "qwen3_0_6b": Qwen3Config(151936, 1024, 28, 16, 8, 128, 3072),
    "qwen3_1_7b": Qwen3Config(151936, 2048, 28, 16, 8, 128, 6144),
    "qwen3_4b": Qwen3Config(151936, 2560, 36, 32, 8, 128, 9728),
    "qwen3_8b": Qwen3Config(151936, 4096, 36, 32, 8, 128, 12288, tie_word_embeddings=False),
    "tiny": Qwen3Config(512, 64, 2, 4, 2, 32, 128),
}


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """HF Qwen3RMSNorm: normalise in float32, cast to x.dtype, then scale by the weight."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotate-half rotary embedding. x: [B, T, heads, hd]; positions: int [B, T]."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


def _ones(shape: tuple[int, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype))


def attend(q: Array, segments: Sequence[tuple[Array, Array, Array]]) -> Array:
    """Grouped-query attention of q [B, T, heads, hd] over the keys of all segments at once.

    Each segment is (k, v, mask): k/v [B, kv, S, hd], or [1, kv, S, hd] when every row shares them
    (a prompt prefix, read once rather than broadcast); mask bool [B or 1, T or 1, S] (query t
    may see key s). One float32 softmax spans every segment, so splitting a context into a shared
    prefix and per-row parts changes only the summation order. Every query must see some key.
    Returns [B, T, heads, hd] in v's dtype; the probability-weighted sum accumulates in float32.
    """
    b, t, heads, hd = q.shape
    kv = segments[0][0].shape[1]
    q = q.reshape(b, t, kv, heads // kv, hd)
    f32 = jnp.float32
    scores = []
    for k, _, mask in segments:
        if k.shape[0] == 1 and b > 1:
            s = einsum_f32("btkgd,ksd->bkgts", q, k[0])
        else:
            s = einsum_f32("btkgd,bksd->bkgts", q, k)
        scores.append(jnp.where(mask[:, None, None], s, -jnp.inf))
    probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1) / math.sqrt(hd), axis=-1)
    out = jnp.zeros((b, t, kv, heads // kv, hd), f32)
    start = 0
    for (_, v, _), s in zip(segments, scores, strict=True):
        p = probs[..., start : start + s.shape[-1]].astype(v.dtype)
        start += s.shape[-1]
        if v.shape[0] == 1 and b > 1:
            out += einsum_f32("bkgts,ksd->btkgd", p, v[0])
        else:
            out += einsum_f32("bkgts,bksd->btkgd", p, v)
    return out.astype(segments[-1][1].dtype).reshape(b, t, heads, hd)


def attend_bounded(
    q: Array, prefix: tuple[Array, Array, Array], k: Array, v: Array, filled: Array, block: int
) -> Array:
    """`attend` over a prefix segment and the first `filled` positions of k/v, reading k/v in
    blocks of `block` positions and never past the longest row's filled length.

    q [B, T, heads, hd]; prefix (k, v, mask) as in `attend`; k/v [B, kv, N, hd]; filled int32 [B]
    (or scalar): row b sees positions < filled[b] of k/v (every query of the row alike). Blocks
    0..ceil(max(filled) / block) - 1 are read, one per `lax.while_loop` trip, and folded in by an
    online softmax (running max, sum and weighted values, all float32), so the cost follows the
    filled length, not N. The same float32 sums as `attend` in another order: results agree to
    float32 rounding (bf16: the unnormalised probabilities are rounded to v's dtype, `attend`
    rounds the normalised ones). Every query must see some key. Returns [B, T, heads, hd] in
    v's dtype.
    """
    b, t, heads, hd = q.shape
    kv, n = k.shape[1], k.shape[2]
    block = min(block, n)
    qg = q.reshape(b, t, kv, heads // kv, hd)
    filled = jnp.broadcast_to(jnp.asarray(filled, jnp.int32), (b,))
    scale = math.sqrt(hd)

    def fold(
        carry: tuple[Array, Array, Array], s: Array, vals: Array, shared: bool
    ) -> tuple[Array, Array, Array]:
        # s [B, kv, g, T, S] masked scores; vals [B or 1, kv, S, hd].
        m, total, acc = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # all masked so far: p = 0, no NaN
        p = jnp.exp(s - m_safe)
        corr = jnp.exp(m - m_safe)
        pv = p.astype(vals.dtype)
        if shared and b > 1:
            pv = einsum_f32("bkgts,ksd->bkgtd", pv, vals[0])
        else:
            pv = einsum_f32("bkgts,bksd->bkgtd", pv, vals)
        return m_new, total * corr + jnp.sum(p, axis=-1, keepdims=True), acc * corr + pv

    pk, pv_, pmask = prefix
    if pk.shape[0] == 1 and b > 1:
        s = einsum_f32("btkgd,ksd->bkgts", qg, pk[0])
    else:
        s = einsum_f32("btkgd,bksd->bkgts", qg, pk)
    s = jnp.where(pmask[:, None, None], s, -jnp.inf) / scale
    init = (
        jnp.full((b, kv, heads // kv, t, 1), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv, heads // kv, t, 1), jnp.float32),
        jnp.zeros((b, kv, heads // kv, t, hd), jnp.float32),
    )
    carry = fold(init, s, pv_, shared=pk.shape[0] == 1)

    def body(i: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        # The last block is clamped to end at N; positions an earlier block read are masked.
        start = jnp.minimum(i * block, n - block)
        kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=2)
        pos = start + jnp.arange(block)
        seen = (pos >= i * block)[None] & (pos[None] < filled[:, None])  # [B, block]
        s = einsum_f32("btkgd,bksd->bkgts", qg, kb)
        s = jnp.where(seen[:, None, None, None], s, -jnp.inf) / scale
        return fold(carry, s, vb, shared=False)

    longest = jnp.max(jnp.minimum(filled, n))
    _, total, acc = jax.lax.fori_loop(0, (longest + block - 1) // block, body, carry)
    out = (acc / total).transpose(0, 3, 1, 2, 4)  # [B, T, kv, g, hd]
    return out.astype(v.dtype).reshape(b, t, heads, hd)


FULL_PASS_BLOCK = 128
"""Query and key block length of a full causal pass (`attend_causal`): longer sequences are
attended block by block, so a pass's attention temporaries grow with T, not T^2."""


def causal_block_length(t: int, block: int | None = None) -> int:
    """The query/key block length `attend_causal` uses for a T-token pass: T when T <= block
    (one block), else ceil(T / ceil(T / block)) (the fewest blocks, padded as little as possible).
    block None: `FULL_PASS_BLOCK`."""
    block = FULL_PASS_BLOCK if block is None else block
    if block < 1 or t < 1:
        raise ValueError(f"block={block} and t={t} must be >= 1.")
    return -(-t // -(-t // block))


def attend_causal(q: Array, k: Array, v: Array, block: int | None = None) -> Array:
    """Causal grouped-query attention of q [B, T, heads, hd] over k/v [B, kv, T, hd] (query t sees
    keys 0..t), the full pass of a sequence (a judge's batch, a prefill, `model_logits`).

    block: None reads `FULL_PASS_BLOCK` when traced. T <= block: `attend` with a causal mask (one
    [T, T] softmax). T > block: the sequence is cut into n = ceil(T / block) blocks of
    `causal_block_length(T, block)` = ceil(T / n) positions (the tail zero-padded; padded keys
    lie after every real query, so causality hides them) and one `lax.scan` runs over the
    n (n + 1) / 2 (query block, key block) pairs on or below the diagonal, query block by query
    block, folding each key block into an online softmax (running max, sum and weighted values, all
    float32) as `attend_bounded` does. Temporaries: one pair's float32 scores [B, heads, b, b] and
    the [B, T, heads, hd] output, never [B, heads, T, T]; blocks above the diagonal are never
    computed. The same float32 sums as `attend` in another order: f32 results agree to rounding
    (bf16: the unnormalised probabilities are rounded to v's dtype, `attend` rounds the normalised
    ones). Reverse-mode differentiable (a fixed-length scan). Returns [B, T, heads, hd] in v's
    dtype.
    """
    b, t, heads, hd = q.shape
    size = causal_block_length(t, block)
    if size == t:
        return attend(q, [(k, v, jnp.tril(jnp.ones((1, t, t), bool)))])
    kv, g = k.shape[1], heads // k.shape[1]
    n = -(-t // size)
    pad = n * size - t
    qb = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, size, kv, g, hd)
    kb = jnp.pad(k, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, kv, n, size, hd)
    vb = jnp.pad(v, ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, kv, n, size, hd)
    pairs = jnp.asarray([(i, j) for i in range(n) for j in range(i + 1)], jnp.int32)
    diagonal = jnp.tril(jnp.ones((size, size), bool))
    scale = math.sqrt(hd)

    def step(carry: tuple[Array, ...], pair: Array) -> tuple[tuple[Array, ...], None]:
        out, m, total, acc = carry
        i, j = pair[0], pair[1]
        first = j == 0  # a new query block: the running softmax starts afresh
        m = jnp.where(first, -jnp.inf, m)
        total, acc = jnp.where(first, 0.0, total), jnp.where(first, 0.0, acc)
        qi = jax.lax.dynamic_index_in_dim(qb, i, axis=1, keepdims=False)  # [B, b, kv, g, hd]
        kj = jax.lax.dynamic_index_in_dim(kb, j, axis=2, keepdims=False)  # [B, kv, b, hd]
        vj = jax.lax.dynamic_index_in_dim(vb, j, axis=2, keepdims=False)
        s = einsum_f32("btkgd,bksd->bkgts", qi, kj) / scale
        s = jnp.where((j < i) | diagonal, s, -jnp.inf)  # key block 0 leaves every query a key
        m_new = jnp.maximum(m, jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m_new)
        corr = jnp.exp(m - m_new)
        total = total * corr + jnp.sum(p, axis=-1, keepdims=True)
        acc = acc * corr + einsum_f32("bkgts,bksd->bkgtd", p.astype(v.dtype), vj)
        # Written at every pair; the query block's last pair (j == i) writes the final value.
        out = jax.lax.dynamic_update_index_in_dim(out, (acc / total).astype(v.dtype), i, axis=0)
        return (out, m_new, total, acc), None

    init = (
        jnp.zeros((n, b, kv, g, size, hd), v.dtype),
        jnp.full((b, kv, g, size, 1), -jnp.inf, jnp.float32),
        jnp.zeros((b, kv, g, size, 1), jnp.float32),
        jnp.zeros((b, kv, g, size, hd), jnp.float32),
    )
    (out, _, _, _), _ = jax.lax.scan(step, init, pairs)
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(b, n * size, heads, hd)  # [B, T', heads, hd]
    return out[:, :t]


class Attention(nnx.Module):
    """Grouped-query attention; weights stored [in, out] (HF's transposed)."""

    def __init__(self, cfg: Qwen3Config, dtype: Any, rngs: nnx.Rngs):
        h, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = _param(rngs, (h, cfg.num_heads * hd), dtype)
        self.k_proj = _param(rngs, (h, cfg.num_kv_heads * hd), dtype)
        self.v_proj = _param(rngs, (h, cfg.num_kv_heads * hd), dtype)
        self.o_proj = _param(rngs, (cfg.num_heads * hd, h), dtype)
        self.q_norm = _ones((hd,), dtype)
        self.k_norm = _ones((hd,), dtype)
        if cfg.attention_bias:
            self.q_bias = nnx.Param(jnp.zeros((cfg.num_heads * hd,), dtype))
            self.k_bias = nnx.Param(jnp.zeros((cfg.num_kv_heads * hd,), dtype))
            self.v_bias = nnx.Param(jnp.zeros((cfg.num_kv_heads * hd,), dtype))
            self.o_bias = nnx.Param(jnp.zeros((h,), dtype))

    def project_qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """x [B, T, H] -> q [B, T, heads, hd], k/v [B, T, kv, hd]; q, k normed and rotated."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = x @ self.q_proj[...], x @ self.k_proj[...], x @ self.v_proj[...]
        if cfg.attention_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = rope(rms_norm(q, self.q_norm[...], cfg.rms_norm_eps), positions, cfg.rope_theta)
        k = rope(rms_norm(k, self.k_norm[...], cfg.rms_norm_eps), positions, cfg.rope_theta)
        return q, k, v

    def _out(self, attn: Array) -> Array:
        """attn [B, T, heads, hd] -> [B, T, H]."""
        b, t = attn.shape[:2]
        out = attn.reshape(b, t, -1) @ self.o_proj[...]
        return out + self.o_bias[...] if self.cfg.attention_bias else out

    def __call__(
        self, x: Array, positions: Array, state: LayerKV | None = None
    ) -> tuple[Array, Any]:
        """Self-attention of x [B, T, H] at `positions`; returns (out [B, T, H], the new state).

        state None: causal attention within x (a full pass or a prefill); the new state is the
        context built, (k, v) [B, kv, T, hd] (the cache layout). state a `LayerKV`: one new token
        per row (T = 1), stored in the cache first, then attending over what it holds for the row.
        """
        q, k, v = self.project_qkv(x, positions)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if state is None:
            return self._out(attend_causal(q, k, v)), (k, v)
        state, out = state.decode(q, k, v)
        return self._out(out), state


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config, dtype: Any, rngs: nnx.Rngs):
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _param(rngs, (h, f), dtype)
        self.up_proj = _param(rngs, (h, f), dtype)
        self.down_proj = _param(rngs, (f, h), dtype)

    def __call__(self, x: Array) -> Array:
        gated = jax.nn.silu(x @ self.gate_proj[...]) * (x @ self.up_proj[...])
        return gated @ self.down_proj[...]


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attention(norm(x)), then + MLP(norm(.)). The MLP of a layer
    `cfg.is_sparse(layer)` selects is a `SparseMoE` (Qwen3-MoE), else a dense `MLP`."""

    def __init__(self, cfg: Qwen3Config, dtype: Any, rngs: nnx.Rngs, layer: int = 0):
        self.cfg = cfg
        self.input_layernorm = _ones((cfg.hidden_size,), dtype)
        self.post_attention_layernorm = _ones((cfg.hidden_size,), dtype)
        self.self_attn = Attention(cfg, dtype, rngs)
        if cfg.is_sparse(layer):
            self.mlp: MLP | SparseMoE = SparseMoE(cfg.moe_config(), dtype, rngs)
        else:
            self.mlp = MLP(cfg, dtype, rngs)

    def __call__(
        self,
        x: Array,
        positions: Array,
        state: Any = None,
        *,
        index: int = 0,
        hook: Hook | None = None,
    ) -> tuple[Array, Any]:
        """x [B, T, H] -> (x' [B, T, H], the attention's new state; see `Attention.__call__`).

        `index` is this layer's place in the model, for the hook's "input", "attn", "mlp" sites.
        """
        eps = self.cfg.rms_norm_eps
        x = _at(hook, index, "input", x)
        attn, state = self.self_attn(rms_norm(x, self.input_layernorm[...], eps), positions, state)
        x = x + _at(hook, index, "attn", attn)
        mlp = self.mlp(rms_norm(x, self.post_attention_layernorm[...], eps))
        return x + _at(hook, index, "mlp", mlp), state


@struct.dataclass
class LayerKV:
    """One attention layer's decode state: the cache a new token per row is stored in and reads.

    prefix_k/v [1, kv, Pb, hd] (one prompt shared by every row) or [B, kv, Pb, hd];
    prefix_mask bool [1 or B, 1, Pb]; k/v [B, kv, N, hd]; index int32 scalar or [B]; block (static)
    0 or the block length of bounded attention (see DecodeKV).
    """

    prefix_k: Array
    prefix_v: Array
    prefix_mask: Array
    k: Array
    v: Array
    index: Array
    block: int = struct.field(pytree_node=False, default=0)

    def store(self, k: Array, v: Array) -> tuple[LayerKV, list[tuple[Array, Array, Array]]]:
        """Write the new tokens' k/v [B, kv, 1, hd]; return the updated state and the segments
        the new tokens attend to (their own entry included)."""
        n = self.k.shape[2]
        if self.index.ndim == 0:
            ck = jax.lax.dynamic_update_slice_in_dim(self.k, k, self.index, axis=2)
            cv = jax.lax.dynamic_update_slice_in_dim(self.v, v, self.index, axis=2)
            mask = (jnp.arange(n) <= self.index)[None, None]
        else:
            rows = jnp.arange(k.shape[0])
            ck = self.k.at[rows, :, self.index].set(k[:, :, 0], mode="drop")
            cv = self.v.at[rows, :, self.index].set(v[:, :, 0], mode="drop")
            mask = (jnp.arange(n) <= self.index[:, None])[:, None]
        prefix = (self.prefix_k, self.prefix_v, self.prefix_mask)
        return self.replace(k=ck, v=cv), [prefix, (ck, cv, mask)]

    def decode(self, q: Array, k: Array, v: Array) -> tuple[LayerKV, Array]:
        """Store the new tokens' k/v [B, kv, 1, hd], then attend q [B, 1, heads, hd] over the
        prompt and the row's tokens (the new one included). Returns (the updated state, the
        attention output [B, 1, heads, hd]). block > 0: `attend_bounded` (reads the row tokens
        only up to the longest row's filled length); 0: `attend` over all N positions.
        """
        state, segments = self.store(k, v)
        if not self.block:
            return state, attend(q, segments)
        n = self.k.shape[2]
        # A row whose index is out of range stores nothing and its output is junk: it sees only
        # its prompt, so it does not make every row read all N positions.
        filled = jnp.where(self.index < n, self.index + 1, 0)
        return state, attend_bounded(q, segments[0], state.k, state.v, filled, self.block)


@struct.dataclass
class DecodeKV:
    """The cache a decode step (one new token per row) writes to and attends over, all layers.

    prefix_k/v: per layer [1, kv, Pb, hd] (one prompt shared by every row) or [B, kv, Pb, hd].
    prefix_mask: bool [1 or B, 1, Pb], the prompt positions a row may see (true length, not pad).
    k/v: per layer [B, kv, N, hd], the rows' own tokens; slot n holds a row's generated token n.
    index: int32 scalar (every row, in lockstep) or [B]: the slot the new token is stored in. A row
        attends to its slots 0..index; an index >= N stores nothing (that row's output is junk).
    block: static. 0: attention reads all N slots of every row (`attend`); B > 0: it reads them in
        blocks of B up to the longest row's index (`attend_bounded`), so a step early in
        generation reads little of the cache.
    """

    prefix_k: tuple[Array, ...]
    prefix_v: tuple[Array, ...]
    prefix_mask: Array
    k: tuple[Array, ...]
    v: tuple[Array, ...]
    index: Array
    block: int = struct.field(pytree_node=False, default=0)

    def layers(self) -> tuple[LayerKV, ...]:
        """Each layer's decode state (views of these arrays; nothing is copied)."""
        return tuple(
            LayerKV(pk, pv, self.prefix_mask, k, v, self.index, self.block)
            for pk, pv, k, v in zip(self.prefix_k, self.prefix_v, self.k, self.v, strict=True)
        )

    def with_layers(self, layers: Sequence[LayerKV]) -> DecodeKV:
        """This cache with every layer's k/v taken from `layers` (after a decode step)."""
        return self.replace(k=tuple(s.k for s in layers), v=tuple(s.v for s in layers))


@struct.dataclass
class KVCache:
    """Keys/values of one model for a batch of rows that share one prompt.

    prefix_k/v: per layer [1, kv, Pb, hd] (the prompt, stored once; Pb >= the true length, so
    prompts padded to a bucket length share one compiled decode).
    prefix_length: int32 scalar, the true prompt length; slots >= it are never attended.
    k/v: per layer [B, kv, N, hd] (generated tokens; slot n holds generated token n).
    """

    prefix_k: tuple[Array, ...]
    prefix_v: tuple[Array, ...]
    prefix_length: Array
    k: tuple[Array, ...]
    v: tuple[Array, ...]

    @property
    def prefix_capacity(self) -> int:
        """Static prompt slots (the bucket length Pb)."""
        return self.prefix_k[0].shape[2]

    @property
    def capacity(self) -> int:
        """How many generated tokens fit."""
        return self.k[0].shape[2]


def empty_kv(
    cfg: Qwen3Config, dtype: Any, batch: int, capacity: int
) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
    """Zeroed per-row K and V for `capacity` tokens: per layer [batch, kv, capacity, hd].

    Every array is its own buffer, so the cache can be donated and updated in place.
    """
    shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim)
    k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return k, v


def slot_kv(
    prompt_length: Array, write: Array, prompt: Sequence[Any], own: Sequence[Any], block: int
) -> DecodeKV:
    """The `DecodeKV` of S engine slots: prompt/own per layer (k, v) as `Qwen3Config`'s
    `empty_prompt_states`/`empty_own_states`, prompt_length and write int [S] (see
    `Qwen3.decode_slots`)."""
    pk, pv = tuple(k for k, _ in prompt), tuple(v for _, v in prompt)
    in_prompt = jnp.arange(pk[0].shape[2]) < prompt_length[:, None]
    ok, ov = tuple(k for k, _ in own), tuple(v for _, v in own)
    return DecodeKV(pk, pv, in_prompt[:, None], ok, ov, write, block)


class Qwen3(nnx.Module):
    """Qwen3ForCausalLM, or Qwen3MoeForCausalLM when `cfg.num_experts` > 0. Parameters in
    `dtype` (float32 or bfloat16); logits always float32."""

    def __init__(self, cfg: Qwen3Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs, i) for i in range(cfg.num_layers)])
        self.norm = _ones((cfg.hidden_size,), dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype)

    def logits(self, x: Array) -> Array:
        """Final norm and LM head: hidden [..., H] -> float32 logits [..., V]."""
        x = rms_norm(x, self.norm[...], self.cfg.rms_norm_eps)
        if self.cfg.tie_word_embeddings:
            return einsum_f32("...h,vh->...v", x, self.embed_tokens[...])
        return einsum_f32("...h,hv->...v", x, self.lm_head[...])

    def forward(
        self,
        tokens: Array,
        positions: Array,
        states: Sequence[Any] | None = None,
        hook: Hook | None = None,
    ) -> tuple[Array, tuple[Any, ...]]:
        """The model loop: tokens, positions int [B, T] -> (hidden [B, T, H] in the param dtype,
        before the final norm; each layer's new state).

        states: one per layer, each None (a full causal pass over the tokens) or the state the
        layer decodes against; None: a full pass in every layer. hook: see `Hook`.
        """
        x = _at(hook, 0, "embed", self.embed_tokens[...][tokens])
        states = (None,) * len(self.layers) if states is None else tuple(states)
        if len(states) != len(self.layers):
            raise ValueError(f"{len(states)} layer states for {len(self.layers)} layers")
        out = []
        for i, (layer, state) in enumerate(zip(self.layers, states, strict=True)):
            x, state = layer(x, positions, state, index=i, hook=hook)
            out.append(state)
        return x, tuple(out)

    def hidden_states(
        self, tokens: Array, hook: Hook | None = None
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """Full causal pass over tokens int [B, T], before the final norm and LM head.

        Returns (hidden [B, T, H] in the param dtype, keys and values per layer [B, kv, T, hd]).
        """
        return self._full_pass(tokens, hook)

    def _full_pass(
        self, tokens: Array, hook: Hook | None
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        # Subclasses override the public passes with other arguments (DirectionalQwen3: alpha);
        # the base passes call this, never each other.
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x, states = self.forward(tokens, positions, None, hook)
        return x, tuple(k for k, _ in states), tuple(v for _, v in states)

    def __call__(
        self, tokens: Array, hook: Hook | None = None
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """Full causal pass over tokens int [B, T].

        Returns (logits f32 [B, T, V], keys and values per layer, each [B, kv, T, hd]).
        """
        x, ks, vs = self._full_pass(tokens, hook)
        return self.logits(x), ks, vs

    def prefill(
        self,
        prompt_tokens: Array,
        length: Array | int | None = None,
        hook: Hook | None = None,
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """Run one prompt (int [Pb], right-padded) through the model.

        `length` (int, may be traced; default Pb) is the true prompt length: causal attention
        means the padding never changes positions < length. Returns (float32 logits [V] after
        token length-1, prompt keys and values per layer [1, kv, Pb, hd]). Only one row of logits
        is computed, so a long prompt does not materialise [Pb, V].
        """
        x, ks, vs = self._full_pass(prompt_tokens[None, :], hook)
        last = prompt_tokens.shape[0] - 1 if length is None else jnp.asarray(length) - 1
        h = jax.lax.dynamic_index_in_dim(x[0], last, axis=0, keepdims=False)
        return self.logits(h), ks, vs

    def decode_step(
        self, tokens: Array, positions: Array, kv: DecodeKV, hook: Hook | None = None
    ) -> tuple[Array, DecodeKV]:
        """One new token per row: tokens, positions int [B] -> (float32 logits [B, V], kv with the
        new keys/values stored at kv.index)."""
        x, layers = self.forward(tokens[:, None], positions[:, None], kv.layers(), hook)
        return self.logits(x[:, 0]), kv.with_layers(layers)

    def prefill_states(
        self, prompt_tokens: Array, length: Array, **cond: Any
    ) -> tuple[Array, tuple[Any, ...]]:
        """Engine layer-state protocol: `prefill` of one prompt (int [Pb], true `length`) ->
        (float32 logits [V], one prompt state per layer: (k, v) [1, kv, Pb, hd]). `cond`: the
        keyword arguments of a conditioned subclass's prefill (alpha)."""
        logits, ks, vs = self.prefill(prompt_tokens, length, **cond)
        return logits, tuple(zip(ks, vs, strict=True))

    def decode_slots(
        self,
        tokens: Array,
        positions: Array,
        prompt_length: Array,
        write: Array,
        active: Array,
        prompt: Sequence[Any],
        own: Sequence[Any],
        block: int = 0,
        **cond: Any,
    ) -> tuple[Array, tuple[Any, ...], tuple[Any, ...]]:
        """Engine layer-state protocol: one decode step of S slots.

        tokens, positions, prompt_length int [S]; active bool [S]: the slot decodes a token (an
        inactive slot's state must not change, its logits are junk); write int [S]: the own-state
        slot the token is stored in, >= capacity where inactive (attention drops the write, so
        `active` is not read here). prompt/own: per layer, as the config's
        `empty_prompt_states` / `empty_own_states` with n = S. block: > 0 reads the own K/V in
        blocks only up to the longest busy slot (`attend_bounded`), 0 all of it. Returns (float32
        logits [S, V], prompt states, own states); attention never changes a prompt.
        """
        kv = slot_kv(prompt_length, write, prompt, own, block)
        logits, kv = self.decode_step(tokens, positions, kv, **cond)
        return logits, tuple(prompt), tuple(zip(kv.k, kv.v, strict=True))

    def init_cache(
        self,
        prompt_tokens: Array,
        batch: int,
        capacity: int,
        length: Array | int | None = None,
    ) -> tuple[Array, KVCache]:
        """Prefill one prompt (int [P]) and make an empty per-row cache for `capacity` new tokens.

        `length` (default P) lets the prompt be right-padded to a bucket length. Returns the
        float32 logits [V] after the last true prompt token, and the cache.
        """
        n = prompt_tokens.shape[0] if length is None else length
        logits, ks, vs = self.prefill(prompt_tokens, n)
        k, v = empty_kv(self.cfg, self.dtype, batch, capacity)
        return logits, KVCache(ks, vs, jnp.asarray(n, jnp.int32), k, v)

    def decode(self, tokens: Array, step: Array, cache: KVCache) -> tuple[Array, KVCache]:
        """Append one token per row at generated slot `step` (int scalar, same for all rows).

        tokens int [B]; returns (logits f32 [B, V], updated cache). Position = prefix_length + step.
        The token attends to the prompt (shared) and generated slots 0..step (itself included).
        """
        in_prompt = jnp.arange(cache.prefix_capacity) < cache.prefix_length
        kv = DecodeKV(cache.prefix_k, cache.prefix_v, in_prompt[None, None], cache.k, cache.v, step)
        positions = jnp.full(tokens.shape, cache.prefix_length + step, jnp.int32)
        logits, kv = self.decode_step(tokens, positions, kv)
        return logits, cache.replace(k=kv.k, v=kv.v)


def init_random(cfg: Qwen3Config, *, dtype: Any = jnp.float32, seed: int = 0) -> Qwen3:
    """A Qwen3 with N(0, 0.02) weights and unit norms: for benchmarks, tests and training."""
    return Qwen3(cfg, dtype=dtype, rngs=nnx.Rngs(params=seed))
