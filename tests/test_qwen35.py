"""The Qwen3.5 text model (lpe_jax.model.qwen35) against transformers' Qwen3_5ForCausalLM and
Qwen3_5MoeForCausalLM: logits parity in float32 ('highest' matmul precision), and the key map on
the multimodal checkpoint layout."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hybrid_fixtures import QWEN35_TEXT, qwen35_text_config, randomize, rel_err, state_dict_numpy

from lpe_jax.model.hf_keymap import assign_hf, skipped_names
from lpe_jax.model.qwen35 import Qwen35, Qwen35Config, hf_weight_table

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")
_logits = nnx.jit(lambda m, tokens: m(tokens))


def _load(hf_dict: dict, weights: dict) -> Qwen35:
    cfg = Qwen35Config.from_hf(hf_dict)
    model = Qwen35(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assign_hf(model, hf_weight_table(cfg, weights.keys()), weights)
    return model


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.from_numpy(tokens)).logits.numpy()


def test_dense_logits_match_hf_text_and_multimodal_layouts():
    import transformers

    hf_cfg = qwen35_text_config()  # layers: linear, linear, linear, full
    hf = randomize(transformers.Qwen3_5ForCausalLM(hf_cfg))
    tokens = np.random.default_rng(0).integers(0, hf_cfg.vocab_size, size=(2, 13))
    ref = _hf_logits(hf, tokens)
    weights = state_dict_numpy(hf)
    ours = np.asarray(_logits(_load(hf_cfg.to_dict(), weights), jnp.asarray(tokens)))
    assert np.abs(ref).max() > 1.0
    assert rel_err(ours, ref) <= 1e-4, rel_err(ours, ref)

    # The Hub's multimodal layout: text tower under model.language_model., plus tensors the text
    # model never reads; config.json nests the text config.
    mm = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    mm["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3))
    mm["mtp.fc.weight"] = np.zeros((4, 4))
    assert skipped_names(mm) == ["model.visual.patch_embed.proj.weight", "mtp.fc.weight"]
    mm_config = {"model_type": "qwen3_5", "text_config": hf_cfg.to_dict()}
    mm_logits = np.asarray(_logits(_load(mm_config, mm), jnp.asarray(tokens)))
    np.testing.assert_array_equal(mm_logits, ours)


def test_padded_prefill_then_decode_matches_hf():
    """Rows of different prompt lengths, right-padded in one prefill, then decoded token by token:
    every step's logits equal HF's full pass over that row's unpadded sequence."""
    import transformers

    hf_cfg = qwen35_text_config()
    hf = randomize(transformers.Qwen3_5ForCausalLM(hf_cfg), seed=2)
    model = _load(hf_cfg.to_dict(), state_dict_numpy(hf))
    rng = np.random.default_rng(2)
    lengths, new = [7, 3], 4
    seqs = [rng.integers(0, hf_cfg.vocab_size, size=n + new) for n in lengths]
    prompts = np.zeros((2, max(lengths)), np.int64)
    for row, n in enumerate(lengths):
        prompts[row, :n] = seqs[row][:n]
    prefill = nnx.jit(lambda m, t, n: m.prefill(t, n, capacity=12))
    decode = nnx.jit(lambda m, t, s: m.decode_step(t, s))
    logits, states = prefill(model, jnp.asarray(prompts), jnp.asarray(lengths))
    steps = [np.asarray(logits)]
    for i in range(new - 1):
        tokens = jnp.asarray([seqs[row][n + i] for row, n in enumerate(lengths)])
        logits, states = decode(model, tokens, states)
        steps.append(np.asarray(logits))
    for row, n in enumerate(lengths):
        ref = _hf_logits(hf, seqs[row][None, : n + new - 1])[0, n - 1 :]
        ours = np.stack([s[row] for s in steps])
        assert rel_err(ours, ref) <= 1e-4, (row, rel_err(ours, ref))


def test_moe_logits_match_hf():
    import transformers

    text = {k: v for k, v in QWEN35_TEXT.items() if k != "intermediate_size"}
    hf_cfg = transformers.Qwen3_5MoeTextConfig(
        **{**text, "num_hidden_layers": 2},
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"],
    )
    hf = randomize(transformers.Qwen3_5MoeForCausalLM(hf_cfg), seed=1)
    tokens = np.random.default_rng(1).integers(0, hf_cfg.vocab_size, size=(2, 9))
    ref = _hf_logits(hf, tokens)
    ours = np.asarray(_logits(_load(hf_cfg.to_dict(), state_dict_numpy(hf)), jnp.asarray(tokens)))
    assert np.abs(ref).max() > 1.0
    assert rel_err(ours, ref) <= 1e-4, rel_err(ours, ref)


def test_config_errors():
    with pytest.raises(ValueError, match="model_type"):
        Qwen35Config.from_hf({"model_type": "qwen3"})
    bad = {**qwen35_text_config().to_dict(), "layer_types": ["linear_attention"] * 3 + ["mamba"]}
    with pytest.raises(ValueError, match="mamba"):
        Qwen35Config.from_hf(bad)
