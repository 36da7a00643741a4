"""Paper-exact LPE: search, advance, fit, fallback, budgets, vectorized form."""

import numpy as np
import pytest

from lpe_jax.estimators import lpe
from lpe_jax.estimators.lpe import DrawResult, lpe_paper, lpe_paper_from_counts, paper_alpha_grid


def _scripted(search: dict, fit: dict, tokens_per_rollout=None):
    """draw() answering from tables keyed by alpha; missing alphas give 0 compliant."""
    seen = set()  # every fit alpha was scanned first, so a second visit is the fit phase

    def draw(alpha, n):
        table = fit if alpha in seen else search
        seen.add(alpha)
        k = table.get(alpha, 0)
        if tokens_per_rollout is None:
            return k
        return (k, tokens_per_rollout * n)

    return draw


def test_grid_is_exact_decimals():
    g = paper_alpha_grid()
    assert g.size == 20 and g[0] == 0.0 and g[-1] == 0.95
    assert g[3] == 0.15 and g[6] == 0.3 and g[14] == 0.7  # no 0.1 + 0.2 drift


def test_recovers_exact_line():
    slope, log10_r1 = -5.5, -5.0

    def draw(alpha, n):
        r = min(0.9, 10 ** (log10_r1 + slope * (alpha - 1)))
        return round(n * r)

    res = lpe_paper(draw, n_fit=10**14)
    assert not res.fallback
    np.testing.assert_allclose(res.slope, slope, rtol=1e-6)
    np.testing.assert_allclose(np.log10(res.estimate), log10_r1, atol=1e-6)
    # every fitted point is below 0.5 and the advance ran to the top of the grid
    assert max(res.fit_log10_rates) < np.log10(0.5)
    assert res.trace[-1].alpha == 0.95 and res.trace[-1].phase == "fit"


def test_search_and_advance_follow_the_appendix():
    search = {0.55: 5}  # 0.95 .. 0.6 give 0/10; 0.55 gives 5/10 >= 0.5: start
    fit = {0.55: 6, 0.6: 3, 0.65: 1, 0.7: 0, 0.75: 4}
    res = lpe_paper(_scripted(search, fit), n_fit=13)
    s_alphas = [s.alpha for s in res.trace if s.phase == "search"]
    f_alphas = [s.alpha for s in res.trace if s.phase == "fit"]
    assert s_alphas == [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55]
    assert all(s.n == 10 for s in res.trace if s.phase == "search")
    assert f_alphas == [0.55, 0.6, 0.65, 0.7]  # stops at the first zero, 0.75 never drawn
    assert all(s.n == 13 for s in res.trace if s.phase == "fit")
    assert res.start_alpha == 0.55
    assert res.fit_alphas == (0.55, 0.6, 0.65)  # zero point not fitted
    np.testing.assert_allclose(res.fit_log10_rates, np.log10([6 / 13, 3 / 13, 1 / 13]))
    icpt, slope = lpe.ols_line(np.array(res.fit_alphas), np.array(res.fit_log10_rates))
    np.testing.assert_allclose(res.estimate, 10 ** (icpt + slope))
    assert res.rollouts == 9 * 10 + 4 * 13
    assert res.forward_passes is None  # int-returning draw: tokens unknown


def test_rates_at_or_above_half_are_not_fitted_but_advance_continues():
    fit = {0.55: 13, 0.6: 7, 0.65: 3, 0.7: 1}  # 13/13 and 7/13 >= 0.5 excluded
    res = lpe_paper(_scripted({0.55: 10}, fit), n_fit=13)
    assert res.fit_alphas == (0.65, 0.7)
    assert [s.alpha for s in res.trace if s.phase == "fit"][-1] == 0.75


def test_scan_reaching_zero_starts_fit_at_zero():
    fit = {0.0: 5, 0.05: 2}
    res = lpe_paper(_scripted({}, fit), n_fit=20)
    assert len([s for s in res.trace if s.phase == "search"]) == 20
    assert res.start_alpha == 0.0 and res.fit_alphas == (0.0, 0.05)


