"""Synthetic banks: rates, ground truth, IS weights, schema."""

import hashlib

import numpy as np
import pytest

from lpe_jax.estimators.importance import importance_sampling
from lpe_jax.evaluation.synthetic import FAMILIES, family_info, make_synthetic_bank, synthetic_rates

ALPHAS = np.round(np.arange(20) * 0.05, 10)


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


def test_mixed_bank_is_the_published_one():
    """Published numbers use the "mixed" bank: its random stream must not change."""
    b = make_synthetic_bank(20, rollouts=50, n_is=20, seed=0)
    digest = hashlib.sha256(
        b.compliance.tobytes() + b.truth_k.tobytes() + b.is_compliance.tobytes()
    ).hexdigest()[:16]
    assert digest == "ddb54526a0b92f40"


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_a_valid_monotone_curve_set(family):
    r, r1, _ = synthetic_rates(300, ALPHAS, family=family, rng=np.random.default_rng(4))
    assert np.all((r > 0) & (r <= 0.98)) and np.all(np.diff(r, axis=1) <= 1e-15)
    assert np.all((r1 >= 1e-8) & (r1 <= 1e-3))
    assert family_info(family).stress and "N(" in family_info(family).is_model
    b = make_synthetic_bank(6, rollouts=20, n_is=10, family=family, seed=2)
    b2 = make_synthetic_bank(6, rollouts=20, n_is=10, family=family, seed=2)
    np.testing.assert_array_equal(b.compliance, b2.compliance)


def test_stress_families_have_their_stress():
    rng = np.random.default_rng(5)
    low, _, _ = synthetic_rates(400, ALPHAS, family="low_variant", rng=rng)
    assert np.mean(low[:, 0] < 0.5) > 0.8  # the search runs to alpha = 0 for most prompts
    sl, r1, _ = synthetic_rates(400, ALPHAS, family="slopes", rng=rng)
    assert np.all(sl[:, 0] >= 0.5)
    slope = (np.log10(r1) - np.log10(sl[:, -1])) / 0.05  # decades per unit alpha, near 1
    assert -12 - 1e-9 <= slope.min() < -10 and -4 < slope.max() <= -3 + 1e-9
    for fam, sign in (("concave", -1), ("convex", 1)):
        r, r1, _ = synthetic_rates(200, ALPHAS, family=fam, rng=rng)
        y = np.log10(r)
        below_cap = np.all(r < 0.98, axis=1)
        d2 = np.diff(y[below_cap], 2, axis=1)  # second difference in alpha
        assert np.all(sign * d2 > 0)
        line = np.log10(r1)[:, None] + (y[:, :1] - np.log10(r1)[:, None]) * (1 - ALPHAS)
        assert np.all(sign * (y - line)[below_cap][:, 1:] < 0)  # bends away from the chord


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="family"):
        make_synthetic_bank(2, family="cubic")
    with pytest.raises(ValueError, match="unknown_rate"):
        make_synthetic_bank(2, unknown_rate=1.0)
    with pytest.raises(ValueError, match="alpha grid must start at 0"):
        make_synthetic_bank(2, rollouts=5, alphas=np.array([0.5, 0.9]))
