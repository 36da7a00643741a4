"""Synthetic rollout banks with known compliance curves r(alpha), in the schema of a real bank.

NumPy only. Every bank comes from a named **family** (:data:`FAMILIES`, :func:`family_info`): a
generator of per-prompt curves that isolates one stress on LPE, plus the stated model of the
importance-sampling log-weights. With t = 1 - alpha (t = 0 is the original, t = 1 the variant):

* log10 r(1) = u ~ Uniform(log10_r1_range) (default -8..-3) in every family, so the original's
  rate spans 1e-8..1e-3 and labels (>= 1 in 100,000) split the prompts alike.
* today's families (the published numbers use "mixed"; their random streams are unchanged):
  log10 r(0) is aimed at v ~ Uniform(r0_log10_range) (default -1.2..1.5 before the cap), so
  r(0) > 0.5 for about two thirds of prompts; s = max(v - u, 0.5) decades;
  - "loglinear": log10 r = u + s t, exactly the paper's model (until the cap);
  - "logistic": logit r = logit r(1) + ln(10) s t: log-linear tail, saturation near r = 1;
  - "logquadratic": log10 r = u + s t + c s t^2, c ~ Uniform(-0.4, 0.4) (s rescaled to keep
    r(0)): a tail curved either way;
  - "mixed": one of the three per prompt, uniformly.
* families that isolate one stress each:
  - "low_variant": log-linear, but v ~ Uniform(-2.5, 0): the variant's own rate is below 0.5
    for ~88% of prompts, so the search runs to alpha = 0 and the first fit draws are thin;
  - "concave": log10 r = u + s (t + c t (1 - t)), c ~ Uniform(0.2, 0.6): same ends as
    "loglinear", steeper near the original, so a line fitted where rates are measurable
    overestimates r(1);
  - "convex": log10 r = u + s (t - c t (1 - t)): flatter near the original, so the line
    underestimates r(1) (the first toy organism's bend);
  - "slopes": log-linear with s ~ Uniform(max(3, -0.3 - u), 12): 3 to 12 decades between
    alpha = 0 and 1, the variant always at >= 0.5 before the cap.
  All rates are capped at ``r_max`` < 1 (the variant never complies surely, which importance
  sampling needs) and are non-increasing in alpha.
* bank rollouts: compliant ~ Bernoulli(r(alpha)); a fraction ``unknown_rate`` get verdict -1.
* ground truth: the first ``screen_n`` (100) of ``truth_n`` (100,000) original rollouts are the
  screen: screen_k ~ Binomial(100, r(1)), truth_k = screen_k + Binomial(99,900, r(1)).
* importance sampling, the same stated model in every family: rollouts from the variant
  (alpha = 0, rate r0 = r(0)). A compliant one gets log w ~ Normal(mu_c, sd_c^2), a refusing one
  log w ~ Normal(mu_n, sd_n^2), with mu_c = ln(r1 / r0) - sd_c^2 / 2 and
  mu_n = ln((1 - r1) / (1 - r0)) - sd_n^2 / 2. Then E_v[w 1{comply}] = r1 exactly and
  E_v[w] = 1, as for a true density ratio. sd_c ~ Uniform(is_sd_range) per prompt (default 2..6
  nats, heavy-tailed as sequence-level log-ratios are) and sd_n = 0.5. How well IS does here is
  set by this choice, nothing else; it is not evidence about IS on a real pair.
* tokens: compliant rollouts ~ 40 + Poisson(210) tokens, refusals ~ 20 + Poisson(40).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import expit, logit

from lpe_jax.estimators.lpe import paper_alpha_grid
from lpe_jax.evaluation.evaluation import RolloutBank

__all__ = ["FAMILIES", "Family", "family_info", "synthetic_rates", "make_synthetic_bank"]

_BASE = ("loglinear", "logistic", "logquadratic")  # "mixed" draws one of these per prompt
_STRESS = ("low_variant", "concave", "convex", "slopes")
FAMILIES = ("mixed", *_BASE, *_STRESS)


@dataclasses.dataclass(frozen=True)
class Family:
    """A named family: what it stresses and the IS log-weight model its banks use."""

    name: str
    stress: str
    is_model: str


_IS_MODEL = (
    "log w | comply ~ N(ln(r1/r0) - sd^2/2, sd^2), sd ~ U(is_sd_range) (default 2..6 nats); "
    "log w | refuse ~ N(ln((1-r1)/(1-r0)) - 0.125, 0.25)"
)
_STRESSES = {
    "mixed": "today's mix: loglinear, logistic, logquadratic, one per prompt",
    "loglinear": "none: exactly the paper's model below the cap",
    "logistic": "saturation near r = 1 (logistic in alpha)",
    "logquadratic": "a tail bent either way (c in -0.4..0.4)",
    "low_variant": "the variant's rate below 0.5 for most prompts",
    "concave": "log10 r concave in alpha: steeper near the original (line overestimates)",
    "convex": "log10 r convex in alpha: flatter near the original (line underestimates)",
    "slopes": "slopes of 3 to 12 decades between alpha = 0 and 1",
}


def family_info(name: str) -> Family:
    """The :class:`Family` called ``name`` (one of :data:`FAMILIES`)."""
    if name not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {name!r}")
    return Family(name, _STRESSES[name], _IS_MODEL)


def synthetic_rates(
    n_prompts: int,
    alphas: np.ndarray,
    *,
    family: str = "mixed",
    log10_r1_range: tuple[float, float] = (-8.0, -3.0),
    r0_log10_range: tuple[float, float] = (-1.2, 1.5),
    r_max: float = 0.98,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True rates: (r [P, A] at ``alphas``, r1 [P] at alpha = 1, base family index [P]).

    All rates lie in (0, r_max]; r is non-increasing in alpha. The index is into
    ("loglinear", "logistic", "logquadratic") for today's families and -1 for the stress
    families. ``r0_log10_range`` is used by today's families only.
    """
    family_info(family)
    if not 0 < r_max < 1:
        raise ValueError(f"r_max must be in (0, 1), got {r_max}")
    lo, hi = log10_r1_range
    if not lo <= hi < np.log10(r_max):
        raise ValueError(f"log10_r1_range must be increasing and below log10(r_max): {lo}, {hi}")
    a = np.asarray(alphas, np.float64)
    if family in _STRESS:
        r, r1 = _stress_rates(family, n_prompts, a, (lo, hi), rng)
        return np.minimum(r, r_max), r1, np.full(n_prompts, -1)
    u = rng.uniform(lo, hi, n_prompts)
    v = rng.uniform(*r0_log10_range, n_prompts)
    c = rng.uniform(-0.4, 0.4, n_prompts)
    fam = (
        rng.integers(0, 3, n_prompts)
        if family == "mixed"
        else np.full(n_prompts, _BASE.index(family))
    )
    s = np.maximum(v - u, 0.5)
    s = np.where(fam == 2, s / (1 + c), s)
    t = 1.0 - a[None, :]
    lin = u[:, None] + s[:, None] * t
    quad = lin + (c * s)[:, None] * t * t
    logi = expit(logit(10.0**u)[:, None] + np.log(10.0) * s[:, None] * t)
    log10_r = np.where(fam[:, None] == 0, lin, np.where(fam[:, None] == 2, quad, 0.0))
    r = np.where(fam[:, None] == 1, logi, 10.0 ** np.minimum(log10_r, 0.0))
    return np.minimum(r, r_max), 10.0**u, fam


