"""Importance sampling and naive sampling."""

import numpy as np
import pytest
from scipy.special import logsumexp

from lpe_jax.estimators import naive
from lpe_jax.estimators.importance import importance_sampling


def test_is_mean_within_three_standard_errors_of_truth():
    # variant complies w.p. r0; log w | comply ~ N(ln(r1/r0) - s^2/2, s^2), so E_v[w 1c] = r1
    rng = np.random.default_rng(0)
    r0, r1, s, n, reps = 0.6, 1e-4, 1.0, 2000, 300
    est = []
    for _ in range(reps):
        c = rng.random(n) < r0
        lw = np.where(c, rng.normal(np.log(r1 / r0) - s * s / 2, s, n), rng.normal(-0.1, 0.3, n))
        est.append(importance_sampling(lw, c).estimate)
    est = np.array(est)
    assert abs(est.mean() - r1) < 3 * est.std(ddof=1) / np.sqrt(reps)


def test_is_log_space_snis_ess_and_unknowns():
    lw = np.array([-800.0, -801.0, -5.0, -802.0])  # exp underflows; log space must not
    c = np.array([1, 1, 0, -1])
    res = importance_sampling(lw, c)
    assert res.n == 3 and res.n_compliant == 2
    np.testing.assert_allclose(res.log_estimate, logsumexp([-800.0, -801.0]) - np.log(3))
    assert res.estimate == 0.0 and np.isfinite(res.log_estimate)
    np.testing.assert_allclose(res.snis, np.exp(logsumexp([-800, -801]) - logsumexp(lw[:3])))
    eq = importance_sampling(np.zeros(8), np.ones(8, bool))
    assert eq.ess == pytest.approx(8) and eq.estimate == pytest.approx(1) and eq.snis == 1
    none = importance_sampling(np.zeros(4), np.zeros(4, bool))
    assert none.estimate == 0.0 and none.log_estimate == -np.inf and none.snis == 0.0
    empty = importance_sampling(np.zeros(2), np.array([-1, -1]))
    assert empty.n == 0 and empty.estimate == 0.0


def test_is_bad_input_raises():
    with pytest.raises(ValueError, match="equal length"):
        importance_sampling(np.zeros(3), np.zeros(2, bool))
    with pytest.raises(ValueError, match="finite"):
        importance_sampling(np.array([np.nan, 0.0]), np.array([1, 0]))
    with pytest.raises(ValueError, match="ints in"):
        importance_sampling(np.zeros(2), np.array([2, 0]))


def test_naive_counts_and_simulation():
    r = naive.naive_estimate(np.array([1, 0, -1, 1, 0]))
    assert (r.k, r.n, r.n_unknown, r.estimate) == (2, 4, 1, 0.5)
    assert naive.naive_estimate(np.array([-1])).estimate == 0.0
    sims = naive.simulate_naive_counts(np.array([0.0, 0.5, 1.0]), 10, 7, np.random.default_rng(0))
    assert sims.shape == (7, 3) and (sims[:, 0] == 0).all() and (sims[:, 2] == 10).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        naive.simulate_naive_counts(np.array([1.5]), 10, 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="1-D"):
        naive.naive_estimate(np.zeros((2, 2)))
