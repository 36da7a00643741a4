"""First-token frequencies match softmax of the path logits (chi-square, 20,000 rows per alpha)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from lpe_jax.decoding import paths
from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.model import qwen3
from lpe_jax.model.forward import model_logits

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 64
ROWS = 20_000
PROMPT = np.array([7, 3, 12], np.int32)


def _peaked_model(seed: int) -> qwen3.Qwen3:
    # An N(0, 0.02) LM head gives near-uniform logits; scaling it spreads the distribution (logit
    # std ~2) so the test can tell alpha values apart. Untied, so no token favours itself.
    cfg = qwen3.Qwen3Config(VOCAB, 32, 1, 2, 1, 16, 64, tie_word_embeddings=False)
    m = qwen3.init_random(cfg, seed=seed)
    m.lm_head[...] = m.lm_head[...] * 20.0
    return m


def _expected(m_o, m_v, alpha: float) -> np.ndarray:
    lo = jnp.asarray(model_logits(m_o, PROMPT)[-1:])
    lv = jnp.asarray(model_logits(m_v, PROMPT)[-1:])
    return np.asarray(jax.nn.softmax(paths.linear(lo, lv, jnp.float32(alpha)))[0], np.float64)


def _chi2_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    observed = np.bincount(tokens, minlength=VOCAB).astype(np.float64)
    expected = probs * tokens.size
    small = expected < 5  # merge low-expectation bins so the chi-square approximation holds
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()
    return stats.chisquare(obs, exp).pvalue


@pytest.fixture(scope="module")
def draws():
    m_o, m_v = _peaked_model(0), _peaked_model(1)
    s = PairedSampler(
        original=m_o,
        variant=m_v,
        path=paths.linear,
        max_new_tokens=1,
        eos_token_ids=[],
        max_rows=8192,
    )
    r = s.sample(PROMPT, alphas=np.array([0.0, 0.5, 1.0]), rollouts_per_alpha=ROWS, seed=11)
    return m_o, m_v, r


def test_first_token_follows_path_softmax(draws):
    m_o, m_v, r = draws
    assert (r.lengths == 1).all()
    for i, alpha in enumerate((0.0, 0.5, 1.0)):
        p = _chi2_pvalue(r.tokens[i, :, 0], _expected(m_o, m_v, alpha))
        assert p > 1e-3, f"alpha={alpha}: chi-square p={p:.2e}"


def test_alpha_one_is_the_original_alone_and_test_has_power(draws):
    m_o, m_v, r = draws
    lo = model_logits(m_o, PROMPT)[-1].astype(np.float64)
    p_o = np.exp(lo - np.logaddexp.reduce(lo))
    assert _chi2_pvalue(r.tokens[2, :, 0], p_o) > 1e-3
    # The same test rejects the wrong distribution: variant draws are not the original's.
    assert _chi2_pvalue(r.tokens[0, :, 0], p_o) < 1e-6
    assert _chi2_pvalue(r.tokens[1, :, 0], p_o) < 1e-6
