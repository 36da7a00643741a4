"""LPE with a binomial likelihood fit (ours): zeros count, each point is weighted by its n.

Model. Over the fitted points, log10 r(alpha) = intercept + slope * alpha, i.e. a binomial GLM
with a log link, r capped at 1. We chose the log link over cloglog because it *is* the paper's
model (log10 rate linear in alpha) rather than an approximation of it; the cap never binds at
the optimum because we only fit points whose empirical rate is below 0.5 (so k < n and the
likelihood goes to -inf as r -> 1 there, which keeps every fitted r below 1). Points with rate
>= 0.5 are left out, as the paper leaves them out: that is where log-linearity breaks.

Estimation. The plain maximum-likelihood line does not exist for data the adaptive search makes
often: with one nonzero point and zeros above it the likelihood keeps rising as the slope goes to
-inf, and with no nonzero point there is nothing to fit. We therefore maximize the Firth
(Jeffreys-prior) penalized likelihood l(beta) + 0.5 log det I(beta). For the log link its score
is that of the binomial with h_i / 2 extra compliant rollouts at point i (h_i the leverage, the
h_i summing to 2), so it is finite for every data set with two distinct alphas, removes the
O(1/n) bias of the MLE, and equals the MLE as counts grow. The 95% interval for r(1) is the
profile penalized-likelihood interval (Heinze and Schemper's construction): log10 r(1) values
whose profile drop is at most chi2_1(0.95) / 2.

Stated results for degenerate data (never an exception, never NaN):
* no point with rate < 0.5 ("saturated"): estimate 0.5, interval [0, 1];
* one fitted alpha ("one_point"): estimate (k + 0.5) / (n + 1) there (r is non-increasing in
  alpha on the path, so r(1) is at most r there), interval [0, Clopper-Pearson upper bound];
* no compliant rollout at any fitted alpha ("no_compliant"): the penalized estimate is reported
  (it ranks prompts by how many zeros were seen) with lower bound 0: an upper bound only;
* exactly one alpha with compliant rollouts ("one_nonzero"): the penalized estimate, and the
  profile interval, whose lower end is often 0 because the slope is not bounded below.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

from lpe_jax.estimators.lpe import (
    N_SEARCH,
    START_THRESHOLD,
    DrawFn,
    LPEStep,
    _budget,
    adaptive_draws,
)

__all__ = [
    "BinomialFit",
    "LPEBinomialResult",
    "fit_binomial",
    "fit_binomial_batch",
    "select_grid_points",
    "lpe_binomial_grid",
    "lpe_binomial",
    "fit_trace_binomial",
]

LN10 = float(np.log(10.0))
_MAX_ITER = 100
_TOL = 1e-9


@dataclasses.dataclass(frozen=True)
class BinomialFit:
    """Binomial fit of log10 r(alpha) = intercept + slope * alpha, read at alpha = 1.

    Attributes:
      estimate: r(1) in [0, 1].
      log10_estimate: log10 of ``estimate`` (finite).
      lower, upper: ``level`` interval for r(1); lower == 0.0 means no lower bound.
      intercept, slope: the line (None when degenerate is "saturated" or "one_point").
      alphas, k, n: the points fitted.
      degenerate: None, "saturated", "one_point", "no_compliant" or "one_nonzero".
      level: interval coverage.
    """

    estimate: float
    log10_estimate: float
    lower: float
    upper: float
    intercept: float | None
    slope: float | None
    alphas: tuple[float, ...]
    k: tuple[int, ...]
    n: tuple[int, ...]
    degenerate: str | None
    level: float


# ----------------------------------------------------------------------------- batched core


def _penalized(b0, b1, x, k, n, m):
    """Penalized log-likelihood and its pieces for rows of a batch; x, k, n, m are [B, A].

    Rows whose line puts a fitted rate at or above 1 get -inf.
    """
    eta = b0[:, None] + b1[:, None] * x
    feasible = np.all(~m | (eta < 0), axis=1)
    eta = np.where(m, np.minimum(eta, -1e-300), -1.0)
    mu = np.exp(eta)
    one_minus = -np.expm1(eta)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        w = np.where(m, n * mu / one_minus, 0.0)
        i00, i01, i11 = w.sum(1), (w * x).sum(1), (w * x * x).sum(1)
        det = i00 * i11 - i01 * i01
        ll = np.where(m, k * eta + (n - k) * np.log(one_minus), 0.0).sum(1)
        ok = feasible & (det > 0) & np.isfinite(det)
        pen = np.where(ok, ll + 0.5 * np.log(np.where(ok, det, 1.0)), -np.inf)
    return pen, mu, w, (i00, i01, i11, det)


def _newton_direction(x, k, n, m, mu, w, info):
    i00, i01, i11, det = info
    det = np.where(det > 0, det, 1.0)
    lev = w * (i11[:, None] - 2 * i01[:, None] * x + i00[:, None] * x * x) / det[:, None]
    r = np.where(m, (k + 0.5 * lev - n * mu) / (1.0 - mu), 0.0)
    u0, u1 = r.sum(1), (r * x).sum(1)
    return (i11 * u0 - i01 * u1) / det, (i00 * u1 - i01 * u0) / det


def _init(x, k, n, m):
    """Weighted least squares on log((k + 0.5) / (n + 1)), shifted so every fitted r < 1."""
    y = np.log((k + 0.5) / (n + 1.0))
    wt = np.where(m, (k + 0.5) * (n - k + 0.5) / (n + 1.0), 0.0)  # ~ inverse variance of y
    sw = wt.sum(1)
    xm, ym = (wt * x).sum(1) / sw, (wt * y).sum(1) / sw
    sxx = (wt * (x - xm[:, None]) ** 2).sum(1)
    b1 = (wt * (x - xm[:, None]) * (y - ym[:, None])).sum(1) / np.maximum(sxx, 1e-300)
    b0 = ym - b1 * xm
    eta_max = np.where(m, b0[:, None] + b1[:, None] * x, -np.inf).max(1)
    return b0 - np.maximum(eta_max + 0.1, 0.0), b1


def _fit_rows(x, k, n, m):
    """Penalized Fisher scoring with step halving; rows need >= 2 distinct fitted alphas.

    Returns (b0, b1): ln r(1) and the slope of ln r in alpha.
    """
    b0, b1 = _init(x, k, n, m)
    pen, mu, w, info = _penalized(b0, b1, x, k, n, m)
    info = np.stack(info)
    active = np.arange(b0.size)
    for _ in range(_MAX_ITER):
        if active.size == 0:
            break
        xa, ka, na, ma = x[active], k[active], n[active], m[active]
        d0, d1 = _newton_direction(xa, ka, na, ma, mu[active], w[active], tuple(info[:, active]))
        c0, c1, cur = b0[active], b1[active], pen[active]
        step = np.ones(active.size)
        todo = np.arange(active.size)
        for _ in range(60):  # halve until every fitted r < 1 and the objective does not fall
            t0, t1 = c0[todo] + step[todo] * d0[todo], c1[todo] + step[todo] * d1[todo]
            rows = active[todo]
            val, tmu, tw, tinfo = _penalized(t0, t1, xa[todo], ka[todo], na[todo], ma[todo])
            ok = val >= cur[todo] - 1e-12 * np.abs(cur[todo])
            acc = rows[ok]
            b0[acc], b1[acc], pen[acc] = t0[ok], t1[ok], val[ok]
            mu[acc], w[acc], info[:, acc] = tmu[ok], tw[ok], np.stack(tinfo)[:, ok]
            todo = todo[~ok]
            step[todo] *= 0.5
            if todo.size == 0:
                break
        moved = np.maximum(np.abs(b0[active] - c0), np.abs(b1[active] - c1))
        active = active[moved > _TOL * (1 + np.abs(c0) + np.abs(c1))]
    return b0, b1


def _fit_packed(x, k, n, m):
    """Fit rows after moving fitted points to the left and grouping rows by their count."""
    order = np.argsort(~m, axis=1, kind="stable")
    x, k, n, m = (np.take_along_axis(v, order, axis=1) for v in (x, k, n, m))
    count = m.sum(1)
    b0, b1 = np.empty(count.size), np.empty(count.size)
    lo = 0
    for width in (4, 8, 12, m.shape[1]):
        rows = np.flatnonzero((count > lo) & (count <= width))
        if rows.size:
            b0[rows], b1[rows] = _fit_rows(
                x[rows, :width], k[rows, :width], n[rows, :width], m[rows, :width]
            )
        lo = width
    return b0, b1


def fit_binomial_batch(
    alphas: np.ndarray,
    k: np.ndarray,
    n: np.ndarray,
    mask: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Penalized binomial fit of many rows at once (the module's estimator, point estimate only).

    Args:
      alphas: float [A] in [0, 1).
      k, n: int [*B, A] compliant / judged counts; at masked-in points 0 <= k < n is required.
      mask: bool [*B, A] points to fit.

    Returns:
      (log10_estimate, slope): float64 [*B]; slope is log10 per unit alpha (0.0 where the row
      is degenerate with fewer than two fitted alphas). Degenerate rows follow the module's
      stated results; the output is always finite.
    """
    a = np.asarray(alphas, np.float64)
    k, n, mask = np.asarray(k), np.asarray(n), np.asarray(mask, bool)
    if k.shape != n.shape or k.shape != mask.shape or k.shape[-1:] != a.shape:
        raise ValueError(f"k, n, mask must share shape [..., {a.size}], got {k.shape}, {n.shape}")
    if np.any(mask & ((k < 0) | (k >= n))):
        raise ValueError("fitted points need 0 <= k < n (drop points with rate >= 0.5 first)")
    batch = k.shape[:-1]
    k2 = k.reshape(-1, a.size).astype(np.float64)
    n2 = n.reshape(-1, a.size).astype(np.float64)
    m2 = mask.reshape(-1, a.size)
    x = np.broadcast_to(a - 1.0, k2.shape).copy()
    npts = m2.sum(1)
    out = np.full(k2.shape[0], np.log10(START_THRESHOLD))  # "saturated"
    slope = np.zeros(k2.shape[0])
    one = npts == 1
    if one.any():
        j = np.argmax(m2[one], axis=1)
        rows = np.flatnonzero(one)
        out[one] = np.log10((k2[rows, j] + 0.5) / (n2[rows, j] + 1.0))
    many = np.flatnonzero(npts >= 2)
    if many.size:
        b0, b1 = _fit_packed(x[many], k2[many], n2[many], m2[many])
        out[many], slope[many] = b0 / LN10, b1 / LN10
    return out.reshape(batch), slope.reshape(batch)


