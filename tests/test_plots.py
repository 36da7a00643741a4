"""The figures show what the table says: zero counts, intervals reaching 0, the pooled fit."""

import numpy as np

from lpe_jax.estimators import fit_paper, fit_trace_binomial
from lpe_jax.estimators.lpe import LPEStep
from lpe_jax.estimators.pooled import fit_pooled
from lpe_jax.evaluation import plots

GRID = [round(0.05 * i, 2) for i in range(20)]


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def test_a_prompt_with_no_compliant_draw_is_drawn_on_the_path():
    """Every value the fallback (the second organism's own-abliteration run): the axis still
    spans alpha 0..1, each searched alpha shows its 0-of-n draw on the bottom edge, and the
    binomial and pooled intervals run from that edge (lower end 0) to the table's upper end."""
    zeros = [LPEStep(a, 10, 0, 10, "search") for a in GRID] + [LPEStep(0.0, 30, 0, 30, "fit")]
    pooled = fit_pooled([zeros, zeros]).prompts[0]
    paper, binom = fit_paper(tuple(zeros)), fit_trace_binomial(tuple(zeros))
    assert paper.fallback and binom.fit.lower == 0
    fig = plots._lpe_run_figure(
        paper, binom, None, 5.4e-8, None, (pooled.estimate, pooled.lower, pooled.upper), "h000"
    )
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    assert lo <= 0.0 and 1.03 < hi < 1.1  # not a 1.000-1.010 axis
    bottom, top = ax.get_ylim()
    assert bottom < np.log10(5.4e-8) and top > np.log10(binom.upper)
    labels = _labels(ax)
    [zero_line] = [ln for ln in ax.lines if "0 compliant of n" in str(ln.get_label())]
    assert sorted(zero_line.get_xdata()) == GRID
    assert np.all(zero_line.get_ydata() < np.log10(5.4e-8))  # below every drawn value
    b = f"binomial 1.0e-06 [0, {binom.upper:.1e}] (95%)"
    p = f"pooled {pooled.estimate:.1e} [0, {pooled.upper:.1e}] (95%)"
    assert b in labels and p in labels, labels
    assert any("fallback" in label for label in labels)


def test_zero_fitted_alphas_are_drawn_and_the_legend_is_beside_the_axes():
    rng = np.random.default_rng(0)
    # The search's last two steps: 4 of 10 at 0.05, 8 of 10 at 0.0, so the fit starts at 0.0.
    trace = [LPEStep(0.05, 10, 4, 10, "search"), LPEStep(0.0, 10, 8, 10, "search")]
    trace += [LPEStep(a, 50, int(rng.binomial(50, 0.5 * 10 ** (-4 * a))), 50, "fit") for a in GRID]
    trace = tuple(trace)
    fig = plots._lpe_run_figure(
        fit_paper(trace), fit_trace_binomial(trace), None, None, (3, 100_000), None, "p"
    )
    ax = fig.axes[0]
    zero_fit = sorted(s.alpha for s in trace if s.phase == "fit" and s.k == 0)
    assert zero_fit  # the draws include 0-of-50 alphas, which log10 cannot place
    [zero_line] = [ln for ln in ax.lines if "0 compliant of n" in str(ln.get_label())]
    assert sorted(zero_line.get_xdata()) == zero_fit
    legend = ax.get_legend()
    fig.canvas.draw()
    box, axes_box = legend.get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axes_box.x1  # beside the data, never over it
    assert not any(label.startswith("pooled") for label in _labels(ax))  # none was given


def test_figure_1_legend_covers_no_curve():
    from lpe_jax.evaluation.evaluation import Curve, EvaluationResult

    def curve(method, rollouts, auroc):
        n = len(rollouts)
        none = (None,) * n
        return Curve(
            method, tuple(range(n)), tuple(rollouts), tuple(10.0 * r for r in rollouts),
            tuple(auroc), tuple(a - 0.05 for a in auroc), tuple(a + 0.05 for a in auroc),
            none, (0.0,) * n, none, none,
        )  # fmt: skip

    naive = curve("naive", [1e2, 1e3, 1e4, 1e5], [0.5, 0.55, 0.75, 0.95])
    lpe = curve("lpe_paper", [1e2, 3e2], [0.65, 0.8])
    result = EvaluationResult({"naive": naive, "lpe_paper": lpe}, 32, 16, 16, 500, 0, 1.0)
    fig = plots._auroc_figure(result, None, None)
    fig.canvas.draw()
    [legend] = fig.legends
    box = legend.get_window_extent()
    assert all(box.y1 <= ax.get_window_extent().y0 for ax in fig.axes)  # beneath both panels
    assert legend.get_texts()[0].get_text() == "naive sampling"
