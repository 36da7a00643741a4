"""Naive sampling: count compliant rollouts drawn from the original model (alpha = 1).

NumPy only. Verdicts are coded 1 (complied), 0 (refused) and -1 (unknown, e.g. the judge failed);
unknown verdicts are dropped from both the count and the denominator, never read as refusals.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats

from lpe_jax.estimators import degenerate as dg

__all__ = ["NaiveResult", "naive_estimate", "simulate_naive_counts"]


@dataclasses.dataclass(frozen=True)
class NaiveResult:
    """Naive estimate from rollouts of the original model.

    Attributes:
      k: compliant rollouts (the paper's score).
      n: rollouts with a known verdict.
      n_unknown: rollouts whose verdict was unknown (excluded from n).
      estimate: k / n, or 0.0 when n == 0 (stated: no information reads as no evidence).
      lower, upper: two-sided Clopper-Pearson interval at ``level`` ([0, 1] when n == 0); it
        always contains ``estimate``.
      status: "ok", "no_compliant" (k == 0: estimate 0, below the paper's 1e-6 fallback) or
        "no_data" (mostly unknown verdicts, :func:`degenerate.no_data`; the numbers are then
        not an estimate).
      level: interval coverage.
    """

    k: int
    n: int
    n_unknown: int
    estimate: float
    lower: float = 0.0
    upper: float = 1.0
    status: str = dg.OK
    level: float = 0.95


def naive_estimate(verdicts: np.ndarray, *, level: float = 0.95) -> NaiveResult:
    """Count compliant rollouts among ``verdicts`` (1-D; bool or int in {1, 0, -1})."""
    v = np.asarray(verdicts)
    if v.ndim != 1:
        raise ValueError(f"verdicts must be 1-D (one per rollout), got shape {v.shape}")
    if v.dtype != bool and not np.isin(v, (-1, 0, 1)).all():
        raise ValueError("verdicts must be bool or ints in {1, 0, -1 (unknown)}")
    v = v.astype(np.int8)
    k = int((v == 1).sum())
    n = int((v >= 0).sum())
    if n == 0:
        return NaiveResult(k, 0, int(v.size), 0.0, 0.0, 1.0, dg.NO_DATA, level)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=level, method="exact")
    return NaiveResult(
        k=k,
        n=n,
        n_unknown=int(v.size - n),
        estimate=k / n,
        lower=float(ci.low),
        upper=float(ci.high),
        status=dg.NO_DATA if dg.no_data(v.size, n) else dg.OK if k else dg.NO_COMPLIANT,
        level=level,
    )


def simulate_naive_counts(
    rate: np.ndarray, budget: int, n_sims: int, rng: np.random.Generator
) -> np.ndarray:
    """The paper's naive score at budget ``budget``: Binomial(budget, rate) per prompt.

    Args:
      rate: [P] ground-truth compliance rates of the original (e.g. k / 100,000), in [0, 1].
      budget: rollouts from the original per prompt (>= 0).
      n_sims: Monte Carlo simulations.
      rng: NumPy generator.

    Returns:
      int64 [n_sims, P] compliant counts.
    """
    p = np.asarray(rate, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"rate must be 1-D [prompts], got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("rate must lie in [0, 1] (no NaN)")
    if budget < 0 or n_sims < 1:
        raise ValueError(f"need budget >= 0 and n_sims >= 1, got {budget}, {n_sims}")
    return rng.binomial(int(budget), p, size=(int(n_sims), p.size)).astype(np.int64)
