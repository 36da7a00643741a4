"""Path importance sampling: an unbiased estimate of r(1) from draws along the alpha ladder.

A rollout x drawn at alpha_k from M(alpha_k) carries log q_k(x) (``logp_sampled``) and
log p(x) = log M(1)(x) (``logp_original``); w = p(x) / q_k(x) makes mean(w * c) over the draws at
alpha_k an unbiased estimate of r(1) = P(M(1) complies) (q_k > 0 wherever p > 0 on the linear
path for alpha < 1; at alpha = 1, w = 1). The per-alpha estimates are combined with cross-fitted
inverse-variance weights, which keeps the combination exactly unbiased. The math, and why draws
near alpha = 1 have tame weights, are in docs/estimators_path_is.md.

Missing draws: a draw with an unknown verdict, or with a non-finite log-probability (NaN, +inf,
or -inf for the sampled side), is left out and counted, never read as non-compliance. The estimate
stays unbiased only under the stated assumption that whether a draw is missing is independent of
its compliance (missing at random); otherwise it is biased in the direction of the dependence.
A set with fewer than ``min_known_fraction`` usable draws gets status ``"no_data"``.

With the ``mixture`` path shape, ``logp_sampled`` at alpha = lambda is the log-probability under
Angell et al.'s per-token mixture, so this estimator on those draws is their mixture-proposal IS.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import stats
from scipy.special import logsumexp

from lpe_jax.estimators import degenerate as dg

__all__ = [
    "LOW_ESS",
    "PathISResult",
    "crossfit_estimate",
    "crossfit_estimate_and_ess",
    "path_importance_sampling",
    "verdict_codes",
]

LOW_ESS = "low_ess"
"""Status: the estimate rests on fewer than ``min_ess`` effective compliant draws."""


@dataclasses.dataclass(frozen=True)
class PathISResult:
    """Path importance sampling over a ladder of alphas.

    Attributes:
      estimate: the combined unbiased estimate of r(1); 0.0 when no usable draw complied; NaN for
        ``"no_data"``.
      log_estimate: natural log of ``estimate``, exact where ``estimate`` underflows (-inf when
        nothing complied, NaN for ``"no_data"``).
      std_error: standard error of ``estimate`` (weights treated as fixed; inf when it cannot be
        estimated, e.g. one usable draw at an alpha with weight).
      lower, upper: estimate -+ z(level) * std_error, lower clipped at 0.
      ess_estimate: Kish effective number of draws the estimate rests on,
        (sum a)^2 / sum a^2 over the terms a_j of the combined sum (0 when nothing complied).
      ess_total: sum over alphas of each alpha's compliance-blind Kish ESS of its weights.
      status: "ok", "low_ess" (ess_estimate < min_ess), "no_compliant" or "no_data".
      alphas: float64 [K], the distinct alphas, ascending.
      n: int [K] usable draws per alpha (verdict known and log-probs finite).
      n_unknown: int [K] draws with an unknown verdict (finite log-probs or not).
      n_nonfinite: int [K] draws with a known verdict but a non-finite log-probability.
      n_compliant: int [K] usable compliant draws per alpha.
      log_estimates: float64 [K] log of each alpha's own estimate mean(w c) (-inf: none complied;
        NaN: no usable draw).
      std_errors: float64 [K] each alpha's own standard error (NaN: fewer than 2 usable draws).
      ess: float64 [K] compliance-blind Kish ESS (sum w)^2 / sum w^2 per alpha.
      weights: float64 [K] each alpha's share in the combination (mean over the two cross-fits;
        sums to 1 over the alphas with usable draws).
      level: interval coverage.
    """

    estimate: float
    log_estimate: float
    std_error: float
    lower: float
    upper: float
    ess_estimate: float
    ess_total: float
    status: str
    alphas: np.ndarray
    n: np.ndarray
    n_unknown: np.ndarray
    n_nonfinite: np.ndarray
    n_compliant: np.ndarray
    log_estimates: np.ndarray
    std_errors: np.ndarray
    ess: np.ndarray
    weights: np.ndarray
    level: float = 0.95


def verdict_codes(compliant: np.ndarray) -> np.ndarray:
    """int8 verdicts in {1, 0, -1 (unknown)} from bool, ints in {1, 0, -1}, floats in {1, 0, NaN}
    or objects in {True/1, False/0, None}. Raises on anything else."""
    c = np.asarray(compliant)
    if c.dtype == object:
        unknown = np.array([v is None for v in c.ravel()], bool).reshape(c.shape)
        c = np.where(unknown, np.nan, c).astype(np.float64)
    if c.dtype == bool:
        return c.astype(np.int8)
    if np.issubdtype(c.dtype, np.floating):
        unknown = np.isnan(c)
        if not np.isin(c[~unknown], (0.0, 1.0)).all():
            raise ValueError("float verdicts must be 1.0, 0.0 or NaN (unknown)")
        return np.where(unknown, -1, c).astype(np.int8)
    if np.issubdtype(c.dtype, np.integer) and np.isin(c, (-1, 0, 1)).all():
        return c.astype(np.int8)
    raise ValueError(
        "compliant must be bool, ints in {1, 0, -1 (unknown)}, floats in {1, 0, NaN} "
        "or objects in {True, False, None}"
    )


def _flat_inputs(alphas, compliant, logp_sampled, logp_original):
    """Per-draw 1-D arrays; alphas [A] with the others [A, R] broadcast to one alpha per draw."""
    a = np.asarray(alphas, np.float64)
    c = verdict_codes(compliant)
    ls = np.asarray(logp_sampled, np.float64)
    lo = np.asarray(logp_original, np.float64)
    if not c.shape == ls.shape == lo.shape:
        raise ValueError(
            f"compliant, logp_sampled, logp_original must share a shape; got {c.shape}, "
            f"{ls.shape}, {lo.shape}"
        )
    if a.ndim == 1 and c.ndim == 2 and a.shape[0] == c.shape[0]:
        a = np.broadcast_to(a[:, None], c.shape)
    if a.shape != c.shape or c.ndim != 1 and c.ndim != 2:
        raise ValueError(
            f"alphas must have one value per draw ({c.shape}) or one per row of [A, R] draws; "
            f"got {a.shape}"
        )
    if not np.isfinite(a).all():
        raise ValueError("alphas must be finite")
    return a.ravel(), c.ravel(), ls.ravel(), lo.ravel()


def _kish(lw: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 from log-weights (0.0 when empty or all weights are 0)."""
    if lw.size == 0 or not np.isfinite(lw).any():
        return 0.0
    return float(np.exp(2 * logsumexp(lw) - logsumexp(2 * lw)))


