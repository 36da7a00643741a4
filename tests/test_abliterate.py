"""Finding a refusal direction: post-instruction positions on the real Qwen3 chat template,
activations read at the right tokens, scores, the paper's selection rule, and bad inputs."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from scipy.special import rel_entr, softmax

from lpe_jax.abliteration import abliterate as ab
from lpe_jax.model import qwen3
from lpe_jax.model.tokenizer import load_tokenizer

# CI and the dev machine keep shared data beside the repository: <repo>/../shared.
QWEN3_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "qwen3_tokenizer"
needs_qwen3 = pytest.mark.skipif(
    not QWEN3_TOKENIZER.is_dir(),
    reason=f"the real Qwen3 tokenizer is absent: {QWEN3_TOKENIZER}",
)
# <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n
QWEN3_SUFFIX = [151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]


def random_model(cfg: qwen3.Qwen3Config, seed: int = 0) -> qwen3.Qwen3:
    """Unit-scale random weights filled from NumPy (no per-parameter compile): embeddings
    N(0, 1), matrices N(0, 1/fan_in), norm weights 1 + 0.1 N(0, 1)."""
    model = nnx.eval_shape(lambda: qwen3.Qwen3(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)

    def draw(x: jax.ShapeDtypeStruct) -> jax.Array:
        z = rng.normal(size=x.shape).astype(np.float32)
        if x.ndim == 1:
            return jax.numpy.asarray(1 + 0.1 * z)
        return jax.numpy.asarray(z if x.shape[0] == cfg.vocab_size else z / np.sqrt(x.shape[0]))

    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(draw, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    return load_tokenizer(QWEN3_TOKENIZER)


@needs_qwen3
def test_post_instruction_tokens_of_the_real_qwen3_template(qwen3_tokenizer):
    """Thinking off (the project's default): the 9 template tokens after the user's text,
    Qwen3's empty think block included; thinking on: the 5 without it."""
    assert ab.post_instruction_ids(qwen3_tokenizer) == QWEN3_SUFFIX
    assert ab.post_instruction_ids(qwen3_tokenizer, enable_thinking=True) == QWEN3_SUFFIX[:5]
    ids, suffix = ab.encode_instructions(qwen3_tokenizer, ["How do I pick a lock?", "Hi"])
    assert suffix == QWEN3_SUFFIX and all(list(i[-9:]) == QWEN3_SUFFIX for i in ids)
    assert ab.refusal_token_ids(qwen3_tokenizer, ["I", "As"]) == [40, 2121]


@needs_qwen3
def test_activations_are_read_at_the_post_instruction_tokens(qwen3_tokenizer):
    """Tiny random weights at Qwen3's vocabulary (151,936). Prompts of different lengths in
    padded batches: the embedding-layer activations at the 9 positions are exactly the
    embeddings of the 9 template tokens, and deeper layers equal one prompt at a time."""
    cfg = qwen3.Qwen3Config(151936, 32, 2, 2, 1, 16, 64)
    model = random_model(cfg)
    texts = ["Hi", "Pick a lock", "Write a poem now"]  # 13, 15, 16 tokens: one length bucket
    ids, suffix = ab.encode_instructions(qwen3_tokenizer, texts)
    means = ab.mean_activations(model, ids, len(suffix), batch_size=2)
    assert means.shape == (9, 2, 32) and means.dtype == np.float64
    embed = np.asarray(model.embed_tokens[...], np.float64)
    np.testing.assert_allclose(means[:, 0], embed[QWEN3_SUFFIX], rtol=0, atol=1e-7)
    one_by_one = np.mean([ab.mean_activations(model, [i], 9, batch_size=1) for i in ids], axis=0)
    np.testing.assert_allclose(means, one_by_one, rtol=1e-5, atol=1e-6)


def test_tokenizer_without_chat_template_is_refused(hf_tokenizer_dir, tmp_path):
    tok = load_tokenizer(hf_tokenizer_dir)
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat_template"):
        ab.post_instruction_ids(tok)


def test_template_that_does_not_copy_the_text_is_refused(hf_tokenizer_dir):
    tok = load_tokenizer(hf_tokenizer_dir)
    tok.chat_template = "{{ messages[0]['content'] | upper }}<|im_end|>"
    with pytest.raises(ValueError, match="verbatim"):
        ab.post_instruction_ids(tok)


def test_refusal_score_and_kl_match_their_definitions():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    p = softmax(logits.astype(np.float64), axis=-1)
    ref = p[:, [3, 7]].sum(-1)
    np.testing.assert_allclose(ab.refusal_scores(logits, [3, 7]), np.log(ref / (1 - ref)))
    other = rng.normal(size=(4, 50)).astype(np.float32)
    expected = rel_entr(p, softmax(other.astype(np.float64), axis=-1)).sum(-1)
    np.testing.assert_allclose(ab.kl_divergence(logits, other), expected, rtol=1e-10)
    np.testing.assert_allclose(ab.kl_divergence(logits, logits), 0, atol=1e-12)


def test_candidates_are_unit_and_zero_differences_invalid():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4, 8)), rng.normal(size=(3, 4, 8))
    b[:, 0] = a[:, 0]  # layer 0: the same template tokens in both sets
    raw, unit, valid = ab.candidate_directions(a, b)
    assert not valid[:, 0].any() and valid[:, 1:].all()
    np.testing.assert_allclose(np.linalg.norm(unit[:, 1:], axis=-1), 1, rtol=1e-6)
    np.testing.assert_array_equal(unit[:, 0], 0)
    np.testing.assert_allclose(raw, (a - b).astype(np.float32))