def test_fallback_when_fewer_than_two_nonzero_points():
    res = lpe_paper(_scripted({0.5: 9}, {0.5: 3}), n_fit=13)
    assert res.fallback and res.estimate == 1e-6 and res.slope is None
    assert res.fit_alphas == (0.5,)


def test_unknown_verdicts_are_not_refusals_and_tokens_count():
    def draw(alpha, n):
        if alpha == 0.9 and n == 10:
            return DrawResult(k=4, generated_tokens=100, n_judged=6)  # 4/6 >= 0.5
        if alpha == 0.9:
            return DrawResult(k=5, generated_tokens=50 * n, n_judged=n - 2)
        if alpha == 0.95 and n == 10:
            return DrawResult(k=0, generated_tokens=30 * n, n_judged=n)
        return DrawResult(k=2, generated_tokens=40 * n)

    res = lpe_paper(draw, n_fit=20)
    assert res.start_alpha == 0.9
    assert res.fit_alphas == (0.9, 0.95)
    np.testing.assert_allclose(res.fit_log10_rates[0], np.log10(5 / 18))
    assert res.forward_passes == 2 * (300 + 100 + 50 * 20 + 40 * 20)
    single = lpe_paper(draw, n_fit=20, passes_per_token=1)
    assert single.forward_passes == res.forward_passes // 2


def test_bad_draws_and_grids_raise():
    with pytest.raises(ValueError, match="k <= n_judged"):
        lpe_paper(lambda a, n: n + 1, n_fit=13)
    with pytest.raises(ValueError, match="k <= n_judged"):
        lpe_paper(lambda a, n: DrawResult(k=3, n_judged=2), n_fit=13)
    with pytest.raises(TypeError):
        lpe_paper(lambda a, n: "3", n_fit=13)
    with pytest.raises(ValueError, match="increasing"):
        lpe_paper(lambda a, n: 0, n_fit=13, alphas=[0.5, 0.4])
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        lpe_paper(lambda a, n: 0, n_fit=13, alphas=[0.5, 1.0])
    with pytest.raises(ValueError, match="n_fit"):
        lpe_paper(lambda a, n: 0, n_fit=0)


def _replay(comp, alphas):
    """draw() serving comp[a] (verdicts 1/0/-1) in order, without replacement."""
    used = {}

    def draw(alpha, n):
        a = int(np.flatnonzero(np.isclose(alphas, alpha))[0])
        lo = used.get(a, 0)
        used[a] = lo + n
        v = comp[a, lo : lo + n]
        return DrawResult(k=int((v == 1).sum()), n_judged=int((v >= 0).sum()))

    return draw


def test_vectorized_equals_scalar_on_random_orders():
    rng = np.random.default_rng(1)
    alphas = paper_alpha_grid()
    r = np.minimum(0.95, 10 ** (-4 + 5 * (1 - alphas)))
    n_fit, n_r = 13, 60
    for trial in range(40):
        comp = (rng.random((alphas.size, n_r)) < r[:, None] * rng.uniform(0.3, 1.5)).astype(int)
        comp[rng.random(comp.shape) < 0.05] = -1  # unknown verdicts

        scalar = lpe_paper(_replay(comp, alphas), n_fit=n_fit)
        s, f = comp[:, :10], comp[:, 10 : 10 + n_fit]
        vec = lpe_paper_from_counts(
            (s == 1).sum(1), (s >= 0).sum(1), (f == 1).sum(1), (f >= 0).sum(1), alphas, n_fit
        )
        assert vec.rollouts == scalar.rollouts, trial
        assert bool(vec.fallback) == scalar.fallback
        np.testing.assert_allclose(vec.log10_estimate, np.log10(scalar.estimate), atol=1e-10)
        np.testing.assert_array_equal(alphas[vec.fitted], scalar.fit_alphas)
