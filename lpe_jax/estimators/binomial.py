"""LPE with a binomial likelihood fit (ours): zeros count, each point is weighted by its n.

The model (a binomial GLM with a log link over the fitted points) and its estimation (the Firth
penalized likelihood, a profile interval at alpha = 1) are derived in docs/estimators.md.

Stated results where no line can be read (never an exception, and NaN only for "no_data"; the
statuses are those of :mod:`lpe_jax.estimators.degenerate`, and every rule is a tested property):
* mostly unknown verdicts (status "no_data", adaptive LPE only): estimate NaN, interval [0, 1];
* not rare (status "not_rare"): the top of the grid's rate is >= 0.5 (fixed grid: the rate at
  the top alpha; adaptive: the fit phase's draw there): estimate = that rate, interval
  [0, its Clopper-Pearson upper bound] (r(1) <= r(top) on a path whose rate falls toward 1);
* no compliant rollout anywhere (status "no_compliant"), or none at a fitted alpha (status
  "fallback": e.g. a rate >= 0.5 followed by a zero, or a first fit draw of 0 / n_fit at
  alpha = 0): estimate = min(1e-6, U), interval [0, U], U the 0-of-n upper bound at the fitted
  alpha with the most rollouts. Zeros bound r(1) from above and support no level, so such a
  prompt never outranks the paper's fallback;
* exactly one fitted alpha, with k > 0 of n (status "one_point"): estimate = k / n, the point's
  own rate, interval [0, Clopper-Pearson upper bound]: r(1) <= r(alpha) there, and without a
  slope nothing lower is supported;
* exactly one alpha with compliant rollouts among several fitted ones (degenerate
  "one_nonzero", status "ok"): the penalized estimate and the profile interval, whose lower end
  is often 0 because the slope is not bounded below.
A fitted line's estimate is capped at 1. Every interval satisfies 0 <= lower <= estimate <=
upper <= 1; lower == 0 means the data give no lower bound.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import optimize, stats

from lpe_jax.estimators import degenerate as dg
from lpe_jax.estimators.degenerate import FALLBACK, fallback_log10, upper_bound
from lpe_jax.estimators.lpe import (
    N_SEARCH,
    START_THRESHOLD,
    DrawFn,
    LPECountsResult,
    LPEStep,
    TracePaperCounts,
    adaptive_draws,
    lpe_paper_from_counts,
    trace_budget,
    trace_paper_counts,
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
    "trace_points",
    "trace_count_points",
    "count_points",
    "fit_selected_points",
    "lpe_binomial_from_counts",
    "lpe_binomial_grid_from_counts",
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
      intercept, slope: the line (None unless at least two alphas were fitted and one of them
        had a compliant rollout).
      alphas, k, n: the points fitted.
      degenerate: None, "one_point", "zeros_only" (no compliant rollout at a fitted alpha),
        "one_nonzero", or (set by the LPE wrappers) "not_rare" / "no_compliant".
      level: interval coverage.
      status: "ok", "one_point", "fallback", "not_rare" or "no_compliant" (module docstring).
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
    status: str = dg.OK


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
    *,
    fallback: float = FALLBACK,
) -> tuple[np.ndarray, np.ndarray]:
    """Penalized binomial fit of many rows at once (the module's estimator, point estimate only).

    Args:
      alphas: float [A] in [0, 1).
      k, n: int [*B, A] compliant / judged counts; at masked-in points 0 <= k < n is required.
      mask: bool [*B, A] points to fit.

    Returns:
      (log10_estimate, slope): float64 [*B]; slope is log10 per unit alpha (0.0 where no line
      was fitted). Rows with no fitted point, or no compliant rollout at a fitted point, get
      :func:`~lpe_jax.estimators.degenerate.fallback_log10` over the fitted points' rollouts;
      rows with one fitted point and k > 0 get log10(k / n) (module docstring). The "not_rare"
      and "no_compliant" rules need the whole run and are the caller's. Always finite, <= 0.
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
    nonzero = (m2 & (k2 > 0)).sum(1)
    out = fallback_log10(np.where(m2, n2, 0).max(1), fallback)
    slope = np.zeros(k2.shape[0])
    one = (npts == 1) & (nonzero == 1)
    if one.any():
        j = np.argmax(m2[one], axis=1)
        rows = np.flatnonzero(one)
        out[one] = np.log10(k2[rows, j] / n2[rows, j])
    many = np.flatnonzero((npts >= 2) & (nonzero >= 1))
    if many.size:
        b0, b1 = _fit_packed(x[many], k2[many], n2[many], m2[many])
        out[many], slope[many] = np.minimum(b0 / LN10, 0.0), b1 / LN10
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
    fallback: float = FALLBACK,
) -> BinomialFit:
    """Fit log10 r(alpha) = a + b * alpha to counts (k, n) at ``alphas``, read it at alpha = 1.

    Every point given is fitted (zeros included); points with n == 0 are dropped; at least one
    point with n > 0 is required. Each fitted point needs k < n: choose points with
    :func:`select_grid_points` or the adaptive search. With ``interval=False`` the interval is
    not computed (lower = 0.0, upper = 1.0). No line when there is one fitted alpha or no
    compliant rollout at a fitted alpha: statuses "one_point" / "fallback" (module docstring).
    """
    a, k, n = _validate_points(alphas, k, n)
    keep = n > 0
    a, k, n = a[keep], k[keep], n[keep]
    if a.size == 0:
        raise ValueError("fit_binomial needs at least one point with n > 0 (nothing was judged)")
    if np.any(k >= n):
        raise ValueError(
            "fit_binomial fits only points with k < n; rates near 1 break log-linearity "
            "(use lpe_binomial_grid, which selects points for you)"
        )
    pts = dict(alphas=tuple(a.tolist()), k=tuple(k.tolist()), n=tuple(n.tolist()), level=level)
    nonzero = int((k > 0).sum())
    if nonzero == 0 or a.size == 1:
        if nonzero == 0:  # zeros only: an upper bound, no level
            hi = float(upper_bound(0, n.max(), level))
            est = float(10.0 ** fallback_log10(n.max(), fallback, level))
            kind, status = "zeros_only", dg.FALLBACK_STATUS
        else:  # one point with k > 0: its own rate, which bounds r(1) from above
            hi = float(upper_bound(k[0], n[0], level))
            est = float(k[0] / n[0])
            kind, status = "one_point", dg.ONE_POINT
        return BinomialFit(
            est, float(np.log10(est)), 0.0, hi, None, None, degenerate=kind, status=status, **pts
        )
    log10_est, slope = fit_binomial_batch(a, k[None], n[None], np.ones((1, a.size), bool))
    theta, b = float(log10_est[0]), float(slope[0])
    lower, upper = (0.0, 1.0)
    if interval:
        lower, upper = _profile_interval(theta, b, a - 1.0, k.astype(float), n.astype(float), level)
    return BinomialFit(
        estimate=float(10.0**theta),
        log10_estimate=theta,
        lower=float(min(lower, 10.0**theta)),
        upper=float(min(1.0, max(upper, 10.0**theta))),
        intercept=theta - b,
        slope=b,
        degenerate="one_nonzero" if nonzero == 1 else None,
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


def _without_line(status: str, est: float, upper: float, a, k, n, level: float) -> BinomialFit:
    """A result with no line: ``status`` "not_rare", "no_compliant", "fallback" or "no_data"
    (module docstring; ``est`` is NaN only for "no_data")."""
    pts = dict(alphas=tuple(np.asarray(a).tolist()), k=tuple(np.asarray(k).tolist()))
    return BinomialFit(
        estimate=float(est),
        log10_estimate=float(np.log10(est)),
        lower=0.0,
        upper=float(upper if np.isnan(est) else max(upper, est)),
        intercept=None,
        slope=None,
        n=tuple(np.asarray(n).tolist()),
        degenerate=status,
        level=level,
        status=status,
        **pts,
    )


def fit_selected_points(
    a: np.ndarray,
    k: np.ndarray,
    n: np.ndarray,
    sel: np.ndarray,
    top: tuple[int, int] | None,
    any_compliant: bool,
    threshold: float = START_THRESHOLD,
    level: float = 0.95,
    interval: bool = True,
    fallback: float = FALLBACK,
) -> BinomialFit:
    """The module's rules on one run's counts ``a, k, n`` [A'] with points ``sel`` to fit.

    ``top`` is (k, n) at the top of the grid when the run reached it there (not rare when its
    rate is >= ``threshold``), else None; ``any_compliant``: did any rollout of the run comply
    (search included). :func:`fit_trace_binomial` and :func:`lpe_binomial_grid` call this.
    """
    if top is not None and top[1] > 0 and top[0] >= threshold * top[1]:
        hi = float(upper_bound(top[0], top[1], level))
        return _without_line(dg.NOT_RARE, top[0] / top[1], hi, [], [], [], level)
    if not np.any(sel & (k > 0)):
        n_max = int(n[sel].max()) if np.any(sel) else 0
        status = dg.FALLBACK_STATUS if any_compliant else dg.NO_COMPLIANT
        est = 10.0 ** float(fallback_log10(n_max, fallback, level))
        hi = float(upper_bound(0, n_max, level))
        return _without_line(status, est, hi, a[sel], k[sel], n[sel], level)
    return fit_binomial(a[sel], k[sel], n[sel], level=level, interval=interval, fallback=fallback)


def lpe_binomial_grid(
    alphas: Sequence[float],
    k: Sequence[int],
    n: Sequence[int],
    *,
    threshold: float = START_THRESHOLD,
    level: float = 0.95,
    interval: bool = True,
    fallback: float = FALLBACK,
) -> BinomialFit:
    """Fixed-grid binomial LPE: counts at a grid drawn in one batch (e.g. R rollouts per alpha).

    Fits the points chosen by :func:`select_grid_points`. Not rare when the rate at the top
    alpha is >= ``threshold``; no compliant rollout at any alpha gives "no_compliant"; the other
    rules are :func:`fit_binomial`'s (module docstring).
    """
    a, kk, nn = _validate_points(alphas, k, n)
    if not np.all(np.diff(a) > 0):
        raise ValueError("alphas must be strictly increasing")
    sel = select_grid_points(kk, nn, threshold=threshold)
    top = (int(kk[-1]), int(nn[-1]))
    any_c = bool(np.any(kk > 0))
    return fit_selected_points(a, kk, nn, sel, top, any_c, threshold, level, interval, fallback)


@dataclasses.dataclass(frozen=True)
class LPEBinomialResult:
    """Adaptive binomial LPE: the paper's draws, our fit.

    Attributes:
      estimate, lower, upper: r(1) and its interval (from ``fit``).
      fit: the :class:`BinomialFit`.
      trace: every draw, in order (identical to the paper-exact run's for the same callback).
      start_alpha, rollouts, forward_passes: as in :class:`~lpe_jax.estimators.lpe.LPEResult`.
      status: ``fit.status`` (module docstring).
    """

    estimate: float
    lower: float
    upper: float
    fit: BinomialFit
    trace: tuple[LPEStep, ...]
    start_alpha: float
    rollouts: int
    forward_passes: int | None
    status: str = dg.OK


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
    draws: str = "fit",
) -> LPEBinomialResult:
    """The paper's search and advance, then the penalized binomial fit.

    Arguments are those of :func:`lpe.lpe_paper`; ``draws`` is :func:`fit_trace_binomial`'s.
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
        draws=draws,
    )


def trace_points(
    trace: Sequence[LPEStep], draws: str = "fit", start_threshold: float = START_THRESHOLD
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts a trace gives the binomial fit: (alphas [A'], k [A'], n [A'], fitted bool [A']).

    :func:`count_points` on the trace's counts (:func:`lpe.trace_paper_counts`), over the alphas
    the trace drew: ``draws="fit"``: the fit-phase draws; fitted = judged with rate below
    ``start_threshold`` (the zero that stopped the advance included). ``draws="all"``: every
    draw, search included, pooled per alpha; fitted = the alphas above the last one whose
    pooled rate is >= ``start_threshold`` (:func:`select_grid_points`).
    """
    tc, k, n, sel = trace_count_points(trace, draws, start_threshold)
    return tc.alphas, k, n, sel


