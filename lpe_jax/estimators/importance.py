"""Importance sampling from variant rollouts, in log space throughout.

Each rollout x is drawn from the variant (alpha = 0) and carries the log-weight
log w(x) = log p_original(x) - log p_variant(x) (a sum over generated tokens). The plain estimate
of r(1) is sum over compliant rollouts of w / N; the self-normalized one divides by sum of w
instead of N. Rollouts with an unknown verdict (-1) are dropped before anything is computed, so a
judge failure never counts as a refusal.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats
from scipy.special import logsumexp

from lpe_jax.estimators import degenerate as dg

__all__ = ["ISResult", "importance_sampling"]


@dataclasses.dataclass(frozen=True)
class ISResult:
    """Importance-sampling estimates of the original model's compliance rate.

    Attributes:
      estimate: plain IS, sum_{compliant} w / N (0.0 when nothing complied or N == 0).
      log_estimate: natural log of ``estimate`` (-inf when it is 0); exact even where
        ``estimate`` underflows.
      std_error: standard error of the plain estimate (sample std of w * 1{comply} / sqrt(N)).
      snis: self-normalized estimate sum_{compliant} w / sum w (0.0 when N == 0).
      ess: Kish effective sample size (sum w)^2 / sum w^2 over all N rollouts (0.0 when N == 0).
      n: rollouts with a known verdict.
      n_compliant: compliant rollouts among them.
      lower, upper: estimate -+ z(level) * std_error, lower clipped at 0 (a normal interval;
        it always contains ``estimate``; [0, 0] when nothing complied, which says only that
        these weights saw no compliance).
      status: "ok", "no_compliant" (estimate 0, below the paper's 1e-6 fallback) or "no_data"
        (mostly unknown verdicts, :func:`degenerate.no_data`; the numbers are then not an
        estimate).
    """

    estimate: float
    log_estimate: float
    std_error: float
    snis: float
    ess: float
    n: int
    n_compliant: int
    lower: float = 0.0
    upper: float = 0.0
    status: str = dg.OK


def importance_sampling(
    log_weights: np.ndarray, compliant: np.ndarray, *, level: float = 0.95
) -> ISResult:
    """Plain and self-normalized IS from variant rollouts.

    Args:
      log_weights: float [N], log p_original - log p_variant per rollout (finite).
      compliant: [N] bool, or int in {1, 0, -1 (unknown; dropped)}.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    c = np.asarray(compliant)
    if lw.ndim != 1 or c.shape != lw.shape:
        raise ValueError(
            f"log_weights and compliant must be 1-D of equal length, got {lw.shape}, {c.shape}"
        )
    if c.dtype != bool and not np.isin(c, (-1, 0, 1)).all():
        raise ValueError("compliant must be bool or ints in {1, 0, -1 (unknown)}")
    c = c.astype(np.int8)
    known = c >= 0
    lw, hit = lw[known], c[known] == 1
    if not np.all(np.isfinite(lw)):
        raise ValueError("log_weights must be finite for rollouts with a known verdict")
    n = int(lw.size)
    if n == 0:
        return ISResult(0.0, -np.inf, 0.0, 0.0, 0.0, 0, 0, 0.0, 1.0, dg.NO_DATA)
    log_n = np.log(n)
    log_total = logsumexp(lw)
    if hit.any():
        log_hit = logsumexp(lw[hit])
        log_est = float(log_hit - log_n)
        snis = float(np.exp(log_hit - log_total))
    else:
        log_est, snis = -np.inf, 0.0
    # Standard error on a shifted scale so that it never overflows.
    shift = float(lw.max())
    x = np.where(hit, np.exp(lw - shift), 0.0)
    std_error = float(np.std(x, ddof=1) * np.exp(shift) / np.sqrt(n)) if n > 1 else np.inf
    ess = float(np.exp(2 * log_total - logsumexp(2 * lw)))
    est = float(np.exp(log_est))
    half = float(stats.norm.ppf(0.5 + level / 2)) * std_error if np.isfinite(std_error) else np.inf
    return ISResult(
        estimate=est,
        log_estimate=log_est,
        std_error=std_error,
        snis=snis,
        ess=ess,
        n=n,
        n_compliant=int(hit.sum()),
        lower=max(0.0, est - half),
        upper=est + half,
        status=dg.NO_DATA if dg.no_data(c.size, n) else (dg.OK if hit.any() else dg.NO_COMPLIANT),
    )
