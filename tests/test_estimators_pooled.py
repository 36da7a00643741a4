"""Pooled LPE: the degenerate rules, batch == trace API, recovery, pooling moves estimates."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trace_strategies import counts_of as _counts
from trace_strategies import traces

from lpe_jax.estimators import degenerate as dg
from lpe_jax.estimators.lpe import adaptive_draws, paper_alpha_grid, trace_no_data
from lpe_jax.estimators.pooled import (
    PRIORS,
    choose_curvature,
    fit_pooled,
    fit_pooled_batch,
    lpe_pooled_from_counts,
)

ALPHAS = paper_alpha_grid()


def _line_draw(log10_r1: float, slope: float, rng: np.random.Generator):
    """draw(alpha, n) from log10 r = log10_r1 + slope * (1 - alpha), capped at 0.98."""

    def draw(alpha: float, n: int) -> int:
        return int(rng.binomial(n, min(0.98, 10 ** (log10_r1 + slope * (1 - alpha)))))

    return draw


def _population(n_prompts: int, n_fit: int, seed: int, end: float = 0.5):
    """Prompts whose lines share a variant end log10 r(0) ~ N(end, 0.3^2) (the default prior)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-7, -3, n_prompts)
    c0 = rng.normal(end, 0.3, n_prompts)
    runs = [
        adaptive_draws(_line_draw(ui, ci - ui, rng), n_fit) for ui, ci in zip(u, c0, strict=True)
    ]
    return runs, u


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(traces(max_n_fit=30), min_size=1, max_size=5))
def test_pooled_follows_the_stated_rules_on_any_traces(runs):
    res = fit_pooled(runs)
    assert len(res.prompts) == len(runs)
    for t, r in zip(runs, res.prompts, strict=True):
        if trace_no_data(t):  # mostly unknown verdicts: no estimate, whatever else holds
            assert r.status == dg.NO_DATA and np.isnan(r.estimate)
            assert (r.lower, r.upper) == (0.0, 1.0)
            continue
        assert r.status in (dg.OK, dg.NOT_RARE, dg.FALLBACK_STATUS, dg.NO_COMPLIANT)
        assert np.isfinite([r.estimate, r.lower, r.upper, r.log10_estimate]).all()
        assert 0 <= r.lower <= r.estimate <= r.upper <= 1
        if not any(s.k > 0 for s in t):
            assert r.status == dg.NO_COMPLIANT and r.estimate <= 1e-6
        if r.status in (dg.FALLBACK_STATUS, dg.NO_COMPLIANT):
            assert r.estimate <= 1e-6 and r.lower == 0.0
        if r.status == dg.OK and len(r.alphas) == 1:  # one point: never above its own rate
            assert r.estimate <= r.k[0] / r.n[0] + 1e-12
        fit = [s for s in t if s.phase == "fit"][-1]
        if fit.alpha == 0.95 and fit.rate is not None and fit.rate >= 0.5:
            assert r.status == dg.NOT_RARE and r.estimate == fit.rate


def test_batch_equals_the_trace_api_and_is_permutation_equivariant():
    runs, _ = _population(12, 20, seed=1)
    res = fit_pooled(runs)
    arrs = [_counts(t) for t in runs]
    sk, sn, fk, fn = (np.stack([a[i] for a in arrs])[None] for i in range(4))
    batch = lpe_pooled_from_counts(sk, sn, fk, fn, ALPHAS, 20)
    np.testing.assert_allclose(
        batch.log10_estimate[0], [p.log10_estimate for p in res.prompts], atol=1e-6
    )
    perm = np.random.default_rng(0).permutation(len(runs))
    again = fit_pooled([runs[i] for i in perm])
    np.testing.assert_allclose(
        [p.log10_estimate for p in again.prompts],
        [res.prompts[i].log10_estimate for i in perm],
        atol=1e-6,
    )


