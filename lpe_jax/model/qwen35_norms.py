"""The two RMSNorms of Qwen3.5 (dense and MoE), which differ from Qwen3's `rms_norm`.

- `rms_norm_offset` is HF `Qwen3_5RMSNorm` / `Qwen3_5MoeRMSNorm` (the layer norms, the final norm
  and the gated attention's q/k norms): the weight is stored zero-centred and applied as
  `(1 + weight)`, and the multiply happens in float32 *before* the cast back (Qwen3 casts first).
- `gated_rms_norm` is HF `Qwen3_5RMSNormGated` (the Gated DeltaNet's output norm): a plain weight
  (initialised to ones), applied after the cast back, then multiplied by `silu(gate)` in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _normalize_f32(x: Array, eps: float) -> Array:
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def rms_norm_offset(x: Array, weight: Array, eps: float) -> Array:
    """HF Qwen3_5RMSNorm: normalise x in f32, scale by (1 + weight) in f32, cast to x.dtype."""
    return (_normalize_f32(x, eps) * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


def gated_rms_norm(x: Array, gate: Array, weight: Array, eps: float) -> Array:
    """HF Qwen3_5RMSNormGated over the last axis: weight * norm(x) (cast to x.dtype first), times
    silu(gate) in f32, returned in x.dtype. x and gate have the same shape."""
    normed = weight * _normalize_f32(x, eps).astype(x.dtype)
    return (normed * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)