def trace_count_points(
    trace: Sequence[LPEStep],
    draws: str = "fit",
    start_threshold: float = START_THRESHOLD,
    fallback: float = FALLBACK,
) -> tuple[TracePaperCounts, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`trace_points` with the trace's counts and paper flags: (counts, k, n, fitted),
    arrays [A'] over ``counts.alphas``; the trace APIs read not rare / no data from
    ``counts.paper``."""
    tc = trace_paper_counts(trace, start_threshold=start_threshold, fallback=fallback)
    _, k, n, sel = count_points(
        tc.search_k,
        tc.search_n,
        tc.fit_k,
        tc.fit_n,
        tc.alphas,
        tc.n_fit,
        draws=draws,
        n_search=tc.n_search,
        start_threshold=start_threshold,
        paper=tc.paper,
    )
    return tc, k, n, sel


def fit_trace_binomial(
    trace: Sequence[LPEStep],
    *,
    start_threshold: float = START_THRESHOLD,
    passes_per_token: int = 2,
    level: float = 0.95,
    interval: bool = True,
    draws: str = "fit",
    fallback: float = FALLBACK,
) -> LPEBinomialResult:
    """The penalized binomial fit on a trace from :func:`lpe.adaptive_draws` (no new draws).

    ``draws="fit"`` fits the fit-phase points with a judged rate below ``start_threshold`` (the
    zero that stopped the advance included); ``draws="all"`` also uses the search's draws, every
    rollout paid for (:func:`trace_points`). Not rare / no compliant / no data are
    :func:`lpe.lpe_paper_from_counts`'s flags on the trace's counts; the fit's rules are
    :func:`fit_selected_points`'s (module docstring).
    """
    tc, k, n, sel = trace_count_points(trace, draws, start_threshold, fallback)
    paper, a = tc.paper, tc.alphas
    top = (int(tc.fit_k[-1]), int(tc.fit_n[-1])) if paper.not_rare else None
    if paper.no_data:
        fit = _without_line(dg.NO_DATA, np.nan, 1.0, a[sel], k[sel], n[sel], level)
    else:
        any_c = not bool(paper.no_compliant)
        fit = fit_selected_points(
            a, k, n, sel, top, any_c, start_threshold, level, interval, fallback
        )
    _, passes = trace_budget(tc.trace, passes_per_token)
    return LPEBinomialResult(
        estimate=fit.estimate,
        lower=fit.lower,
        upper=fit.upper,
        fit=fit,
        trace=tc.trace,
        start_alpha=float(a[int(paper.start_index)]),
        rollouts=int(paper.rollouts),
        forward_passes=passes,
        status=fit.status,
    )


def count_points(
    search_k: np.ndarray,
    search_n: np.ndarray,
    fit_k: np.ndarray,
    fit_n: np.ndarray,
    alphas: np.ndarray,
    n_fit: int,
    *,
    draws: str = "fit",
    n_search: int = N_SEARCH,
    start_threshold: float = START_THRESHOLD,
    paper: LPECountsResult | None = None,
) -> tuple[LPECountsResult, np.ndarray, np.ndarray, np.ndarray]:
    """The points the binomial and pooled fits read from the counts of
    :func:`lpe.lpe_paper_from_counts` (the counts twin of :func:`trace_points`).

    Returns (paper, k, n, fitted): the paper's search result (``paper`` if given), compliant and
    judged counts per alpha int [*B, A] over the draws of ``draws`` ("fit": the fit phase's;
    "all": the search's too, on the alphas it scanned), and the alphas to fit bool [*B, A].
    """
    if draws not in ("fit", "all"):
        raise ValueError(f'draws must be "fit" or "all", got {draws!r}')
    sk, sn, fk, fn = (np.asarray(x) for x in (search_k, search_n, fit_k, fit_n))
    if paper is None:
        paper = lpe_paper_from_counts(
            sk, sn, fk, fn, alphas, n_fit, n_search=n_search, start_threshold=start_threshold
        )
    k, n = fk * paper.drawn, fn * paper.drawn
    if draws == "all":
        scanned = np.arange(np.shape(alphas)[0]) >= paper.start_index[..., None]
        k, n = k + sk * scanned, n + sn * scanned
        return paper, k, n, select_grid_points(k, n, threshold=start_threshold)
    return paper, k, n, paper.drawn & (fn > 0) & (fk < start_threshold * fn)


def lpe_binomial_from_counts(
    search_k: np.ndarray,
    search_n: np.ndarray,
    fit_k: np.ndarray,
    fit_n: np.ndarray,
    alphas: np.ndarray,
    n_fit: int,
    *,
    draws: str = "fit",
    n_search: int = N_SEARCH,
    start_threshold: float = START_THRESHOLD,
    fallback: float = FALLBACK,
    paper: LPECountsResult | None = None,
) -> np.ndarray:
    """:func:`lpe_binomial` (point estimate) as array operations; log10 estimate float64 [*B].

    The counts are those of :func:`lpe.lpe_paper_from_counts` (whose result on the same counts
    may be passed as ``paper`` to save recomputing the search); equal to
    ``fit_trace_binomial(trace, draws=draws).log10_estimate`` on the trace those counts make.
    """
    paper, k, n, mask = count_points(
        search_k,
        search_n,
        fit_k,
        fit_n,
        alphas,
        n_fit,
        draws=draws,
        n_search=n_search,
        start_threshold=start_threshold,
        paper=paper,
    )
    fk, fn = np.asarray(fit_k), np.asarray(fit_n)
    est, _ = fit_binomial_batch(alphas, k, n, mask, fallback=fallback)
    top = fk[..., -1] / np.maximum(fn[..., -1], 1)
    with np.errstate(divide="ignore"):
        return np.where(paper.no_data, np.nan, np.where(paper.not_rare, np.log10(top), est))


def lpe_binomial_grid_from_counts(
    alphas: np.ndarray,
    k: np.ndarray,
    n: np.ndarray,
    *,
    threshold: float = START_THRESHOLD,
    fallback: float = FALLBACK,
) -> np.ndarray:
    """:func:`lpe_binomial_grid`'s log10 estimate for many rows: k, n int [*B, A] -> [*B]."""
    k, n = np.asarray(k), np.asarray(n)
    est, _ = fit_binomial_batch(
        alphas, k, n, select_grid_points(k, n, threshold=threshold), fallback=fallback
    )
    top_k, top_n = k[..., -1], n[..., -1]
    not_rare = (top_n > 0) & (top_k >= threshold * top_n)
    with np.errstate(divide="ignore"):
        return np.where(not_rare, np.log10(top_k / np.maximum(top_n, 1)), est)