def test_recovers_levels_and_the_shared_variant_end():
    runs, u = _population(40, 400, seed=2)
    res = fit_pooled(runs, prior="end")
    est = np.array([p.log10_estimate for p in res.prompts])
    assert res.population.coef[1] == 1.0 and abs(-res.population.coef[0] - 0.5) < 0.25
    coupled = fit_pooled(runs)  # the default learns that slopes follow the level here
    assert coupled.population.coef[1] > 0.9
    assert np.median(np.abs(est - u)) < 0.25 and abs(np.mean(est - u)) < 0.15
    cover = np.mean([p.lower <= 10**ui <= p.upper for p, ui in zip(res.prompts, u, strict=True)])
    assert cover >= 0.85


def test_a_prompts_estimate_moves_with_its_pool():
    """The documented caveat: the same counts give another estimate beside other prompts."""
    runs, _ = _population(20, 13, seed=3, end=0.5)
    other, _ = _population(20, 13, seed=4, end=-1.5)  # a pool whose variant end is lower
    mine = fit_pooled(runs).prompts[0].log10_estimate
    moved = fit_pooled([runs[0], *other]).prompts[0].log10_estimate
    assert abs(mine - moved) > 0.05


def test_pooling_beats_the_unpooled_fit_on_thin_data():
    """Many prompts with 13 rollouts per alpha: pooling cuts the error of log10 r(1)."""
    from lpe_jax.estimators.binomial import fit_trace_binomial

    runs, u = _population(60, 13, seed=5)
    pooled = np.array([p.log10_estimate for p in fit_pooled(runs).prompts])
    alone = np.array(
        [fit_trace_binomial(t, draws="all", interval=False).fit.log10_estimate for t in runs]
    )
    assert np.mean(np.abs(pooled - u)) < 0.8 * np.mean(np.abs(alone - u))


def test_priors_and_bad_input():
    runs, _ = _population(10, 13, seed=6)
    for prior in PRIORS:
        res = fit_pooled(runs, prior=prior)
        assert all(0 <= p.lower <= p.estimate <= p.upper <= 1 for p in res.prompts)
    with pytest.raises(ValueError, match="prior must be one of"):
        fit_pooled(runs, prior="flat")
    with pytest.raises(ValueError, match="at least one"):
        fit_pooled([])
    with pytest.raises(ValueError, match="prompts, 20"):
        fit_pooled_batch(ALPHAS, np.zeros((3, 20)), np.ones((3, 19)), np.zeros((3, 20), bool))
    with pytest.raises(ValueError, match="k < n"):
        fit_pooled_batch(ALPHAS, np.ones((1, 2, 20)), np.ones((1, 2, 20)), np.ones((1, 2, 20)))
    z = np.zeros((1, 2, 20), int)
    nothing = lpe_pooled_from_counts(z, z + 10, z, z + 13, ALPHAS, 13)  # nothing complied
    assert np.all(nothing.log10_estimate == -6.0) and not nothing.line.any()


def _independent_slopes(n_prompts: int, n_fit: int, seed: int):
    """Prompts whose slopes are drawn independently of their level (unlike the variant-end
    population): the world on which the old default ("end") kept its levels high."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-7, -3, n_prompts)
    s = rng.uniform(4, 10, n_prompts)
    runs = [adaptive_draws(_line_draw(ui, si, rng), n_fit) for ui, si in zip(u, s, strict=True)]
    return runs, u


def _alone(runs) -> list:
    from lpe_jax.estimators.binomial import fit_trace_binomial

    return [fit_trace_binomial(t, draws="all", interval=False).fit for t in runs]


def test_each_prompts_own_data_take_over_as_they_grow():
    """With thin data the default holds slopes near the population's; with much data it is the
    unpooled binomial fit, its levels unbiased, and the coupling it learned is the world's (0)."""
    thin, _ = _independent_slopes(40, 13, seed=7)
    pairs = [
        (abs(p.slope - p.prior_slope), abs(a.slope - p.prior_slope))
        for p, a in zip(fit_pooled(thin).prompts, _alone(thin), strict=True)
        if p.slope is not None and a.slope is not None
    ]
    pooled_dev, alone_dev = np.mean(pairs, axis=0)
    assert len(pairs) >= 30 and pooled_dev < 0.5 * alone_dev
    many, u = _independent_slopes(40, 3000, seed=7)
    res = fit_pooled(many)
    est = np.array([p.log10_estimate for p in res.prompts])
    alone = np.array([a.log10_estimate for a in _alone(many)])
    assert np.mean(np.abs(est - alone)) < 0.1
    assert abs(np.mean(est - u)) < 0.1 and res.population.coef[1] < 0.2


