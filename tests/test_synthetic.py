"""Synthetic banks: rates, ground truth, IS weights, schema."""

import numpy as np
import pytest

from lpe_jax.estimators.importance import importance_sampling
from lpe_jax.synthetic import make_synthetic_bank, synthetic_rates


def test_rates_span_the_target_ranges():
    rng = np.random.default_rng(0)
    a = np.round(np.arange(20) * 0.05, 10)
    r, r1, fam = synthetic_rates(600, a, rng=rng)
    assert np.all((r1 >= 1e-8) & (r1 <= 1e-3))
    assert np.all(np.diff(r, axis=1) <= 1e-15)  # non-increasing in alpha
    assert 0.5 < np.mean(r[:, 0] > 0.5) < 0.85
    assert set(np.unique(fam)) == {0, 1, 2} and np.all((r > 0) & (r <= 0.98))
    lin, _, _ = synthetic_rates(50, a, family="loglinear", rng=rng)
    y = np.log10(lin)
    for row in y:  # exactly linear below the cap
        keep = row < np.log10(0.98) - 1e-12
        d = np.diff(row[keep]) / np.diff(a[keep])
        np.testing.assert_allclose(d, d[0], rtol=1e-9)


def test_bank_schema_truth_and_determinism():
    b = make_synthetic_bank(12, rollouts=50, n_is=40, unknown_rate=0.1, seed=3)
    assert b.compliance.shape == (12, 20, 50) and b.is_log_weights.shape == (12, 40)
    assert set(np.unique(b.compliance)) <= {-1, 0, 1} and (b.compliance == -1).any()
    assert np.all(b.screen_k <= b.truth_k) and np.all(b.truth_n == 100_000)
    b2 = make_synthetic_bank(12, rollouts=50, n_is=40, unknown_rate=0.1, seed=3)
    np.testing.assert_array_equal(b.compliance, b2.compliance)
    np.testing.assert_array_equal(b.is_log_weights, b2.is_log_weights)


def test_is_weights_are_unbiased_for_r1():
    b = make_synthetic_bank(30, rollouts=2, n_is=20_000, is_sd_range=(0.5, 0.5), seed=1)
    est = np.array(
        [
            importance_sampling(lw, c).estimate
            for lw, c in zip(b.is_log_weights, b.is_compliance, strict=True)
        ]
    )
    se = np.array(
        [
            importance_sampling(lw, c).std_error
            for lw, c in zip(b.is_log_weights, b.is_compliance, strict=True)
        ]
    )
    z = (est - b.true_r1) / se
    assert abs(z.mean()) < 3 / np.sqrt(z.size) + 0.2 and np.all(np.abs(z) < 5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="family"):
        make_synthetic_bank(2, family="cubic")
    with pytest.raises(ValueError, match="unknown_rate"):
        make_synthetic_bank(2, unknown_rate=1.0)
    with pytest.raises(ValueError, match="alpha grid must start at 0"):
        make_synthetic_bank(2, rollouts=5, alphas=np.array([0.5, 0.9]))