def _var(y: np.ndarray) -> float:
    """Sample variance (ddof=1) of scaled terms y = w c / e^shift; NaN below 2 values."""
    return float(y.var(ddof=1)) if y.size > 1 else np.nan


def _crossfit_weights(n_h: np.ndarray, var_other: np.ndarray) -> np.ndarray:
    """Inverse-variance shares n_k / s_k^2 for one half, s_k^2 from the OTHER half only.

    n_h, var_other: [..., K] (any leading batch shape); shares sum to 1 over the last axis (0
    everywhere where n_h has no draw). An alpha whose other half shows no spread (nothing complied
    there, or under 2 draws) is given the largest spread seen at any alpha (the least informative
    credible value); when no alpha shows spread, shares follow the draw counts. Alphas without
    draws in this half get 0.
    """
    n_h = np.asarray(n_h, np.float64)
    seen = np.isfinite(var_other) & (var_other > 0)
    any_seen = seen.any(axis=-1, keepdims=True)
    top = np.max(np.where(seen, var_other, 0.0), axis=-1, keepdims=True)
    s2 = np.where(seen, var_other, np.where(any_seen, top, 1.0))
    raw = np.where(any_seen, np.where(n_h > 0, n_h / s2, 0.0), n_h)
    total = raw.sum(axis=-1, keepdims=True)
    return np.where(total > 0, raw / np.where(total > 0, total, 1.0), 0.0)


def crossfit_estimate(n_h: np.ndarray, sum_y: np.ndarray, var_h: np.ndarray) -> np.ndarray:
    """The cross-fitted combination of :func:`path_importance_sampling`, batched.

    Args:
      n_h: [..., 2, K] usable draws per half (by position among an alpha's usable draws: even
        positions half 0, odd half 1) and alpha.
      sum_y: [..., 2, K] sums of the terms w * c over those draws (any common scale).
      var_h: [..., 2, K] their sample variances (ddof 1; NaN below 2 draws).
    Returns float64 [...]: sum over halves with draws and alphas of share * mean, averaged over
    the halves (the estimate of r(1), in the scale of ``sum_y``; 0 where nothing has a draw).
    """
    n_h = np.asarray(n_h, np.float64)
    mean = np.where(n_h > 0, sum_y / np.where(n_h > 0, n_h, 1.0), 0.0)
    return (_crossfit_shares(n_h, var_h) * mean).sum(axis=(-2, -1))


