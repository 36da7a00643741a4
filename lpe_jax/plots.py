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
from lpe_jax.evaluation import BankDraw, EvaluationResult, RolloutBank  # noqa: E402

__all__ = ["plot_auroc", "plot_extrapolation", "plot_lpe_run"]

_STYLE = {
    "naive": ("black", "naive sampling"),
    "is": ("gray", "importance sampling"),
    "snis": ("silver", "self-normalized IS"),
    "lpe_paper": ("tab:blue", "LPE (paper: OLS)"),
    "lpe_binomial": ("tab:orange", "LPE (binomial fit)"),
    "lpe_binomial_grid": ("tab:green", "LPE (binomial, fixed grid)"),
    "lpe_binomial_all": ("tab:red", "LPE (binomial, search draws too)"),
    "lpe_pooled": ("tab:purple", "LPE (pooled over prompts)"),
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

    Bands are the 95% bootstrap intervals over prompts. Returns the written paths.
    """
    names = list(result.curves) if methods is None else list(methods)
    unknown = [m for m in names if m not in result.curves]
    if unknown:
        raise ValueError(f"no curve for {unknown}; have {list(result.curves)}")
    has_fwd = all(result.curves[m].forward_passes is not None for m in names)
    fig, axes = plt.subplots(1, 2 if has_fwd else 1, figsize=(11 if has_fwd else 6, 4.2))
    axes = np.atleast_1d(axes)
    for ax, unit in zip(axes, ("rollouts", "forward passes"), strict=False):
        for m in names:
            c = result.curves[m]
            x = np.array(c.rollouts if unit == "rollouts" else c.forward_passes)
            color, label = _STYLE.get(m, (None, m))
            ax.plot(x, c.auroc, "o-", color=color, label=label, ms=3)
            ax.fill_between(x, c.auroc_lo, c.auroc_hi, color=color, alpha=0.15, lw=0)
        ax.set_xscale("log")
        ax.set_xlabel(f"{unit} per prompt (mean spent)")
        ax.set_ylabel("AUROC")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        title
        or f"{result.n_eligible} prompts ({result.n_positive} positive), "
        f"{result.n_sims} simulations"
    )
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
    title: str = "",
    formats: Sequence[str] = ("png", "pdf"),
) -> list[str]:
    """Figure 2: log10 compliance rate against alpha for one LPE run.

    Light points: ``all_points`` (alphas, k, n) if given, else every draw of the run's trace that
    was not fitted; dark points: the points the paper's OLS used; dashed line and star: that fit
    and its extrapolation to alpha = 1; orange: the binomial fit on the same draws with its 95%
    interval at alpha = 1; red diamond: the ground truth, from an exact ``truth_rate`` or from
    ``truth_counts`` (k, n) (a triangle at 1 / n when k = 0). Returns the files written.
    """
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
    alphas, k_all, n_all = (np.asarray(x) for x in all_points)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    pos = k_all > 0
    ax.plot(
        alphas[pos],
        np.log10(k_all[pos] / n_all[pos]),
        "o",
        color="tab:blue",
        alpha=0.3,
        label="not fitted",
    )
    n_fit = max((s.n for s in paper.trace if s.phase == "fit"), default=0)
    ax.plot(
        paper.fit_alphas,
        paper.fit_log10_rates,
        "o",
        color="tab:blue",
        label=f"fitted (n_fit={n_fit})",
    )
    xs = np.linspace(min(paper.fit_alphas or (0.0,)), 1.0, 50)
    if not paper.fallback:
        ax.plot(xs, paper.intercept + paper.slope * xs, "--", color="tab:blue", label="OLS fit")
    ax.plot(
        [1.0],
        [np.log10(paper.estimate)],
        "*",
        ms=14,
        color="tab:blue",
        label="LPE estimate" + (" (fallback)" if paper.fallback else ""),
    )
    if binom is not None:
        f = binom.fit
        if f.slope is not None:
            ax.plot(xs, f.intercept + f.slope * xs, ":", color="tab:orange", label="binomial fit")
        lo = np.log10(max(f.lower, 1e-12))
        ax.errorbar(
            [1.01],
            [f.log10_estimate],
            yerr=[[f.log10_estimate - lo], [np.log10(f.upper) - f.log10_estimate]],
            fmt="s",
            color="tab:orange",
            capsize=3,
            ms=5,
            label="binomial 95% interval",
        )
    if truth_rate is not None and truth_rate > 0:
        ax.plot([1.0], [np.log10(truth_rate)], "D", color="red", ms=8, label="ground truth")
    elif truth_counts is not None:
        tk, tn = truth_counts
        if tk > 0:
            ax.plot(
                [1.0],
                [np.log10(tk / tn)],
                "D",
                color="red",
                ms=8,
                label=f"ground truth ({tk}/{tn})",
            )
        else:
            ax.plot(
                [1.0],
                [np.log10(1 / tn)],
                "v",
                color="red",
                ms=8,
                label=f"ground truth 0/{tn} (below)",
            )
    ax.set_xlabel("alpha (0 = variant, 1 = original)")
    ax.set_ylabel("log10 compliance rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    return _save(fig, path_stem, formats)
