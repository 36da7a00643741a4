"""Dots that accumulate in float32 on every backend, bf16 operands included.

On GPU/TPU bf16 operands stay bf16 with float32 accumulation (what tensor cores and the MXU do
natively). XLA:CPU has no BF16 x BF16 -> F32 dot kernel ("Unsupported element type for
DotThunk::Execute", jax 0.10; whether a dot reaches it depends on its shape, so width 16 ran and
256 crashed), so on CPU the operands are upcast first. Both sum the same exact products in
float32 (bf16 -> f32 is exact); only the order may differ. The backend is read at trace time
(`jax.default_backend()`); float32 operands give the plain float32 dot everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _upcast_on_cpu(*operands: Array) -> tuple[Array, ...]:
    if jax.default_backend() == "cpu":
        return tuple(o.astype(jnp.float32) for o in operands)
    return operands


def einsum_f32(spec: str, *operands: Array) -> Array:
    """`jnp.einsum(spec, *operands)` accumulated and returned in float32."""
    if all(o.dtype == jnp.float32 for o in operands):
        return jnp.einsum(spec, *operands)
    return jnp.einsum(spec, *_upcast_on_cpu(*operands), preferred_element_type=jnp.float32)


def ragged_dot_f32(lhs: Array, rhs: Array, group_sizes: Array) -> Array:
    """`jax.lax.ragged_dot` (lhs [M, K] in groups of consecutive rows, rhs [G, K, N]) accumulated
    and returned in float32, upcasting on CPU as `einsum_f32` does."""
    if lhs.dtype != jnp.float32 or rhs.dtype != jnp.float32:
        lhs, rhs = _upcast_on_cpu(lhs, rhs)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
