"""The switch between path IS and LPE (lpe_jax.estimators.combined)."""

import numpy as np
import pytest

from lpe_jax.estimators.combined import DEFAULT_MIN_ESS, blend_path_is_lpe, combine_path_is_lpe
from lpe_jax.estimators.path_is import path_importance_sampling


def test_path_is_at_or_above_the_threshold_lpe_below():
    path = np.array([-3.0, -4.0, -5.0, -6.0])
    ess = np.array([9.99, 10.0, 50.0, 0.0])
    lpe = np.array([-2.0, -2.5, -3.5, np.nan])
    res = combine_path_is_lpe(path, ess, lpe)
    np.testing.assert_array_equal(res.log10_estimate, [-2.0, -4.0, -5.0, np.nan])
    np.testing.assert_array_equal(res.from_path_is, [False, True, True, False])
    assert res.min_ess == DEFAULT_MIN_ESS == 10.0
    assert combine_path_is_lpe(path, ess, lpe, min_ess=60).from_path_is.sum() == 0


def test_no_compliant_rows_or_no_data_fall_back_to_lpe():
    # nothing complied: path IS is 0 (-inf in log10) with ESS 0; no data: NaN with ESS 0
    res = combine_path_is_lpe(np.array([-np.inf, np.nan]), np.zeros(2), np.array([-4.0, -5.0]))
    np.testing.assert_array_equal(res.log10_estimate, [-4.0, -5.0])
    rng = np.random.default_rng(0)
    a = np.repeat([0.5, 1.0], 40)
    pis = path_importance_sampling(a, np.zeros(80, bool), rng.normal(-5, 1, 80), np.full(80, -5.0))
    assert pis.ess_estimate == 0.0
    res = combine_path_is_lpe(pis.log_estimate / np.log(10), pis.ess_estimate, -4.0)
    assert res.log10_estimate == -4.0 and not res.from_path_is


def test_path_is_with_many_tame_compliant_rows_is_kept():
    rng = np.random.default_rng(1)
    a = np.repeat([0.8, 1.0], 100)
    c = rng.random(200) < 0.3
    ls = rng.normal(-5, 0.1, 200)
    pis = path_importance_sampling(a, c, ls, ls + rng.normal(0, 0.1, 200))
    assert pis.ess_estimate > 10
    res = combine_path_is_lpe(np.log10(pis.estimate), pis.ess_estimate, -9.0)
    assert res.from_path_is and res.log10_estimate == pytest.approx(np.log10(pis.estimate))


@pytest.mark.parametrize(
    ("path", "ess", "lpe", "kw", "match"),
    [
        (np.zeros(2), np.zeros(3), np.zeros(2), {}, "share a shape"),
        (np.zeros(2), np.array([1.0, np.nan]), np.zeros(2), {}, "path_ess must be finite"),
        (np.zeros(2), np.array([1.0, -1.0]), np.zeros(2), {}, "path_ess must be finite"),
        (np.zeros(2), np.ones(2), np.zeros(2), {"min_ess": 0.0}, "min_ess must be"),
        (np.zeros(2), np.ones(2), np.zeros(2), {"min_ess": np.nan}, "min_ess must be"),
        (np.array([np.nan, 0.0]), np.full(2, 20.0), np.zeros(2), {}, "NaN or infinite"),
        (np.array([-np.inf, 0.0]), np.full(2, 20.0), np.zeros(2), {}, "NaN or infinite"),
    ],
)
def test_bad_inputs_raise(path, ess, lpe, kw, match):
    with pytest.raises(ValueError, match=match):
        combine_path_is_lpe(path, ess, lpe, **kw)


def test_blend_weights_by_precision_and_falls_back_without_compliant_rows():
    ln10 = np.log(10)
    # ESS 1 / ln10^2 gives path IS an sd of 1 decade: equal to an LPE sd of 1 -> the midpoint
    got = blend_path_is_lpe(
        np.array([-4.0, -4.0, -np.inf, np.nan, -4.0]),
        np.array([1 / ln10**2, 100.0, 0.0, 0.0, 5.0]),
        np.array([-2.0, -2.0, -3.0, -3.0, -2.0]),
        np.array([1.0, 1.0, 1.0, 1.0, np.inf]),
    )
    w = 100 * ln10**2 / (100 * ln10**2 + 1)
    np.testing.assert_allclose(got, [-3.0, -4 * w - 2 * (1 - w), -3.0, -3.0, -4.0])


@pytest.mark.parametrize(
    ("path", "ess", "sd", "match"),
    [
        (np.zeros(2), np.ones(2), np.array([1.0, 0.0]), "lpe_log10_sd must be > 0"),
        (np.zeros(2), np.ones(2), np.ones(3), "lpe_log10_sd must be > 0"),
        (np.zeros(2), np.array([1.0, np.inf]), np.ones(2), "path_ess must be finite"),
        (np.array([0.0, np.nan]), np.ones(2), np.ones(2), "NaN or infinite"),
    ],
)
def test_blend_bad_inputs_raise(path, ess, sd, match):
    with pytest.raises(ValueError, match=match):
        blend_path_is_lpe(path, ess, np.zeros(2), sd)
