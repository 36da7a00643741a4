"""An independent synthetic world: curves drawn unlike :mod:`.synthetic`'s families.

NumPy only. The pooled LPE fit (:mod:`lpe_jax.estimators.pooled`) was tuned on the families of
:mod:`.synthetic`; this world exists to check it on prompts it was not tuned to (issue 21). Its
distributions were fixed before any method was scored on it, and are not to be adjusted to
a method's score. With t = 1 - alpha (t = 0 the original, t = 1 the variant) and log10 odds
g(p) = log10(p / (1 - p)):

* level: u = g(r(1)) ~ Normal(-5.0, 1.4^2), clipped to [-9.5, -2.5] (the families draw log10 r(1)
  uniformly on -8..-3);
* slope: s = 1 + Gamma(shape 2.5, scale 2.4) decades of odds per unit alpha (mean 7, sd 3.8),
  independent of the level (in the families the slope is the gap between the level and a variant
  rate drawn on its own, so low levels have steep slopes);
* curvature: kappa ~ Normal(0, curvature_sd^2) decades, on the odds' log scale:
  g(r(alpha)) = u + s t + kappa t^2 (the families bend log10 r, with ends held fixed);
* the curve is made non-increasing in alpha (a running maximum in t) and capped at 0.98.

Bank: compliant ~ Bernoulli(r(alpha)) at the paper's grid, 1,000 rollouts per alpha; screen and
truth as in :mod:`.synthetic` (screen_k ~ Binomial(100, r(1)), truth_k = screen_k +
Binomial(99,900, r(1))); no token counts and no importance-sampling rollouts (LPE and naive only).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from lpe_jax.estimators.lpe import paper_alpha_grid
from lpe_jax.evaluation.evaluation import RolloutBank

__all__ = ["independent_rates", "make_independent_bank"]

_LEVEL = (-5.0, 1.4)  # mean, sd of log10 odds at alpha = 1
_LEVEL_CLIP = (-9.5, -2.5)
_SLOPE_MIN, _SLOPE_SHAPE, _SLOPE_SCALE = 1.0, 2.5, 2.4
_R_MAX = 0.98


def independent_rates(
    n_prompts: int, alphas: np.ndarray, *, curvature_sd: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Exact rates (r [P, A] at ``alphas``, r1 [P] at alpha = 1), float64, r non-increasing in
    alpha and within (0, 0.98] (module docstring)."""
    if n_prompts < 1 or curvature_sd < 0:
        raise ValueError(
            f"need n_prompts >= 1 and curvature_sd >= 0, got {n_prompts}, {curvature_sd}"
        )
    a = np.asarray(alphas, np.float64)
    if a.ndim != 1 or np.any(np.diff(a) <= 0) or a.min() < 0 or a.max() >= 1:
        raise ValueError(f"alphas must be increasing in [0, 1), got {a}")
    u = np.clip(rng.normal(*_LEVEL, n_prompts), *_LEVEL_CLIP)
    s = _SLOPE_MIN + rng.gamma(_SLOPE_SHAPE, _SLOPE_SCALE, n_prompts)
    kappa = rng.normal(0.0, curvature_sd, n_prompts) if curvature_sd > 0 else np.zeros(n_prompts)
    t = 1.0 - a[None, ::-1]  # increasing t, so a running maximum makes r non-increasing in alpha
    g = u[:, None] + s[:, None] * t + kappa[:, None] * t * t
    g = np.maximum.accumulate(np.maximum(g, u[:, None]), axis=1)[:, ::-1]
    r = np.minimum(expit(np.log(10.0) * g), _R_MAX)
    return r, expit(np.log(10.0) * u)


def make_independent_bank(
    n_prompts: int = 400,
    *,
    curvature_sd: float = 0.0,
    rollouts: int = 1_000,
    truth_n: int = 100_000,
    screen_n: int = 100,
    seed: int = 0,
) -> RolloutBank:
    """A verdicts-only bank of the independent world on the paper's grid; deterministic in
    ``seed``. compliance int8 [P, 20, rollouts]; ``true_rates``/``true_r1`` hold the exact
    rates."""
    if rollouts < 1 or truth_n < screen_n or screen_n < 0:
        raise ValueError("need rollouts >= 1 and 0 <= screen_n <= truth_n")
    rng = np.random.default_rng(seed)
    a = paper_alpha_grid()
    r, r1 = independent_rates(n_prompts, a, curvature_sd=curvature_sd, rng=rng)
    comp = (rng.random((n_prompts, a.size, rollouts)) < r[..., None]).astype(np.int8)
    screen_k = rng.binomial(screen_n, r1)
    return RolloutBank(
        prompt_ids=tuple(f"independent-{i:04d}" for i in range(n_prompts)),
        alphas=a,
        compliance=comp,
        truth_k=screen_k + rng.binomial(truth_n - screen_n, r1),
        truth_n=np.full(n_prompts, truth_n),
        screen_k=screen_k,
        screen_n=np.full(n_prompts, screen_n),
        true_rates=r,
        true_r1=r1,
    )
