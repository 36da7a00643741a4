"""Gated full attention: the full-attention layer of Qwen3.5 (HF `Qwen3_5Attention`, identical in
`Qwen3_5MoeAttention`), in Flax NNX, with the interface of `lpe_jax.model.qwen3.Attention`.

Differences from Qwen3's attention, all read from transformers' code:
- `q_proj` produces, per head, the query *and* an output gate: HF views its output as
  [B, T, heads, 2 * head_dim] and splits each head's row in halves (query first), so the layout is
  interleaved per head, not [all queries | all gates]. The attention output [B, T, heads * hd] is
  multiplied by sigmoid(gate) before `o_proj`.
- q_norm / k_norm are Qwen3.5's zero-centred RMSNorm (`rms_norm_offset`: scale 1 + weight).
- Rotary embeddings turn only the first `rotary_dim = int(head_dim * partial_rotary_factor)`
  dims of each head (rotate-half within them; inverse frequencies over rotary_dim); the rest pass
  unchanged. Qwen3.5's rotary is multimodal (`mrope_section`): its three position streams (time,
  height, width) are equal for text tokens, which makes it the ordinary 1-D rotary used here.
K/V are cached exactly as for Qwen3 (`lpe_jax.model.qwen3.LayerKV`, one layer's share of
`DecodeKV`),
[B, kv, T, head_dim].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lpe_jax.model.hf_keymap import HFParam, same, transposed
from lpe_jax.model.qwen3 import LayerKV, attend_causal, rope
from lpe_jax.model.qwen35_norms import rms_norm_offset

Array = jax.Array
HF_DEFAULT_HEAD_DIM = 256  # transformers.Qwen3_5TextConfig's default when config.json omits it
HF_DEFAULT_PARTIAL_ROTARY = 0.25  # Qwen3_5TextConfig.__post_init__'s default


@dataclasses.dataclass(frozen=True)
class GatedAttentionConfig:
    """Static shape of one gated full-attention layer."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float = 10_000_000.0
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}; grouped-query attention needs whole "
                "groups."
            )
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"rotary_dim={self.rotary_dim} must be even and in (0, head_dim={self.head_dim}]; "
                "check partial_rotary_factor."
            )

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> GatedAttentionConfig:
        """From a Qwen3.5 (or Qwen3.5-MoE) text config dict. partial_rotary_factor and
        rope_theta are read from `rope_parameters` (transformers 5) or the top level (older
        exports); a rope_type other than 'default' or attention_bias=true is refused."""
        missing = [
            k for k in ("hidden_size", "num_attention_heads", "num_key_value_heads") if k not in hf
        ]
        if missing:
            raise ValueError(f"config lacks {missing}; a Qwen3.5 text config has them.")
        if hf.get("attention_bias"):
            raise ValueError("attention_bias=true is not supported (Qwen3.5 has no q/k/v bias).")
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported (only 'default').")
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if theta is None:
            raise ValueError("config gives no rope_theta (top level or in rope_parameters).")
        factor = rope.get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", HF_DEFAULT_PARTIAL_ROTARY)
        )
        head_dim = int(hf.get("head_dim") or HF_DEFAULT_HEAD_DIM)
        return cls(
            hidden_size=int(hf["hidden_size"]),
            num_heads=int(hf["num_attention_heads"]),
            num_kv_heads=int(hf["num_key_value_heads"]),
            head_dim=head_dim,
            rotary_dim=int(head_dim * float(factor)),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        )

    def kv_bytes_per_token(self, dtype: Any) -> int:
        """Bytes of K and V one token occupies in this layer."""
        return 2 * self.num_kv_heads * self.head_dim * jnp.dtype(dtype).itemsize


def partial_rope(x: Array, positions: Array, rotary_dim: int, theta: float) -> Array:
    """Rotate-half rotary on x[..., :rotary_dim] (x [B, T, heads, hd], positions int [B, T]);
    the remaining dims are returned unchanged."""
    if rotary_dim == x.shape[-1]:
        return rope(x, positions, theta)
    turned = rope(x[..., :rotary_dim], positions, theta)
    return jnp.concatenate([turned, x[..., rotary_dim:]], axis=-1)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], dtype: Any, std: float = 0.02) -> nnx.Param:
    return nnx.Param((std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype))


