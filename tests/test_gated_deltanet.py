"""Gated DeltaNet (lpe_jax.model.gated_deltanet) against transformers' Qwen3_5GatedDeltaNet, and its
chunked and recurrent forms against each other (float32, 'highest' matmul precision)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hybrid_fixtures import qwen35_text_config, randomize, rel_err, state_dict_numpy

from lpe_jax.model.gated_deltanet import (
    GatedDeltaNet,
    GatedDeltaNetConfig,
    chunk_gated_delta_rule,
    hf_weight_table,
    qkv_channel_order,
    recurrent_gated_delta_rule,
)
from lpe_jax.model.hf_keymap import assign_hf

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")


@pytest.fixture(scope="module")
def hf_layer():
    """(HF config, a random HF Qwen3_5GatedDeltaNet, its weights as NumPy)."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5GatedDeltaNet

    cfg = qwen35_text_config(num_hidden_layers=1, layer_types=["linear_attention"])
    layer = randomize(Qwen3_5GatedDeltaNet(cfg, 0))
    return cfg, layer, state_dict_numpy(layer)


def _ours(hf_cfg, weights, dtype=jnp.float32, **overrides) -> GatedDeltaNet:
    cfg = GatedDeltaNetConfig.from_hf(hf_cfg.to_dict())
    if overrides:
        cfg = GatedDeltaNetConfig(**{**cfg.__dict__, **overrides})
    layer = GatedDeltaNet(cfg, dtype, nnx.Rngs(0))
    assign_hf(layer, hf_weight_table(cfg, ""), weights)
    return layer


# One compiled program per shape instead of op-by-op dispatch (which dominates on CPU).
_prefill = nnx.jit(lambda m, x, lengths=None, state=None: m.prefill(x, lengths, state))
_decode = nnx.jit(lambda m, x, state: m.decode(x, state))
_chunked = jax.jit(chunk_gated_delta_rule, static_argnames="chunk")
_recurrent = jax.jit(recurrent_gated_delta_rule)


def _x(b: int, t: int, h: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(b, t, h)).astype(np.float32)


def test_prefill_matches_hf_chunked(hf_layer):
    import torch
    from transformers.cache_utils import DynamicCache

    hf_cfg, hf, weights = hf_layer
    x = _x(2, 70, hf_cfg.hidden_size)  # two chunks of 64, the second partial
    cache = DynamicCache(config=hf_cfg)
    with torch.no_grad():
        ref = hf(torch.from_numpy(x), cache=cache).numpy()
    y, state = _prefill(_ours(hf_cfg, weights), jnp.asarray(x))
    assert np.abs(ref).max() > 0.1
    assert rel_err(y, ref) <= 1e-4, rel_err(y, ref)
    # HF keeps K conv inputs (the oldest is never read again); ours the last K-1, with the
    # channels grouped by key head (qkv_channel_order).
    order = qkv_channel_order(GatedDeltaNetConfig.from_hf(hf_cfg.to_dict()))
    assert sorted(order) == list(range(len(order)))
    assert rel_err(state.conv, cache.get_conv_state(0)[:, order, 1:].numpy()) <= 1e-6
    assert rel_err(state.recurrent, cache.get_recurrent_state(0).numpy()) <= 1e-4


def test_decode_matches_hf_recurrent(hf_layer):
    import torch
    from transformers.cache_utils import DynamicCache

    hf_cfg, hf, weights = hf_layer
    x = _x(2, 9, hf_cfg.hidden_size, seed=2)
    ours = _ours(hf_cfg, weights)
    cache = DynamicCache(config=hf_cfg)
    with torch.no_grad():
        hf(torch.from_numpy(x[:, :5]), cache=cache)
    _, state = _prefill(ours, jnp.asarray(x[:, :5]))
    for t in range(5, 9):
        with torch.no_grad():
            ref = hf(torch.from_numpy(x[:, t : t + 1]), cache=cache).numpy()
        y, state = _decode(ours, jnp.asarray(x[:, t : t + 1]), state)
        assert rel_err(y, ref) <= 1e-4, (t, rel_err(y, ref))
        assert rel_err(state.recurrent, cache.get_recurrent_state(0).numpy()) <= 1e-4


