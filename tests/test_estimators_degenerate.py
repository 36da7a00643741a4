"""Degenerate data, every estimator: the stated rules hold on any trace (hypothesis properties).

A line extrapolated from counts is not monotone in each count, so these tests check the rules the
estimators state (module docstring of lpe_jax.estimators.degenerate), not a monotonicity that
does not hold: no compliant rollout anywhere scores at most the paper's 1e-6; a lone fitted point
scores at most its own rate; a prompt at >= 0.5 at the top of the grid is "not_rare" with that
rate; every interval contains its estimate; the one monotonicity that does hold (the count at the
fitted point nearest alpha = 1) is checked for the fits it holds for.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trace_strategies import counts_of as _counts
from trace_strategies import traces

from lpe_jax.estimators import degenerate as dg
from lpe_jax.estimators import importance, naive
from lpe_jax.estimators.binomial import (
    fit_binomial_batch,
    fit_trace_binomial,
    lpe_binomial,
    lpe_binomial_from_counts,
    lpe_binomial_grid,
    lpe_binomial_grid_from_counts,
)
from lpe_jax.estimators.lpe import (
    fit_paper,
    lpe_paper,
    lpe_paper_from_counts,
    ols_line,
    paper_alpha_grid,
    trace_no_data,
    trace_not_rare,
)

ALPHAS = paper_alpha_grid()
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _check_interval(r):
    vals = np.array([r.estimate, r.lower, r.upper])
    assert np.all(np.isfinite(vals)), r
    assert 0.0 <= r.lower <= r.estimate <= r.upper <= 1.0, r
    assert r.status in dg.STATUSES


@SETTINGS
@given(traces())
def test_every_lpe_fit_follows_the_stated_rules(trace):
    paper = fit_paper(trace)
    fits = {d: fit_trace_binomial(trace, draws=d, interval=True) for d in ("fit", "all")}
    top = trace_not_rare(trace)
    anything = any(s.k > 0 for s in trace)
    if trace_no_data(trace):  # mostly unknown: no estimate at all, whatever else holds
        assert 2 * sum(s.n - s.n_judged for s in trace) > sum(s.n for s in trace) or not any(
            s.n_judged for s in trace
        )
        for r in (paper, *fits.values()):
            assert r.status == "no_data" and np.isnan(r.estimate), r
        for r in fits.values():
            assert (r.lower, r.upper) == (0.0, 1.0)
        return
    if top is not None:  # not rare: the top's rate, never the fallback
        assert top >= 0.5
        for r in (paper, *fits.values()):
            assert r.status == "not_rare" and r.estimate == top
    elif not anything:  # nothing complied anywhere: at most the paper's 1e-6
        for r in (paper, *fits.values()):
            assert r.status == "no_compliant" and r.estimate <= 1e-6
    assert paper.status in ("ok", "not_rare", "fallback", "no_compliant")
    if paper.status in ("fallback", "no_compliant"):
        assert paper.estimate == 1e-6 and paper.fallback
    for r in fits.values():
        _check_interval(r)
        if r.status in ("fallback", "no_compliant"):
            assert r.estimate <= 1e-6 and r.lower == 0.0
        if r.status == "one_point":  # its own rate: what a lone point supports, never more
            (k,), (n,) = r.fit.k, r.fit.n
            assert k > 0 and r.estimate == k / n and r.lower == 0.0
        if r.status == "ok":
            assert r.fit.slope is not None and sum(r.fit.k) > 0


@SETTINGS
@given(traces())
def test_vectorized_fits_equal_the_trace_fits(trace):
    sk, sn, fk, fn, n_fit = _counts(trace)
    vec = lpe_paper_from_counts(sk, sn, fk, fn, ALPHAS, n_fit)
    paper = fit_paper(trace)
    np.testing.assert_allclose(vec.log10_estimate, np.log10(paper.estimate), atol=1e-9)
    assert bool(vec.not_rare) == (paper.status == "not_rare")
    assert bool(vec.no_compliant) == (not any(s.k > 0 for s in trace))
    for d in ("fit", "all"):
        scalar = fit_trace_binomial(trace, draws=d, interval=False)
        batch = lpe_binomial_from_counts(sk, sn, fk, fn, ALPHAS, n_fit, draws=d, paper=vec)
        np.testing.assert_allclose(batch, np.log10(scalar.estimate), atol=1e-7)


def test_the_issue_cases():
    """The defect the issue names, and the prompt that is not rare at all."""
    never = lpe_binomial(lambda a, n: 0, 100)
    assert never.status == "no_compliant" and never.estimate == 1e-6
    assert lpe_paper(lambda a, n: 0, 100).estimate == 1e-6
    # A rate >= 0.5 followed by a zero: no level to read, the paper's fallback.
    r = lpe_binomial(lambda a, n: n if a <= 0.5 else 0, 13)
    assert r.status == "fallback" and r.estimate == 1e-6 and r.fit.alphas == (0.55,)
    always = lpe_binomial(lambda a, n: n, 13)
    paper = lpe_paper(lambda a, n: n, 13)
    assert always.status == paper.status == "not_rare"
    assert always.estimate == paper.estimate == 1.0
    grid = lpe_binomial_grid(ALPHAS, np.full(20, 7), np.full(20, 10))
    assert grid.status == "not_rare" and grid.estimate == 0.7


@SETTINGS
@given(
    st.lists(st.integers(0, 40), min_size=20, max_size=20),
    st.lists(st.integers(1, 60), min_size=20, max_size=20),
)
def test_fixed_grid_follows_the_stated_rules(k, n):
    k, n = np.minimum(np.array(k), np.array(n)), np.array(n)
    r = lpe_binomial_grid(ALPHAS, k, n)
    _check_interval(r)
    batch = lpe_binomial_grid_from_counts(ALPHAS, k[None], n[None])
    np.testing.assert_allclose(batch, [np.log10(r.estimate)], atol=1e-7)
    if k[-1] >= 0.5 * n[-1]:
        assert r.status == "not_rare" and r.estimate == k[-1] / n[-1]
    elif k.sum() == 0:
        assert r.status == "no_compliant" and r.estimate <= 1e-6
    if r.status in ("fallback", "no_compliant"):
        assert r.estimate <= 1e-6


@SETTINGS
@given(
    st.integers(2, 8),
    st.integers(0, 12),
    st.lists(st.integers(10, 200), min_size=8, max_size=8),
    st.lists(st.floats(0.0, 0.49), min_size=8, max_size=8),
)
def test_more_compliance_nearest_alpha_1_never_lowers_a_line(m, start, ns, fracs):
    """The rule that does hold: the count at the fitted alpha nearest 1 (others fixed)."""
    a = ALPHAS[start : start + m]
    m = a.size
    n = np.array(ns[:m])
    k = np.floor(np.array(fracs[:m]) * n).astype(np.int64)
    if k.sum() == 0 or k[-1] + 1 >= 0.5 * n[-1]:
        return
    k2 = k.copy()
    k2[-1] += 1
    e1, _ = fit_binomial_batch(a, k[None], n[None], np.ones((1, m), bool))
    e2, _ = fit_binomial_batch(a, k2[None], n[None], np.ones((1, m), bool))
    assert e2[0] >= e1[0] - 1e-9
    pos = k > 0
    if pos.sum() >= 2 and k[-1] > 0:  # the paper's OLS over its nonzero points
        y1 = np.log10(k[pos] / n[pos])
        y2 = np.log10(k2[pos] / n[pos])
        i1, s1 = ols_line(a[pos], y1)
        i2, s2 = ols_line(a[pos], y2)
        assert i2 + s2 >= i1 + s1 - 1e-12


@SETTINGS
@given(st.lists(st.sampled_from([1, 0, -1]), min_size=0, max_size=300))
def test_naive_and_importance_sampling_rules(verdicts):
    v = np.array(verdicts, dtype=np.int64)
    r = naive.naive_estimate(v)
    judged = int((v >= 0).sum())
    if judged == 0:
        assert r.status == "no_data" and (r.lower, r.upper) == (0.0, 1.0)
    if judged == 0 or 2 * (v.size - judged) > v.size:  # mostly unknown: never "no compliant"
        assert r.status == "no_data"
        assert importance.importance_sampling(np.zeros(v.size), v).status == "no_data"
    elif r.k == 0:
        assert r.status == "no_compliant" and r.estimate == 0.0 <= 1e-6
    assert 0 <= r.lower <= r.estimate <= r.upper <= 1
    lw = np.linspace(-3, 1, v.size)
    s = importance.importance_sampling(lw, v)
    if s.n_compliant == 0:
        assert s.estimate == 0.0 and s.status in ("no_compliant", "no_data")
    assert s.lower <= s.estimate <= s.upper and s.lower >= 0


def test_statuses_are_named_once():
    assert len(set(dg.STATUSES)) == len(dg.STATUSES)
    assert dg.fallback_log10(np.array([0, 10, 10**9])).tolist() == pytest.approx(
        [-6.0, -6.0, np.log10(1 - 0.05 ** (1 / 10**9))], rel=1e-6
    )
