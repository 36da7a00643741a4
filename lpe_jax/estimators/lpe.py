"""Logit Path Extrapolation, as in the paper's appendix (adaptive search, then an OLS fit).

NumPy only. Live sampling and replay from a rollout bank share one implementation through a
callback ``draw(alpha, n)``: it returns the outcome of ``n`` *fresh* rollouts at ``alpha`` as
``k``, ``(k, generated_tokens)``, ``(k, generated_tokens, n_judged)`` or a :class:`DrawResult`;
rollouts without a verdict are left out of ``n_judged`` (a judge failure is never a refusal).

The rules (our reading of what the appendix leaves open: docs/estimators.md):

1. Grid: exact decimals 0, 0.05, ..., 0.95; alpha = 1 is only the extrapolation target.
2. Search: from the top of the grid down, ``n_search`` (10) rollouts per alpha; the start alpha
   is the first with k / n_judged >= 0.5, else 0.
3. Fit phase: ``n_fit`` fresh rollouts at the start alpha, then one grid step at a time toward
   1; stop after the first judged zero (drawn, not fitted) or the top of the grid.
4. Fit: OLS of log10(k / n_judged) on alpha over fit-phase points with rate in (0, 0.5);
   estimate = 10 ** (intercept + slope), not clipped.
5. Fewer than two fitted points: estimate 1e-6, no line (status "fallback", or "no_compliant"
   when no rollout complied).
6. A draw with n_judged == 0 has no rate: it neither stops the search nor the advance, and is not
   fitted. A run whose rollouts are mostly unknown (:func:`degenerate.no_data`) is "no_data",
   estimate NaN.
7. Budget: rollouts = all requested, search included; forward passes = passes per token (2
   paired, 1 single model) x generated tokens, None if a draw did not report them.
8. Not rare: the fit reached the top of the grid with a rate >= 0.5 there: status "not_rare",
   estimate that rate.

Points 4-8 are implemented once, in :func:`lpe_paper_from_counts` (arrays over many prompts and
simulations); the trace API (:func:`fit_paper`, :func:`trace_not_rare`, :func:`trace_no_data`)
turns a trace into those counts (:func:`trace_paper_counts`) and calls it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Sequence
from typing import Any

import numpy as np

from lpe_jax.estimators import degenerate
from lpe_jax.estimators.degenerate import FALLBACK

__all__ = [
    "DrawResult",
    "DrawFn",
    "DrawRequest",
    "LPEStep",
    "LPEResult",
    "LPECountsResult",
    "paper_alpha_grid",
    "adaptive_search",
    "run_search",
    "adaptive_draws",
    "lpe_paper",
    "fit_paper",
    "lpe_paper_from_counts",
    "ols_line",
    "trace_counts",
    "trace_paper_counts",
    "TracePaperCounts",
    "trace_not_rare",
    "trace_no_data",
    "trace_budget",
    "FALLBACK",
]

N_SEARCH = 10
START_THRESHOLD = 0.5


@dataclasses.dataclass(frozen=True)
class DrawResult:
    """Outcome of ``n`` fresh rollouts at one alpha.

    Attributes:
      k: compliant rollouts.
      generated_tokens: tokens generated over the n rollouts, or None if unknown.
      n_judged: rollouts with a verdict (None means all n); k <= n_judged <= n.
    """

    k: int
    generated_tokens: int | None = None
    n_judged: int | None = None


DrawFn = Callable[[float, int], int | DrawResult | tuple]


@dataclasses.dataclass(frozen=True)
class LPEStep:
    """One call of ``draw``: ``n`` rollouts requested at ``alpha`` in ``phase``."""

    alpha: float
    n: int
    k: int
    n_judged: int
    phase: str  # "search" or "fit"
    generated_tokens: int | None = None

    @property
    def rate(self) -> float | None:
        """k / n_judged, or None when nothing was judged."""
        return self.k / self.n_judged if self.n_judged else None


@dataclasses.dataclass(frozen=True)
class LPEResult:
    """Result of one LPE run.

    Attributes:
      estimate: predicted compliance rate of the original (alpha = 1).
      trace: every draw, in order.
      intercept, slope: fitted line log10 r = intercept + slope * alpha (None on fallback).
      fit_alphas, fit_log10_rates: the points fitted.
      fallback: True when fewer than two points were fittable and ``estimate`` is the default.
      start_alpha: alpha where the fit phase began.
      rollouts: rollouts spent (search + fit).
      forward_passes: passes_per_token * generated tokens, or None when any count is unknown.
      status: "ok", "not_rare", "no_compliant", "fallback" or "no_data" (:mod:`.degenerate`;
        ``estimate`` is NaN when "no_data").
    """

    estimate: float
    trace: tuple[LPEStep, ...]
    intercept: float | None
    slope: float | None
    fit_alphas: tuple[float, ...]
    fit_log10_rates: tuple[float, ...]
    fallback: bool
    start_alpha: float
    rollouts: int
    forward_passes: int | None
    status: str = degenerate.OK


def paper_alpha_grid(step: float = 0.05, top: float = 0.95) -> np.ndarray:
    """Increasing exact-decimal grid 0, step, ..., top (float64; the paper's is 0..0.95)."""
    if not 0 < step <= top < 1:
        raise ValueError(f"need 0 < step <= top < 1, got step={step}, top={top}")
    n = int(round(top / step))
    if abs(n * step - top) > 1e-9:
        raise ValueError(f"top={top} is not a multiple of step={step}")
    return np.round(np.arange(n + 1) * step, 10)


def _check_grid(alphas: Sequence[float]) -> np.ndarray:
    a = np.round(np.asarray(alphas, dtype=np.float64), 10)
    if a.ndim != 1 or a.size < 1:
        raise ValueError(f"alphas must be a non-empty 1-D grid, got shape {a.shape}")
    if not np.all(np.diff(a) > 0):
        raise ValueError("alphas must be strictly increasing (pass the grid in ascending order)")
    if a[0] < 0 or a[-1] >= 1:
        raise ValueError(f"alphas must lie in [0, 1) (alpha = 1 is the target), got {a}")
    return a


def _as_draw_result(out: int | DrawResult | tuple, n: int, alpha: float) -> DrawResult:
    if isinstance(out, DrawResult):
        res = out
    elif isinstance(out, tuple):
        if len(out) not in (2, 3):
            raise ValueError(
                "draw must return k, (k, generated_tokens), (k, generated_tokens, n_judged) "
                f"or a DrawResult; got a tuple of length {len(out)}"
            )
        res = DrawResult(*out)
    elif isinstance(out, (int, np.integer)):
        res = DrawResult(int(out))
    else:
        raise TypeError(f"draw returned {type(out).__name__}; expected int, tuple or DrawResult")
    judged = n if res.n_judged is None else int(res.n_judged)
    if not 0 <= int(res.k) <= judged <= n:
        raise ValueError(
            f"draw({alpha}, {n}) returned k={res.k}, n_judged={res.n_judged}: need "
            "0 <= k <= n_judged <= n"
        )
    if res.generated_tokens is not None and res.generated_tokens < 0:
        raise ValueError(f"draw({alpha}, {n}) returned negative generated_tokens")
    tokens = None if res.generated_tokens is None else int(res.generated_tokens)
    return DrawResult(int(res.k), tokens, judged)


@dataclasses.dataclass(frozen=True)
class DrawRequest:
    """One draw a search asks for: ``n`` fresh rollouts at ``alpha`` in ``phase``."""

    alpha: float
    n: int
    phase: str  # "search" or "fit"


DrawOutcome = int | DrawResult | tuple
AdaptiveSearch = Generator[DrawRequest, DrawOutcome, tuple[LPEStep, ...]]


def adaptive_search(
    n_fit: int,
    *,
    n_search: int = N_SEARCH,
    alphas: Sequence[float] | None = None,
    start_threshold: float = START_THRESHOLD,
) -> AdaptiveSearch:
    """The appendix's search and advance (points 1-3, 6 of the module docstring) as a generator.

    It yields :class:`DrawRequest` s one at a time; send each one's outcome back (anything
    ``draw`` may return: k, a tuple or a :class:`DrawResult`). When the search ends the generator
    returns the trace (``StopIteration.value``; :func:`run_search` unwraps it). A driver can hold
    many prompts' searches at once and batch their pending requests; the sequence of requests a
    search makes depends only on the outcomes it is sent, so any interleaving of prompts gives
    each prompt the trace the serial order gives.
    """
    if n_fit < 1 or n_search < 1:
        raise ValueError(f"need n_fit >= 1 and n_search >= 1, got {n_fit}, {n_search}")
    grid = _check_grid(paper_alpha_grid() if alphas is None else alphas)
    trace: list[LPEStep] = []

    def ask(alpha: float, n: int, phase: str) -> Generator[DrawRequest, DrawOutcome, LPEStep]:
        res = _as_draw_result((yield DrawRequest(float(alpha), int(n), phase)), n, alpha)
        step = LPEStep(float(alpha), int(n), res.k, int(res.n_judged), phase, res.generated_tokens)
        trace.append(step)
        return step

    start = 0
    for i in range(grid.size - 1, -1, -1):
        s = yield from ask(grid[i], n_search, "search")
        if s.rate is not None and s.rate >= start_threshold:
            start = i
            break
    for i in range(start, grid.size):
        s = yield from ask(grid[i], n_fit, "fit")
        if s.n_judged > 0 and s.k == 0:
            break
    return tuple(trace)


def run_search(search: Generator[DrawRequest, DrawOutcome, Any], draw: DrawFn) -> Any:
    """Drive a search generator with a blocking ``draw(alpha, n)``; returns what it returns."""
    try:
        request = next(search)
        while True:
            request = search.send(draw(request.alpha, request.n))
    except StopIteration as stop:
        return stop.value


def adaptive_draws(
    draw: DrawFn,
    n_fit: int,
    *,
    n_search: int = N_SEARCH,
    alphas: Sequence[float] | None = None,
    start_threshold: float = START_THRESHOLD,
) -> tuple[LPEStep, ...]:
    """Run :func:`adaptive_search` against a blocking ``draw`` callback; returns the trace.

    Fit-phase steps have ``phase == "fit"``.
    """
    search = adaptive_search(
        n_fit, n_search=n_search, alphas=alphas, start_threshold=start_threshold
    )
    return run_search(search, draw)


def ols_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Ordinary least squares y = intercept + slope * x; needs >= 2 distinct x."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or np.unique(x).size < 2:
        raise ValueError("ols_line needs equal-length 1-D x, y with at least two distinct x")
    xm, ym = x.mean(), y.mean()
    slope = float(((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum())
    return float(ym - slope * xm), slope


def trace_budget(trace: Sequence[LPEStep], passes_per_token: int) -> tuple[int, int | None]:
    """(rollouts spent, forward passes) of a trace (point 7 of the module docstring); passes are
    None when a draw did not report its generated tokens."""
    rollouts = sum(s.n for s in trace)
    if any(s.generated_tokens is None for s in trace):
        return rollouts, None
    return rollouts, passes_per_token * sum(int(s.generated_tokens) for s in trace)


def lpe_paper(
    draw: DrawFn,
    n_fit: int,
    *,
    n_search: int = N_SEARCH,
    alphas: Sequence[float] | None = None,
    start_threshold: float = START_THRESHOLD,
    fallback: float = FALLBACK,
    passes_per_token: int = 2,
) -> LPEResult:
    """Paper-exact adaptive LPE (module docstring, points 1-7).

    Args:
      draw: callback ``draw(alpha, n)``; see the module docstring for its contract.
      n_fit: rollouts per alpha in the fit phase (the paper uses 13-100).
      n_search: rollouts per alpha in the search (paper: 10).
      alphas: increasing grid in [0, 1); default the paper's 0, 0.05, ..., 0.95.
      start_threshold: search stops at the first rate >= this (paper: 0.5); the fit keeps
        rates strictly below it.
      fallback: prediction when fewer than two points are fittable (paper: 1e-6).
      passes_per_token: 2 for paired rollouts (both models), 1 for a single model.
    """
    trace = adaptive_draws(
        draw, n_fit, n_search=n_search, alphas=alphas, start_threshold=start_threshold
    )
    return fit_paper(
        trace,
        start_threshold=start_threshold,
        fallback=fallback,
        passes_per_token=passes_per_token,
    )


def fit_paper(
    trace: Sequence[LPEStep],
    *,
    start_threshold: float = START_THRESHOLD,
    fallback: float = FALLBACK,
    passes_per_token: int = 2,
) -> LPEResult:
    """The paper's OLS fit (points 4-5, 8) on a trace from :func:`adaptive_draws`.

    Lets one set of draws be fitted several ways (e.g. here and by the binomial fit) without
    drawing twice. The fit and every rule where no line can be read are
    :func:`lpe_paper_from_counts`'s, applied to the trace's counts (:func:`trace_paper_counts`):
    "no_compliant" and "fallback" give ``fallback``, "not_rare" the top of the grid's rate,
    "no_data" NaN and no line.
    """
    tc = trace_paper_counts(trace, start_threshold=start_threshold, fallback=fallback)
    res = tc.paper
    fitted = res.fitted
    ys = np.log10(tc.fit_k[fitted] / tc.fit_n[fitted])
    ok = not bool(res.fallback) and not bool(res.no_data)
    status = degenerate.OK
    # The line at alpha = 1 summed as intercept + slope, bit for bit the scalar fit's value (the
    # counts' log10_estimate sums it in another order: within an ulp, and evaluate()'s numbers).
    estimate = float(10.0 ** (res.intercept + res.slope)) if ok else float("nan")
    if res.no_data:
        status = degenerate.NO_DATA
    elif res.not_rare:  # the measured rate itself, not 10 ** log10 of it
        estimate, status = float(tc.fit_k[-1] / tc.fit_n[-1]), degenerate.NOT_RARE
    elif res.fallback:
        estimate = float(fallback)
        status = degenerate.NO_COMPLIANT if res.no_compliant else degenerate.FALLBACK_STATUS
    _, passes = trace_budget(tc.trace, passes_per_token)
    return LPEResult(
        estimate=estimate,
        trace=tc.trace,
        intercept=float(res.intercept) if ok else None,
        slope=float(res.slope) if ok else None,
        fit_alphas=tuple(float(a) for a in tc.alphas[fitted]),
        fit_log10_rates=tuple(float(y) for y in ys),
        fallback=bool(res.fallback),
        start_alpha=float(tc.alphas[int(res.start_index)]),
        rollouts=int(res.rollouts),
        forward_passes=passes,
        status=status,
    )


@dataclasses.dataclass(frozen=True)
class TracePaperCounts:
    """One trace as the counts of :func:`lpe_paper_from_counts`, and that function's result.

    Attributes:
      trace: the trace's steps, in order.
      alphas: float64 [A'] the alphas the trace drew, increasing (the top of the grid down to
        the start alpha; the search never draws below it).
      search_k, search_n, fit_k, fit_n: int64 [A'] compliant / judged counts per phase (0 where
        a phase did not draw).
      n_search, n_fit: rollouts of one search / fit draw.
      paper: :func:`lpe_paper_from_counts` on these counts (scalar batch shape).
    """

    trace: tuple[LPEStep, ...]
    alphas: np.ndarray
    search_k: np.ndarray
    search_n: np.ndarray
    fit_k: np.ndarray
    fit_n: np.ndarray
    n_search: int
    n_fit: int
    paper: LPECountsResult


def _phase_n(trace: Sequence[LPEStep], phase: str, default: int | None = None) -> int:
    ns = {int(s.n) for s in trace if s.phase == phase}
    if not ns and default is not None:
        return default
    if len(ns) != 1:
        raise ValueError(
            f"the trace's {phase}-phase steps draw {sorted(ns) or 'no'} rollouts; one "
            "adaptive_draws run draws the same n at every step of a phase (build it with that)"
        )
    return ns.pop()


def trace_paper_counts(
    trace: Sequence[LPEStep],
    *,
    start_threshold: float = START_THRESHOLD,
    fallback: float = FALLBACK,
) -> TracePaperCounts:
    """A trace from :func:`adaptive_draws` as counts, with :func:`lpe_paper_from_counts` run on
    them: the trace API's one path into the counts API, so every rule is stated once.

    Raises ValueError when the trace has no fit phase, draws twice at one alpha in one phase, or
    is not what one search with ``start_threshold`` draws (its fit phase starts elsewhere).
    """
    trace = tuple(trace)
    if not any(s.phase == "fit" for s in trace):
        raise ValueError("the trace has no fit-phase step; build it with adaptive_draws")
    n_fit = _phase_n(trace, "fit")
    n_search = _phase_n(trace, "search", default=N_SEARCH)
    alphas = np.unique(np.round([s.alpha for s in trace], 10))
    counts = {
        p: (np.zeros(alphas.size, np.int64), np.zeros(alphas.size, np.int64))
        for p in ("search", "fit")
    }
    seen: set[tuple[str, int]] = set()
    for s in trace:
        i = int(np.searchsorted(alphas, round(s.alpha, 10)))
        if (s.phase, i) in seen:
            raise ValueError(f"the trace draws twice at alpha={s.alpha} in its {s.phase} phase")
        seen.add((s.phase, i))
        counts[s.phase][0][i], counts[s.phase][1][i] = s.k, s.n_judged
    (sk, sn), (fk, fn) = counts["search"], counts["fit"]
    paper = lpe_paper_from_counts(
        sk,
        sn,
        fk,
        fn,
        alphas,
        n_fit,
        n_search=n_search,
        start_threshold=start_threshold,
        fallback=fallback,
    )
    first_fit = next(s.alpha for s in trace if s.phase == "fit")
    if round(first_fit, 10) != alphas[int(paper.start_index)]:
        raise ValueError(
            f"the trace's fit phase starts at alpha={first_fit}, but a search with "
            f"start_threshold={start_threshold} starts it at {alphas[int(paper.start_index)]}: "
            "fit with the threshold the trace was drawn with"
        )
    return TracePaperCounts(trace, alphas, sk, sn, fk, fn, n_search, n_fit, paper)


def trace_not_rare(
    trace: Sequence[LPEStep], start_threshold: float = START_THRESHOLD
) -> float | None:
    """The top-of-grid rate when a trace is "not rare" (point 8 of the module docstring), else
    None; :func:`lpe_paper_from_counts`'s rule on the trace's counts."""
    tc = trace_paper_counts(trace, start_threshold=start_threshold)
    return float(tc.fit_k[-1] / tc.fit_n[-1]) if tc.paper.not_rare else None


def trace_no_data(trace: Sequence[LPEStep], start_threshold: float = START_THRESHOLD) -> bool:
    """Whether a run's rollouts are mostly unknown (:func:`degenerate.no_data` over every draw);
    :func:`lpe_paper_from_counts`'s rule on the trace's counts."""
    return bool(trace_paper_counts(trace, start_threshold=start_threshold).paper.no_data)


def trace_counts(
    trace: Sequence[LPEStep], phases: Sequence[str] = ("search", "fit")
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Judged counts per alpha over the trace's steps in ``phases``, pooled across steps.

    Every step draws fresh rollouts, so steps at one alpha add up (the search's 10 and the fit's
    n_fit at the start alpha give one point of 10 + n_fit). Returns (alphas float64 [A'],
    k int64 [A'], n_judged int64 [A']), alphas increasing, over the alphas these steps drew.
    """
    steps = [s for s in trace if s.phase in phases]
    alphas = np.unique(np.round([s.alpha for s in steps], 10))
    k = np.zeros(alphas.size, np.int64)
    n = np.zeros(alphas.size, np.int64)
    for s in steps:
        i = int(np.searchsorted(alphas, round(s.alpha, 10)))
        k[i] += s.k
        n[i] += s.n_judged
    return alphas, k, n


@dataclasses.dataclass(frozen=True)
class LPECountsResult:
    """Vectorized LPE over a batch; every array has the batch shape ``B`` unless noted.

    Attributes:
      log10_estimate: float64 [*B] (log10 of the fallback where ``fallback``).
      fallback: bool [*B].
      intercept, slope: float64 [*B] the fitted line log10 r = intercept + slope * alpha
        (NaN where ``fallback``).
      rollouts: int64 [*B] rollouts spent.
      start_index: int64 [*B] grid index of the start alpha.
      drawn: bool [*B, A] fit-phase alphas drawn (stopping zero included).
      fitted: bool [*B, A] points the OLS used.
      n_search_drawn: int64 [*B] number of alphas scanned in the search.
      not_rare: bool [*B] status "not_rare" (the estimate is then the top of the grid's rate).
      no_compliant: bool [*B] no rollout complied in the search or the fit.
      no_data: bool [*B] the charged rollouts are mostly unknown (:func:`degenerate.no_data`);
        ``log10_estimate`` is NaN there.
    """

    log10_estimate: np.ndarray
    fallback: np.ndarray
    intercept: np.ndarray
    slope: np.ndarray
    rollouts: np.ndarray
    start_index: np.ndarray
    drawn: np.ndarray
    fitted: np.ndarray
    n_search_drawn: np.ndarray
    not_rare: np.ndarray
    no_compliant: np.ndarray
    no_data: np.ndarray


def lpe_paper_from_counts(
    search_k: np.ndarray,
    search_n: np.ndarray,
    fit_k: np.ndarray,
    fit_n: np.ndarray,
    alphas: np.ndarray,
    n_fit: int,
    *,
    n_search: int = N_SEARCH,
    start_threshold: float = START_THRESHOLD,
    fallback: float = FALLBACK,
) -> LPECountsResult:
    """:func:`lpe_paper` as array operations, for Monte Carlo over many prompts and simulations.

    Equivalent to running :func:`lpe_paper` with a callback that, at grid index ``a``, returns
    ``(search_k, search_n)[..., a]`` for the search draw and ``(fit_k, fit_n)[..., a]`` for the
    fit draw (``*_n`` are judged counts; ``n_search``/``n_fit`` rollouts are charged).

    Args:
      search_k, search_n, fit_k, fit_n: int [*B, A] compliant / judged counts per alpha.
      alphas: float [A] increasing grid in [0, 1).
      n_fit, n_search: rollouts charged per fit / search draw.
    """
    grid = _check_grid(alphas)
    arrs = [np.asarray(x) for x in (search_k, search_n, fit_k, fit_n)]
    shape = arrs[0].shape
    if any(x.shape != shape for x in arrs) or shape[-1:] != grid.shape:
        raise ValueError(
            f"counts must all have shape [..., {grid.size}], got {[x.shape for x in arrs]}"
        )
    sk, sn, fk, fn = arrs
    if np.any(sk < 0) or np.any(sk > sn) or np.any(fk < 0) or np.any(fk > fn):
        raise ValueError("counts need 0 <= k <= n_judged")
    if np.any(sn > n_search) or np.any(fn > n_fit):
        raise ValueError("judged counts cannot exceed the rollouts drawn (n_search / n_fit)")
    n_a = grid.size
    idx = np.arange(n_a)
    hit = (sn > 0) & (sk >= start_threshold * sn)
    start = np.where(hit.any(-1), n_a - 1 - np.argmax(hit[..., ::-1], axis=-1), 0)
    n_scanned = n_a - start
    after = idx >= start[..., None]
    zero = after & (fn > 0) & (fk == 0)
    stop = np.where(zero.any(-1), np.argmax(zero, axis=-1), n_a - 1)
    drawn = after & (idx <= stop[..., None])
    safe_n = np.maximum(fn, 1)
    fitted = drawn & (fk > 0) & (fk < start_threshold * fn)
    m = fitted.astype(np.float64)
    cnt = m.sum(-1)
    y = np.log10(np.where(fitted, fk, 1) / safe_n)
    denom = np.maximum(cnt, 1)
    xm = (m * grid).sum(-1) / denom
    ym = (m * y).sum(-1) / denom
    dx = grid - xm[..., None]
    sxx = (m * dx * dx).sum(-1)
    sxy = (m * dx * (y - ym[..., None])).sum(-1)
    ok = cnt >= 2
    slope = np.where(ok, sxy / np.where(ok, sxx, 1.0), 0.0)
    intercept = ym - slope * xm
    log10_est = np.where(ok, ym + slope * (1.0 - xm), np.log10(fallback))
    top_k, top_n = fk[..., -1], fn[..., -1]
    not_rare = drawn[..., -1] & (top_n > 0) & (top_k >= start_threshold * top_n)
    with np.errstate(divide="ignore"):
        log10_est = np.where(not_rare, np.log10(top_k / np.maximum(top_n, 1)), log10_est)
    no_compliant = ((sk * after).sum(-1) == 0) & ((fk * drawn).sum(-1) == 0)
    rollouts = n_search * n_scanned + n_fit * drawn.sum(-1)
    no_data = degenerate.no_data(rollouts, (sn * after).sum(-1) + (fn * drawn).sum(-1))
    log10_est = np.where(no_data, np.nan, log10_est)
    return LPECountsResult(
        log10_estimate=log10_est,
        fallback=~ok,
        intercept=np.where(ok, intercept, np.nan),
        slope=np.where(ok, slope, np.nan),
        rollouts=rollouts.astype(np.int64),
        start_index=start.astype(np.int64),
        drawn=drawn,
        fitted=fitted,
        n_search_drawn=n_scanned.astype(np.int64),
        not_rare=not_rare,
        no_compliant=no_compliant,
        no_data=no_data,
    )
