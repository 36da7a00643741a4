"""Token-by-token decoding through the shared-prefix KV cache equals one full-sequence pass."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lpe_jax.model.checkpoint import load_model
from lpe_jax.model.forward import model_logits

# float32 parity needs full-precision matmuls (a conftest fixture sets and restores it).
pytestmark = pytest.mark.usefixtures("highest_matmul_precision")


@nnx.jit
def _decode(model, tokens, step, cache):
    return model.decode(tokens, step, cache)


@pytest.mark.parametrize("bucket", [None, 12], ids=["exact_prompt", "padded_prompt"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(num_heads=8, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)],
    ids=["gqa2_untied", "gqa4_tied"],
)
def test_cached_decode_matches_full_pass(hf_checkpoint, kwargs, bucket):
    model = load_model(hf_checkpoint(**kwargs), dtype="float32")
    rng = np.random.default_rng(1)
    rows, prompt_len, new, capacity = 3, 7, 5, 8  # capacity > new: unfilled slots must be masked
    prompt = rng.integers(0, 96, size=prompt_len)
    generated = rng.integers(0, 96, size=(rows, new))  # a different continuation per row
    full = model_logits(model, np.concatenate([np.tile(prompt, (rows, 1)), generated], axis=1))
    scale = np.abs(full).max()

    if bucket is None:
        last, cache = model.init_cache(jnp.asarray(prompt, jnp.int32), rows, capacity)
    else:  # right-padded with junk to a bucket length; the junk must never be attended
        padded = np.concatenate([prompt, rng.integers(0, 96, size=bucket - prompt_len)])
        last, cache = model.init_cache(jnp.asarray(padded, jnp.int32), rows, capacity, prompt_len)
    np.testing.assert_allclose(np.asarray(last), full[0, prompt_len - 1], atol=1e-5 * scale)
    for step in range(new):
        logits, cache = _decode(model, jnp.asarray(generated[:, step], jnp.int32), step, cache)
        err = np.abs(np.asarray(logits) - full[:, prompt_len + step]).max() / scale
        assert err <= 1e-5, (step, err)
