"""Qwen3.5 (hybrid Gated DeltaNet / gated attention) in the rollout engine, against transformers.

The engine holds per-layer state of either kind through the layer-state protocol: a linear
layer's (conv window, delta state) is computed once into the prompt table, copied into each of its
rows' slots and stepped there; a full-attention layer's prompt K/V is copied the same way and its
own tokens' K/V written per slot. float32, 'highest' matmul precision, 2-layer models (one layer
of each kind) so every path is exercised at the least compile cost.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hybrid_fixtures import QWEN35_TEXT, qwen35_text_config, randomize, rel_err, state_dict_numpy

from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.model.hf_keymap import assign_hf
from lpe_jax.model.qwen35 import Qwen35, Qwen35Config, hf_weight_table

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")
LAYERS = dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
T = 5


def _hf_dense(seed: int):
    import transformers

    return randomize(transformers.Qwen3_5ForCausalLM(qwen35_text_config(**LAYERS)), seed=seed)


def _hf_moe(seed: int):
    import transformers

    text = {k: v for k, v in QWEN35_TEXT.items() if k != "intermediate_size"}
    cfg = transformers.Qwen3_5MoeTextConfig(
        **{**text, **LAYERS},
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return randomize(transformers.Qwen3_5MoeForCausalLM(cfg), seed=seed)


def _ours(hf) -> Qwen35:
    weights = state_dict_numpy(hf)
    cfg = Qwen35Config.from_hf(hf.config.to_dict())
    model = Qwen35(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    assign_hf(model, hf_weight_table(cfg, weights.keys()), weights)
    return model


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(tokens, np.int64))[None]).logits[0].double().numpy()


@pytest.mark.parametrize("make_hf", [_hf_dense, _hf_moe], ids=["dense", "moe"])
def test_protocol_prefill_then_decode_matches_hf(make_hf):
    """prefill_states on a right-padded prompt, then decode_slots token by token beside an
    inactive slot: every step's logits equal HF's full pass over the sequence (prefill then
    decode = one long prefill), and the inactive slot's state is left exactly as it was."""
    hf = make_hf(3)
    model = _ours(hf)
    cfg = model.cfg
    rng = np.random.default_rng(3)
    n, bucket, new = 5, 8, 3
    seq = rng.integers(0, cfg.vocab_size, size=n + new)
    padded = np.zeros(bucket, np.int32)
    padded[:n] = seq[:n]

    prefill = nnx.jit(lambda m, t, k: m.prefill_states(t, k))
    decode = nnx.jit(lambda m, *a: m.decode_slots(*a))
    logits, entry = prefill(model, jnp.asarray(padded), jnp.int32(n))
    # Two slots: slot 0 takes the prompt, slot 1 stays inactive with a junk state.
    junk = jax.tree.map(lambda x: x + 1.0, cfg.empty_prompt_states(jnp.float32, 1, bucket))
    prompt = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), tuple(entry), junk)
    own = cfg.empty_own_states(jnp.float32, 2, new)
    steps = [np.asarray(logits)]
    for i in range(new - 1):
        tokens = jnp.asarray([seq[n + i], 0], jnp.int32)
        pos = jnp.asarray([n + i, 0], jnp.int32)
        plen = jnp.asarray([n, 1], jnp.int32)
        write = jnp.asarray([i, new], jnp.int32)
        active = jnp.asarray([True, False])
        out, prompt, own = decode(model, tokens, pos, plen, write, active, prompt, own)
        steps.append(np.asarray(out[0]))
    ref = _hf_logits(hf, seq[: n + new - 1])[n - 1 :]
    assert np.abs(ref).max() > 1.0
    assert rel_err(np.stack(steps), ref) <= 1e-4, rel_err(np.stack(steps), ref)
    kept = jax.tree.map(lambda x: np.asarray(x[1]), prompt)
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(junk), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b[0]))


PROMPTS = {"a": np.array([5, 17, 2, 40, 9, 33], np.int32), "b": np.array([60, 7], np.int32)}
BLOCKS = [RowBlock("a", PROMPTS["a"], 0.5, 1, 0, 3), RowBlock("b", PROMPTS["b"], 0.3, 2, 0, 2)]


def _run(models, slots: int, attention_block: int) -> dict:
    e = RolloutEngine(
        models[0], models[1], "linear", T, [3], slots=slots, max_prompts=2, steps_per_call=3,
        max_prompt_len=8, per_token=True, attention_block=attention_block,
    )  # fmt: skip
    for b in BLOCKS:
        e.submit(b)
    return {r.block.prompt_key: r.rollouts for r in e.run()}


@pytest.fixture(scope="module")
def pair():
    hf = (_hf_dense(0), _hf_dense(1))
    return hf, (_ours(hf[0]), _ours(hf[1]))


def test_engine_logprobs_match_hf_and_rows_ignore_slot_count_and_attention_blocks(pair):
    """Every generated token's log-prob under both models equals HF's on the row's sequence, and
    the rows are the same with 4 slots (every row at once) reading all the gated attention's
    token K/V, and 1 slot (rows one after another, each slot reused: its linear state must be
    fully replaced by the next prompt's) reading it in blocks of 2 up to the longest row."""
    hf, models = pair
    wide, narrow = _run(models, 4, attention_block=0), _run(models, 1, attention_block=2)
    for key, r in wide.items():
        np.testing.assert_array_equal(narrow[key].tokens, r.tokens)
        # Tokens bit-identical; log-probs to float32 rounding (other batch shapes sum in another
        # order), as tests/test_engine.py holds Qwen3 rows.
        for f in ("token_logp_original", "token_logp_variant"):
            np.testing.assert_allclose(getattr(narrow[key], f), getattr(r, f), 1e-5, 1e-5)
        prompt = PROMPTS[key]
        assert r.lengths.min() >= 2  # decode steps happened, not only the prefill's token
        for row in range(r.tokens.shape[1]):
            n = int(r.lengths[0, row])
            seq = np.concatenate([prompt, r.tokens[0, row, :n]])
            for model, got in ((hf[0], r.token_logp_original), (hf[1], r.token_logp_variant)):
                logits = _hf_logits(model, seq)[len(prompt) - 1 : -1]
                logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
                ref = logp[np.arange(n), seq[len(prompt) :]]
                np.testing.assert_allclose(got[0, row, :n], ref, rtol=1e-4, atol=1e-4)
