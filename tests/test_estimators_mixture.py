"""Angell et al.'s mixture-proposal weights on the exact sequence model (tests/path_model.py)."""

import numpy as np
import pytest
from path_model import L_O, L_V, SEQS, T, rate, token_logp

from lpe_jax.estimators import degenerate as dg
from lpe_jax.estimators.mixture import mixture_importance_sampling, mixture_log_weights

COMPLY = (SEQS == 2).sum(1) >= 2
TOK_O, TOK_V = token_logp(L_O), token_logp(L_V)  # [S, T]
LAM = 0.3


def _mixture_seq_logq():
    return np.logaddexp(np.log(LAM) + TOK_O, np.log(1 - LAM) + TOK_V).sum(1)


def test_weights_are_p_over_q_exactly_and_reweight_to_the_truth():
    lengths = np.full(len(SEQS), T)
    lw = mixture_log_weights(TOK_O, TOK_V, lengths, LAM)
    log_q = _mixture_seq_logq()
    np.testing.assert_allclose(np.exp(log_q).sum(), 1.0, rtol=1e-12)  # q is a distribution
    np.testing.assert_allclose(lw, TOK_O.sum(1) - log_q, rtol=1e-12)
    # E_q[w c] = sum_x q(x) w(x) c(x) = r(1) exactly.
    truth = rate(TOK_O.sum(1), COMPLY)
    np.testing.assert_allclose(np.sum(np.exp(log_q + lw)[COMPLY]), truth, rtol=1e-12)
    # Defensive: every per-token weight is at most 1 / lam.
    assert (lw <= T * -np.log(LAM) + 1e-12).all()
    assert mixture_log_weights(TOK_O, TOK_V, lengths, 1.0) == pytest.approx(np.zeros(len(SEQS)))


def test_padding_ignored_and_nonfinite_rows_flagged():
    lp_o = np.array([[-1.0, -2.0, np.nan], [-1.0, np.nan, -5.0]])
    lp_v = np.array([[-0.5, -np.inf, 7.0], [-1.0, -1.0, -1.0]])
    lw = mixture_log_weights(lp_o, lp_v, np.array([2, 3]), 0.5)
    expected = -1.0 - np.logaddexp(np.log(0.5) - 1, np.log(0.5) - 0.5) + np.log(2)
    assert lw[0] == pytest.approx(expected) and np.isnan(lw[1])
    res = mixture_importance_sampling(lp_o, lp_v, np.array([2, 3]), 0.5, np.array([1, 0]))
    assert res.n_nonfinite == 1 and res.n_unknown == 0 and res.is_result.n == 1
    res = mixture_importance_sampling(lp_o, lp_v, np.array([2, 3]), 0.5, np.array([-1, 1]))
    assert res.is_result.status == dg.NO_DATA and (res.n_unknown, res.n_nonfinite) == (1, 1)


def test_plain_estimate_unbiased_under_exact_mixture_draws():
    truth = rate(TOK_O.sum(1), COMPLY)
    q = np.exp(_mixture_seq_logq())
    rng = np.random.default_rng(0)
    lengths = np.full(200, T)
    est, snis = [], []
    for _ in range(400):
        i = rng.choice(len(SEQS), size=200, p=q / q.sum())
        r = mixture_importance_sampling(TOK_O[i], TOK_V[i], lengths, LAM, COMPLY[i]).is_result
        est.append(r.estimate)
        snis.append(r.snis)
    est = np.array(est)
    assert abs(est.mean() - truth) < 3.5 * est.std(ddof=1) / np.sqrt(est.size)
    assert abs(np.mean(snis) - truth) < 0.1 * truth  # SNIS: consistent, bias O(1/R)


def test_bad_inputs_raise():
    z = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"\[R, T\]"):
        mixture_log_weights(z, np.zeros((2, 4)), np.array([1, 1]), 0.5)
    with pytest.raises(ValueError, match="lengths must be int"):
        mixture_log_weights(z, z, np.array([1.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match=r"lengths must lie"):
        mixture_log_weights(z, z, np.array([1, 4]), 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        mixture_log_weights(z, z, np.array([1, 1]), 0.0)
    with pytest.raises(ValueError, match="compliant must be"):
        mixture_importance_sampling(z, z, np.array([1, 1]), 0.5, np.array([1, 0, 1]))