def test_rule_chunked_equals_recurrent():
    rng = np.random.default_rng(3)
    b, t, h, dk, dv = 2, 37, 3, 8, 5

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q, k = unit(rng.normal(size=(b, t, h, dk))), unit(rng.normal(size=(b, t, h, dk)))
    v = rng.normal(size=(b, t, h, dv))
    g, beta = -rng.uniform(0, 2, size=(b, t, h)), rng.uniform(0, 1, size=(b, t, h))
    s0 = rng.normal(size=(b, h, dk, dv))
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v, g, beta, s0)]
    out_r, s_r = _recurrent(*args)
    for chunk in (1, 8, 64):  # 37 is no multiple of 8; 64 > 37
        out_c, s_c = _chunked(*args, chunk=chunk)
        assert rel_err(out_c, out_r) <= 1e-5, chunk
        assert rel_err(s_c, s_r) <= 1e-5, chunk


def test_prefill_then_decode_equals_one_prefill(hf_layer):
    hf_cfg, _, weights = hf_layer
    ours = _ours(hf_cfg, weights, chunk_size=8)  # several chunks at a short length
    x = jnp.asarray(_x(2, 21, hf_cfg.hidden_size, seed=4))
    full, full_state = _prefill(ours, x)
    y, state = _prefill(ours, x[:, :13])  # 13: not a multiple of the chunk
    outs = [y]
    for t in range(13, 21):
        y_t, state = _decode(ours, x[:, t : t + 1], state)
        outs.append(y_t)
    assert rel_err(jnp.concatenate(outs, axis=1), full) <= 1e-5
    assert rel_err(state.recurrent, full_state.recurrent) <= 1e-5
    assert rel_err(state.conv, full_state.conv) <= 1e-6
    # A prefill continued from a state is the same sequence too.
    y2, state2 = _prefill(ours, x[:, 13:], None, _prefill(ours, x[:, :13])[1])
    assert rel_err(y2, full[:, 13:]) <= 1e-5
    assert rel_err(state2.recurrent, full_state.recurrent) <= 1e-5


def test_padded_batch_state_at_true_length(hf_layer):
    hf_cfg, _, weights = hf_layer
    ours = _ours(hf_cfg, weights, chunk_size=8)
    t = 19
    lengths = [19, 11, 2, 0]  # 2 < conv_kernel - 1: the window keeps leading zeros
    x = _x(len(lengths), t, hf_cfg.hidden_size, seed=5)
    y, state = _prefill(ours, jnp.asarray(x), jnp.asarray(lengths))
    for row, n in enumerate(lengths):
        if n == 0:  # nothing read: the initial (zero) state
            assert not np.any(state.recurrent[row]) and not np.any(state.conv[row])
            continue
        y_n, s_n = _prefill(ours, jnp.asarray(x[row : row + 1, :n]))
        assert rel_err(y[row, :n], y_n[0]) <= 1e-5, row
        assert rel_err(state.recurrent[row], s_n.recurrent[0]) <= 1e-5, row
        # Rows of a batch round their projections differently from a batch of one.
        assert rel_err(state.conv[row], s_n.conv[0]) <= 1e-6, row


def test_bfloat16_hidden_256_runs():
    cfg = GatedDeltaNetConfig(256, num_k_heads=2, num_v_heads=4, head_k_dim=64, head_v_dim=64)
    f32 = GatedDeltaNet(cfg, jnp.float32, nnx.Rngs(0))
    bf16 = GatedDeltaNet(cfg, jnp.bfloat16, nnx.Rngs(0))
    x = jnp.asarray(_x(2, 9, 256, seed=6))
    y32, _ = _prefill(f32, x, jnp.asarray([9, 5]))
    y16, state = _prefill(bf16, x.astype(jnp.bfloat16), jnp.asarray([9, 5]))
    y16_t, state = _decode(bf16, x[:, :1].astype(jnp.bfloat16), state)
    assert y16.dtype == y16_t.dtype == jnp.bfloat16
    assert state.conv.dtype == jnp.bfloat16 and state.recurrent.dtype == jnp.float32
    assert bool(jnp.isfinite(y16_t.astype(jnp.float32)).all())
    assert rel_err(y16[0].astype(jnp.float32), y32[0]) <= 5e-2


def test_key_map_rejects_wrong_shapes(hf_layer):
    hf_cfg, _, weights = hf_layer
    cfg = GatedDeltaNetConfig.from_hf(hf_cfg.to_dict())
    layer = GatedDeltaNet(cfg, jnp.float32, nnx.Rngs(0))
    bad = {**weights, "conv1d.weight": weights["conv1d.weight"][:, :, :3]}
    del bad["A_log"]
    with pytest.raises(ValueError, match=r"conv1d\.weight: shape .*missing A_log|missing A_log"):
        assign_hf(layer, hf_weight_table(cfg, ""), bad)
    assert jax.tree.leaves(nnx.state(layer))  # untouched module still usable
