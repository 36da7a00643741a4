"""path_is and mixture_is in the evaluation, on banks of exact draws (tests/path_model.py)."""

import dataclasses

import numpy as np
import pytest
from path_model import L_O, L_V, SEQS, rate, seq_logp, token_logp

from lpe_jax.estimators.lpe import lpe_paper_from_counts
from lpe_jax.estimators.mixture import mixture_log_weights
from lpe_jax.estimators.path_is import (
    crossfit_estimate,
    crossfit_estimate_and_ess,
    path_importance_sampling,
)
from lpe_jax.evaluation import evaluation as ev

ALPHAS = np.array([0.0, 0.3, 0.6, 0.9])
RARE = (SEQS == 2).sum(1) >= 2  # r(1) ~ 4.4e-3
SOME = (SEQS[:, 0] == 2) | (SEQS[:, 2] == 2)
R, M, LAM = 60, 3000, 0.5
N_SEARCH, N_FIT = 10, 20


def _draw(log_q: np.ndarray, n: int, rng) -> np.ndarray:
    p = np.exp(log_q)
    return rng.choice(len(SEQS), size=n, p=p / p.sum())


@pytest.fixture(scope="module")
def bank():
    """Two prompts (RARE, SOME): R exact draws per alpha with their path weights, M exact draws
    from the per-token mixture at LAM with theirs. Prompt 0 is labelled positive, 1 negative."""
    rng = np.random.default_rng(7)
    lo = seq_logp(1.0)
    log_mix = -mixture_log_weights(
        token_logp(L_O), token_logp(L_V), np.full(len(SEQS), 3), LAM
    )  # log q_mix - log p_o
    comp, plw, mlw, mc = [], [], [], []
    for comply in (RARE, SOME):
        rows = [_draw(seq_logp(a), R, rng) for a in ALPHAS]
        comp.append([comply[i] for i in rows])
        plw.append([lo[i] - seq_logp(a)[i] for a, i in zip(ALPHAS, rows, strict=True)])
        i = _draw(lo + log_mix, M, rng)
        mlw.append(-log_mix[i])
        mc.append(comply[i])
    r1 = np.array([rate(lo, RARE), rate(lo, SOME)])
    return ev.RolloutBank(
        prompt_ids=("rare", "some"),
        alphas=ALPHAS,
        compliance=np.array(comp),
        truth_k=np.array([5, 0]),
        truth_n=np.array([1000, 1000]),
        screen_k=np.zeros(2, int),
        screen_n=np.full(2, 100),
        true_r1=r1,
        path_log_weights=np.array(plw),
        mixture_log_weights=np.array(mlw),
        mixture_compliance=np.array(mc),
        mixture_lambda=LAM,
    )


def _draws(bank, n_sims, seed):
    settings = {"n_fits": (N_FIT,), "naive_budgets": (), "is_budgets": (), "grid_rollouts": ()}
    return ev.SimulatedDraws(
        bank,
        np.random.default_rng(seed),
        n_sims=n_sims,
        n_search=N_SEARCH,
        subset_size=R,
        seed=seed,
        coverage_pairs=0,
        pooled_prior="end",
        settings=settings,
    )


def test_crossfit_estimate_is_path_importance_samplings_combination():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = rng.integers(0, 9, 4)
        a = np.repeat(ALPHAS, n)
        c = (rng.random(a.size) < 0.4).astype(np.int8)
        lw = rng.normal(-3, 2, a.size)
        full = path_importance_sampling(a, c, -lw, np.zeros(a.size))
        want = full.estimate
        y = np.where(c == 1, np.exp(lw), 0.0)
        pos = np.concatenate([np.arange(k) for k in n])  # position within its alpha
        grp = np.repeat(np.arange(4), n)
        n_h = np.zeros((2, 4))
        s_h, q_h, v_h = np.zeros((2, 4)), np.zeros((2, 4)), np.full((2, 4), np.nan)
        for h in (0, 1):
            for k in range(4):
                part = y[(grp == k) & (pos % 2 == h)]
                n_h[h, k], s_h[h, k], q_h[h, k] = part.size, part.sum(), (part**2).sum()
                if part.size > 1:
                    v_h[h, k] = part.var(ddof=1)
        got = crossfit_estimate(n_h, s_h, v_h)
        assert got == pytest.approx(0.0 if np.isnan(want) else want, rel=1e-12, abs=1e-300)
        total, ess = crossfit_estimate_and_ess(n_h, s_h, q_h, v_h)
        assert total == pytest.approx(got, rel=1e-12, abs=1e-300)
        assert ess == pytest.approx(0.0 if np.isnan(want) else full.ess_estimate, rel=1e-9)


