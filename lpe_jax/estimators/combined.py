"""Two ways to join path IS and LPE on LPE's own draws into one estimate of r(1) (NumPy only).

Path IS on LPE's draws (:mod:`lpe_jax.estimators.path_is`) is unbiased and, where its weights
are tame, far better calibrated than a line fit; where a few huge weights carry it (few effective
compliant draws) its log sits decades low. Both rules read path IS's own Kish effective number
of compliant draws (``PathISResult.ess_estimate``):

* :func:`combine_path_is_lpe` (switch): path IS where that reaches ``min_ess``, the line fit's
  estimate elsewhere. The threshold is path IS's own ``low_ess`` threshold (10), fixed before
  any scoring, not tuned on a bank.
* :func:`blend_path_is_lpe` (precision-weighted, in log10): path IS's log10 standard error taken
  as 1 / (ln 10 sqrt(ESS)) (the relative error of a mean resting on ESS equal draws), the line
  fit's from its interval; ESS 0 gives the line fit alone.

Neither is unbiased (which source dominates depends on the draws); both give a ranking and a
point estimate without an interval. Measured on both organisms' banks, neither beats both of its
parts (docs/results.md, "A combined estimate"), so neither is an evaluation method of its own.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["DEFAULT_MIN_ESS", "SwitchResult", "blend_path_is_lpe", "combine_path_is_lpe"]

DEFAULT_MIN_ESS = 10.0
"""Path IS's own ``min_ess`` (status ``low_ess`` below it); chosen a priori."""


@dataclasses.dataclass(frozen=True)
class SwitchResult:
    """The combined estimate; arrays share the inputs' shape.

    Attributes:
      log10_estimate: float64, path IS's log10 estimate where ``from_path_is``, the LPE estimate
        (NaN and -inf passed through) elsewhere.
      from_path_is: bool, path IS's ESS of compliant draws reached ``min_ess``.
      min_ess: the threshold used.
    """

    log10_estimate: np.ndarray
    from_path_is: np.ndarray
    min_ess: float


def combine_path_is_lpe(
    path_log10: np.ndarray,
    path_ess: np.ndarray,
    lpe_log10: np.ndarray,
    *,
    min_ess: float = DEFAULT_MIN_ESS,
) -> SwitchResult:
    """Path IS where ``path_ess >= min_ess``, the LPE estimate elsewhere (elementwise).

    Args:
      path_log10: float [...] path IS log10 estimates (NaN for "no_data", -inf: nothing complied).
      path_ess: float [...] path IS's Kish ESS of compliant draws (``ess_estimate``), finite and
        >= 0; pass 0 where path IS has no data.
      lpe_log10: float [...] the line fit's log10 estimates on the same draws.
      min_ess: the threshold, finite and > 0.
    Raises ValueError on mismatched shapes, a bad ESS or threshold, or a path IS estimate that
    contradicts its ESS (NaN or -inf where the ESS reaches the threshold).
    """
    p, e, q = _checked(path_log10, path_ess, lpe_log10)
    if not (np.isfinite(min_ess) and min_ess > 0):
        raise ValueError(f"min_ess must be finite and > 0; got {min_ess}")
    use = e >= min_ess
    if (use & ~np.isfinite(p)).any():
        raise ValueError(
            "path_log10 is NaN or infinite where path_ess reaches min_ess; an estimate resting "
            "on that many compliant draws is positive and finite: pass path IS's own ESS"
        )
    return SwitchResult(np.where(use, p, q), use, float(min_ess))


def blend_path_is_lpe(
    path_log10: np.ndarray,
    path_ess: np.ndarray,
    lpe_log10: np.ndarray,
    lpe_log10_sd: np.ndarray,
) -> np.ndarray:
    """float64 [...] precision-weighted mean in log10 of path IS and the line fit (elementwise).

    Path IS's log10 sd is 1 / (ln 10 sqrt(path_ess)); where ``path_ess`` is 0 (nothing complied,
    or no data) the line fit's estimate is returned alone. Arguments as
    :func:`combine_path_is_lpe`; ``lpe_log10_sd`` float [...] the line fit's log10 standard
    error, > 0 (e.g. the half-width of its upper interval / z). Raises ValueError on mismatched
    shapes, a bad ESS or sd, or a path IS estimate that is NaN or infinite where its ESS is > 0.
    """
    p, e, q = _checked(path_log10, path_ess, lpe_log10)
    s = np.asarray(lpe_log10_sd, np.float64)
    if s.shape != p.shape or not (s > 0).all():
        raise ValueError(
            f"lpe_log10_sd must be > 0 (inf: no information) with shape {p.shape}; got "
            f"{s.shape} with min {s.min() if s.size else None}"
        )
    has = e > 0
    if (has & ~np.isfinite(p)).any():
        raise ValueError("path_log10 is NaN or infinite where path_ess > 0: pass path IS's own ESS")
    prec_p = np.log(10) ** 2 * e  # 1 / sd^2 of path IS in log10
    w = np.where(has, prec_p / (prec_p + s**-2.0), 0.0)
    return np.where(has, w * np.where(has, p, 0.0) + (1 - w) * q, q)


def _checked(path_log10, path_ess, lpe_log10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    p = np.asarray(path_log10, np.float64)
    e = np.asarray(path_ess, np.float64)
    q = np.asarray(lpe_log10, np.float64)
    if not p.shape == e.shape == q.shape:
        raise ValueError(
            f"path_log10, path_ess and lpe_log10 must share a shape; got {p.shape}, {e.shape}, "
            f"{q.shape}"
        )
    if not (np.isfinite(e) & (e >= 0)).all():
        raise ValueError("path_ess must be finite and >= 0 (pass 0 where path IS has no data)")
    return p, e, q