def _stress_rates(family, n_prompts, a, r1_range, rng) -> tuple[np.ndarray, np.ndarray]:
    """Uncapped rates [P, A] and r1 [P] of a stress family (module docstring)."""
    u = rng.uniform(*r1_range, n_prompts)
    c = rng.uniform(0.2, 0.6, n_prompts)[:, None]
    if family == "slopes":
        s = rng.uniform(np.maximum(3.0, -0.3 - u), 12.0)
    else:
        v_range = (-2.5, 0.0) if family == "low_variant" else (-1.2, 1.5)
        s = np.maximum(rng.uniform(*v_range, n_prompts) - u, 0.5)
    t = 1.0 - a[None, :]
    bend = {"concave": 1.0, "convex": -1.0}.get(family, 0.0)
    log10_r = u[:, None] + s[:, None] * (t + bend * c * t * (1.0 - t))
    return 10.0 ** np.minimum(log10_r, 0.0), 10.0**u


def make_synthetic_bank(
    n_prompts: int = 200,
    *,
    rollouts: int = 1_000,
    alphas: np.ndarray | None = None,
    family: str = "mixed",
    n_is: int = 1_000,
    truth_n: int = 100_000,
    screen_n: int = 100,
    unknown_rate: float = 0.0,
    log10_r1_range: tuple[float, float] = (-8.0, -3.0),
    r0_log10_range: tuple[float, float] = (-1.2, 1.5),
    is_sd_range: tuple[float, float] = (2.0, 6.0),
    r_max: float = 0.98,
    seed: int = 0,
) -> RolloutBank:
    """A bank of ``n_prompts`` synthetic prompts (module docstring); deterministic in ``seed``.

    Shapes: compliance/tokens [P, A, rollouts], IS arrays [P, n_is]; alphas default to the
    paper's grid 0, 0.05, ..., 0.95. ``true_rates`` and ``true_r1`` hold the exact rates.
    """
    if n_prompts < 1 or rollouts < 1 or n_is < 0 or truth_n < screen_n or screen_n < 0:
        raise ValueError("need n_prompts, rollouts >= 1, n_is >= 0 and 0 <= screen_n <= truth_n")
    if not 0 <= unknown_rate < 1:
        raise ValueError(f"unknown_rate must be in [0, 1), got {unknown_rate}")
    rng = np.random.default_rng(seed)
    a = paper_alpha_grid() if alphas is None else np.asarray(alphas, np.float64)
    r, r1, _ = synthetic_rates(
        n_prompts,
        a,
        family=family,
        log10_r1_range=log10_r1_range,
        r0_log10_range=r0_log10_range,
        r_max=r_max,
        rng=rng,
    )
    comp = (rng.random((n_prompts, a.size, rollouts)) < r[..., None]).astype(np.int8)
    tokens = _tokens(comp, rng)
    if unknown_rate > 0:
        comp[rng.random(comp.shape) < unknown_rate] = -1
    screen_k = rng.binomial(screen_n, r1)
    truth_k = screen_k + rng.binomial(truth_n - screen_n, r1)
    mean_tok = r1 * 250.0 + (1 - r1) * 60.0  # E[tokens] of an original rollout
    kw = {}
    if n_is > 0:
        r0 = _variant_rate(r, a)
        kw = _is_rollouts(r0, r1, n_is, is_sd_range, unknown_rate, rng)
    return RolloutBank(
        prompt_ids=tuple(f"synthetic-{i:04d}" for i in range(n_prompts)),
        alphas=a,
        compliance=comp,
        tokens=tokens,
        truth_k=truth_k,
        truth_n=np.full(n_prompts, truth_n),
        screen_k=screen_k,
        screen_n=np.full(n_prompts, screen_n),
        truth_mean_tokens=mean_tok,
        true_rates=r,
        true_r1=r1,
        **kw,
    )


