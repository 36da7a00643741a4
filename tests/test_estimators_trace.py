"""One set of draws, two fits: fitting a trace equals running the estimator on the same draws."""

import numpy as np
import pytest

from lpe_jax import plots
from lpe_jax.estimators import (
    adaptive_draws,
    fit_paper,
    fit_trace_binomial,
    lpe_binomial,
    lpe_paper,
)


def _draw(seed: int):
    rng = np.random.default_rng(seed)

    def draw(alpha: float, n: int) -> tuple[int, int]:
        rate = min(1.0, 10 ** (-0.3 - 5.0 * alpha))
        return int(rng.binomial(n, rate)), 20 * n

    return draw


def test_fit_of_trace_equals_the_estimators():
    trace = adaptive_draws(_draw(0), 50)
    assert lpe_paper(_draw(0), 50) == fit_paper(trace)
    a, b = lpe_binomial(_draw(0), 50), fit_trace_binomial(trace)
    assert (a.estimate, a.lower, a.upper, a.rollouts) == (b.estimate, b.lower, b.upper, b.rollouts)


def test_trace_without_fit_phase_is_refused():
    trace = tuple(s for s in adaptive_draws(_draw(1), 20) if s.phase == "search")
    with pytest.raises(ValueError, match="no fit-phase step"):
        fit_paper(trace)
    with pytest.raises(ValueError, match="no fit-phase step"):
        fit_trace_binomial(trace)


def test_plot_lpe_run_writes_png_and_pdf(tmp_path):
    trace = adaptive_draws(_draw(2), 40)
    files = plots.plot_lpe_run(
        fit_paper(trace), fit_trace_binomial(trace), str(tmp_path / "p"), truth_rate=1e-5
    )
    assert [f.rsplit(".", 1)[1] for f in files] == ["png", "pdf"]
    assert all((tmp_path / f"p.{e}").stat().st_size > 1000 for e in ("png", "pdf"))