def _crossfit_shares(n_h: np.ndarray, var_h: np.ndarray) -> np.ndarray:
    """[..., 2, K] each (half, alpha)'s share in the combination (halves with draws averaged)."""
    has = n_h.sum(axis=-1) > 0  # [..., 2]
    halves = np.maximum(has.sum(axis=-1), 1)[..., None, None]
    share = np.stack(
        [_crossfit_weights(n_h[..., h, :], var_h[..., 1 - h, :]) for h in (0, 1)], axis=-2
    )
    return np.where(has[..., None], share, 0.0) / halves


def crossfit_estimate_and_ess(
    n_h: np.ndarray, sum_y: np.ndarray, sum_y2: np.ndarray, var_h: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`crossfit_estimate` and its Kish ESS, batched.

    ``sum_y2`` [..., 2, K] holds the sums of the squared terms (same scale as ``sum_y``); the
    other arguments are :func:`crossfit_estimate`'s. Returns float64 [...] estimates and
    (sum a)^2 / sum a^2 over the combined sum's terms a_j = share * y_j / n, which is
    :attr:`PathISResult.ess_estimate` (0 where the estimate is 0).
    """
    n_h = np.asarray(n_h, np.float64)
    share = _crossfit_shares(n_h, var_h)
    safe_n = np.where(n_h > 0, n_h, 1.0)
    total = (share * np.where(n_h > 0, sum_y / safe_n, 0.0)).sum(axis=(-2, -1))
    sq = (share**2 * np.where(n_h > 0, sum_y2 / safe_n**2, 0.0)).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        ess = np.where((total > 0) & (sq > 0), total**2 / np.where(sq > 0, sq, 1.0), 0.0)
    return total, ess


def _combine(group, usable, y_all, n_h, var_h, var_k):
    """Cross-fitted combination: (terms a_j of the sum [scaled], its variance [scaled], shares [K]).

    a_j = share_{k,h} y_j / n_{k,h}; the variance holds the shares fixed, with each alpha's spread
    from all its draws (an alpha that saw none gets the largest seen, as in the shares).
    """
    k_n = n_h.shape[1]
    halves = [h for h in (0, 1) if n_h[h].sum() > 0]
    share = np.zeros((2, k_n))
    for h in halves:
        share[h] = _crossfit_weights(n_h[h], var_h[1 - h]) / len(halves)
    terms = [np.zeros(0)]
    for k in range(k_n):
        idx = np.flatnonzero((group == k) & usable)
        for h in halves:
            part = idx[h::2]
            if part.size:
                terms.append(share[h, k] * y_all[part] / part.size)
    seen = np.isfinite(var_k) & (var_k > 0)
    var_k = np.where(seen | np.isnan(var_k), var_k, var_k[seen].max() if seen.any() else 0.0)
    var = 0.0
    for h in halves:
        for k in np.flatnonzero(share[h] > 0):
            var += share[h, k] ** 2 * var_k[k] / n_h[h, k]  # NaN (one draw) -> inf below
    return np.concatenate(terms), (var if np.isfinite(var) else np.inf), share.sum(axis=0)


def path_importance_sampling(
    alphas: np.ndarray,
    compliant: np.ndarray,
    logp_sampled: np.ndarray,
    logp_original: np.ndarray,
    *,
    min_ess: float = 10.0,
    min_known_fraction: float = 0.5,
    level: float = 0.95,
) -> PathISResult:
    """Unbiased estimate of r(1) from draws at a ladder of alphas (see the module docstring).

    Args:
      alphas: float [N] one alpha per draw, or [A] with the other arrays [A, R]. Draws must come
        in draw order (or any order chosen without looking at outcomes): the halves are by position.
      compliant: verdicts, [N] or [A, R] (see :func:`verdict_codes`; unknown is left out).
      logp_sampled: float [N] or [A, R], log-probability of the draw under the distribution it was
        drawn from, M(alpha) (nats; the rollout record's ``logp_sampled``).
      logp_original: float like ``logp_sampled``, log M(1)(x) (``logp_original``); -inf is a
        valid weight of 0, NaN/+inf make the draw non-finite.
      min_ess: ``ess_estimate`` below this gives status ``"low_ess"`` (default 10: fewer effective
        compliant draws make the normal interval unreliable).
      min_known_fraction: fewer usable draws than this fraction of all draws gives ``"no_data"``.
      level: two-sided coverage of ``lower``/``upper``.

    Combination (exactly unbiased): the usable draws at each alpha are split by position into two
    halves; half h's per-alpha means are combined with inverse-variance shares estimated from the
    other half only (independent of them, so E[sum_k share_k mean_k] = r(1)), and the two
    cross-fits are averaged.
    """
    if not 0.0 < min_known_fraction <= 1.0:
        raise ValueError(f"min_known_fraction must be in (0, 1]; got {min_known_fraction}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1); got {level}")
    a, c, ls, lo = _flat_inputs(alphas, compliant, logp_sampled, logp_original)
    finite = np.isfinite(ls) & ~np.isnan(lo) & (lo < np.inf)
    usable = (c >= 0) & finite
    lw = np.where(usable, lo - np.where(finite, ls, 0.0), -np.inf)
    grid, group = np.unique(a, return_inverse=True)
    k_n = grid.size
    shift = float(lw[usable].max()) if usable.any() and np.isfinite(lw[usable]).any() else 0.0
    y_all = np.where(usable & (c == 1), np.exp(lw - shift), 0.0)  # scaled terms w c / e^shift

    n = np.zeros(k_n, np.int64)
    n_unknown, n_nonfinite, n_comp = n.copy(), n.copy(), n.copy()
    log_est, se_k, ess = np.full(k_n, np.nan), np.full(k_n, np.nan), np.zeros(k_n)
    n_h, var_h = np.zeros((2, k_n)), np.full((2, k_n), np.nan)
    var_k = np.full(k_n, np.nan)
    for k in range(k_n):
        rows = group == k
        idx = np.flatnonzero(rows & usable)
        n[k], n_unknown[k] = idx.size, int((rows & (c < 0)).sum())
        n_nonfinite[k] = int((rows & (c >= 0) & ~finite).sum())
        n_comp[k] = int((c[idx] == 1).sum())
        ess[k] = _kish(lw[idx])
        if idx.size:
            hit = idx[c[idx] == 1]
            log_est[k] = (logsumexp(lw[hit]) if hit.size else -np.inf) - np.log(idx.size)
            var_k[k] = _var(y_all[idx])
            se_k[k] = np.sqrt(var_k[k] / idx.size) * np.exp(shift)
        for h in (0, 1):
            part = idx[h::2]
            n_h[h, k] = part.size
            var_h[h, k] = _var(y_all[part])

    n_total = int(a.size)
    if n.sum() == 0 or n.sum() < min_known_fraction * n_total:
        nan = float("nan")
        return PathISResult(
            nan, nan, nan, 0.0, 1.0, 0.0, float(ess.sum()), dg.NO_DATA, grid, n, n_unknown,
            n_nonfinite, n_comp, log_est, se_k, ess, np.zeros(k_n), level,
        )  # fmt: skip

    terms, var_scaled, weights = _combine(group, usable, y_all, n_h, var_h, var_k)
    total = float(terms.sum())
    if total > 0:
        log_estimate = float(np.log(total) + shift)
        ess_est = float(total**2 / np.sum(terms**2))
    else:
        log_estimate, ess_est = -np.inf, 0.0
    estimate = float(np.exp(log_estimate))
    std_error = float(np.sqrt(var_scaled) * np.exp(shift))
    half = float(stats.norm.ppf(0.5 + level / 2)) * std_error
    if total <= 0:
        status = dg.NO_COMPLIANT
    elif ess_est < min_ess:
        status = LOW_ESS
    else:
        status = dg.OK
    return PathISResult(
        estimate=estimate,
        log_estimate=log_estimate,
        std_error=std_error,
        lower=max(0.0, estimate - half),
        upper=estimate + half,
        ess_estimate=ess_est,
        ess_total=float(ess.sum()),
        status=status,
        alphas=grid,
        n=n,
        n_unknown=n_unknown,
        n_nonfinite=n_nonfinite,
        n_compliant=n_comp,
        log_estimates=log_est,
        std_errors=se_k,
        ess=ess,
        weights=weights,
        level=level,
    )
