"""One einsum with float32 accumulation that also runs on XLA's CPU backend in bfloat16.

On GPU/TPU a bf16 dot with `preferred_element_type=float32` accumulates in f32 natively. XLA's CPU
backend rejects some of those dots, so there the operands are upcast to f32 first: the same
products and f32 sums (bf16 -> f32 is exact), only slower. A local helper of the hybrid layers;
the lead unifies it with the one lpe_jax/qwen3.py gains for the same reason.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def einsum_f32(spec: str, *operands: Array) -> Array:
    """`jnp.einsum(spec, *operands)` accumulated and returned in float32."""
    if jax.default_backend() == "cpu" and any(o.dtype != jnp.float32 for o in operands):
        operands = tuple(o.astype(jnp.float32) for o in operands)
    return jnp.einsum(spec, *operands, preferred_element_type=jnp.float32)


def ragged_dot_f32(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """`jax.lax.ragged_dot` (lhs [M, K] in groups of consecutive rows, rhs [G, K, N]) accumulated
    and returned in float32, upcasting on CPU as `einsum_f32` does."""
    if jax.default_backend() == "cpu" and (lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32):
        lhs, rhs = lhs.astype(jnp.float32), rhs.astype(jnp.float32)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
