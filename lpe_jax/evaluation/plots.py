"""The two figures of the paper, drawn from our own results (matplotlib, Agg backend, no JAX)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lpe_jax.estimators.binomial import LPEBinomialResult, fit_trace_binomial  # noqa: E402
from lpe_jax.estimators.lpe import LPEResult, adaptive_draws, fit_paper  # noqa: E402
from lpe_jax.evaluation.evaluation import BankDraw, EvaluationResult, RolloutBank  # noqa: E402
from lpe_jax.evaluation.report import fmt_rate  # noqa: E402

__all__ = ["plot_auroc", "plot_extrapolation", "plot_forecast", "plot_lpe_run"]

_STYLE = {
    "naive": ("black", "naive sampling"),
    "is": ("gray", "importance sampling"),
    "snis": ("silver", "self-normalized IS"),
    "lpe_paper": ("tab:blue", "LPE (paper: OLS)"),
    "lpe_binomial": ("tab:orange", "LPE (binomial fit)"),
    "lpe_binomial_grid": ("tab:green", "LPE (binomial, fixed grid)"),
    "lpe_binomial_all": ("tab:red", "LPE (binomial, search draws too)"),
    "lpe_pooled": ("tab:purple", "LPE (pooled over prompts)"),
    "path_is": ("tab:brown", "path IS (LPE's draws)"),
    "mixture_is": ("tab:cyan", "mixture IS (Angell et al.)"),
}


def _save(fig, path_stem: str, formats: Sequence[str]) -> list[str]:
    os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
    paths = []
    for ext in formats:
        p = f"{path_stem}.{ext}"
        fig.savefig(p, dpi=150, bbox_inches="tight")
        paths.append(p)
    plt.close(fig)
    return paths


def plot_auroc(
    result: EvaluationResult,
    path_stem: str,
    *,
    methods: Sequence[str] | None = None,
    title: str | None = None,
    formats: Sequence[str] = ("png", "pdf"),
) -> list[str]:
    """Figure 1: AUROC against mean rollouts per prompt (and forward passes, when known).

    Bands are the 95% bootstrap intervals over prompts; the legend sits beneath the axes.
    Returns the written paths.
    """
    return _save(_auroc_figure(result, methods, title), path_stem, formats)


def _auroc_figure(result: EvaluationResult, methods: Sequence[str] | None, title: str | None):
    """The Figure 1 of :func:`plot_auroc`, unsaved (tests inspect it)."""
    names = list(result.curves) if methods is None else list(methods)
    unknown = [m for m in names if m not in result.curves]
    if unknown:
        raise ValueError(f"no curve for {unknown}; have {list(result.curves)}")
    has_fwd = any(result.curves[m].forward_passes is not None for m in names)
    fig, axes = plt.subplots(1, 2 if has_fwd else 1, figsize=(11 if has_fwd else 6, 4.2))
    axes = np.atleast_1d(axes)
    for ax, unit in zip(axes, ("rollouts", "forward passes"), strict=False):
        for m in names:
            c = result.curves[m]
            if unit != "rollouts" and c.forward_passes is None:  # e.g. mixture_is: no tokens
                continue
            x = np.array(c.rollouts if unit == "rollouts" else c.forward_passes)
            color, label = _STYLE.get(m, (None, m))
            ax.plot(x, c.auroc, "o-", color=color, label=label, ms=3)
            ax.fill_between(x, c.auroc_lo, c.auroc_hi, color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel(f"{unit} per prompt (mean spent)")
        ax.set_ylabel("AUROC")
        ax.grid(alpha=0.3, which="both")
    # Beneath the axes, not on them: inside, it covered the naive curve's low-budget end.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(
        title
        or f"{result.n_eligible} prompts ({result.n_positive} positive), "
        f"{result.n_sims} simulations"
    )
    return fig


def plot_forecast(
    result: EvaluationResult,
    path_stem: str,
    *,
    methods: Sequence[str] | None = None,
    title: str | None = None,
    formats: Sequence[str] = ("png", "pdf"),
) -> list[str]:
    """Jones et al.'s worst-prompt forecast from each method's estimates at its largest setting:
    the median over simulations with its 5-95% range, at the evaluated prompts (left; the exact
    worst rate among them as a line) and at ten times as many (right; the exact rates' own
    forecast as a line). Methods whose fit refused in every simulation are listed, not drawn.
    Returns the written paths; ValueError when the result has no forecasts (no exact truth)."""
    if result.exact_worst_log10 is None:
        raise ValueError("the forecast figure needs a bank with exact rates (true_r1)")
    names = [m for m in (methods or result.curves) if result.curves[m].forecast]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
    refs = (result.exact_worst_log10, result.exact_forecast_log10)
    for j, (ax, ref) in enumerate(zip(axes, refs, strict=True)):
        for i, m in enumerate(names):
            c = result.curves[m]
            f = c.forecast[-1]
            med, lo, hi = f.median[j], f.low[j], f.high[j]
            color, label = _STYLE.get(m, (None, m))
            tag = f"{label}, n={c.setting[-1]}"
            if med is None:
                ax.text(0.02, i, f"{tag}: refused", transform=ax.get_yaxis_transform(), fontsize=7)
                continue
            ax.errorbar(med, i, xerr=[[med - lo], [hi - med]], fmt="o", color=color, ms=4)
        ax.axvline(ref, color="black", ls="--", lw=1)
        ax.grid(alpha=0.3)
    n = result.n_eligible
    axes[0].set_xlabel(f"log10 worst rate among the {n} prompts (dashed: exact)")
    axes[1].set_xlabel(f"log10 forecast worst rate at {10 * n} prompts (dashed: exact rates')")
    axes[0].set_yticks(range(len(names)))
    axes[0].set_yticklabels([_STYLE.get(m, (None, m))[1] for m in names], fontsize=8)
    fig.suptitle(title or f"Jones et al. forecast, {result.n_sims} simulations")
    return _save(fig, path_stem, formats)


def plot_extrapolation(
    bank: RolloutBank,
    prompt: int,
    path_stem: str,
    *,
    n_fit: int = 100,
    seed: int = 0,
    formats: Sequence[str] = ("png", "pdf"),
) -> list[str]:
    """Figure 2 for one prompt of ``bank``: one LPE run replayed from the bank (see plot_lpe_run).

    Light points are the rates over all of the bank's rollouts at each alpha; the run draws n_fit
    per alpha in a random order from ``seed``; the truth marker comes from truth_k / truth_n.
    """
    c = bank.compliance[prompt]
    order = np.argsort(np.random.default_rng(seed).random(c.shape), axis=1)
    trace = adaptive_draws(BankDraw(bank, prompt, order=order), n_fit, alphas=bank.alphas)
    truth = None
    if bank.truth_k is not None:
        truth = (int(bank.truth_k[prompt]), int(bank.truth_n[prompt]))
    return plot_lpe_run(
        fit_paper(trace),
        fit_trace_binomial(trace),
        path_stem,
        all_points=(bank.alphas, (c == 1).sum(1), (c >= 0).sum(1)),
        truth_counts=truth,
        title=bank.prompt_ids[prompt],
        formats=formats,
    )


def plot_lpe_run(
    paper: LPEResult,
    binom: LPEBinomialResult | None,
    path_stem: str,
    *,
    all_points: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    truth_rate: float | None = None,
    truth_counts: tuple[int, int] | None = None,
    pooled: tuple[float, float, float] | None = None,
    title: str = "",
    formats: Sequence[str] = ("png", "pdf"),
) -> list[str]:
    """Figure 2: log10 compliance rate against alpha for one LPE run.

    Light points: ``all_points`` (alphas, k, n) if given, else every draw of the run's trace that
    was not fitted; dark points: the points the paper's OLS used; open triangles on the bottom
    edge: alphas where no drawn rollout complied (0 of n, whose log10 is -inf); dashed line and
    star: the OLS fit and its extrapolation to alpha = 1 (the 1e-6 fallback when there is no
    fit); orange: the binomial fit on the same draws and its 95% interval at alpha = 1; purple:
    ``pooled`` (estimate, lower, upper) of the pooled fit, when given; red diamond: the ground
    truth, from an exact ``truth_rate`` or from ``truth_counts`` (k, n) (a triangle at 1 / n when
    k = 0). An interval whose lower end is 0 runs to the bottom edge and ends in an arrow. The
    axis spans alpha from 0 (or the lowest drawn alpha) to 1, and the legend sits beside it.
    Returns the files written.
    """
    fig = _lpe_run_figure(paper, binom, all_points, truth_rate, truth_counts, pooled, title)
    return _save(fig, path_stem, formats)


def _lpe_run_figure(paper, binom, all_points, truth_rate, truth_counts, pooled, title):
    """The Figure 2 of :func:`plot_lpe_run`, unsaved (tests inspect its axes)."""
    if all_points is None:
        fitted = set(paper.fit_alphas)
        rest = [
            s for s in paper.trace if s.n_judged and (s.phase == "search" or s.alpha not in fitted)
        ]
        all_points = (
            np.array([s.alpha for s in rest]),
            np.array([s.k for s in rest]),
            np.array([s.n_judged for s in rest]),
        )
    alphas, k_all, n_all = (np.asarray(x, dtype=np.float64) for x in all_points)
    zero_alphas = sorted(
        {float(a) for a, k, n in zip(alphas, k_all, n_all, strict=True) if k == 0 and n > 0}
        | {s.alpha for s in paper.trace if s.phase == "fit" and s.n_judged and s.k == 0}
    )
    fig, ax = plt.subplots(figsize=(6, 4.2))
    shown: list[float] = []  # every finite log10 value drawn: sets the axis' floor

    def point(x, y, *args, **kw):
        shown.extend(np.atleast_1d(y).tolist())
        ax.plot(x, y, *args, **kw)

    pos = k_all > 0
    point(
        alphas[pos],
        np.log10(k_all[pos] / n_all[pos]),
        "o",
        color="tab:blue",
        alpha=0.3,
        label="not fitted",
    )
    n_fit = max((s.n for s in paper.trace if s.phase == "fit"), default=0)
    point(
        list(paper.fit_alphas),
        list(paper.fit_log10_rates),
        "o",
        color="tab:blue",
        label=f"fitted (n_fit={n_fit})",
    )
    x_lo = min([0.0, *alphas.tolist(), *paper.fit_alphas])
    xs = np.linspace(min(paper.fit_alphas or (x_lo,)), 1.0, 50)
    if not paper.fallback:
        point(xs, paper.intercept + paper.slope * xs, "--", color="tab:blue", label="OLS fit")
    star = "LPE estimate" + (" (the 1e-6 fallback: no fit)" if paper.fallback else "")
    point([1.0], [np.log10(paper.estimate)], "*", ms=14, color="tab:blue", label=star)
    intervals = []  # (x, estimate, lower, upper, color, label)
    if binom is not None:
        f = binom.fit
        if f.slope is not None:
            point(xs, f.intercept + f.slope * xs, ":", color="tab:orange", label="binomial fit")
        intervals.append((1.015, binom.estimate, f.lower, f.upper, "tab:orange", "binomial"))
    if pooled is not None:
        intervals.append((1.03, *pooled, "tab:purple", "pooled"))
    for _, est, lo, hi, _, _ in intervals:
        shown.extend(np.log10([v for v in (est, lo, hi) if v > 0]).tolist())
    if truth_rate is not None and truth_rate > 0:
        point([1.0], [np.log10(truth_rate)], "D", color="red", ms=8, label="ground truth")
    elif truth_counts is not None:
        tk, tn = truth_counts
        if tk > 0:
            point(
                [1.0],
                [np.log10(tk / tn)],
                "D",
                color="red",
                ms=8,
                label=f"ground truth ({tk}/{tn})",
            )
        else:
            point(
                [1.0],
                [np.log10(1 / tn)],
                "v",
                color="red",
                ms=8,
                label=f"ground truth 0/{tn} (below)",
            )
    finite = [y for y in shown if np.isfinite(y)]
    top = max(finite, default=0.0)
    floor = min(finite, default=-6.0) - 1.0
    for x, est, lo, hi, color, name in intervals:
        y, y_lo = np.log10(est), np.log10(lo) if lo > 0 else floor
        ax.errorbar(
            [x],
            [y],
            yerr=[[y - y_lo], [np.log10(hi) - y]],
            fmt="s",
            color=color,
            capsize=3,
            ms=5,
            label=f"{name} {fmt_rate(est)} [{fmt_rate(lo)}, {fmt_rate(hi)}] (95%)",
        )
        if lo <= 0:  # the interval reaches 0: an arrow off the bottom edge
            ax.plot([x], [floor], "v", color=color, ms=6)
    if zero_alphas:
        ax.plot(
            zero_alphas,
            np.full(len(zero_alphas), floor),
            "v",
            mfc="none",
            color="tab:blue",
            ms=7,
            label="a draw with 0 compliant of n (log10 = -inf)",
        )
    ax.set_xlim(x_lo - 0.03, 1.06)
    ax.set_ylim(floor - 0.3, max(top, floor + 1.0) + 0.3)
    ax.set_xlabel("alpha (0 = variant, 1 = original)")
    ax.set_ylabel("log10 compliance rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    return fig
