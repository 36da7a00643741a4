"""One set of draws, two fits: fitting a trace equals running the estimator on the same draws."""

import numpy as np
import pytest

from lpe_jax.estimators import (
    adaptive_draws,
    adaptive_search,
    fit_paper,
    fit_trace_binomial,
    lpe_binomial,
    lpe_paper,
)
from lpe_jax.evaluation import plots


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


def _rate_draw(slope: float):
    """Deterministic per (alpha, call index) so any interleaving sees the same outcomes."""
    calls: dict[float, int] = {}

    def draw(alpha: float, n: int) -> tuple[int, int]:
        i = calls.get(alpha, 0)
        calls[alpha] = i + 1
        rng = np.random.default_rng([int(alpha * 1000), i, int(-slope * 10)])
        return int(rng.binomial(n, min(1.0, 10 ** (-0.2 + slope * alpha)))), 7 * n

    return draw


def test_interleaved_searches_equal_the_serial_order():
    slopes = [-3.0, -5.0, -8.0, -11.0]
    serial = [adaptive_draws(_rate_draw(s), 30) for s in slopes]
    draws = [_rate_draw(s) for s in slopes]
    searches = [adaptive_search(30) for _ in slopes]
    pending = {i: next(g) for i, g in enumerate(searches)}
    traces: dict[int, tuple] = {}
    rng = np.random.default_rng(0)
    while pending:  # answer the pending requests in a random order, one round at a time
        for i in rng.permutation(sorted(pending)):
            req = pending.pop(i)
            try:
                pending[i] = searches[i].send(draws[i](req.alpha, req.n))
            except StopIteration as stop:
                traces[i] = stop.value
    assert [traces[i] for i in range(len(slopes))] == serial
    assert all(len(t) > 2 for t in serial)


def test_search_yields_requests_and_rejects_bad_outcomes():
    search = adaptive_search(13)
    req = next(search)
    assert (req.alpha, req.n, req.phase) == (0.95, 10, "search")
    with pytest.raises(ValueError, match="need 0 <= k <= n_judged"):
        search.send(11)
