"""Path importance sampling on an exact sequence model (tests/path_model.py)."""

import numpy as np
import pytest
from path_model import SEQS, draw_ladder, rate, seq_logp

from lpe_jax.estimators import degenerate as dg
from lpe_jax.estimators.path_is import (
    LOW_ESS,
    _crossfit_weights,
    path_importance_sampling,
    verdict_codes,
)

LADDER = (0.3, 0.6, 0.9, 1.0)
RARE = (SEQS == 2).sum(1) >= 2  # r(1) ~ 4.4e-3
COMMON = (SEQS == 2).sum(1) >= 1  # r(1) ~ 0.17


def _simulate(comply, n, reps, seed, unknown=0.0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(reps):
        a, c, ls, lo = draw_ladder(LADDER, n, comply, rng)
        c = np.where(rng.random(c.size) < unknown, -1, c)
        out.append((path_importance_sampling(a, c, ls, lo), c, ls, lo))
    return out


def test_unbiased_on_exact_truth_and_insample_weights_are_not():
    truth = rate(seq_logp(1.0), RARE)
    sims = _simulate(RARE, 30, 400, seed=0)
    est = np.array([r.estimate for r, *_ in sims])
    se = est.std(ddof=1) / np.sqrt(est.size)
    assert abs(est.mean() - truth) < 3.5 * se
    # Control: the same shares estimated in-sample (each alpha's own spread) are biased low,
    # so this check has the power to see a biased combination.
    insample = np.array(
        [
            np.sum(_crossfit_weights(r.n, r.std_errors**2) * np.exp(r.log_estimates))
            for r, *_ in sims
        ]
    )
    se_in = insample.std(ddof=1) / np.sqrt(insample.size)
    assert insample.mean() < truth - 6 * se_in


def test_unknowns_left_out_not_counted_as_zero():
    truth = rate(seq_logp(1.0), RARE)
    sims = _simulate(RARE, 30, 400, seed=1, unknown=0.3)
    est = np.array([r.estimate for r, *_ in sims])
    se = est.std(ddof=1) / np.sqrt(est.size)
    assert abs(est.mean() - truth) < 3.5 * se
    # Control: reading unknown as refusal scales every term by ~0.7 -> far below the truth.
    zeros = np.array(
        [
            path_importance_sampling(np.repeat(LADDER, 30), np.maximum(c, 0), ls, lo).estimate
            for _, c, ls, lo in sims
        ]
    )
    assert zeros.mean() < truth - 6 * zeros.std(ddof=1) / np.sqrt(zeros.size)
    r = sims[0][0]
    assert r.n_unknown.sum() == (sims[0][1] < 0).sum() and r.n.sum() + r.n_unknown.sum() == 120


def test_interval_coverage_near_nominal_with_enough_draws():
    truth = rate(seq_logp(1.0), COMMON)
    sims = _simulate(COMMON, 400, 300, seed=2)
    cover = np.mean([r.lower <= truth <= r.upper for r, *_ in sims])
    assert 0.89 <= cover <= 0.985, cover
    assert all(r.status == dg.OK for r, *_ in sims)


def test_alpha_one_alone_is_the_naive_rate_and_weights_exact():
    a = np.ones(6)
    c = np.array([1, 0, 0, 1, 0, 0])
    lp = np.log(np.full(6, 0.2))
    r = path_importance_sampling(a, c, lp, lp, min_ess=1)
    assert r.estimate == pytest.approx(2 / 6) and r.ess_total == pytest.approx(6)
    assert r.std_error == pytest.approx(np.std(c, ddof=1) / np.sqrt(6))
    # Log space: weights e^-800 underflow, the log estimate does not.
    r = path_importance_sampling(
        np.full(4, 0.5), [1, 1, 0, 0], np.zeros(4), np.full(4, -800.0), min_ess=1
    )
    assert r.estimate == 0.0 and r.log_estimate == pytest.approx(-800 + np.log(0.5))


def test_nonfinite_and_unknown_rows_counted_and_statuses():
    a = np.array([[0.5] * 4, [1.0] * 4])
    c = np.array([[1, 0, None, 1], [0, 0, 0, 1]], dtype=object)
    ls = np.array([[-1.0, -1.0, -1.0, np.nan], [-2.0, -2, -2, -2]])
    lo = np.array([[-2.0, -3.0, -1.0, -1.0], [-2.0, -2, -2, -2]])
    r = path_importance_sampling(a[:, 0], c, ls, lo)
    assert r.n.tolist() == [2, 4] and r.n_unknown.tolist() == [1, 0]
    assert r.n_nonfinite.tolist() == [1, 0] and r.n_compliant.tolist() == [1, 1]
    assert r.status == LOW_ESS and r.estimate > 0
    none = path_importance_sampling(a[:, 0], np.zeros((2, 4), int), ls, lo)
    assert none.status == dg.NO_COMPLIANT and none.estimate == 0.0
    mostly_unknown = np.full((2, 4), np.nan)
    mostly_unknown[0, 0] = 1.0
    nd = path_importance_sampling(a[:, 0], mostly_unknown, ls, lo)
    assert nd.status == dg.NO_DATA and np.isnan(nd.estimate)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="share a shape"):
        path_importance_sampling(np.ones(3), np.ones(3, bool), np.zeros(2), np.zeros(3))
    with pytest.raises(ValueError, match="one value per draw"):
        path_importance_sampling(np.ones(2), np.ones(3, bool), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="float verdicts"):
        verdict_codes(np.array([0.5]))
    with pytest.raises(ValueError, match="compliant must be"):
        verdict_codes(np.array([2]))
    assert verdict_codes(np.array([True, None, 0], dtype=object)).tolist() == [1, -1, 0]
