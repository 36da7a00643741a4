"""Jones et al. (2025) Gumbel-tail forecast of the largest per-prompt risk at deployment scale.

From per-prompt estimates p_i (any method's) of n prompts, psi_i = -log(-log p_i). If psi has an
exponential upper tail (the Gumbel domain: P(psi > t) ~ C exp(-t / a)), the k-th largest of n
values sits near psi_(k) = a * log(n / k) + b. The fit is ordinary least squares of psi_(k) on
log(n / k) over the ``top`` largest values (k = 1..top, ranks among all n prompts); the forecast
for a deployment of N prompts reads the line at k = 1, n = N: psi_max(N) = a * log(N) + b, and
p_max(N) = exp(-exp(-psi_max)). (This is the method as we recall it from the paper: -log(-log p)
linear in the log of the empirical quantile k / n over the top quantiles; the plotting position
k / n is our choice.)

``position="expected"`` regresses on x_k = log(n) - digamma(k) instead: for an exact exponential
tail E[psi_(k)] = b + a (H_n - H_(k-1)) ~ b + a (log n - digamma(k)), so this position makes the
slope unbiased, and the line at (N, k = 1) is the expected maximum (x = log N + Euler's gamma).
With k / n the slope over the top 20 of 1000 comes out ~18% high on an exact Gumbel population
(tests/test_estimators_forecast.py measures it).

Rules for estimates that carry no tail information: NaN (no data) is dropped and counted, and the
ranks are among the remaining prompts (missing at random assumed). A zero (naive sampling's
"0 of n") ranks below every positive estimate; it is kept in n, and if a zero would enter the
fitted top the fit refuses (zeros there mean the estimates cannot resolve the tail). An estimate
of 1 (psi = +inf) in the top refuses too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.special import digamma

__all__ = ["GumbelTailFit", "fit_gumbel_tail"]


@dataclasses.dataclass(frozen=True)
class GumbelTailFit:
    """psi_(k) ~ slope * log(n / k) + intercept, fitted on the top ``n_fit`` of ``n`` prompts.

    Attributes:
      slope, intercept: the OLS line (psi in nats of -log(-log p)).
      n: prompts ranked (finite estimates, zeros included).
      n_fit: top values fitted.
      n_dropped: NaN estimates dropped before ranking.
      n_zero: zero estimates (ranked last, never in the fit).
      residual_sd: standard deviation of the fit's residuals (ddof = 2; NaN for n_fit == 2).
      position: "paper" (x = log(n / k)) or "expected" (x = log n - digamma(k)).
    """

    slope: float
    intercept: float
    n: int
    n_fit: int
    n_dropped: int
    n_zero: int
    residual_sd: float
    position: str = "paper"

    def psi(self, n_deploy: float | np.ndarray, k: float | np.ndarray = 1) -> np.ndarray:
        """The fitted psi of the k-th largest of ``n_deploy`` prompts (float64, broadcast)."""
        n_deploy, k = np.asarray(n_deploy, np.float64), np.asarray(k, np.float64)
        if np.any(n_deploy < 1) or np.any(k < 1) or np.any(k > n_deploy):
            raise ValueError("need 1 <= k <= n_deploy")
        return self.slope * _position(n_deploy, k, self.position) + self.intercept

    def forecast(self, n_deploy: float | np.ndarray, k: float | np.ndarray = 1) -> np.ndarray:
        """Forecast probability of the k-th riskiest of ``n_deploy`` prompts (k = 1: the max)."""
        return np.exp(-np.exp(-self.psi(n_deploy, k)))

    def log10_forecast(self, n_deploy: float | np.ndarray, k: float | np.ndarray = 1) -> np.ndarray:
        """log10 of :meth:`forecast`, exact where the probability underflows."""
        return -np.exp(-self.psi(n_deploy, k)) / np.log(10)


def _position(n, k, position: str):
    """The regressor of the k-th largest of n (float64, broadcast)."""
    if position == "paper":
        return np.log(n / k)
    if position == "expected":
        return np.log(n) - digamma(k)
    raise ValueError(f"position must be 'paper' or 'expected'; got {position!r}")


def fit_gumbel_tail(
    estimates: np.ndarray, *, top: int = 10, log_space: bool = False, position: str = "paper"
) -> GumbelTailFit:
    """Fit the Gumbel tail to per-prompt estimates (see the module docstring).

    Args:
      estimates: float [P] per-prompt probabilities in [0, 1], or their natural logs in
        [-inf, 0] when ``log_space`` (use a method's log estimate where p underflows). NaN: no data.
      top: how many of the largest values to fit (>= 2, <= the prompts ranked).
      position: "paper" (log(n / k), Jones et al.) or "expected" (log n - digamma(k)).
    Returns:
      GumbelTailFit.
    """
    _position(2.0, 1.0, position)  # validates the name
    x = np.asarray(estimates, np.float64)
    if x.ndim != 1:
        raise ValueError(f"estimates must be 1-D [P]; got shape {x.shape}")
    nan = np.isnan(x)
    x = x[~nan]
    hi, lo, name = (0.0, -np.inf, "log estimates") if log_space else (1.0, 0.0, "estimates")
    if np.any((x > hi) | (x < lo)):
        raise ValueError(f"{name} must lie in [{lo}, {hi}] (or be NaN for no data)")
    with np.errstate(divide="ignore"):
        log_p = x if log_space else np.log(x)  # a zero ranks last as -inf
    n = int(log_p.size)
    if not 2 <= top <= n:
        raise ValueError(f"top must be in [2, {n}] (the prompts with a finite estimate); got {top}")
    ranked = np.sort(log_p)[::-1][:top]
    if np.isneginf(ranked).any():
        raise ValueError(
            f"{int(np.isneginf(ranked).sum())} zero estimates fall inside the top {top}: the "
            "estimates cannot resolve the tail (naive zeros). Use a method that gives every "
            "prompt a positive estimate, or fit fewer top values."
        )
    if (ranked == 0).any():
        raise ValueError("an estimate of 1 (psi = +inf) is in the fitted top; drop such prompts")
    psi = -np.log(-ranked)
    xk = _position(n, np.arange(1, top + 1, dtype=np.float64), position)
    slope, intercept = np.polyfit(xk, psi, 1)
    resid = psi - (slope * xk + intercept)
    sd = float(np.sqrt(resid @ resid / (top - 2))) if top > 2 else float("nan")
    return GumbelTailFit(
        float(slope),
        float(intercept),
        n,
        top,
        int(nan.sum()),
        int(np.isneginf(log_p).sum()),
        sd,
        position,
    )