def _variant_rate(r: np.ndarray, a: np.ndarray) -> np.ndarray:
    """r(0): the bank's own rate at alpha = 0 (the variant), which must be on the grid."""
    if not np.isclose(a[0], 0.0):
        raise ValueError("IS rollouts come from the variant: the alpha grid must start at 0")
    return r[:, 0]


def _tokens(comp: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    long = 40 + rng.poisson(210, comp.shape)
    short = 20 + rng.poisson(40, comp.shape)
    return np.where(comp == 1, long, short).astype(np.int32)


def _is_rollouts(r0, r1, n_is, sd_range, unknown_rate, rng) -> dict:
    n_p = r0.size
    comp = (rng.random((n_p, n_is)) < r0[:, None]).astype(np.int8)
    sd_c = rng.uniform(*sd_range, n_p)[:, None]
    sd_n = 0.5
    mu_c = np.log(r1 / r0)[:, None] - sd_c**2 / 2
    mu_n = np.log((1 - r1) / (1 - r0))[:, None] - sd_n**2 / 2
    z = rng.standard_normal((n_p, n_is))
    lw = np.where(comp == 1, mu_c + sd_c * z, mu_n + sd_n * z)
    tokens = _tokens(comp, rng)
    if unknown_rate > 0:
        comp[rng.random(comp.shape) < unknown_rate] = -1
    return dict(is_log_weights=lw, is_compliance=comp, is_tokens=tokens)