# ----------------------------------------------------------------------------- scalar API


def _profile(theta: float, x, k, n) -> float:
    """Max over the slope of the penalized log-likelihood with log10 r(1) fixed at theta."""
    b0 = theta * LN10
    lo = b0 / np.max(-x)  # every fitted r < 1 needs b1 > lo
    m = np.ones((1, x.size), bool)

    def score(b1: float) -> float:
        bb0, bb1 = np.array([b0]), np.array([b1])
        _, mu, w, info = _penalized(bb0, bb1, x[None], k[None], n[None], m)
        i00, i01, i11, det = (v[0] for v in info)
        lev = w[0] * (i11 - 2 * i01 * x + i00 * x * x) / det
        return float((x * (k + 0.5 * lev - n * mu[0]) / (1.0 - mu[0])).sum())

    left = lo + 1e-9 * max(1.0, abs(lo))
    right = max(lo, 0.0) + 1.0
    while score(right) > 0 and right < 1e6:
        right = right + 2.0 * (right - lo)
    if score(left) <= 0:
        b1 = left
    elif score(right) > 0:
        b1 = right
    else:
        b1 = optimize.brentq(score, left, right, xtol=1e-10, rtol=1e-10)
    val = _penalized(np.array([b0]), np.array([b1]), x[None], k[None], n[None], m)[0][0]
    return float(val)


