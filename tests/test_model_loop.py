"""The one model loop (`Qwen3.forward`): its hook sees every residual-stream site in order, an
identity hook changes nothing, and a layer kind with its own fixed-size state (a stand-in for a
recurrent layer) runs through the same loop in a full pass and in decode steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lpe_jax.model import qwen3

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")

CFG = qwen3.Qwen3Config(48, 32, 2, 4, 2, 16, 64, tie_word_embeddings=False)
TOKENS = np.array([[5, 17, 2, 40, 9, 33, 1]], np.int32)


def test_hook_sees_every_site_in_order_and_identity_changes_nothing():
    model = qwen3.init_random(CFG, seed=0)
    seen = []

    def record(layer, site, x):
        seen.append((layer, site, x.shape))
        return x

    plain = jax.jit(lambda t: model(t)[0])(TOKENS)
    hooked = jax.jit(lambda t: model(t, record)[0])(TOKENS)
    np.testing.assert_array_equal(plain, hooked)
    shape = (1, TOKENS.shape[1], CFG.hidden_size)
    want = [(0, "embed", shape)]
    for i in range(CFG.num_layers):
        want += [(i, site, shape) for site in ("input", "attn", "mlp")]
    assert seen == want
    # a write removed by the hook is gone from the output: zeroing every MLP write of a model
    # equals that model with zero MLP weights
    no_mlp = jax.jit(lambda t: model(t, lambda i, s, x: x * 0 if s == "mlp" else x)[0])(TOKENS)
    zeroed = qwen3.init_random(CFG, seed=0)
    for layer in zeroed.layers:
        layer.mlp.down_proj[...] = jnp.zeros_like(layer.mlp.down_proj[...])
    np.testing.assert_allclose(no_mlp, zeroed(TOKENS)[0], rtol=1e-6, atol=1e-6)
    assert not np.allclose(no_mlp, plain, atol=1e-3)


class DecayLayer(nnx.Module):
    """A stand-in recurrent layer kind: s_t = 0.5 s_{t-1} + x_t W, output x_t + s_t. Its state is
    the fixed-size s [B, H] (None: start from zero over a whole sequence), what a linear-attention
    layer (Gated DeltaNet) keeps in place of K/V."""

    def __init__(self, h: int, rngs: nnx.Rngs):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (h, h)))

    def __call__(self, x, positions, state=None, *, index=0, hook=None):
        s = jnp.zeros((x.shape[0], x.shape[2]), x.dtype) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            s = 0.5 * s + x[:, t] @ self.w[...]
            outs.append(s)
        write = jnp.stack(outs, axis=1)
        write = write if hook is None else hook(index, "attn", write)
        return x + write, s


def test_a_layer_kind_with_its_own_state_runs_through_the_same_loop():
    """Layer 1 replaced by the recurrent kind: a full pass equals a prefill followed by decode
    steps, each threading layer 0's K/V (LayerKV) and layer 1's fixed-size state through
    `Qwen3.forward`, which never looks inside either."""
    model = qwen3.init_random(CFG, seed=0)
    model.layers[1] = DecayLayer(CFG.hidden_size, nnx.Rngs(params=1))
    t = TOKENS.shape[1]
    full, _ = model.forward(TOKENS, jnp.arange(t)[None])
    prompt = 4
    x, (kv0, s1) = model.forward(TOKENS[:, :prompt], jnp.arange(prompt)[None])
    assert s1.shape == (1, CFG.hidden_size)
    outs = [x]
    # layer 0's decode state: the prompt's K/V as the prefix, room for the generated tokens
    k, v = qwen3.empty_kv(CFG, jnp.float32, 1, t - prompt)
    layer0 = qwen3.LayerKV(kv0[0], kv0[1], jnp.ones((1, 1, prompt), bool), k[0], v[0], 0)
    states = (layer0, s1)
    for step in range(t - prompt):
        pos = prompt + step
        layer0 = states[0].replace(index=jnp.int32(step))
        x, states = model.forward(TOKENS[:, pos : pos + 1], jnp.array([[pos]]), (layer0, states[1]))
        outs.append(x)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="1 layer states for 2 layers"):
        model.forward(TOKENS, jnp.arange(t)[None], (None,))