def _replay(bank, n_sims, seed):
    """Path IS by explicit replay: a random order per (simulation, prompt, alpha), LPE's counts
    from its first rows, then path_importance_sampling on exactly the rows LPE drew."""
    rng = np.random.default_rng(seed)
    p_n, a_n, _ = bank.compliance.shape
    order = np.argsort(rng.random((n_sims, p_n, a_n, R)), -1)
    comp = np.take_along_axis(np.broadcast_to(bank.compliance, order.shape), order, -1)
    lw = np.take_along_axis(np.broadcast_to(bank.path_log_weights, order.shape), order, -1)
    sk = (comp[..., :N_SEARCH] == 1).sum(-1)
    fk = (comp[..., N_SEARCH : N_SEARCH + N_FIT] == 1).sum(-1)
    full = lambda n: np.full(sk.shape, n)  # noqa: E731
    res = lpe_paper_from_counts(sk, full(N_SEARCH), fk, full(N_FIT), ALPHAS, N_FIT)
    out = np.empty((n_sims, p_n))
    for s in range(n_sims):
        for p in range(p_n):
            scanned = np.arange(a_n) >= res.start_index[s, p]
            take = [
                np.arange(N_SEARCH * scanned[k] + N_FIT * res.drawn[s, p, k]) for k in range(a_n)
            ]
            a = np.concatenate([np.full(t.size, ALPHAS[k]) for k, t in enumerate(take)])
            c = np.concatenate([comp[s, p, k, t] for k, t in enumerate(take)])
            w = np.concatenate([lw[s, p, k, t] for k, t in enumerate(take)])
            out[s, p] = path_importance_sampling(a, c, -w, np.zeros(a.size)).estimate
    return out, res.rollouts


def test_path_is_in_the_evaluation_has_the_law_of_replaying_lpes_draws(bank):
    d = _draws(bank, 3000, seed=1)
    point = ev._path_is(d, N_FIT)
    got = 10.0**point.log10_scores
    assert point.rollouts == pytest.approx(d.adaptive(N_FIT).paper.rollouts.mean())
    want, spent = _replay(bank, 400, seed=2)
    assert point.rollouts == pytest.approx(spent.mean(), rel=0.05)
    for p in range(2):
        se = np.hypot(got[:, p].std() / np.sqrt(got.shape[0]), want[:, p].std() / np.sqrt(400))
        assert abs(got[:, p].mean() - want[:, p].mean()) < 4 * se
        # so do the share of zero estimates and the mean log10 of the others (both see which
        # rows were drawn, where the mean of an unbiased estimator does not)
        z_got, z_want = (got[:, p] == 0).mean(), (want[:, p] == 0).mean()
        z_se = np.sqrt(z_want * (1 - z_want) / 400 + z_got * (1 - z_got) / got.shape[0])
        assert abs(z_got - z_want) <= 4 * z_se + 1e-9
        lg, lw_ = np.log10(got[got[:, p] > 0, p]), np.log10(want[want[:, p] > 0, p])
        l_se = np.hypot(lg.std() / np.sqrt(lg.size), lw_.std() / np.sqrt(lw_.size))
        assert abs(lg.mean() - lw_.mean()) < 4 * l_se


def test_switch_is_path_is_where_its_ess_reaches_10_and_pooled_elsewhere(bank):
    d = _draws(bank, 200, seed=3)
    path = ev._path_is(d, N_FIT).log10_scores
    pooled = ev._lpe_pooled(d, N_FIT).log10_scores
    scores, ess = d.path_is(N_FIT)  # cached: the switch reads path_is's own draws
    got = ev._lpe_path_is_switch(d, N_FIT)
    np.testing.assert_array_equal(scores, path)
    use = ess >= 10
    assert use.any() and (~use).any()  # both branches are exercised on this bank
    np.testing.assert_array_equal(got.log10_scores, np.where(use, path, pooled))
    assert got.rollouts == pytest.approx(d.adaptive(N_FIT).paper.rollouts.mean())
    blend = ev._lpe_path_is_blend(d, N_FIT).log10_scores
    lo, hi = np.minimum(path, pooled), np.maximum(path, pooled)
    inside = np.where(ess > 0, (lo - 1e-12 <= blend) & (blend <= hi + 1e-12), blend == pooled)
    assert inside.all()
    assert [m.name for m in ev.COMBINED_METHODS] == ["lpe_path_is_switch", "lpe_path_is_blend"]
    assert not set(ev.METHODS) & {m.name for m in ev.COMBINED_METHODS}


def test_mixture_is_weights_are_unbiased_on_exact_mixture_draws(bank):
    d = _draws(bank, 2000, seed=4)
    point = ev._mixture_is(d, N_FIT)
    spent = d.adaptive(N_FIT).paper.rollouts
    assert point.rollouts == pytest.approx(np.minimum(spent, M).mean())
    got = 10.0**point.log10_scores
    w = np.exp(bank.mixture_log_weights) * (bank.mixture_compliance == 1)
    for p in range(2):
        se_bank = w[p].std() / np.sqrt(M)
        assert abs(w[p].mean() - bank.true_r1[p]) < 4 * se_bank  # the weights target r(1)
        se = got[:, p].std() / np.sqrt(got.shape[0])
        assert abs(got[:, p].mean() - w[p].mean()) < 4 * se + 0.02 * w[p].mean()
    # Control (power): weights of the wrong proposal (lam read as 0.9) target another value,
    # exactly E_q[p / q' c], many bank standard errors away from r(1).
    per_seq = lambda lam: mixture_log_weights(  # noqa: E731
        token_logp(L_O), token_logp(L_V), np.full(len(SEQS), 3), lam
    )
    log_q = seq_logp(1.0) - per_seq(LAM)
    wrong = np.sum(np.exp(log_q + per_seq(0.9))[RARE])
    se_rare = w[0].std() / np.sqrt(M)
    assert abs(wrong - bank.true_r1[0]) > 10 * se_rare


