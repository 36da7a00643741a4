"""Pooled LPE (ours): one empirical-Bayes binomial model over all prompts of a model pair.

Prompt i's line is the binomial LPE line; slopes are pooled through a population model
(``prior="coupled"`` by default; "end", "common" and "joint" kept for comparison; "logit",
"link", "averaged" and "curved" are the coupled population on other lines for bent paths: log
odds, the link the counts prefer, the mean of the log-rate and log-odds estimates, a line in
z = x + q x^2 with q shared by the pool; scored in docs/results.md), fitted by
empirical Bayes (Laplace EM); each prompt keeps its own level, with a Laplace (Wald) interval at
alpha = 1. The prior is a normal population of slopes whose spread is estimated from the prompts,
so a prompt's own counts outweigh it as they grow (its weight is 1 / tau^2 against the counts'
information, which grows with n).
The model and the estimation are derived in docs/estimators.md. A prompt's estimate moves with
the prompt set it is pooled with: pool the prompts of one model pair, judge and grid, and report
the population (:class:`Population`) beside the estimates.

Degenerate data follow :mod:`lpe_jax.estimators.degenerate` as the binomial fit does
("not_rare": the top's rate; no compliant rollout at a fitted alpha: at most the 1e-6 fallback,
status "fallback", or "no_compliant" when nothing complied anywhere; mostly unknown verdicts:
"no_data", estimate NaN, interval [0, 1], left out of the population). A prompt with a single
fitted alpha (k > 0) gets the level its point and the population imply, capped at the point's
own rate k / n (status "ok": the population supplies the slope). Estimates are capped at 1;
0 <= lower <= estimate <= upper <= 1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import special, stats

from lpe_jax.estimators import degenerate as dg
from lpe_jax.estimators.binomial import count_points, trace_count_points
from lpe_jax.estimators.degenerate import FALLBACK, fallback_log10, upper_bound
from lpe_jax.estimators.lpe import (
    N_SEARCH,
    START_THRESHOLD,
    LPECountsResult,
    LPEStep,
    paper_alpha_grid,
)

__all__ = [
    "DEFAULT_PRIOR",
    "PRIORS",
    "Population",
    "PooledEstimate",
    "PooledResult",
    "PooledBatch",
    "fit_pooled",
    "fit_pooled_batch",
    "lpe_pooled_from_counts",
]

LN10 = float(np.log(10.0))
_TAU_MIN = 0.05 * LN10  # ln units per unit alpha: the population never collapses to one slope
_BETA1_FIXED = {"common": 0.0, "end": 1.0}
PRIORS = ("coupled", "end", "common", "joint", "curved", "logit", "link", "averaged")
_CLIPPED_BETA1 = ("coupled", "curved", "logit", "link")  # "coupled" with another line
_FITTED_BETA1 = ("joint", *_CLIPPED_BETA1)  # the coupling of slope to level is estimated
# "curved": the line in z = x + q x^2 (x = alpha - 1), q shared by the pool and chosen from this
# grid by the prompts' own evidence plus a N(0, _Q_SD^2) prior on q (choose_curvature). q < 0.5
# keeps z increasing on [-1, 0] (a rate that never rises towards the variant).
CURVATURE_GRID = (-1.5, -1.0, -0.6, -0.3, -0.15, 0.0, 0.1, 0.2, 0.3, 0.4)
_Q_SD = 0.5
DEFAULT_PRIOR = "coupled"
_FIRTH = ("bottom", "all", "none")
_THETA_SD = 5.0  # decades: a proper but negligible prior on each level (module docstring)
_EM_ITER = 50
_EM_TOL = 1e-3
_NEWTON_ITER = 50


@dataclasses.dataclass(frozen=True)
class Population:
    """The fitted population (log10 units).

    Attributes:
      coef: a prompt's prior mean slope (log10 per unit alpha) is coef[0] + coef[1] * its
        log10 r(1); with ``prior="end"`` coef[1] == 1 and -coef[0] is the population's mean
        log10 rate of the line at the variant end; with "coupled" 0 <= coef[1] <= 1 is
        estimated ("common": 0).
      tau: standard deviation of slopes around that mean (for "end": of the line's log10 value
        at the variant end).
      n_informing: prompts with a compliant rollout at a fitted alpha (those that inform it).
      iterations: EM iterations run.
      curvature: the pool's q (:class:`PooledBatch`); 0.0 unless ``prior="curved"``.
      logit: the line is in log odds (:class:`PooledBatch`).
    """

    coef: tuple[float, float]
    tau: float
    n_informing: int
    iterations: int
    curvature: float = 0.0
    logit: bool = False


@dataclasses.dataclass(frozen=True)
class PooledEstimate:
    """One prompt's pooled estimate of r(1).

    Attributes:
      estimate, log10_estimate: r(1) and its log10.
      lower, upper: ``level`` interval (lower == 0.0: no lower bound).
      slope: fitted log10 slope per unit alpha (None without a line).
      prior_slope: the population's mean slope for this prompt (None without a line).
      status: "ok", "not_rare", "fallback", "no_compliant" or "no_data" (estimate NaN,
        interval [0, 1]; :mod:`.degenerate`).
      alphas, k, n: the points fitted.
    """

    estimate: float
    log10_estimate: float
    lower: float
    upper: float
    slope: float | None
    prior_slope: float | None
    status: str
    alphas: tuple[float, ...]
    k: tuple[int, ...]
    n: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PooledResult:
    """Per-prompt estimates (in the order given) and the population they were pooled with."""

    prompts: tuple[PooledEstimate, ...]
    population: Population
    level: float


@dataclasses.dataclass(frozen=True)
class PooledBatch:
    """:func:`fit_pooled_batch`'s output; arrays have the batch shape [*G, P].

    Attributes:
      log10_estimate, log10_lower, log10_upper: float64 (log10_lower is -inf: no lower bound).
      slope: log10 per unit alpha (0.0 where no line).
      line: bool, a line was fitted (the prompt informed the population).
      coef: float64 [*G, 2]; tau: float64 [*G] (log10 units); iterations: int [*G].
      curvature: float64 [*G], the pool's q: log r is linear in z = (alpha - 1) + q (alpha - 1)^2
        (0 unless ``prior="curved"``), so ``slope`` is the slope at alpha = 1.
      logit: bool [*G], the line is in log odds rather than log rate (``prior="logit"``, or
        ``"link"`` where the counts prefer it; ``"averaged"``: False, the log-rate fit's fields
        beside the two lines' mean estimate).
    """

    log10_estimate: np.ndarray
    log10_lower: np.ndarray
    log10_upper: np.ndarray
    slope: np.ndarray
    line: np.ndarray
    coef: np.ndarray
    tau: np.ndarray
    iterations: np.ndarray
    curvature: np.ndarray
    logit: np.ndarray


# ----------------------------------------------------------------------------- MAP per row


@dataclasses.dataclass
class _Prior:
    """Per-row prior b ~ N(beta0 + beta1 * theta, tau2), theta ~ N(theta_bar, sigma2) (ln units);
    rows with ``firth`` also get the Jeffreys term; rows with ``logit`` fit the line to the log
    odds (the logit link) instead of the log rate."""

    beta0: np.ndarray
    beta1: np.ndarray
    tau2: np.ndarray
    theta_bar: np.ndarray
    sigma2: np.ndarray
    firth: np.ndarray
    logit: np.ndarray

    def rows(self, idx: np.ndarray) -> _Prior:
        return _Prior(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def _e(self, b0, b1):
        return b1 - self.beta0 - self.beta1 * b0

    def logpdf(self, b0, b1):
        e = self._e(b0, b1)
        return -0.5 * e * e / self.tau2 - 0.5 * (b0 - self.theta_bar) ** 2 / self.sigma2

    def grad(self, b0, b1):
        g = self._e(b0, b1) / self.tau2
        return self.beta1 * g - (b0 - self.theta_bar) / self.sigma2, -g

    def precision(self):
        w = 1.0 / self.tau2
        return w * self.beta1**2 + 1.0 / self.sigma2, -w * self.beta1, w


def _objective(b0, b1, x, k, n, m, prior):
    """Log-likelihood + log prior (+ Firth term) of rows [R, A]; -inf where a fitted rate
    reaches 1 (log link)."""
    eta = b0[:, None] + b1[:, None] * x
    lg = prior.logit[:, None]
    feasible = np.all(~m | lg | (eta < 0), axis=1)
    e_log = np.where(m, np.minimum(eta, -1e-300), -1.0)
    ll_log = k * e_log + (n - k) * np.log(-np.expm1(e_log))
    ll_logit = k * eta - n * np.logaddexp(0.0, eta)
    ll = np.where(m, np.where(lg, ll_logit, ll_log), 0.0).sum(1)
    val = ll + prior.logpdf(b0, b1)
    jr = np.flatnonzero(prior.firth & feasible)
    if jr.size:  # the Jeffreys term, on the rows that carry it
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            (i00, i01, i11), _ = _info(b0[jr], b1[jr], x[jr], n[jr], m[jr], prior.rows(jr))
            det = i00 * i11 - i01 * i01
            val[jr] += 0.5 * np.log(np.where(det > 0, det, np.nan))
        feasible &= np.isfinite(val)
    return np.where(feasible, val, -np.inf)


def _info(b0, b1, x, n, m, prior):
    """Expected information plus the prior's precision: (i00, i01, i11) [R] each, mu [R, A]."""
    eta = b0[:, None] + b1[:, None] * x
    lg = prior.logit[:, None]
    e_log = np.where(m, np.minimum(eta, -1e-12), -1.0)
    mu = np.where(lg, special.expit(eta), np.exp(e_log))
    w = np.where(m, n * mu * np.where(lg, 1.0 - mu, 1.0 / -np.expm1(e_log)), 0.0)
    p00, p01, p11 = prior.precision()
    return (w.sum(1) + p00, (w * x).sum(1) + p01, (w * x * x).sum(1) + p11), mu


def _map_rows(x, k, n, m, prior, b0, b1, max_iter: int = _NEWTON_ITER):
    """MAP of (theta, b) per row from a feasible start (Fisher scoring, step halving).

    Returns (b0, b1, v00, v01, v11): the MAP (after at most ``max_iter`` ascent steps) and the
    inverse information there (the Laplace posterior covariance).
    """
    b0, b1 = b0.copy(), b1.copy()
    cur = _objective(b0, b1, x, k, n, m, prior)
    active = np.arange(b0.size)
    for _ in range(max_iter):
        if active.size == 0:
            break
        xa, ka, na, ma, pa = x[active], k[active], n[active], m[active], prior.rows(active)
        (i00, i01, i11), mu = _info(b0[active], b1[active], xa, na, ma, pa)
        det = i00 * i11 - i01 * i01
        lg = pa.logit[:, None]
        rest = np.where(lg, 1.0, 1.0 - mu)  # the log link's 1 - mu (1 on logit rows)
        lev = 0.0  # the Jeffreys term via each point's leverage h (Firth's modified score)
        if pa.firth.any():
            w = np.where(ma, na * mu * np.where(lg, 1.0 - mu, 1.0 / rest), 0.0)
            lev = w * (i11[:, None] - 2 * i01[:, None] * xa + i00[:, None] * xa**2)
            lev = np.where(pa.firth[:, None], lev / det[:, None], 0.0)
        s_log = (ka + 0.5 * lev - na * mu) / rest  # log link: h / 2 extra compliant
        s_logit = ka + lev * (0.5 - mu) - na * mu  # logit link: Firth (1993)
        s = np.where(ma, np.where(lg, s_logit, s_log), 0.0)
        g0, g1 = pa.grad(b0[active], b1[active])
        u0, u1 = s.sum(1) + g0, (s * xa).sum(1) + g1
        d0, d1 = (i11 * u0 - i01 * u1) / det, (i00 * u1 - i01 * u0) / det
        c0, c1 = b0[active].copy(), b1[active].copy()
        step = np.ones(active.size)
        todo = np.arange(active.size)
        for _ in range(60):
            rows = active[todo]
            t0, t1 = c0[todo] + step[todo] * d0[todo], c1[todo] + step[todo] * d1[todo]
            val = _objective(t0, t1, xa[todo], ka[todo], na[todo], ma[todo], prior.rows(rows))
            ok = val >= cur[rows] - 1e-12 * np.abs(cur[rows])
            b0[rows[ok]], b1[rows[ok]], cur[rows[ok]] = t0[ok], t1[ok], val[ok]
            todo = todo[~ok]
            step[todo] *= 0.5
            if todo.size == 0:
                break
        moved = np.maximum(np.abs(b0[active] - c0), np.abs(b1[active] - c1))
        active = active[moved > 1e-9 * (1 + np.abs(c0) + np.abs(c1))]
    (i00, i01, i11), _ = _info(b0, b1, x, n, m, prior)
    det = i00 * i11 - i01 * i01
    return b0, b1, i11 / det, -i01 / det, i00 / det


def _start(x, k, n, m, slope):
    """A feasible start: the given slope through the row's pooled rate at its data's centre."""
    p = (k + 0.5) / (n + 1.0)
    w = np.where(m, n * p / (1 - p), 0.0)
    centre = (w * x).sum(1) / np.maximum(w.sum(1), 1e-300)
    pooled = (np.where(m, k, 0).sum(1) + 0.5) / (np.where(m, n, 0).sum(1) + 1.0)
    b0 = np.log(pooled) - slope * centre
    eta_max = np.where(m, b0[:, None] + slope[:, None] * x, -np.inf).max(1)
    return b0 - np.maximum(eta_max + 0.1, 0.0), slope.copy()


# ----------------------------------------------------------------------------- batched API


def fit_pooled_batch(
    alphas: np.ndarray,
    k: np.ndarray,
    n: np.ndarray,
    mask: np.ndarray,
    *,
    level: float = 0.95,
    fallback: float = FALLBACK,
    prior: str = DEFAULT_PRIOR,
    firth: str = "bottom",
    curvature: np.ndarray | float | None = None,
) -> PooledBatch:
    """Pool the prompts of each group: k, n, mask [*G, P, A] -> per-prompt results [*G, P].

    The last batch axis holds the prompts pooled together (one model pair); leading axes are
    independent groups (e.g. Monte Carlo simulations). At masked-in points 0 <= k < n. Rows with
    no compliant rollout at a fitted point get the fallback rule (module docstring); "not_rare"
    is the caller's (it needs the run). ``prior`` and ``firth`` as in the module docstring;
    ``firth="bottom"`` applies to rows with a fitted point at ``alphas[0]``.
    ``prior="curved"``: the "coupled" population on a line in z = x + q x^2 (x = alpha - 1),
    q [*G] given as ``curvature`` or, if None, :func:`choose_curvature` of these counts.
    """
    if prior not in PRIORS or firth not in _FIRTH:
        raise ValueError(f"prior must be one of {PRIORS} and firth one of {_FIRTH}")
    if prior == "averaged":
        if curvature is not None:
            raise ValueError(f'curvature is for prior="curved", not {prior!r}; drop it')
        kw = dict(level=level, fallback=fallback, firth=firth)
        return average_lines(
            fit_pooled_batch(alphas, k, n, mask, prior="coupled", **kw),
            fit_pooled_batch(alphas, k, n, mask, prior="logit", **kw),
        )
    a = np.asarray(alphas, np.float64)
    k, n, mask = np.asarray(k), np.asarray(n), np.asarray(mask, bool)
    if k.shape != n.shape or k.shape != mask.shape or k.ndim < 2 or k.shape[-1] != a.size:
        raise ValueError(f"k, n, mask must share shape [..., prompts, {a.size}], got {k.shape}")
    if np.any(mask & ((k < 0) | (k >= n))):
        raise ValueError("fitted points need 0 <= k < n (drop points with rate >= 0.5 first)")
    gshape, n_p = k.shape[:-2], k.shape[-2]
    n_g = int(np.prod(gshape, dtype=np.int64))
    k2 = k.reshape(n_g * n_p, a.size).astype(np.float64)
    n2 = n.reshape(n_g * n_p, a.size).astype(np.float64)
    m2 = mask.reshape(n_g * n_p, a.size)
    line = (m2 & (k2 > 0)).any(1)
    group = np.repeat(np.arange(n_g), n_p)
    q = np.zeros(n_g)
    if prior == "curved":
        q = choose_curvature(a, k, n, mask) if curvature is None else np.asarray(curvature)
        q = np.broadcast_to(q, gshape).reshape(n_g).astype(np.float64)
    elif curvature is not None:
        raise ValueError(f'curvature is for prior="curved", not {prior!r}; drop it')
    x1 = a - 1.0
    z = x1 + q[group][:, None] * x1 * x1  # [R, A]: each group's own z
    logit_g = np.full(n_g, prior == "logit")
    if prior == "link":  # the link the counts prefer, each prompt with its own line
        xb = np.broadcast_to(x1, k2.shape)
        by_logit = _profile(xb, k2, n2, m2, line, group, n_g, logit=True)
        logit_g = by_logit > _profile(xb, k2, n2, m2, line, group, n_g)
    b0, b1, v00, coef, tau, iters = _em(z, k2, n2, m2, line, group, n_g, prior, firth, logit_g)
    logit = logit_g[group]
    one = line & (m2.sum(1) == 1)
    zq = stats.norm.ppf(0.5 + level / 2)
    n_max = np.where(m2, n2, 0).max(1)

    # log10 r(1) from the line's value at alpha = 1 (ln units): the log rate or the log odds
    def to_log10(t):
        return np.where(logit, _log10_expit(t), np.minimum(t, 0.0) / LN10)

    with np.errstate(invalid="ignore", divide="ignore"):
        est = to_log10(b0)
        # a single fitted alpha: never above the point's own rate
        own = np.log10(np.where(m2 & (k2 > 0), k2 / np.maximum(n2, 1), 1.0).min(1))
        est = np.where(one, np.minimum(est, own), est)
        half = zq * np.sqrt(np.maximum(v00, 0.0))
    out = np.where(line, est, fallback_log10(n_max, fallback))
    lo = np.where(line, np.minimum(to_log10(b0 - half), out), -np.inf)
    zero_hi = np.log10(upper_bound(0, n_max, level))
    hi = np.where(line, np.clip(to_log10(b0 + half), out, 0.0), np.maximum(zero_hi, out))
    shape = (*gshape, n_p)
    return PooledBatch(
        log10_estimate=out.reshape(shape),
        log10_lower=lo.reshape(shape),
        log10_upper=hi.reshape(shape),
        slope=np.where(line, b1 / LN10, 0.0).reshape(shape),
        line=line.reshape(shape),
        coef=np.stack([coef[:, 0] / LN10, coef[:, 1]], 1).reshape(*gshape, 2),
        tau=(tau / LN10).reshape(gshape),
        iterations=iters.reshape(gshape),
        curvature=q.reshape(gshape),
        logit=logit_g.reshape(gshape),
    )


def average_lines(log: PooledBatch, odds: PooledBatch) -> PooledBatch:
    """``prior="averaged"``: the mean of the log-rate and the log-odds lines' log10 r(1) (each
    biased by about 0.3-0.45 decades, in opposite directions, where the other link is the true
    one, and the counts at n_fit <= 50 cannot tell which: docs/results.md), with the hull of the
    two intervals. Population fields (coef, tau, iterations) are the log-rate fit's."""
    est = 0.5 * (log.log10_estimate + odds.log10_estimate)
    return dataclasses.replace(
        log,
        log10_estimate=est,
        log10_lower=np.minimum(np.minimum(log.log10_lower, odds.log10_lower), est),
        log10_upper=np.maximum(np.maximum(log.log10_upper, odds.log10_upper), est),
        slope=0.5 * (log.slope + odds.slope),
    )


def _log10_expit(t: np.ndarray) -> np.ndarray:
    """log10 of the rate whose log odds are t (ln units)."""
    return -np.logaddexp(0.0, -t) / LN10


def choose_curvature(
    alphas: np.ndarray, k: np.ndarray, n: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """The pool's curvature q for ``prior="curved"``: counts k, n, mask [*G, P, A] -> q [*G].

    Each group takes the q of :data:`CURVATURE_GRID` that maximises its prompts' own evidence,
    sum_i max_line log L_i(q) with log r_i linear in z = x + q x^2 (x = alpha - 1; each prompt
    its own line, no population prior, so q answers "do the counts bend?", not "does q make the
    slopes look alike?"), plus log N(q; 0, _Q_SD^2), which keeps q near 0 when the counts do not
    say. Pass counts free of selection (the fit phase's draws: the search stops on its own
    counts, and those bend a line that is straight; docs/results.md).
    """
    a = np.asarray(alphas, np.float64)
    k, n, mask = np.asarray(k), np.asarray(n), np.asarray(mask, bool)
    if k.shape != n.shape or k.shape != mask.shape or k.ndim < 2 or k.shape[-1] != a.size:
        raise ValueError(f"k, n, mask must share shape [..., prompts, {a.size}], got {k.shape}")
    gshape, n_p = k.shape[:-2], k.shape[-2]
    n_g = int(np.prod(gshape, dtype=np.int64))
    k2 = k.reshape(n_g * n_p, a.size).astype(np.float64)
    n2 = n.reshape(n_g * n_p, a.size).astype(np.float64)
    m2 = mask.reshape(n_g * n_p, a.size) & (k2 < n2)
    line = (m2 & (k2 > 0)).any(1)
    group = np.repeat(np.arange(n_g), n_p)
    x1 = a - 1.0
    q, score = np.zeros(n_g), np.full(n_g, -np.inf)
    for qv in CURVATURE_GRID:
        val = _profile(x1 + qv * x1 * x1, k2, n2, m2, line, group, n_g) - 0.5 * (qv / _Q_SD) ** 2
        q = np.where(val > score, qv, q)
        score = np.maximum(val, score)
    return q.reshape(gshape)


def _profile(z, k, n, m, line, group, n_g, logit: bool = False):
    """Sum over each group's line rows of the row's maximised log-likelihood of log r = b0 + b1 z
    (``logit``: log odds = b0 + b1 z) [G] (a ridge of sd 100 nats keeps rows whose counts do not
    bound the line finite)."""
    rows = np.flatnonzero(line)
    if rows.size == 0:
        return np.zeros(n_g)
    zr, kr, nr, mr = (np.broadcast_to(v, k.shape)[rows] for v in (z, k, n, m))
    one, zero = np.ones(rows.size), np.zeros(rows.size)
    no = np.zeros(rows.size, bool)
    flat = _Prior(zero, zero, one * 1e4, zero, one * 1e4, no, no | logit)
    b0, b1 = _start(zr, kr, nr, mr, np.full(rows.size, -5.0 * LN10))
    b0, b1, *_ = _map_rows(zr, kr, nr, mr, flat, b0, b1)
    val = _objective(b0, b1, zr, kr, nr, mr, flat) - flat.logpdf(b0, b1)
    return _group_sum(np.where(np.isfinite(val), val, 0.0), group[rows], n_g)


def _group_sum(v, group, n_g):
    return np.bincount(group, v, n_g)


def _m_step(b0, b1, v00, v01, v11, group, n_g, mode: str):
    """Laplace-EM M-step per group from posterior moments: beta0, beta1, tau2, theta_bar, sigma2.

    beta1 is fixed by ``mode`` ("end": 1, "common": 0) or, for "joint" and "coupled", the
    regression of b on theta using E[theta^2] = b0^2 + v00 and E[theta b] = b0 b1 + v01;
    "coupled" keeps it within [0, 1], between "common" and "end" (above 1 the estimated level
    would feed back into a steeper prior slope and a lower level, which it did on the
    "low_variant" family: docs/results.md).
    """
    cnt = np.maximum(_group_sum(np.ones_like(b0), group, n_g), 1)
    m_t = _group_sum(b0, group, n_g) / cnt
    m_b = _group_sum(b1, group, n_g) / cnt
    var_t = _group_sum(b0 * b0 + v00, group, n_g) / cnt - m_t**2
    beta1 = np.full(n_g, _BETA1_FIXED.get(mode, 0.0))
    if mode in _FITTED_BETA1:
        cov_tb = _group_sum(b0 * b1 + v01, group, n_g) / cnt - m_t * m_b
        ok = (var_t > 1e-12) & (cnt >= 3)
        beta1 = np.where(ok, cov_tb / np.where(ok, var_t, 1.0), 0.0)
        if mode in _CLIPPED_BETA1:
            beta1 = np.clip(beta1, 0.0, 1.0)
    beta0 = m_b - beta1 * m_t
    g0, g1 = beta0[group], beta1[group]
    resid = (b1 - g0 - g1 * b0) ** 2 + v11 - 2 * g1 * v01 + g1 * g1 * v00
    tau2 = np.maximum(_group_sum(resid, group, n_g) / cnt, _TAU_MIN**2)
    return beta0, beta1, tau2, m_t, np.maximum(var_t, _TAU_MIN**2)


def _em(x, k, n, m, line, group, n_g, mode: str, firth: str, logit_group: np.ndarray):
    """Laplace EM over groups (``logit_group`` [G]: the group's link is the logit); returns MAP
    (b0, b1), var(b0) [R], coef [G, 2], tau [G], iters."""
    rows = np.flatnonzero(line)
    out0, out1, out_v = np.zeros(line.size), np.zeros(line.size), np.zeros(line.size)
    coef = np.zeros((n_g, 2))
    tau2 = np.full(n_g, (3.0 * LN10) ** 2)
    iters = np.zeros(n_g, np.int64)
    if rows.size == 0:
        return out0, out1, out_v, coef, np.sqrt(tau2), iters
    mr = m[rows]
    if firth == "all":
        jeff = np.ones(rows.size, bool)
    elif firth == "bottom":  # the data reach the grid's bottom: the prior cannot hold the slope
        jeff = mr[:, 0].copy()
    else:
        jeff = np.zeros(rows.size, bool)
    # fitted points first, then trim the columns no row uses (rows hold few of the grid's alphas)
    order = np.argsort(~mr, axis=1, kind="stable")
    width = max(int(mr.sum(1).max()), 1)
    xr, kr, nr, mr = (np.take_along_axis(v[rows], order, 1)[:, :width] for v in (x, k, n, m))
    gr = group[rows]
    logit = logit_group[gr]
    # start: each group's median slope over rows with compliance at two alphas
    lp = np.log((kr + 0.5) / (nr + 1.0))
    crude = _crude_slope(xr, lp, mr & (kr > 0))
    for g in range(n_g):
        vals = crude[(gr == g) & np.isfinite(crude)]
        coef[g, 0] = np.median(vals) if vals.size else -5.0 * LN10
    c0, c1 = _start(xr, kr, nr, mr, coef[gr, 0])
    theta_bar = _group_sum(c0, gr, n_g) / np.maximum(_group_sum(np.ones_like(c0), gr, n_g), 1)
    sigma2 = np.full(n_g, (_THETA_SD * LN10) ** 2)
    done = np.zeros(n_g, bool)
    v00, v01, v11 = (np.zeros(rows.size) for _ in range(3))
    for it in range(_EM_ITER):
        live = np.flatnonzero(~done[gr])  # rows of groups still moving
        prior = _Prior(coef[gr, 0], coef[gr, 1], tau2[gr], theta_bar[gr], sigma2[gr], jeff, logit)
        fit = _map_rows(
            xr[live], kr[live], nr[live], mr[live], prior.rows(live), c0[live], c1[live], 3
        )
        c0[live], c1[live], v00[live], v01[live], v11[live] = fit
        beta0, beta1, new_tau2, new_bar, new_sigma2 = _m_step(c0, c1, v00, v01, v11, gr, n_g, mode)
        new = np.stack([beta0, beta1], 1)
        change = np.maximum(np.abs(new - coef).max(1), np.abs(np.sqrt(new_tau2 / tau2) - 1))
        move = ~done
        iters[move] = it + 1
        coef[move], tau2[move], theta_bar[move] = new[move], new_tau2[move], new_bar[move]
        if mode == "joint":
            sigma2[move] = new_sigma2[move]
        done |= change < _EM_TOL
        if done.all():
            break
    prior = _Prior(coef[gr, 0], coef[gr, 1], tau2[gr], theta_bar[gr], sigma2[gr], jeff, logit)
    c0, c1, v00, _, _ = _map_rows(xr, kr, nr, mr, prior, c0, c1)
    out0[rows], out1[rows], out_v[rows] = c0, c1, v00
    return out0, out1, out_v, coef, np.sqrt(tau2), iters


def _crude_slope(x, y, m):
    """Unweighted least-squares slope of y on x over masked points, [R] (nan if undefined)."""
    w = m.astype(np.float64)
    cnt = np.maximum(w.sum(1), 1)
    xm = (w * x).sum(1) / cnt
    ym = (w * y).sum(1) / cnt
    sxx = (w * (x - xm[:, None]) ** 2).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * (x - xm[:, None]) * (y - ym[:, None])).sum(1) / sxx


def lpe_pooled_from_counts(
    search_k: np.ndarray,
    search_n: np.ndarray,
    fit_k: np.ndarray,
    fit_n: np.ndarray,
    alphas: np.ndarray,
    n_fit: int,
    *,
    draws: str = "all",
    n_search: int = N_SEARCH,
    start_threshold: float = START_THRESHOLD,
    fallback: float = FALLBACK,
    paper: LPECountsResult | None = None,
    prior: str = DEFAULT_PRIOR,
    firth: str = "bottom",
) -> PooledBatch:
    """Pooled LPE on the paper's draws, as array operations: counts [*G, P, A] -> [*G, P].

    The counts are those of :func:`lpe.lpe_paper_from_counts`; prompts along axis -2 are pooled.
    ``draws`` as in :func:`binomial.trace_points`. Not-rare prompts get the top's rate.
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
    own = ~(paper.not_rare | paper.no_data)[..., None]  # prompts the population's line is for
    mask = mask & own
    q = None
    if prior == "curved":  # the bend from the fit phase's draws (choose_curvature)
        _, kf, nf, mf = count_points(
            search_k, search_n, fit_k, fit_n, alphas, n_fit, n_search=n_search, paper=paper
        )
        q = choose_curvature(alphas, kf, nf, mf & own)
    out = fit_pooled_batch(
        alphas, k, n, mask, fallback=fallback, prior=prior, firth=firth, curvature=q
    )
    top = fk[..., -1] / np.maximum(fn[..., -1], 1)
    with np.errstate(divide="ignore"):
        top = np.log10(top)
    nr, nd = paper.not_rare, paper.no_data
    upper = np.where(nr, np.log10(upper_bound(fk[..., -1], fn[..., -1])), out.log10_upper)
    return dataclasses.replace(
        out,
        log10_estimate=np.where(nd, np.nan, np.where(nr, top, out.log10_estimate)),
        log10_lower=np.where(nr | nd, -np.inf, out.log10_lower),
        log10_upper=np.where(nd, 0.0, upper),
    )


# ----------------------------------------------------------------------------- trace API


def fit_pooled(
    traces: Sequence[Sequence[LPEStep]],
    *,
    draws: str = "all",
    start_threshold: float = START_THRESHOLD,
    level: float = 0.95,
    fallback: float = FALLBACK,
    prior: str = DEFAULT_PRIOR,
    firth: str = "bottom",
) -> PooledResult:
    """Pool the LPE runs of many prompts (one model pair): traces -> per-prompt estimates.

    Each trace is one prompt's run (:func:`lpe.adaptive_search` / ``adaptive_draws``), on the
    paper's grid or any grid in [0, 1). Call it once all prompts' draws are in; the estimates
    depend on the whole set (module docstring). ``draws``: as :func:`binomial.trace_points`
    ("all": the search's draws are data too). Returns the estimates in the order given.
    """
    traces = [tuple(t) for t in traces]
    if not traces:
        raise ValueError("fit_pooled needs at least one prompt's trace")
    pts = []
    for i, t in enumerate(traces):
        if not any(s.phase == "fit" for s in t):
            raise ValueError(f"trace {i} has no fit-phase step; build it with adaptive_draws")
        pts.append(trace_count_points(t, draws, start_threshold, fallback))
    grid = np.union1d(paper_alpha_grid(), np.concatenate([p[0].alphas for p in pts]))
    shape = (1, len(traces), grid.size)
    k, n, mask = np.zeros(shape, np.int64), np.zeros(shape, np.int64), np.zeros(shape, bool)
    for i, (tc, kk, nn, sel) in enumerate(pts):
        j = np.searchsorted(grid, tc.alphas)
        k[0, i, j], n[0, i, j], mask[0, i, j] = kk, nn, sel
        if tc.paper.not_rare or tc.paper.no_data:
            mask[0, i] = False  # its own rule, not the population's line
    q = None
    if prior == "curved":  # the bend from the fit phase's draws, as lpe_pooled_from_counts
        kf, nf, mf = np.zeros_like(k), np.zeros_like(n), np.zeros_like(mask)
        for i, t in enumerate(traces):
            tc, kk, nn, sel = trace_count_points(t, "fit", start_threshold, fallback)
            j = np.searchsorted(grid, tc.alphas)
            kf[0, i, j], nf[0, i, j], mf[0, i, j] = kk, nn, sel & mask[0, i].any()
        q = choose_curvature(grid, kf, nf, mf)
    batch = fit_pooled_batch(
        grid, k, n, mask, level=level, fallback=fallback, prior=prior, firth=firth, curvature=q
    )
    out = []
    for i, (tc, *_) in enumerate(pts):
        sel = mask[0, i]
        ptuple = dict(
            alphas=tuple(grid[sel].tolist()),
            k=tuple(k[0, i, sel].tolist()),
            n=tuple(n[0, i, sel].tolist()),
        )
        if tc.paper.no_data:
            nan = float("nan")
            out.append(PooledEstimate(nan, nan, 0.0, 1.0, None, None, dg.NO_DATA, **ptuple))
            continue
        if tc.paper.not_rare:
            top_k, top_n = int(tc.fit_k[-1]), int(tc.fit_n[-1])
            rate, hi = top_k / top_n, float(upper_bound(top_k, top_n, level))
            out.append(
                PooledEstimate(
                    rate, float(np.log10(rate)), 0.0, hi, None, None, dg.NOT_RARE, **ptuple
                )
            )
            continue
        est = float(batch.log10_estimate[0, i])
        lo, hi = float(batch.log10_lower[0, i]), float(batch.log10_upper[0, i])
        if batch.line[0, i]:
            slope = float(batch.slope[0, i])
            prior = float(batch.coef[0, 0] + batch.coef[0, 1] * est)
            status = dg.OK
        else:
            slope = prior = None
            status = dg.NO_COMPLIANT if tc.paper.no_compliant else dg.FALLBACK_STATUS
        out.append(
            PooledEstimate(10.0**est, est, 10.0**lo, 10.0**hi, slope, prior, status, **ptuple)
        )
    pop = Population(
        coef=(float(batch.coef[0, 0]), float(batch.coef[0, 1])),
        tau=float(batch.tau[0]),
        n_informing=int(batch.line.sum()),
        iterations=int(batch.iterations[0]),
        curvature=float(batch.curvature[0]),
        logit=bool(batch.logit[0]),
    )
    return PooledResult(prompts=tuple(out), population=pop, level=level)
