"""Sampler log-probs equal teacher forcing; EOS ends rows; per-token arrays agree."""

import jax
import numpy as np
import pytest

from lpe_jax.decoding import paths
from lpe_jax.decoding.sampler import PAD_ID, PairedSampler
from lpe_jax.estimators.mixture import mixture_log_weights
from lpe_jax.model import qwen3
from lpe_jax.model.forward import model_logits

jax.config.update("jax_default_matmul_precision", "highest")

CFG = qwen3.Qwen3Config(96, 32, 2, 4, 2, 16, 64)
PROMPT = np.array([5, 17, 2, 40, 9], np.int32)  # padded to a 16-slot bucket inside the sampler
EOS = (3, 11, 29, 50, 77)  # several ids so many rows end early


@pytest.fixture(scope="module")
def rollouts():
    m_o, m_v = qwen3.init_random(CFG, seed=0), qwen3.init_random(CFG, seed=1)
    s = PairedSampler(
        original=m_o, variant=m_v, path=paths.linear, max_new_tokens=10, eos_token_ids=EOS
    )
    r = s.sample(
        PROMPT, alphas=np.array([0.0, 0.4, 1.0]), rollouts_per_alpha=8, seed=3, per_token=True
    )
    return m_o, m_v, r


def _teacher_forced(model, r):
    """Per-token float64 log p of every row's kept tokens, by one causal pass on padded ids."""
    a_n, r_n, t = r.tokens.shape
    p = PROMPT.size
    ids = np.zeros((a_n * r_n, p + t), np.int32)  # right padding never changes earlier logits
    ids[:, :p] = PROMPT
    ids[:, p:] = np.maximum(r.tokens.reshape(-1, t), 0)
    logits = model_logits(model, ids)[:, p - 1 : p + t - 1].astype(np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    picked = np.take_along_axis(logp, ids[:, p:, None], axis=-1)[..., 0]
    kept = np.arange(t) < r.lengths.reshape(-1, 1)
    return (picked * kept).reshape(a_n, r_n, t), logits.reshape(a_n, r_n, t, -1)


def test_logp_matches_teacher_forcing(rollouts):
    m_o, m_v, r = rollouts
    tf_o, _ = _teacher_forced(m_o, r)
    tf_v, _ = _teacher_forced(m_v, r)
    np.testing.assert_allclose(tf_o.sum(-1), r.logp_original, atol=1e-4, rtol=0)
    np.testing.assert_allclose(tf_v.sum(-1), r.logp_variant, atol=1e-4, rtol=0)
    np.testing.assert_allclose(r.token_logp_original, tf_o, atol=1e-5, rtol=0)
    np.testing.assert_allclose(r.token_logp_variant, tf_v, atol=1e-5, rtol=0)


def _sampled_logp(m_o, m_v, r, temperature: float = 1.0) -> np.ndarray:
    """Per-token float64 log-probs [A, R, T] of every row's kept tokens under the distribution
    it was drawn from (the linear path at its alpha, temperature applied), teacher forced."""
    _, lo = _teacher_forced(m_o, r)
    _, lv = _teacher_forced(m_v, r)
    alpha = r.alphas.astype(np.float32)[:, None, None, None]
    lp = np.asarray(paths.linear(lo, lv, alpha), np.float64) / temperature
    lp = lp - np.logaddexp.reduce(lp, axis=-1, keepdims=True)
    picked = np.take_along_axis(lp, np.maximum(r.tokens, 0)[..., None], axis=-1)[..., 0]
    return picked * (np.arange(r.tokens.shape[-1]) < r.lengths[..., None])


def test_path_token_logp_is_the_sampling_distribution(rollouts):
    m_o, m_v, r = rollouts
    want = _sampled_logp(m_o, m_v, r)
    np.testing.assert_allclose(r.token_logp_path, want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(r.logp_sampled, want.sum(-1), atol=1e-4, rtol=0)
    assert r.logp_sampled.dtype == np.float32


def test_logp_sampled_is_under_the_tempered_path(rollouts):
    m_o, m_v, _ = rollouts
    s = PairedSampler(m_o, m_v, paths.linear, 10, EOS, temperature=0.5, max_rows=8)
    r = s.sample(PROMPT, alphas=np.array([0.3, 0.9]), rollouts_per_alpha=4, seed=1)
    want = _sampled_logp(m_o, m_v, r, temperature=0.5).sum(-1)
    np.testing.assert_allclose(r.logp_sampled, want, atol=1e-4, rtol=0)
    # the test has power: at temperature 1 the same rows have other log-probs
    assert np.abs(_sampled_logp(m_o, m_v, r).sum(-1) - want).max() > 0.1


def test_eos_ends_rows_and_padding_follows(rollouts):
    _, _, r = rollouts
    t = r.tokens.shape[-1]
    assert r.tokens.shape == (3, 8, 10) and r.tokens.dtype == np.int32
    assert r.lengths.min() >= 1 and (r.lengths < t).any() and (r.lengths == t).any()
    for a in range(3):
        for i in range(8):
            n, row = r.lengths[a, i], r.tokens[a, i]
            assert np.all(row[n:] == PAD_ID)
            assert not np.isin(row[: n - 1], EOS).any()  # no EOS before the last kept token
            ended = row[n - 1] in EOS
            assert r.truncated[a, i] == (not ended)
            if not ended:
                assert n == t
    assert not r.nonfinite.any()
    assert r.token_lists()[1][2] == r.generated_ids(1, 2)
    assert r.forward_passes == 2 * r.lengths.sum()


def test_mixture_path_weights_need_only_sequence_sums(rollouts):
    """The ``mixture`` path samples lam p_o + (1 - lam) p_v per token (probability space), so
    logp_original - logp_sampled is Angell et al.'s sequence weight: equal to the per-token
    formula of lpe_jax.estimators.mixture, with no per-token arrays needed."""
    m_o, m_v, _ = rollouts
    s = PairedSampler(m_o, m_v, paths.mixture, 10, EOS, max_rows=8)
    r = s.sample(PROMPT, alphas=np.array([0.3, 0.8]), rollouts_per_alpha=8, seed=2, per_token=True)
    for a, lam in enumerate((0.3, 0.8)):
        want = mixture_log_weights(
            r.token_logp_original[a], r.token_logp_variant[a], r.lengths[a], lam
        )
        np.testing.assert_allclose(r.logp_original[a] - r.logp_sampled[a], want, atol=2e-4)
    # power: the geometric (linear) path's log-probs of the same rows differ by far more than
    # the tolerance
    lin = _sampled_logp(m_o, m_v, r).sum(-1)
    assert np.abs(lin - r.logp_sampled).max() > 20 * 2e-4