def test_evaluate_prints_path_is_mixture_is_and_log_errors(bank):
    res = ev.evaluate(
        bank,
        n_fits=(N_FIT,),
        naive_budgets=(100, 1000),
        is_budgets=(),
        grid_rollouts=(),
        n_sims=50,
        subset_size=R,
        n_bootstrap=50,
    )
    assert {"path_is", "mixture_is", "lpe_paper"} <= set(res.curves)
    c = res.curves["path_is"]
    assert c.is_loss_pos[0] is not None and c.is_loss_pos[0] >= 0
    table = res.table_markdown()
    assert "Itakura-Saito" in table and "| path_is | 20 |" in table and "| mixture_is |" in table


def test_bank_roundtrip_and_validation(bank, tmp_path):
    bank.save(tmp_path / "b.npz")
    back = ev.RolloutBank.load(tmp_path / "b.npz")
    # saved as float32, the precision of the log-probs they come from
    np.testing.assert_allclose(back.path_log_weights, bank.path_log_weights, rtol=1e-6, atol=1e-6)
    assert back.mixture_lambda == LAM
    assert back.subset(np.array([1])).mixture_log_weights.shape == (1, M)
    kw = dict(prompt_ids=("a",), alphas=ALPHAS, compliance=np.zeros((1, 4, 3), np.int8))
    with pytest.raises(ValueError, match="compliance's shape"):
        ev.RolloutBank(**kw, path_log_weights=np.zeros((1, 4, 2)))
    with pytest.raises(ValueError, match="given together"):
        ev.RolloutBank(**kw, mixture_log_weights=np.zeros((1, 5)))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ev.RolloutBank(
            **kw,
            mixture_log_weights=np.zeros((1, 5)),
            mixture_compliance=np.zeros((1, 5), np.int8),
            mixture_lambda=0.0,
        )


def test_worst_forecast_reads_the_estimates_tail():
    """Exact estimates give the exact rates' own forecast in every simulation; zeros in the
    top (naive's) make every fit refuse, and it says so."""
    rates = 10.0 ** np.random.default_rng(0).uniform(-8, -3, 40)
    exact = ev._worst_forecast(np.log10(rates)[None], 10)
    same = ev._worst_forecast(np.tile(np.log10(rates), (5, 1)), 10)
    assert same.median == exact.median and same.low == same.high == exact.median
    assert same.refused == 0.0 and exact.median[0] < exact.median[1] < 0
    with np.errstate(divide="ignore"):  # 5 positive estimates, 35 zeros: zeros enter the top 10
        zeros = np.log10(np.where(rates >= np.sort(rates)[-5], rates, 0.0))
        refused = ev._worst_forecast(np.tile(zeros, (3, 1)), 10)
    assert refused.refused == 1.0 and refused.median == (None, None)


def test_evaluation_forecast_and_its_figure(bank, tmp_path):
    from lpe_jax.evaluation import plots

    res = ev.evaluate(
        bank, n_fits=(N_FIT,), naive_budgets=(100,), is_budgets=(), grid_rollouts=(),
        n_sims=20, subset_size=R, n_bootstrap=20,
    )  # fmt: skip
    # two prompts: too few for a tail fit (top = P // 2 < 2), so no forecast, and no figure
    assert all(c.forecast == () for c in res.curves.values())
    with pytest.raises(ValueError, match="needs"):
        plots.plot_forecast(dataclasses.replace(res, exact_worst_log10=None), str(tmp_path / "f"))
    big = ev.evaluate(
        bank.subset(np.array([0, 1, 0, 1, 0, 1])), n_fits=(N_FIT,), naive_budgets=(100,),
        is_budgets=(), grid_rollouts=(), n_sims=20, subset_size=R, n_bootstrap=20,
    )  # fmt: skip
    f = big.curves["mixture_is"].forecast[0]
    assert f.top == 3 and f.median[0] is not None and big.exact_worst_log10 is not None
    assert plots.plot_forecast(big, str(tmp_path / "fc"))[0].endswith("fc.png")


def test_averaged_line_in_the_evaluation_is_the_direct_fit(bank):
    """lpe_pooled_averaged reuses the cached log-rate and log-odds fits: the same numbers as
    fitting prior="averaged" on LPE's draws directly."""
    d = _draws(bank, 50, seed=5)
    a = d.adaptive(N_FIT)
    direct = ev.lpe_pooled_from_counts(
        *a.counts, bank.alphas, N_FIT, n_search=N_SEARCH, paper=a.paper, prior="averaged"
    )
    got = d.pooled(N_FIT, "averaged")
    for f in ("log10_estimate", "log10_lower", "log10_upper", "slope"):
        np.testing.assert_allclose(getattr(got, f), getattr(direct, f), rtol=1e-12, err_msg=f)
