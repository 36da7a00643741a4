"""What every LPE-style estimator reports where the data cannot carry a fitted line (NumPy only).

The statuses (a result's ``status`` field; the main job's table shows them; the reasons are in
docs/estimators.md):

* ``"ok"``: a line was fitted and read at alpha = 1.
* ``"not_rare"``: the rate at the top of the grid is >= the start threshold (0.5); the estimate
  is that measured rate (an upper bound on r(1)), never the fallback.
* ``"no_compliant"``: no rollout of the run complied; estimate :func:`fallback_log10`, a ranking
  convention (below every fitted prompt), not a bound: after few draws r(1) may be far higher.
* ``"fallback"``: compliant rollouts exist, but none at a point the fit may use; estimate
  :func:`fallback_log10`.
* ``"one_point"`` (binomial fits only): one fitted alpha with k > 0 of n; estimate k / n.
* ``"no_data"``: the draws are mostly unknown (:func:`no_data`); LPE-style estimates are NaN
  with the interval [0, 1], and the main job leaves the prompt out of its scores.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = [
    "FALLBACK",
    "OK",
    "NOT_RARE",
    "NO_COMPLIANT",
    "FALLBACK_STATUS",
    "ONE_POINT",
    "NO_DATA",
    "STATUSES",
    "MAX_UNKNOWN_SHARE",
    "no_data",
    "upper_bound",
    "fallback_log10",
]

FALLBACK = 1e-6
OK = "ok"
NOT_RARE = "not_rare"
NO_COMPLIANT = "no_compliant"
FALLBACK_STATUS = "fallback"
ONE_POINT = "one_point"
NO_DATA = "no_data"
STATUSES = (OK, NOT_RARE, NO_COMPLIANT, FALLBACK_STATUS, ONE_POINT, NO_DATA)
MAX_UNKNOWN_SHARE = 0.5


def no_data(n: np.ndarray, n_judged: np.ndarray) -> np.ndarray:
    """Whether draws of ``n`` rollouts of which ``n_judged`` got a verdict are "no_data".

    True where nothing was judged or more than :data:`MAX_UNKNOWN_SHARE` of the rollouts are
    unknown: the one rule every estimator (trace and counts APIs, naive, IS) applies. Shapes
    broadcast; bool out.
    """
    n, judged = np.asarray(n, np.int64), np.asarray(n_judged, np.int64)
    return (judged <= 0) | (n - judged > MAX_UNKNOWN_SHARE * n)


def upper_bound(k: np.ndarray, n: np.ndarray, level: float = 0.95) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a rate from k of n (1.0 where n == 0).

    Shapes broadcast; float64 out, in (0, 1].
    """
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        hi = stats.beta.ppf(level, k + 1, np.maximum(n - k, 1e-300))
    return np.where((n <= 0) | (k >= n), 1.0, hi)


def fallback_log10(n_zero: np.ndarray, fallback: float = FALLBACK, level: float = 0.95):
    """log10 of the estimate for "no_compliant" / "fallback": min(fallback, upper bound of 0/n).

    ``n_zero`` is the most rollouts judged at any one alpha the bound may use (the rate at every
    alpha below 1 bounds r(1) from above). The estimate is at most ``fallback`` and never above
    the 0 of n bound, so the interval [0, bound] always contains it.
    """
    return np.log10(np.minimum(fallback, upper_bound(0, n_zero, level)))