@pytest.fixture(scope="module")
def tiny():
    """A 4-layer random model and token prompts that end with a shared 3-token suffix."""
    model = random_model(qwen3.Qwen3Config(64, 32, 4, 2, 1, 16, 64), seed=1)
    rng = np.random.default_rng(0)
    suffix = [5, 6, 7]

    def prompts(n, lo, hi):
        return [np.array([*rng.integers(lo, hi, rng.integers(3, 9)), *suffix]) for _ in range(n)]

    return model, prompts(6, 10, 30), prompts(6, 30, 60)


def test_selection_follows_the_papers_rule(tiny):
    """The chosen candidate has the lowest ablated refusal score among those passing the
    filters; pruned layers and zero candidates are not scored; the grid is what score_candidate
    gives for the chosen one."""
    model, harmful, harmless = tiny
    h_mean = ab.mean_activations(model, harmful[:4], 3)
    s_mean = ab.mean_activations(model, harmless[:4], 3)
    settings = ab.SelectionSettings(kl_threshold=None, induce_threshold=None)
    sel = ab.select_direction(model, h_mean, s_mean, harmful[4:], harmless[4:], [1, 2], settings)
    assert sel.refusal.shape == (3, 4)
    assert np.isnan(sel.refusal[:, 3]).all()  # int(4 * 0.8) = 3 layers kept
    assert np.isfinite(sel.refusal[:, 1:3]).all()
    best = np.nanmin(np.where(sel.eligible, sel.refusal, np.nan))
    assert sel.refusal[sel.position + 3, sel.layer] == best
    assert -3 <= sel.position <= -1 and sel.layer < 3
    base = ab.last_token_logits(model, harmless[4:])
    again = ab.score_candidate(model, sel.direction, harmful[4:], harmless[4:], base, [1, 2])
    assert again.refusal == pytest.approx(best, abs=1e-9)
    assert again.kl == pytest.approx(sel.kl[sel.position + 3, sel.layer], abs=1e-9)
    summary = sel.summary()
    assert summary["layer"] == sel.layer and summary["grid_refusal"][0][3] is None


def test_no_surviving_candidate_names_the_filters(tiny):
    model, harmful, harmless = tiny
    h_mean = ab.mean_activations(model, harmful[:4], 3)
    s_mean = ab.mean_activations(model, harmless[:4], 3)
    settings = ab.SelectionSettings(kl_threshold=1e-12, induce_threshold=None)
    with pytest.raises(ValueError, match=r"have KL > 1e-12.*prune_layer_fraction"):
        ab.select_direction(model, h_mean, s_mean, harmful[4:], harmless[4:], [1], settings)
    with pytest.raises(ValueError, match="prune_layer_fraction must lie"):
        ab.SelectionSettings(prune_layer_fraction=1.0)


def test_bad_vectors_are_refused(tiny):
    model, harmful, _ = tiny
    with pytest.raises(ValueError, match=r"finite float vector \[32\]"):
        ab.last_token_logits(model, harmful, ablate=np.ones(31))
    with pytest.raises(ValueError, match="no prompts"):
        ab.last_token_logits(model, [])


def test_layer_by_layer_passes_equal_the_single_program(tiny):
    """The host-stepped passes (one jitted layer at a time) give the logits and activations of
    residual_forward traced as one program, with ablation and activation addition."""
    model, harmful, _ = tiny
    rng = np.random.default_rng(2)
    r = rng.normal(size=32).astype(np.float32)
    r /= np.linalg.norm(r)
    v = rng.normal(size=32).astype(np.float32)
    prompts = harmful[:3]
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((3, lengths.max()), np.int32)  # right-padded: causal, so harmless
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p

    @jax.jit
    def single(state, ablate, add_vector):
        m = nnx.merge(graphdef, state)
        x, resid = ab.residual_forward(m, tokens, ablate=ablate, add_layer=2, add_vector=add_vector)
        return m.logits(x), resid

    graphdef, state = nnx.split(model)
    want, _ = single(state, r, v)
    rows = np.arange(3)
    got = ab.last_token_logits(model, prompts, ablate=r, add=(2, v), batch_size=2)
    np.testing.assert_allclose(got, np.asarray(want)[rows, lengths - 1], rtol=1e-5, atol=1e-5)
    _, resid = single(state, np.zeros(32, np.float32), np.zeros(32, np.float32))
    idx = lengths[:, None] - 3 + np.arange(3)  # [3 prompts, 3 positions]
    acts = np.stack([np.asarray(h)[rows[:, None], idx] for h in resid], axis=2)  # [N, P, L, H]
    means = ab.mean_activations(model, prompts, 3, batch_size=2)
    np.testing.assert_allclose(means, acts.mean(0), rtol=1e-5, atol=1e-5)
