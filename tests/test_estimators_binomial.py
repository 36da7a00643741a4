"""Binomial LPE: penalized fit, profile interval coverage, degenerate data, point selection."""

import numpy as np
import pytest
from scipy import optimize

from lpe_jax.estimators import binomial, lpe
from lpe_jax.estimators.binomial import (
    fit_binomial,
    fit_binomial_batch,
    lpe_binomial,
    lpe_binomial_grid,
    select_grid_points,
)

ALPHAS = lpe.paper_alpha_grid()


def _penalized_direct(params, x, k, n):
    eta = params[0] + params[1] * x
    if np.any(eta >= 0):
        return -np.inf
    mu = np.exp(eta)
    w = n * mu / (1 - mu)
    info = np.array([[w.sum(), (w * x).sum()], [(w * x).sum(), (w * x * x).sum()]])
    ll = (k * eta + (n - k) * np.log1p(-mu)).sum()
    return ll + 0.5 * np.log(np.linalg.det(info))


def test_batch_fit_maximizes_the_penalized_likelihood():
    rng = np.random.default_rng(0)
    a = ALPHAS[8:]
    x = a - 1
    true = np.minimum(0.45, 10 ** (-4 - 6 * (a - 1)))
    k = rng.binomial(30, true, size=(12, a.size))
    k[0] = 0
    k[0, 0] = 2  # one nonzero point at the far end, zeros above
    k[1] = 0
    k[1, 2] = 3  # one nonzero point, zeros above: plain MLE does not exist
    n = np.full_like(k, 30)
    est, slope = fit_binomial_batch(a, k, n, np.ones_like(k, bool))
    assert np.all(np.isfinite(est)) and np.all(np.isfinite(slope))
    for i in range(k.shape[0]):
        start = np.array([est[i], slope[i]]) * np.log(10)
        neg = lambda p, i=i: -_penalized_direct(p, x, k[i], n[i])  # noqa: E731
        best = optimize.minimize(
            neg, start, method="Nelder-Mead", options=dict(xatol=1e-10, fatol=1e-12, maxiter=4000)
        )
        assert -best.fun <= -neg(start) + 1e-7  # nothing better nearby


def test_exact_counts_recover_the_line():
    r = np.minimum(0.9, 10 ** (-5.0 - 5.5 * (ALPHAS - 1)))
    n = np.full(ALPHAS.size, 10**12)
    k = np.round(n * r).astype(np.int64)
    f = lpe_binomial_grid(ALPHAS, k, n, interval=False)
    np.testing.assert_allclose(f.log10_estimate, -5.0, atol=1e-6)
    np.testing.assert_allclose(f.slope, -5.5, atol=1e-6)
    assert f.degenerate is None and f.alphas[0] == 0.15  # rates >= 0.5 (alpha <= 0.1) left out


def test_interval_covers_truth_in_at_least_90_percent():
    rng = np.random.default_rng(2024)
    a = ALPHAS[8:]  # 0.4 .. 0.95
    log10_r1, slope = -4.0, -5.8
    r = 10 ** (log10_r1 + slope * (a - 1))  # 0.3 at alpha = 0.4
    hits = 0
    for _ in range(200):
        k = rng.binomial(200, r)
        f = fit_binomial(a, k, np.full(a.size, 200))
        assert 0 <= f.lower <= f.estimate <= f.upper <= 1
        hits += f.lower <= 10**log10_r1 <= f.upper
    assert hits >= 180, hits


def test_degenerate_data_give_stated_results():
    n = np.full(ALPHAS.size, 50)
    zeros = lpe_binomial_grid(ALPHAS, np.zeros_like(n), n)
    assert zeros.status == "no_compliant" and zeros.lower == 0.0
    assert zeros.estimate == 1e-6 and zeros.upper == pytest.approx(1 - 0.05 ** (1 / 50))
    ones = lpe_binomial_grid(ALPHAS, n, n)
    assert ones.status == "not_rare" and ones.estimate == 1.0
    assert (ones.lower, ones.upper) == (0.0, 1.0)
    k = np.full_like(n, 50)
    k[-1] = 2
    one = lpe_binomial_grid(ALPHAS, k, n)
    assert one.status == "one_point" and one.alphas == (0.95,)
    assert one.estimate == 2 / 50 and one.lower == 0.0 and one.upper > 2 / 50
    k[-1] = 0  # a rate >= 0.5 followed by a zero: no level, the paper's fallback
    fb = lpe_binomial_grid(ALPHAS, k, n)
    assert fb.status == "fallback" and fb.estimate == 1e-6 and fb.lower == 0.0
    k = np.zeros_like(n)
    k[:5] = 40
    k[5] = 4
    sep = lpe_binomial_grid(ALPHAS, k, n)
    assert sep.degenerate == "one_nonzero" and sep.status == "ok"
    for f in (zeros, ones, one, fb, sep):
        vals = [f.estimate, f.log10_estimate, f.lower, f.upper]
        assert np.all(np.isfinite(vals))
        assert 0 <= f.lower <= f.estimate <= f.upper <= 1


def test_select_grid_points_keeps_the_tail_after_the_last_high_rate():
    k = np.array([[10, 9, 3, 6, 2, 0, 1], [1, 1, 0, 0, 0, 0, 0], [10, 10, 10, 10, 10, 10, 10]])
    n = np.full_like(k, 10)
    n[1, 3] = 0
    sel = select_grid_points(k, n)
    np.testing.assert_array_equal(sel[0], [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(sel[1], [1, 1, 1, 0, 1, 1, 1])
    assert not sel[2].any()


def test_adaptive_variant_uses_the_paper_draws():
    rng = np.random.default_rng(3)
    comp = rng.random((ALPHAS.size, 300)) < np.minimum(0.9, 10 ** (-3 - 5 * (ALPHAS - 1)))[:, None]

    def make_draw():
        used = {}

        def draw(alpha, n):
            a = int(np.flatnonzero(np.isclose(ALPHAS, alpha))[0])
            lo = used.get(a, 0)
            used[a] = lo + n
            return int(comp[a, lo : lo + n].sum())

        return draw

    paper = lpe.lpe_paper(make_draw(), n_fit=30)
    ours = lpe_binomial(make_draw(), n_fit=30)
    assert ours.trace == paper.trace and ours.rollouts == paper.rollouts
    fit_steps = [s for s in paper.trace if s.phase == "fit"]
    assert ours.fit.alphas == tuple(s.alpha for s in fit_steps if s.k < 0.5 * s.n)
    assert 0 <= ours.lower <= ours.estimate <= ours.upper <= 1


def test_bad_input_raises():
    with pytest.raises(ValueError, match="n < k"):
        fit_binomial([0.5, 0.6], np.array([3, 1]), np.array([2, 10]))
    with pytest.raises(ValueError, match="equal length"):
        fit_binomial([0.5, 0.6], np.array([1]), np.array([10]))
    with pytest.raises(ValueError, match="k < n"):
        fit_binomial([0.5, 0.6], np.array([10, 1]), np.array([10, 10]))
    with pytest.raises(ValueError, match="integer"):
        fit_binomial([0.5, 0.6], np.array([1.5, 1]), np.array([10, 10]))
    with pytest.raises(ValueError, match="increasing"):
        lpe_binomial_grid([0.6, 0.5], np.array([1, 1]), np.array([10, 10]))
    with pytest.raises(ValueError, match="shape"):
        fit_binomial_batch(ALPHAS, np.zeros((2, 3)), np.ones((2, 3)), np.ones((2, 3), bool))
    assert binomial.LN10 == pytest.approx(np.log(10))
