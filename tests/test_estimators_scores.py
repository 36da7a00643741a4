"""Log-space scores on hand-computed values."""

import numpy as np
import pytest

from lpe_jax.estimators.scores import log_error_score


def test_hand_computed_values():
    truth = np.array([1e-4, 1e-4, 1e-2])
    est = np.array([1e-3, 1e-5, 1e-2])  # +1 decade, -1 decade, exact
    s = log_error_score(truth, est)
    assert s.mean_signed_log10 == pytest.approx(0.0)
    assert s.mean_abs_log10 == pytest.approx(2 / 3)
    # IS: p/q - ln(p/q) - 1 -> 0.1 + ln 10 - 1, 10 - ln 10 - 1, 0
    expected = ((0.1 + np.log(10) - 1) + (10 - np.log(10) - 1) + 0.0) / 3
    assert s.mean_is_loss == pytest.approx(expected)
    assert (s.n, s.n_no_data, s.n_floored, s.n_zero) == (3, 0, 0, 0)
    # Underestimating by a decade costs more than overestimating by one.
    assert 10 - np.log(10) - 1 > 0.1 + np.log(10) - 1


def test_no_data_excluded_zeros_and_floor_and_log_space():
    truth = np.array([1e-4, 1e-4, 1e-4])
    s = log_error_score(truth, np.array([np.nan, 1e-4, 0.0]))
    assert (s.n, s.n_no_data, s.n_zero) == (2, 1, 1)
    assert s.mean_signed_log10 == -np.inf and s.mean_is_loss == np.inf
    f = log_error_score(truth, np.array([np.nan, 1e-4, 0.0]), floor=1e-6)
    assert (f.n_floored, f.n_zero) == (1, 0)
    assert f.mean_signed_log10 == pytest.approx(-1.0) and f.mean_abs_log10 == pytest.approx(1.0)
    # log space: rates far below float64's range score exactly.
    ls = log_error_score(np.array([-2000.0]), np.array([-2000.0 + np.log(10)]), log_space=True)
    assert ls.mean_signed_log10 == pytest.approx(1.0)
    assert ls.mean_is_loss == pytest.approx(0.1 + np.log(10) - 1)
    allnan = log_error_score(truth[:1], np.array([np.nan]))
    assert allnan.n == 0 and np.isnan(allnan.mean_abs_log10)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="equal length"):
        log_error_score(np.array([0.1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="truth must be"):
        log_error_score(np.array([0.0]), np.array([0.1]))
    with pytest.raises(ValueError, match="estimates must be"):
        log_error_score(np.array([0.1]), np.array([1.5]))
    with pytest.raises(ValueError, match="floor must be"):
        log_error_score(np.array([0.1]), np.array([0.1]), floor=0.0)
