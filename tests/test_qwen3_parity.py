"""Logit parity of `load_model` + `Qwen3` with transformers' Qwen3ForCausalLM (torch, CPU, eager).

Each config is saved as a real HF directory by `save_pretrained`; the reference is
`Qwen3ForCausalLM.from_pretrained` of that same directory in float32, so the test covers the
loader (names, layouts, dtypes, shards, config keys) and the model numerics together.
"""

import numpy as np
import pytest
from hf_fixtures import hf_logits

from lpe_jax.model.checkpoint import load_model
from lpe_jax.model.forward import model_logits

# float32 parity needs full-precision matmuls (a conftest fixture sets and restores it).
pytestmark = pytest.mark.usefixtures("highest_matmul_precision")

CONFIGS = {
    # head_dim 32 != hidden/heads = 16; GQA group 2; transformers 5 rope_parameters key.
    "untied_hd32_gqa2": dict(),
    # tied embeddings; group 1 (MHA); transformers 4 top-level rope_theta key.
    "tied_mha_ropekey": dict(
        tie_word_embeddings=True, num_kv_heads=4, head_dim=16, rope_key="rope_theta"
    ),
    # group 4, rope_theta 1e6 as in Qwen3-4B, sharded into several files with an index.
    "gqa4_sharded": dict(
        num_heads=8, num_kv_heads=2, head_dim=16, rope_theta=1e6, max_shard_size="40KB"
    ),
    # weights stored in bf16 (the reference loads the same bf16 values upcast to f32).
    "bf16_stored_tied": dict(storage_dtype="bfloat16", tie_word_embeddings=True, head_dim=24),
    # attention_bias, eps 1e-5, no head_dim key (loader falls back to hidden/heads).
    "bias_nohd": dict(attention_bias=True, head_dim=None, rms_norm_eps=1e-5),
}


def _tokens(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, size=(2, 20))


def _rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_float32_and_bfloat16(name, hf_checkpoint):
    path = hf_checkpoint(**CONFIGS[name])
    tokens = _tokens(96)
    ref = hf_logits(path, tokens)
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean anything"

    f32 = model_logits(load_model(path, dtype="float32"), tokens)
    err32 = _rel_err(f32, ref)
    bf16 = model_logits(load_model(path, dtype="bfloat16"), tokens)
    err16 = _rel_err(bf16, ref)
    print(f"{name}: max|logits|={np.abs(ref).max():.2f} rel f32={err32:.2e} bf16={err16:.2e}")
    assert err32 <= 1e-4, err32
    assert err16 <= 3e-2, err16


def test_parity_past_the_full_pass_block(hf_checkpoint):
    """A sequence longer than qwen3.FULL_PASS_BLOCK: our full pass attends block by block
    (qwen3.attend_causal), HF's is one [T, T] softmax; float32 logits agree as at 20 tokens."""
    from lpe_jax.model.qwen3 import FULL_PASS_BLOCK

    path = hf_checkpoint(**CONFIGS["gqa4_sharded"])
    tokens = np.random.default_rng(1).integers(0, 96, size=(2, 2 * FULL_PASS_BLOCK + 21))
    ref = hf_logits(path, tokens)
    err = _rel_err(model_logits(load_model(path, dtype="float32"), tokens), ref)
    assert err <= 1e-4, err