def _profile_interval(
    theta_hat: float, slope_hat: float, x, k, n, level: float
) -> tuple[float, float]:
    crit = 0.5 * stats.chi2.ppf(level, 1)
    m = np.ones((1, x.size), bool)
    b0, b1 = np.array([theta_hat * LN10]), np.array([slope_hat * LN10])
    at_fit = float(_penalized(b0, b1, x[None], k[None], n[None], m)[0][0])
    top = max(_profile(theta_hat, x, k, n), at_fit)

    def drop(t: float) -> float:
        return top - _profile(t, x, k, n) - crit

    hi_end = -1e-12
    upper = 1.0
    if theta_hat < hi_end and drop(hi_end) > 0:
        upper = 10.0 ** optimize.brentq(drop, theta_hat, hi_end, xtol=1e-6)
    lower = 0.0
    step, t = 0.5, theta_hat
    while t > theta_hat - 60:
        t_next = t - step
        if drop(t_next) > 0:
            lower = 10.0 ** optimize.brentq(drop, t_next, t, xtol=1e-6)
            break
        t, step = t_next, step * 2
    return lower, upper


def _validate_points(alphas, k, n) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.round(np.asarray(alphas, np.float64), 10)
    k, n = np.asarray(k), np.asarray(n)
    if a.ndim != 1 or k.shape != a.shape or n.shape != a.shape:
        raise ValueError(
            f"alphas, k, n must be 1-D of equal length, got {a.shape}, {k.shape}, {n.shape}"
        )
    if not (np.issubdtype(k.dtype, np.integer) and np.issubdtype(n.dtype, np.integer)):
        raise ValueError("k and n must be integer counts")
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("counts need 0 <= k <= n at every alpha (is n < k somewhere?)")
    if np.any((a < 0) | (a >= 1)) or np.unique(a).size != a.size:
        raise ValueError("alphas must be distinct values in [0, 1)")
    return a, k.astype(np.int64), n.astype(np.int64)


