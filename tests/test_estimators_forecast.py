"""Jones et al.'s Gumbel-tail forecast on an exactly Gumbel-tailed population."""

import numpy as np
import pytest

from lpe_jax.estimators.forecast import fit_gumbel_tail

MU, BETA = -5.0, 0.3  # psi ~ Gumbel(MU, BETA): the k-th largest of n is near MU + BETA log(n/k)


def _p_from_psi(psi):
    return np.exp(-np.exp(-psi))


def test_recovers_the_max_of_a_larger_population():
    rng = np.random.default_rng(0)
    n, n_deploy, reps = 1000, 100_000, 200
    true_max = MU + BETA * (np.log(n_deploy) + np.euler_gamma)  # E[max of N Gumbel(MU, BETA)]
    fits = {"paper": [], "expected": []}
    for _ in range(reps):
        p = _p_from_psi(rng.gumbel(MU, BETA, n))
        for pos, out in fits.items():
            f = fit_gumbel_tail(p, top=20, position=pos)
            out.append((f.slope, float(f.psi(n_deploy))))
    slope, fc = np.array(fits["expected"]).T

    def se(x):
        return x.std(ddof=1) / np.sqrt(reps)

    # The expected-order-statistic position: unbiased slope and expected-max forecast.
    assert abs(slope.mean() - BETA) < 4 * se(slope)
    assert abs(fc.mean() - true_max) < 4 * se(fc)
    # The paper's k/n position: within one scale unit of the max, slope measurably high (~+18%).
    slope_p, fc_p = np.array(fits["paper"]).T
    assert abs(fc_p.mean() - true_max) < BETA
    assert slope_p.mean() > BETA + 4 * se(slope_p)
    fit = fit_gumbel_tail(_p_from_psi(rng.gumbel(MU, BETA, n)), top=20)
    assert fit.forecast(n_deploy) == pytest.approx(np.exp(-np.exp(-fit.psi(n_deploy))))
    assert np.log10(fit.forecast(n_deploy)) == pytest.approx(fit.log10_forecast(n_deploy))


def test_line_exact_on_exact_quantiles_and_log_space():
    n = 50
    psi = 0.7 * np.log(n / np.arange(1, n + 1)) - 2.0  # exactly on the line
    fit = fit_gumbel_tail(_p_from_psi(psi), top=10)
    assert fit.slope == pytest.approx(0.7) and fit.intercept == pytest.approx(-2.0)
    assert fit.psi(1e6) == pytest.approx(0.7 * np.log(1e6) - 2.0)
    log_fit = fit_gumbel_tail(-np.exp(-psi), top=10, log_space=True)
    assert log_fit.slope == pytest.approx(0.7) and log_fit.residual_sd == pytest.approx(0, abs=1e-9)


def test_nan_dropped_zeros_ranked_last_and_refusals():
    n = 30
    p = _p_from_psi(0.5 * np.log(n / np.arange(1, n + 1)) - 3.0)
    p_with = np.concatenate([p, [np.nan, np.nan, 0.0]])
    fit = fit_gumbel_tail(p_with, top=5)
    assert (fit.n_dropped, fit.n_zero, fit.n) == (2, 1, n + 1)
    with pytest.raises(ValueError, match="zero estimates fall inside the top"):
        fit_gumbel_tail(np.array([1e-3, 0.0, 0.0, 0.0]), top=3)
    with pytest.raises(ValueError, match="estimate of 1"):
        fit_gumbel_tail(np.array([1.0, 0.5, 0.1]), top=2)
    with pytest.raises(ValueError, match=r"must lie in"):
        fit_gumbel_tail(np.array([1.5, 0.5, 0.1]))
    with pytest.raises(ValueError, match="top must be"):
        fit_gumbel_tail(np.array([0.5, np.nan]), top=2)
    with pytest.raises(ValueError, match="position must be"):
        fit_gumbel_tail(p, position="median")
    with pytest.raises(ValueError, match="k <= n_deploy"):
        fit.psi(10, k=11)
