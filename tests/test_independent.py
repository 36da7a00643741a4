"""The independent synthetic world: its stated curves, bank shape and determinism."""

import numpy as np
import pytest
from scipy.special import logit

from lpe_jax.estimators.lpe import paper_alpha_grid
from lpe_jax.evaluation.independent import independent_rates, make_independent_bank


def test_curves_are_the_stated_ones():
    a = paper_alpha_grid()
    r, r1 = independent_rates(300, a, curvature_sd=0.0, rng=np.random.default_rng(0))
    assert r.shape == (300, a.size) and np.all(np.diff(r, axis=1) <= 0)
    assert np.all((r > 0) & (r <= 0.98)) and np.all(r >= r1[:, None])
    g = logit(r) / np.log(10)  # log10 odds: a straight line in alpha while below the cap
    slope = (g[:, -1] - g[:, -2]) / 0.05
    below = r[:, -3] < 0.9
    g1 = logit(r1) / np.log(10)
    np.testing.assert_allclose((g[below, -3] - g1[below]) / 0.15, -slope[below], rtol=1e-6)
    assert np.all(-slope >= 1.0) and abs(np.mean(-slope) - 7.0) < 0.6  # 1 + Gamma(2.5, 2.4)
    # slopes drawn independently of the level (the families tie them together)
    assert abs(np.corrcoef(g1, slope)[0, 1]) < 0.2
    bent, _ = independent_rates(300, a, curvature_sd=2.0, rng=np.random.default_rng(0))
    assert np.all(np.diff(bent, axis=1) <= 0) and not np.allclose(bent, r)


def test_bank_is_deterministic_and_has_truth():
    b = make_independent_bank(12, rollouts=30, seed=3)
    again = make_independent_bank(12, rollouts=30, seed=3)
    assert b.compliance.shape == (12, 20, 30)
    np.testing.assert_array_equal(b.compliance, again.compliance)
    np.testing.assert_array_equal(b.truth_k, again.truth_k)
    assert np.all(b.truth_k >= b.screen_k) and b.true_r1.shape == (12,)
    with pytest.raises(ValueError, match="curvature_sd"):
        independent_rates(3, paper_alpha_grid(), curvature_sd=-1.0, rng=np.random.default_rng(0))
