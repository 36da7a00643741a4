"""Estimators of a rare compliance rate (NumPy/SciPy only; importing this pulls in no JAX).

Modules: ``naive`` (count from the original), ``importance`` (importance sampling from the
variant), ``lpe`` (the paper's adaptive Logit Path Extrapolation), ``binomial`` (LPE with a
penalized binomial fit and an interval), ``pooled`` (all prompts' runs in one empirical-Bayes
model), ``degenerate`` (the statuses and rules every estimator follows where the data carry no
line).
"""

from lpe_jax.estimators import binomial, degenerate, importance, lpe, naive, pooled
from lpe_jax.estimators.binomial import (
    BinomialFit,
    LPEBinomialResult,
    fit_binomial,
    fit_binomial_batch,
    fit_trace_binomial,
    lpe_binomial,
    lpe_binomial_from_counts,
    lpe_binomial_grid,
    lpe_binomial_grid_from_counts,
    select_grid_points,
    trace_points,
)
from lpe_jax.estimators.importance import ISResult, importance_sampling
from lpe_jax.estimators.lpe import (
    DrawFn,
    DrawRequest,
    DrawResult,
    LPECountsResult,
    LPEResult,
    LPEStep,
    adaptive_draws,
    adaptive_search,
    fit_paper,
    lpe_paper,
    lpe_paper_from_counts,
    ols_line,
    paper_alpha_grid,
    run_search,
    trace_counts,
    trace_not_rare,
    trace_paper_counts,
)
from lpe_jax.estimators.naive import NaiveResult, naive_estimate, simulate_naive_counts
from lpe_jax.estimators.pooled import (
    PooledEstimate,
    PooledResult,
    Population,
    fit_pooled,
    fit_pooled_batch,
    lpe_pooled_from_counts,
)

__all__ = [
    "binomial",
    "degenerate",
    "importance",
    "lpe",
    "naive",
    "pooled",
    "BinomialFit",
    "LPEBinomialResult",
    "fit_binomial",
    "fit_binomial_batch",
    "fit_trace_binomial",
    "lpe_binomial",
    "lpe_binomial_grid",
    "lpe_binomial_from_counts",
    "lpe_binomial_grid_from_counts",
    "select_grid_points",
    "trace_points",
    "ISResult",
    "importance_sampling",
    "DrawFn",
    "DrawRequest",
    "DrawResult",
    "LPECountsResult",
    "LPEResult",
    "LPEStep",
    "adaptive_draws",
    "adaptive_search",
    "fit_paper",
    "lpe_paper",
    "lpe_paper_from_counts",
    "ols_line",
    "paper_alpha_grid",
    "run_search",
    "trace_counts",
    "trace_not_rare",
    "trace_paper_counts",
    "NaiveResult",
    "naive_estimate",
    "simulate_naive_counts",
    "PooledEstimate",
    "PooledResult",
    "Population",
    "fit_pooled",
    "fit_pooled_batch",
    "lpe_pooled_from_counts",
]