def fit_binomial(
    alphas: Sequence[float],
    k: Sequence[int],
    n: Sequence[int],
    *,
    level: float = 0.95,
    interval: bool = True,
) -> BinomialFit:
    """Fit log10 r(alpha) = a + b * alpha to counts (k, n) at ``alphas``, read it at alpha = 1.

    Every point given is fitted (zeros included); points with n == 0 are dropped. Each fitted
    point needs k < n: choose points with :func:`select_grid_points` or the adaptive search.
    With ``interval=False`` the interval is not computed (lower = 0.0, upper = 1.0).
    """
    a, k, n = _validate_points(alphas, k, n)
    keep = n > 0
    a, k, n = a[keep], k[keep], n[keep]
    if np.any(k >= n):
        raise ValueError(
            "fit_binomial fits only points with k < n; rates near 1 break log-linearity "
            "(use lpe_binomial_grid, which selects points for you)"
        )
    pts = dict(alphas=tuple(a.tolist()), k=tuple(k.tolist()), n=tuple(n.tolist()), level=level)
    if a.size == 0:
        return BinomialFit(
            0.5, float(np.log10(0.5)), 0.0, 1.0, None, None, degenerate="saturated", **pts
        )
    if a.size == 1:
        est = (k[0] + 0.5) / (n[0] + 1.0)
        hi = 1.0 if k[0] == n[0] else float(stats.beta.ppf(level, k[0] + 1, n[0] - k[0]))
        return BinomialFit(
            float(est), float(np.log10(est)), 0.0, hi, None, None, degenerate="one_point", **pts
        )
    log10_est, slope = fit_binomial_batch(a, k[None], n[None], np.ones((1, a.size), bool))
    theta, b = float(log10_est[0]), float(slope[0])
    nonzero = int((k > 0).sum())
    degenerate = {0: "no_compliant", 1: "one_nonzero"}.get(nonzero)
    lower, upper = (0.0, 1.0)
    if interval:
        lower, upper = _profile_interval(theta, b, a - 1.0, k.astype(float), n.astype(float), level)
        if degenerate == "no_compliant":
            lower = 0.0
    return BinomialFit(
        estimate=float(10.0**theta),
        log10_estimate=theta,
        lower=float(lower),
        upper=float(max(upper, 10.0**theta)),
        intercept=theta - b,
        slope=b,
        degenerate=degenerate,
        **pts,
    )


def select_grid_points(
    k: np.ndarray, n: np.ndarray, *, threshold: float = START_THRESHOLD
) -> np.ndarray:
    """Fixed-grid point choice: every alpha above the last one whose rate is >= ``threshold``.

    Args:
      k, n: int [*B, A] counts on an increasing alpha grid.

    Returns:
      bool [*B, A]. Points beyond the last rate >= threshold (toward alpha = 1) are the
      log-linear tail; they are all below the threshold and zeros among them are kept. If no
      point reaches the threshold, all points with n > 0 are selected. Points with n == 0 are
      never selected.
    """
    k, n = np.asarray(k), np.asarray(n)
    if k.shape != n.shape or k.ndim < 1:
        raise ValueError(f"k and n must share a shape [..., A], got {k.shape}, {n.shape}")
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("counts need 0 <= k <= n")
    high = (n > 0) & (k >= threshold * n)
    n_a = k.shape[-1]
    last = np.where(high.any(-1), n_a - 1 - np.argmax(high[..., ::-1], axis=-1), -1)
    return (np.arange(n_a) > last[..., None]) & (n > 0)


