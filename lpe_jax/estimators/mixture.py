"""Angell et al.'s mixture-proposal importance sampling (NumPy only).

The proposal draws each token from the probability-space mixture
q_t = lam * p_o(. | x_<t) + (1 - lam) * p_v(. | x_<t) of the original and the variant (a defensive
proposal: q_t >= lam * p_o, so every weight is at most 1 / lam per token). A sequence's weight is

    log w(x) = sum_t [log p_o(x_t) - logaddexp(log lam + log p_o(x_t), log(1 - lam) + log p_v(x_t))]

and the estimates of r(1) are the plain mean of w * c and the self-normalized sum(w c) / sum(w).

The weight needs per-token log-probabilities of both endpoints. The main job's engine does not
record them by default (the rollout record carries per-sequence sums; per-token arrays are an
option of the sampler, not wired into the scripts). Where draws come from the ``mixture`` path at
alpha = lam with temperature 1, the record's ``logp_sampled`` is already sum_t log q_t, and
:func:`lpe_jax.estimators.path_is.path_importance_sampling` gives the same plain estimate without
per-token arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lpe_jax.estimators.importance import ISResult, importance_sampling
from lpe_jax.estimators.path_is import verdict_codes

__all__ = ["MixtureISResult", "mixture_importance_sampling", "mixture_log_weights"]


def mixture_log_weights(
    token_logp_original: np.ndarray,
    token_logp_variant: np.ndarray,
    lengths: np.ndarray,
    lam: float,
) -> np.ndarray:
    """float64 [R] log w per sequence for the per-token mixture proposal at weight ``lam``.

    Args:
      token_logp_original, token_logp_variant: float [R, T] per-token log-probs (nats) of the
        sampled tokens under each endpoint (temperature 1); entries at t >= lengths[r] are padding
        and ignored whatever they hold.
      lengths: int [R] tokens kept per sequence, in [0, T].
      lam: the original's share in (0, 1].
    A row with NaN or +inf inside its length, or -inf under the original, gives NaN (the caller
    counts it; :func:`mixture_importance_sampling` does).
    """
    lp_o = np.asarray(token_logp_original, np.float64)
    lp_v = np.asarray(token_logp_variant, np.float64)
    ln = np.asarray(lengths)
    if lp_o.ndim != 2 or lp_o.shape != lp_v.shape:
        raise ValueError(
            f"per-token log-probs must be [R, T] of one shape; got {lp_o.shape}, {lp_v.shape}"
        )
    if ln.shape != lp_o.shape[:1] or not np.issubdtype(ln.dtype, np.integer):
        raise ValueError(f"lengths must be int [R] = [{lp_o.shape[0]}]; got {ln.dtype} {ln.shape}")
    if ((ln < 0) | (ln > lp_o.shape[1])).any():
        raise ValueError(f"lengths must lie in [0, T = {lp_o.shape[1]}]")
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"lam (the original's share of the mixture) must be in (0, 1]; got {lam}")
    inside = np.arange(lp_o.shape[1]) < ln[:, None]
    # log p_v = -inf is fine (q_t = lam p_o > 0); log p_o must be finite: x_t was drawn from q_t.
    bad = inside & ~(np.isfinite(lp_o) & ~np.isnan(lp_v) & (lp_v < np.inf))
    log_lam, log_rest = np.log(lam), np.log1p(-lam) if lam < 1 else -np.inf
    with np.errstate(invalid="ignore"):
        log_q = np.logaddexp(log_lam + lp_o, log_rest + lp_v)
        per_token = np.where(inside, lp_o - log_q, 0.0)
    return np.where(bad.any(axis=1), np.nan, per_token.sum(axis=1))


@dataclasses.dataclass(frozen=True)
class MixtureISResult:
    """Mixture-proposal IS of r(1).

    Attributes:
      is_result: plain (``estimate``) and self-normalized (``snis``) estimates, ``ess``, interval
        and status over the usable rows (see :class:`lpe_jax.estimators.importance.ISResult`).
      lam: the original's share of the mixture.
      n_unknown: rows with an unknown verdict (left out).
      n_nonfinite: rows with a known verdict but a non-finite weight (left out, never refusals).
    """

    is_result: ISResult
    lam: float
    n_unknown: int
    n_nonfinite: int


def mixture_importance_sampling(
    token_logp_original: np.ndarray,
    token_logp_variant: np.ndarray,
    lengths: np.ndarray,
    lam: float,
    compliant: np.ndarray,
    *,
    level: float = 0.95,
) -> MixtureISResult:
    """Plain and self-normalized IS of r(1) from R draws of the mixture proposal at ``lam``.

    Unbiased (plain estimate) when the rows were drawn from the mixture and whether a row is
    unknown or non-finite is independent of its compliance. ``compliant``: [R] verdicts (see
    :func:`lpe_jax.estimators.path_is.verdict_codes`).
    """
    lw = mixture_log_weights(token_logp_original, token_logp_variant, lengths, lam)
    c = verdict_codes(compliant)
    if c.shape != lw.shape:
        raise ValueError(f"compliant must be [R] = {lw.shape}; got {c.shape}")
    nonfinite = (c >= 0) & np.isnan(lw)
    c = np.where(nonfinite, -1, c)
    res = importance_sampling(np.where(np.isnan(lw), 0.0, lw), c, level=level)
    return MixtureISResult(
        res, float(lam), int((c < 0).sum() - nonfinite.sum()), int(nonfinite.sum())
    )
