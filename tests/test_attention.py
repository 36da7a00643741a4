"""Bounded attention (qwen3.attend_bounded) equals full-length attention (qwen3.attend) to float32
rounding, and reads no block past the longest row's filled length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe_jax.model.qwen3 import attend, attend_bounded

B, HEADS, KV, HD, P, N = 5, 4, 2, 16, 7, 13


def _inputs(dtype, prefix_rows: int, seed: int = 0):
    r = np.random.default_rng(seed)

    def a(*shape):
        return jnp.asarray(r.normal(size=shape), dtype)

    q, k, v = a(B, 1, HEADS, HD), a(B, KV, N, HD), a(B, KV, N, HD)
    pk, pv = a(prefix_rows, KV, P, HD), a(prefix_rows, KV, P, HD)
    prompt_len = r.integers(1, P + 1, (prefix_rows, 1, 1))
    prefix = (pk, pv, jnp.asarray(np.arange(P)[None, None] < prompt_len))
    return q, prefix, k, v


_bounded = jax.jit(attend_bounded, static_argnums=5)


@pytest.mark.parametrize(
    "dtype, tol, prefix_rows, block",
    [
        (jnp.float32, 1e-6, 1, 3),  # a block length that does not divide N: the last is clamped
        (jnp.float32, 1e-6, B, 64),  # one block, longer than N
        (jnp.bfloat16, 2**-6, B, 3),
        (jnp.bfloat16, 2**-6, 1, 4),
    ],
    ids=["f32_shared_prefix_block3", "f32_per_row_prefix_block64", "bf16_per_row", "bf16_shared"],
)
def test_bounded_attention_matches_full_length(dtype, tol, prefix_rows, block):
    # Rows from empty (prompt only) to full.
    q, prefix, k, v = _inputs(dtype, prefix_rows)
    filled = jnp.asarray([0, 1, 5, 9, N], jnp.int32)
    full = attend(q, [prefix, (k, v, (jnp.arange(N) < filled[:, None])[:, None])])
    got = _bounded(q, prefix, k, v, filled, block)
    assert got.shape == full.shape and got.dtype == full.dtype == dtype
    # bf16: 1-2 units in the last place of outputs of size ~1 (probabilities rounded unnormalised).
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(full, np.float32), atol=tol)


@pytest.mark.parametrize("longest, block", [(5, 3), (4, 4)])
def test_blocks_past_the_longest_row_are_never_read(longest, block):
    # NaN keys/values from the first block past `longest` on: reading them (even masked: the
    # weights are 0, and 0 * NaN = NaN) would make the output NaN.
    q, prefix, k, v = _inputs(jnp.float32, 1, seed=1)
    first_unread = -(-longest // block) * block
    k, v = k.at[:, :, first_unread:].set(jnp.nan), v.at[:, :, first_unread:].set(jnp.nan)
    filled = jnp.asarray([longest, 0, 1, longest, 2], jnp.int32).clip(0, longest)
    got = _bounded(q, prefix, k, v, filled, block)
    assert np.isfinite(np.asarray(got)).all()
    clean_k, clean_v = jnp.nan_to_num(k), jnp.nan_to_num(v)
    full = attend(q, [prefix, (clean_k, clean_v, (jnp.arange(N) < filled[:, None])[:, None])])
    np.testing.assert_allclose(np.asarray(got), np.asarray(full), atol=1e-6)
