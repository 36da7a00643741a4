"""The direction path: M(alpha) equals the weights orthogonalized at strength 1 - alpha (alpha = 0:
the abliteration, alpha = 1: the original), per row inside one batch; the engine samples it with
one model, per-row alphas and per-(prompt, alpha) prefills, deterministically.

The sampling model is untied with a scaled head (logit std ~2), so tokens depend on the logits: a
row sampled from the wrong M(alpha) (or the wrong prompt K/V) would change its tokens.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from lpe_jax.abliteration.abliterate import residual_forward
from lpe_jax.abliteration.direction_path import DirectionalQwen3
from lpe_jax.abliteration.orthogonalize import orthogonalize_model, unit_direction
from lpe_jax.decoding import memory
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.decoding.engine_device import ATTENTION_BLOCK
from lpe_jax.model import qwen3
from lpe_jax.model.forward import model_logits

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")

CFG = qwen3.Qwen3Config(96, 32, 2, 4, 2, 16, 64, tie_word_embeddings=False)
EOS = [3, 11]
PROMPT = np.array([5, 17, 2, 40, 9, 33], np.int32)
T = 8


@pytest.fixture(scope="module")
def setup():
    model = qwen3.init_random(CFG, seed=0)
    model.lm_head[...] = model.lm_head[...] * 20.0
    # A direction the residual stream has much of (the mean embedding), so removing it matters.
    direction = np.asarray(model.embed_tokens[...]).mean(0) + 0.01
    return model, direction, DirectionalQwen3.wrap(model, direction)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def test_m_alpha_is_the_weights_orthogonalized_at_strength_one_minus_alpha(setup):
    model, direction, dm = setup
    tokens = np.random.default_rng(1).integers(0, 96, (3, 9)).astype(np.int32)
    forward = jax.jit(lambda t, a: dm(t, a)[0])
    alphas = (0.0, 0.3, 0.75)
    for alpha in alphas:
        edited = orthogonalize_model(model, direction, strength=1.0 - alpha)
        assert rel(forward(tokens, alpha), model_logits(edited, tokens)) <= 1e-5, alpha
    # alpha = 1 is the original (up to XLA's fusion order); alpha = 0 differs from it
    assert rel(forward(tokens, 1.0), model_logits(model, tokens)) <= 1e-6
    assert rel(forward(tokens, 0.0), model_logits(model, tokens)) > 1e-2
    # one alpha per row: row b of a mixed batch is the single-alpha pass of row b
    mixed = forward(tokens, np.array(alphas, np.float32))
    for b, alpha in enumerate(alphas):
        np.testing.assert_allclose(mixed[b], forward(tokens, alpha)[b], atol=1e-5)


def test_in_memory_abliteration_is_run_time_ablation_with_the_original_head():
    """orthogonalize_model of a tied model (what the direction path's alpha = 0 equals) gives the
    logits of the original with the direction projected out at run time, as the checkpoint
    write_abliterated writes does (tests/test_abliterate_exact.py); it comes back untied, the head
    being the original embedding."""
    tied = qwen3.init_random(CFG.__class__(96, 32, 2, 4, 2, 16, 64), seed=3)
    unit = unit_direction(np.random.default_rng(0).normal(size=CFG.hidden_size), 32)
    tokens = np.random.default_rng(2).integers(0, 96, (2, 7)).astype(np.int32)
    in_memory = orthogonalize_model(tied, unit)
    assert not in_memory.cfg.tie_word_embeddings
    np.testing.assert_array_equal(in_memory.lm_head[...], tied.embed_tokens[...].T)
    graphdef, state = nnx.split(tied)

    @jax.jit
    def ablated(state, tokens, unit):
        model = nnx.merge(graphdef, state)
        return model.logits(residual_forward(model, tokens, ablate=unit)[0])

    expected = ablated(state, tokens, unit)
    assert rel(model_logits(in_memory, tokens), expected) <= 1e-5
    assert rel(ablated(state, tokens, unit * 0), expected) > 1e-2  # the ablation matters


def _engine(model, blocks, per_token=False):
    engine = RolloutEngine(
        model,
        None,
        "linear",
        T,
        EOS,
        slots=8,
        max_prompts=4,
        steps_per_call=4,
        per_token=per_token,
        max_prompt_len=PROMPT.size,
    )
    for block in blocks:
        engine.submit(block)
    return {r.block.tag: r.rollouts for r in engine.run()}, engine


def _block(alpha, start=0, count=6, tag=None):
    return RowBlock("p", PROMPT, alpha, seed=7, rollout_start=start, count=count, tag=tag or alpha)


@pytest.fixture(scope="module")
def mixed_run(setup):
    """The direction path's rows at alphas 1 and 0.4 in one engine (shared slots)."""
    _, _, dm = setup
    return _engine(dm, [_block(1.0), _block(0.4)])


def test_engine_samples_each_row_from_its_own_m_alpha(setup, mixed_run):
    """Rows at alpha 1 are the original's own samples; rows at 0.4, sharing the slots with them,
    are those of the weights orthogonalized at 0.6 sampled alone, and not the original's at the
    same keys. One prefill per alpha; no endpoint log-probs."""
    model, direction, _ = setup
    got, engine = mixed_run
    assert engine.stats.prefills == 2
    plain, _ = _engine(model, [_block(1.0), _block(0.4)])
    np.testing.assert_array_equal(got[1.0].tokens, plain[1.0].tokens)
    np.testing.assert_array_equal(got[1.0].lengths, plain[1.0].lengths)
    assert not np.array_equal(got[0.4].tokens, plain[0.4].tokens)
    edited = orthogonalize_model(model, direction, strength=0.6)
    want, _ = _engine(edited, [_block(0.4)])
    np.testing.assert_array_equal(got[0.4].tokens, want[0.4].tokens)
    for r in got.values():
        assert np.isnan(r.logp_original).all() and np.isnan(r.logp_variant).all()
    # memory is planned for one model's K/V: a two-model slot holds (T + prompt slots) more tokens
    # and one more prompt copy (refill temporaries)
    f32, pb = np.float32, engine.prompt_slots
    two = memory.bytes_per_slot(CFG, CFG, f32, f32, T, pb, 4, attention_block=ATTENTION_BLOCK)
    assert two - engine.planned_bytes()["slot"] == (T + 2 * pb) * CFG.kv_bytes_per_token(f32)


def test_engine_rows_do_not_depend_on_blocks_or_order(setup, mixed_run):
    """Same seed, the rows split into other blocks and submitted in another order: same tokens.
    Per-token log-probs: the row's own model's (finite, <= 0), none for the endpoints."""
    _, _, dm = setup
    got, _ = mixed_run
    blocks = [_block(0.4, 3, 3, "b"), _block(1.0, 0, 6, "c"), _block(0.4, 0, 3, "a")]
    again, _ = _engine(dm, blocks, per_token=True)
    lp = again["c"].token_logp_path
    assert np.isfinite(lp).all() and (lp <= 0).all() and (lp < 0).any()
    assert np.isnan(again["c"].token_logp_original).all()
    tokens = np.concatenate([again["a"].tokens, again["b"].tokens], axis=1)
    np.testing.assert_array_equal(tokens, got[0.4].tokens)
    np.testing.assert_array_equal(again["c"].tokens, got[1.0].tokens)


def test_a_conditioned_model_is_sampled_alone(setup):
    model, _, dm = setup
    with pytest.raises(ValueError, match="variant=None"):
        RolloutEngine(dm, model, "linear", T, EOS, slots=8)
    with pytest.raises(ValueError, match="hidden size is 32"):
        DirectionalQwen3.wrap(model, np.ones(31))
    with pytest.raises(ValueError, match="takes alpha on every pass"):  # a Qwen3 caller
        dm.prefill(PROMPT)