def lpe_binomial_grid(
    alphas: Sequence[float],
    k: Sequence[int],
    n: Sequence[int],
    *,
    threshold: float = START_THRESHOLD,
    level: float = 0.95,
    interval: bool = True,
) -> BinomialFit:
    """Fixed-grid binomial LPE: counts at a grid drawn in one batch (e.g. R rollouts per alpha).

    Fits the points chosen by :func:`select_grid_points`; all-compliant data gives the stated
    "saturated" result, all-zero data the "no_compliant" one.
    """
    a, kk, nn = _validate_points(alphas, k, n)
    if not np.all(np.diff(a) > 0):
        raise ValueError("alphas must be strictly increasing")
    sel = select_grid_points(kk, nn, threshold=threshold)
    return fit_binomial(a[sel], kk[sel], nn[sel], level=level, interval=interval)


@dataclasses.dataclass(frozen=True)
class LPEBinomialResult:
    """Adaptive binomial LPE: the paper's draws, our fit.

    Attributes:
      estimate, lower, upper: r(1) and its interval (from ``fit``).
      fit: the :class:`BinomialFit`.
      trace: every draw, in order (identical to the paper-exact run's for the same callback).
      start_alpha, rollouts, forward_passes: as in :class:`~lpe_jax.estimators.lpe.LPEResult`.
    """

    estimate: float
    lower: float
    upper: float
    fit: BinomialFit
    trace: tuple[LPEStep, ...]
    start_alpha: float
    rollouts: int
    forward_passes: int | None


def lpe_binomial(
    draw: DrawFn,
    n_fit: int,
    *,
    n_search: int = N_SEARCH,
    alphas: Sequence[float] | None = None,
    start_threshold: float = START_THRESHOLD,
    passes_per_token: int = 2,
    level: float = 0.95,
    interval: bool = True,
) -> LPEBinomialResult:
    """The paper's search and advance, then the penalized binomial fit.

    Fits every fit-phase point with a judged rate below ``start_threshold``, including the zero
    point that stopped the advance. Arguments are those of :func:`lpe.lpe_paper`.
    """
    trace = adaptive_draws(
        draw, n_fit, n_search=n_search, alphas=alphas, start_threshold=start_threshold
    )
    return fit_trace_binomial(
        trace,
        start_threshold=start_threshold,
        passes_per_token=passes_per_token,
        level=level,
        interval=interval,
    )


def fit_trace_binomial(
    trace: Sequence[LPEStep],
    *,
    start_threshold: float = START_THRESHOLD,
    passes_per_token: int = 2,
    level: float = 0.95,
    interval: bool = True,
) -> LPEBinomialResult:
    """The penalized binomial fit on a trace from :func:`lpe.adaptive_draws` (no new draws).

    Fits every fit-phase point with a judged rate below ``start_threshold``, the zero point
    that stopped the advance included.
    """
    trace = tuple(trace)
    fit_steps = [s for s in trace if s.phase == "fit"]
    if not fit_steps:
        raise ValueError("the trace has no fit-phase step; build it with adaptive_draws")
    pts = [s for s in fit_steps if s.n_judged > 0 and s.k < start_threshold * s.n_judged]
    fit = fit_binomial(
        [s.alpha for s in pts],
        np.array([s.k for s in pts], dtype=np.int64),
        np.array([s.n_judged for s in pts], dtype=np.int64),
        level=level,
        interval=interval,
    )
    rollouts, passes = _budget(trace, passes_per_token)
    return LPEBinomialResult(
        estimate=fit.estimate,
        lower=fit.lower,
        upper=fit.upper,
        fit=fit,
        trace=trace,
        start_alpha=fit_steps[0].alpha,
        rollouts=rollouts,
        forward_passes=passes,
    )