class GatedAttention(nnx.Module):
    """HF Qwen3_5Attention; weights stored [in, out] (HF's transposed), HF's parameter names."""

    def __init__(self, cfg: GatedAttentionConfig, dtype: Any, rngs: nnx.Rngs):
        h, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = _param(rngs, (h, 2 * cfg.num_heads * hd), dtype)  # query|gate per head
        self.k_proj = _param(rngs, (h, cfg.num_kv_heads * hd), dtype)
        self.v_proj = _param(rngs, (h, cfg.num_kv_heads * hd), dtype)
        self.o_proj = _param(rngs, (cfg.num_heads * hd, h), dtype)
        self.q_norm = nnx.Param(jnp.zeros((hd,), dtype))  # zero-centred: scale 1 + weight
        self.k_norm = nnx.Param(jnp.zeros((hd,), dtype))

    def project_qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array, Array]:
        """x [B, T, H] -> q [B, T, heads, hd], k/v [B, T, kv, hd] (q, k normed and rotated) and
        the output gate [B, T, heads * hd] (before the sigmoid)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, gate = jnp.split((x @ self.q_proj[...]).reshape(b, t, cfg.num_heads, -1), 2, axis=-1)
        k = (x @ self.k_proj[...]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = (x @ self.v_proj[...]).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = rms_norm_offset(q, self.q_norm[...], cfg.rms_norm_eps)
        k = rms_norm_offset(k, self.k_norm[...], cfg.rms_norm_eps)
        q = partial_rope(q, positions, cfg.rotary_dim, cfg.rope_theta)
        k = partial_rope(k, positions, cfg.rotary_dim, cfg.rope_theta)
        return q, k, v, gate.reshape(b, t, -1)

    def output(self, attn: Array, gate: Array) -> Array:
        """attn [B, T, heads, hd], gate [B, T, heads * hd] -> [B, T, H]."""
        b, t = attn.shape[:2]
        return (attn.reshape(b, t, -1) * jax.nn.sigmoid(gate)) @ self.o_proj[...]

    def __call__(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        """Causal self-attention over x [B, T, H] at `positions` (a full pass or a prefill;
        right padding never reaches positions before it).

        Returns (out [B, T, H], k and v [B, kv, T, hd], the cache layout).
        """
        q, k, v, gate = self.project_qkv(x, positions)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        return self.output(attend_causal(q, k, v), gate), k, v

    def decode(self, x: Array, positions: Array, kv: LayerKV) -> tuple[Array, LayerKV]:
        """One new token per row, x [B, 1, H]: store its k/v in this layer's cache `kv`, then
        attend over what it holds for the row (`LayerKV.decode`, as Qwen3's attention: with
        kv.block > 0 the row's own tokens are read in blocks only up to the longest row's).
        Returns (out [B, 1, H], kv updated)."""
        q, k, v, gate = self.project_qkv(x, positions)
        kv, attn = kv.decode(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))
        return self.output(attn, gate), kv


def hf_weight_table(cfg: GatedAttentionConfig, prefix: str) -> list[HFParam]:
    """HF names of one gated attention layer under `prefix` (e.g.
    'model.language_model.layers.3.self_attn.') -> `GatedAttention` parameters."""
    h, hd = cfg.hidden_size, cfg.head_dim
    qd, kvd = cfg.num_heads * hd, cfg.num_kv_heads * hd
    return [
        transposed(("q_proj",), prefix + "q_proj.weight", (2 * qd, h)),
        transposed(("k_proj",), prefix + "k_proj.weight", (kvd, h)),
        transposed(("v_proj",), prefix + "v_proj.weight", (kvd, h)),
        transposed(("o_proj",), prefix + "o_proj.weight", (h, qd)),
        same(("q_norm",), prefix + "q_norm.weight", (hd,)),
        same(("k_norm",), prefix + "k_norm.weight", (hd,)),
    ]
