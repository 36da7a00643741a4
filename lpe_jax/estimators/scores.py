"""Log-space scores of estimates against a known truth (NumPy only).

For a prompt with true rate p > 0 and estimate q, with d = ln p - ln q:

* signed log10 error: log10 q - log10 p = -d / ln 10 (positive: the estimate is high);
* absolute log10 error: |log10 q - log10 p|;
* Itakura-Saito loss (Wu & Hilton, 2024, score estimates this way): IS(p, q) = p/q - ln(p/q) - 1
  = e^d - d - 1 >= 0, zero only at q = p. It grows like e^d for underestimates (q << p) and only
  like |d| for overestimates, so missing a risk costs far more than overstating it.

Everything is computed from logs, so rates below 1e-308 score exactly. An estimate of NaN (status
``no_data``) is excluded and counted, never scored as zero. An estimate of 0 is scored as it is
(log error -inf, IS loss inf) unless a ``floor`` is given, which raises every estimate below it to
the floor (counted).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["LogErrorScore", "log_error_score"]

_LN10 = np.log(10.0)


@dataclasses.dataclass(frozen=True)
class LogErrorScore:
    """Mean log-space errors over the scored prompts.

    Attributes:
      mean_signed_log10: mean of log10 q - log10 p (decades; -inf if a 0 estimate was scored).
      mean_abs_log10: mean of |log10 q - log10 p| (decades).
      mean_is_loss: mean Itakura-Saito loss p/q - ln(p/q) - 1 (inf if a 0 estimate was scored).
      n: prompts scored.
      n_no_data: prompts with a NaN estimate, excluded.
      n_floored: estimates raised to ``floor`` (0 without a floor).
      n_zero: estimates of exactly 0 among the scored (after flooring; they make means infinite).
    """

    mean_signed_log10: float
    mean_abs_log10: float
    mean_is_loss: float
    n: int
    n_no_data: int
    n_floored: int
    n_zero: int


def log_error_score(
    truth: np.ndarray,
    estimate: np.ndarray,
    *,
    log_space: bool = False,
    floor: float | None = None,
) -> LogErrorScore:
    """Score estimates against the truth in log space (see the module docstring).

    Args:
      truth: float [P] true rates in (0, 1] (natural logs in (-inf, 0] when ``log_space``).
      estimate: float [P] estimates in [0, 1] or NaN (natural logs, -inf for 0, when
        ``log_space``).
      floor: optional rate in (0, 1]; estimates below it are scored at it.
    """
    t = np.asarray(truth, np.float64)
    e = np.asarray(estimate, np.float64)
    if t.ndim != 1 or t.shape != e.shape:
        raise ValueError(
            f"truth and estimate must be 1-D of equal length; got {t.shape}, {e.shape}"
        )
    with np.errstate(divide="ignore"):
        log_t = t if log_space else np.log(t)
        log_e = e if log_space else np.log(e)
    if not np.all(np.isfinite(log_t) & (log_t <= 0)):
        raise ValueError("truth must be a rate in (0, 1] for every prompt (finite, positive)")
    no_data = np.isnan(log_e)
    if np.any(log_e[~no_data] > 0) or (not log_space and np.any(e[~no_data] < 0)):
        raise ValueError("estimates must be rates in [0, 1] (or NaN for no data)")
    log_t, log_e = log_t[~no_data], log_e[~no_data]
    n_floored = 0
    if floor is not None:
        if not 0.0 < floor <= 1.0:
            raise ValueError(f"floor must be a rate in (0, 1]; got {floor}")
        below = log_e < np.log(floor)
        n_floored, log_e = int(below.sum()), np.where(below, np.log(floor), log_e)
    if log_t.size == 0:
        nan = float("nan")
        return LogErrorScore(nan, nan, nan, 0, int(no_data.sum()), 0, 0)
    d = log_t - log_e  # ln(p / q); +inf for a 0 estimate
    with np.errstate(over="ignore", invalid="ignore"):
        is_loss = np.where(np.isinf(d), np.inf, np.expm1(d) - d)
    signed = -d / _LN10
    return LogErrorScore(
        mean_signed_log10=float(signed.mean()),
        mean_abs_log10=float(np.abs(signed).mean()),
        mean_is_loss=float(is_loss.mean()),
        n=int(log_t.size),
        n_no_data=int(no_data.sum()),
        n_floored=n_floored,
        n_zero=int(np.isneginf(log_e).sum()),
    )
