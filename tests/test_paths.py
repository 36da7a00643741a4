"""Path shapes: formulas, endpoints, domains, registry."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from lpe_jax.decoding import paths


def _logits(seed: int) -> jnp.ndarray:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(3, 11)) * 3, jnp.float32)


def test_linear_formula_and_exact_endpoints():
    lo, lv = _logits(0), _logits(1)
    a = jnp.asarray([[0.0], [0.3], [1.0]], jnp.float32)
    out = np.asarray(paths.linear(lo, lv, a))
    np.testing.assert_allclose(out[1], 0.3 * lo[1] + 0.7 * lv[1], rtol=1e-6)
    np.testing.assert_array_equal(out[0], lv[0])
    np.testing.assert_array_equal(out[2], lo[2])


def test_amplify_extrapolates_past_original():
    lo, lv = _logits(0), _logits(1)
    out = np.asarray(paths.amplify(lo, lv, jnp.float32(2.0)))
    np.testing.assert_allclose(out, 2 * lo - lv, rtol=1e-5, atol=1e-5)
    assert paths.amplify.domain == (1.0, math.inf)


def test_mixture_is_log_of_probability_mixture():
    lo, lv = _logits(0), _logits(1)
    po, pv = (np.exp(np.asarray(x - jnp.max(x, -1, keepdims=True))) for x in (lo, lv))
    po, pv = po / po.sum(-1, keepdims=True), pv / pv.sum(-1, keepdims=True)
    for a in (0.0, 0.25, 1.0):
        out = np.asarray(paths.mixture(lo, lv, jnp.float32(a)))
        np.testing.assert_allclose(np.exp(out), a * po + (1 - a) * pv, rtol=1e-5, atol=1e-7)


def test_check_alphas_names_the_domain():
    assert paths.linear.check_alphas([0, 0.5, 1]).dtype == np.float64
    with pytest.raises(ValueError, match=r"linear.*\[0.0, 1.0\]"):
        paths.linear.check_alphas([0.5, 1.2])
    with pytest.raises(ValueError, match="amplify"):
        paths.amplify.check_alphas([0.5])
    with pytest.raises(ValueError, match="finite"):
        paths.linear.check_alphas([np.nan])
    with pytest.raises(ValueError, match="non-empty"):
        paths.linear.check_alphas([])


def test_registry_and_custom_paths():
    assert paths.get_path("linear") is paths.linear
    assert {"linear", "amplify", "mixture"} <= set(paths.available_paths())
    with pytest.raises(ValueError, match="unknown path"):
        paths.get_path("nope")
    with pytest.raises(ValueError, match="already registered"):
        paths.register_path(paths.PathShape("linear", paths.linear.fn, (0, 1)))

    def half(lo, lv, a):
        return 0.5 * (lo + lv)

    wrapped = paths.as_path(half)
    assert wrapped.name == "half" and wrapped.domain == (-math.inf, math.inf)
    wrapped.check_alphas([-5.0, 7.0])
    assert paths.as_path("mixture") is paths.mixture
    custom = paths.register_path(paths.PathShape("test_half", half, (0.0, 2.0)), overwrite=True)
    assert paths.get_path("test_half") is custom
    with pytest.raises(ValueError, match="lo <= hi"):
        paths.PathShape("bad", half, (1.0, 0.0))
    with pytest.raises(TypeError):
        paths.as_path(3)