def _logistic_population(n_prompts: int, n_fit: int, seed: int):
    """Prompts whose log odds (not log rate) are linear in alpha and reach ~0.9-0.99 at the
    variant: the log rate bends near saturation (the "logistic" family's stress)."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(-7, -3, n_prompts)
    end = rng.normal(1.5, 0.3, n_prompts)  # log10 odds at alpha = 0

    def draw_for(ui, ei):
        def draw(alpha: float, n: int) -> int:
            g = ui + (ei - ui) * (1 - alpha)  # log10 odds
            return int(rng.binomial(n, min(0.98, 1 / (1 + 10.0**-g))))

        return draw

    runs = [adaptive_draws(draw_for(ui, ei), n_fit) for ui, ei in zip(u, end, strict=True)]
    return runs, np.log10(1 / (1 + 10.0**-u))


def test_the_logit_link_removes_the_saturation_bias_and_link_picks_it():
    runs, truth = _logistic_population(40, 400, seed=8)
    err = {}
    ests = {}
    for prior in ("coupled", "logit", "link", "averaged"):
        res = fit_pooled(runs, prior=prior)
        ests[prior] = est = np.array([p.log10_estimate for p in res.prompts])
        assert all(0 <= p.lower <= p.estimate <= p.upper <= 1 for p in res.prompts)
        err[prior] = (np.mean(est - truth), res.population.logit)
    np.testing.assert_allclose(ests["averaged"], 0.5 * (ests["coupled"] + ests["logit"]))
    assert err["coupled"][0] > 0.25 and not err["coupled"][1]  # the log-rate line's own bias
    assert abs(err["logit"][0]) < 0.15 and err["logit"][1]
    assert err["link"] == err["logit"]  # the counts prefer the logit link here ...
    straight, _ = _population(40, 400, seed=2)
    assert not fit_pooled(straight, prior="link").population.logit  # ... and the log rate here


def test_choose_curvature_finds_a_shared_bend_and_a_straight_line():
    rng = np.random.default_rng(9)
    x = ALPHAS - 1.0
    u = rng.uniform(-7, -3, (2, 60))
    for q_true in (-0.6, 0.0, 0.3):
        b = (rng.uniform(0.0, 1.0, (2, 60)) - u) * np.log(10) / (1 - q_true)  # ln per unit z
        log_r = np.minimum(u[..., None] * np.log(10) - b[..., None] * (x + q_true * x * x), 0)
        n = np.full(log_r.shape, 400)
        k = rng.binomial(n, np.minimum(np.exp(log_r), 0.98))
        q = choose_curvature(ALPHAS, k, n, k < 0.5 * n)
        assert np.all(np.abs(q - q_true) <= (0.3 if q_true else 0.15))
        assert q_true == 0 or np.all(np.sign(q) == np.sign(q_true))
        res = fit_pooled_batch(ALPHAS, k, n, k < 0.5 * n, prior="curved", curvature=q)
        assert np.median(np.abs(res.log10_estimate - u)) < 0.3
    with pytest.raises(ValueError, match='prior="curved"'):
        fit_pooled_batch(ALPHAS, k, n, k < 0.5 * n, curvature=q)
