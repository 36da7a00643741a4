"""Gated full attention (lpe_jax.model.gated_attention) against transformers' Qwen3_5Attention
(float32, 'highest' matmul precision), and its cached decode against its own full pass."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hybrid_fixtures import qwen35_text_config, randomize, rel_err, state_dict_numpy

from lpe_jax.model.gated_attention import GatedAttention, GatedAttentionConfig, hf_weight_table
from lpe_jax.model.hf_keymap import assign_hf
from lpe_jax.model.qwen3 import FULL_PASS_BLOCK, LayerKV

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")
_call = nnx.jit(lambda m, x, pos: m(x, pos))
_decode = nnx.jit(lambda m, x, pos, kv: m.decode(x, pos, kv))


@pytest.fixture(scope="module")
def hf_layer():
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Attention

    cfg = qwen35_text_config(num_hidden_layers=1, layer_types=["full_attention"])
    cfg._attn_implementation = "eager"
    layer = randomize(Qwen3_5Attention(cfg, 0))
    return cfg, layer, state_dict_numpy(layer)


def _ours(hf_cfg, weights, dtype=jnp.float32) -> GatedAttention:
    cfg = GatedAttentionConfig.from_hf(hf_cfg.to_dict())
    layer = GatedAttention(cfg, dtype, nnx.Rngs(0))
    assign_hf(layer, hf_weight_table(cfg, ""), weights)
    return layer


def test_config_reads_partial_rotary(hf_layer):
    cfg = GatedAttentionConfig.from_hf(hf_layer[0].to_dict())
    assert (cfg.head_dim, cfg.rotary_dim) == (16, 4)  # factor 0.25 from rope_parameters
    with pytest.raises(ValueError, match="rope_type"):
        GatedAttentionConfig.from_hf(
            {**hf_layer[0].to_dict(), "rope_parameters": {"rope_type": "yarn"}}
        )


@pytest.mark.parametrize("t", [11, FULL_PASS_BLOCK + 37], ids=["one_block", "blocked"])
def test_full_pass_matches_hf(hf_layer, t):
    # Past FULL_PASS_BLOCK tokens the full pass attends block by block (qwen3.attend_causal);
    # HF's eager attention is one [T, T] softmax.
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5TextRotaryEmbedding

    hf_cfg, hf, weights = hf_layer
    b = 2
    x = np.random.default_rng(0).normal(size=(b, t, hf_cfg.hidden_size)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t) + 5, (b, t))  # offset: rotary at nonzero positions
    xt = torch.from_numpy(x)
    cos_sin = Qwen3_5TextRotaryEmbedding(hf_cfg)(xt, torch.from_numpy(pos.copy()))
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None].expand(b, 1, t, t)
    with torch.no_grad():
        ref = hf(xt, cos_sin, mask)[0].numpy()
    y, k, v = _call(_ours(hf_cfg, weights), jnp.asarray(x), jnp.asarray(pos))
    assert k.shape == v.shape == (b, hf_cfg.num_key_value_heads, t, hf_cfg.head_dim)
    assert np.abs(ref).max() > 0.1
    assert rel_err(y, ref) <= 1e-4, rel_err(y, ref)


def test_decode_equals_full_pass(hf_layer):
    hf_cfg, _, weights = hf_layer
    ours = _ours(hf_cfg, weights)
    b, p, n = 2, 6, 4
    x = jnp.asarray(np.random.default_rng(1).normal(size=(b, p + n, hf_cfg.hidden_size)))
    x = x.astype(jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(p + n), (b, p + n))
    full, _, _ = _call(ours, x, pos)
    _, pk, pv = _call(ours, x[:, :p], pos[:, :p])
    shape = (b, hf_cfg.num_key_value_heads, n, hf_cfg.head_dim)
    kv = LayerKV(pk, pv, jnp.ones((b, 1, p), bool), jnp.zeros(shape), jnp.zeros(shape), 0)
    for i in range(n):
        kv = kv.replace(index=jnp.asarray(i, jnp.int32))
        y, kv = _decode(ours, x[:, p + i : p + i + 1], pos[:, p + i : p + i + 1], kv)
        assert rel_err(y[:, 0], full[:, p + i]) <= 1e-5, i


def test_bfloat16_hidden_256_runs():
    cfg = GatedAttentionConfig(256, num_heads=4, num_kv_heads=2, head_dim=64, rotary_dim=16)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 256)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    y32, _, _ = _call(GatedAttention(cfg, jnp.float32, nnx.Rngs(0)), x, pos)
    y16, k16, _ = _call(GatedAttention(cfg, jnp.bfloat16, nnx.Rngs(0)), x.astype(jnp.bfloat16), pos)
    assert y16.dtype == k16.dtype == jnp.bfloat16
    assert rel_err(y16.astype(jnp.float32), y32) <= 5e-2
