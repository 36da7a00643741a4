"""Bounded attention (qwen3.attend_bounded) equals full-length attention (qwen3.attend) to float32
rounding, and reads no block past the longest row's filled length. Blocked causal attention
(qwen3.attend_causal, a full pass) equals one causal softmax (qwen3.attend), values and gradients,
and never holds a [T, T] score buffer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lpe_jax.model.qwen3 import attend, attend_bounded, attend_causal, causal_block_length

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


@jax.jit
def _causal_reference(q, k, v):
    t = q.shape[1]
    return attend(q, [(k, v, jnp.tril(jnp.ones((1, t, t), bool)))])


def _qkv(b, t, heads, kv, hd, dtype, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(2 * r.normal(size=(b, t, heads, hd)), dtype)  # scores of a few units
    k = jnp.asarray(2 * r.normal(size=(b, kv, t, hd)), dtype)
    return q, k, jnp.asarray(r.normal(size=(b, kv, t, hd)), dtype)


_causal = jax.jit(attend_causal, static_argnums=3)


def test_causal_block_length():
    assert [causal_block_length(t, 8) for t in (1, 8, 9, 16, 17, 37)] == [1, 8, 5, 8, 6, 8]
    with pytest.raises(ValueError, match="block=0"):
        causal_block_length(5, 0)


@pytest.mark.usefixtures("highest_matmul_precision")
@pytest.mark.parametrize(
    "t, heads, kv, block",
    [(37, 4, 2, 8), (64, 4, 4, 16), (10, 2, 1, 3), (9, 4, 2, 9)],
    ids=["gqa_padded_tail", "mha_divides", "mqa_small_blocks", "one_block"],
)
def test_causal_blocks_equal_one_softmax_f32(t, heads, kv, block):
    q, k, v = _qkv(2, t, heads, kv, 16, jnp.float32)
    ref = _causal_reference(q, k, v)
    got = _causal(q, k, v, block)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    rel = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
    assert rel <= 1e-5, rel


@pytest.mark.usefixtures("highest_matmul_precision")
def test_causal_blocks_gradients_f32():
    # Reverse mode through the scan (training runs the full pass): gradients agree as well.
    q, k, v = _qkv(2, 21, 4, 2, 8, jnp.float32)

    def grads(fn):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)

    got, ref = grads(lambda *a: attend_causal(*a, 8)), grads(_causal_reference)
    for a, r in zip(got, ref, strict=True):
        assert float(jnp.abs(a - r).max() / jnp.abs(r).max()) <= 1e-5


def test_causal_blocks_bf16():
    # bf16: the unnormalised probabilities are rounded (attend rounds the normalised ones):
    # 1-2 units in the last place of outputs of size ~1.
    q, k, v = _qkv(2, 37, 4, 2, 16, jnp.bfloat16)
    got, ref = _causal(q, k, v, 8), _causal_reference(q, k, v)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=2**-6)


def test_causal_blocks_hold_no_t_by_t_scores():
    """XLA's temporaries of the blocked pass stay below one float32 [B, heads, T, T] buffer (the
    one-softmax pass holds about four) and grow about linearly in T."""
    b, heads, t = 2, 4, 1024

    def temp(fn, t):
        q, k, v = _qkv(b, t, heads, 2, 16, jnp.float32)
        return jax.jit(fn).lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    one_t_by_t = b * heads * t * t * 4
    blocked = temp(lambda *a: attend_causal(*a, 128), t)
    assert temp(_causal_reference, t) >= 2 * one_t_by_t  # the control: the T^2 term is there
    assert blocked < one_t_by_t / 4, (blocked, one_t_by_t)
    assert blocked < 2.5 * temp(lambda *a: attend_causal(*a, 128), t // 2)
