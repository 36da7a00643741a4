"""Hypothesis strategies for LPE traces, shared by the estimator property tests."""

import numpy as np
from hypothesis import strategies as st

from lpe_jax.estimators.lpe import adaptive_search, paper_alpha_grid

ALPHAS = paper_alpha_grid()


@st.composite
def traces(draw, max_n_fit: int = 40):
    """An adaptive trace whose every outcome hypothesis chooses (zeros and >= 0.5 favoured)."""
    n_fit = draw(st.integers(1, max_n_fit))
    search = adaptive_search(n_fit)
    req = next(search)
    try:
        while True:
            judged = draw(st.sampled_from([req.n, req.n, req.n, max(req.n - 1, 0), 0]))
            k = draw(
                st.one_of(
                    st.just(0),
                    st.integers(0, judged),
                    st.integers((judged + 1) // 2, judged),
                )
            )
            req = search.send((k, None, judged))
    except StopIteration as stop:
        return stop.value


def counts_of(trace):
    """The arrays lpe_paper_from_counts takes, from a trace (unused cells are zeros)."""
    a = ALPHAS.size
    sk, sn, fk, fn = (np.zeros(a, np.int64) for _ in range(4))
    for s in trace:
        i = int(np.flatnonzero(np.isclose(ALPHAS, s.alpha))[0])
        k, n = (sk, sn) if s.phase == "search" else (fk, fn)
        k[i], n[i] = s.k, s.n_judged
    n_fit = next(s.n for s in trace if s.phase == "fit")
    return sk, sn, fk, fn, n_fit
