"""Evaluation: AUROC, bank schema, Monte Carlo protocol, figures."""

import dataclasses

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lpe_jax.estimators.lpe import lpe_paper
from lpe_jax.evaluation import evaluation as ev
from lpe_jax.evaluation.synthetic import make_synthetic_bank


@pytest.fixture(scope="module")
def bank():
    return make_synthetic_bank(80, rollouts=200, n_is=200, seed=5)


def test_auroc_matches_sklearn_with_midranks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(50) < 0.4
        s = rng.normal(size=50) + y
        assert ev.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        t = rng.integers(0, 4, 50).astype(float)  # many ties
        assert ev.auroc(t, y) == pytest.approx(roc_auc_score(y, t), abs=1e-12)
    assert ev.auroc([1.0, 1.0, 1.0], [True, False, False]) == 0.5
    assert ev.auroc([-np.inf, 0.0], [False, True]) == 1.0
    s = rng.normal(size=(7, 30))
    y = np.arange(30) % 3 == 0
    batch = ev.auroc_batch(s, y)
    np.testing.assert_allclose(batch, [roc_auc_score(y, row) for row in s])
    assert ev._win_matrix(s, y).mean() == pytest.approx(batch.mean())
    with pytest.raises(ValueError, match="both classes"):
        ev.auroc([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        ev.auroc([np.nan, 0.2], [True, False])


def test_matching_budget_interpolates_on_log_budget():
    b, a = np.array([100, 1000, 10000]), np.array([0.5, 0.7, 0.9])
    assert ev.matching_budget(0.8, b, a) == pytest.approx(np.sqrt(1000 * 10000))
    assert ev.matching_budget(0.95, b, a) is None and ev.matching_budget(0.4, b, a) is None
    assert ev.matching_budget(0.7, b, np.array([0.5, 0.7, 0.7])) == pytest.approx(1000)


def test_bank_validation_and_roundtrip(bank, tmp_path):
    c = bank.compliance[:2]
    with pytest.raises(ValueError, match="compliance must be"):
        ev.RolloutBank(("a", "b"), bank.alphas, c[:, :5])
    with pytest.raises(ValueError, match="strictly increasing"):
        ev.RolloutBank(("a", "b"), bank.alphas[::-1], c)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        ev.RolloutBank(("a",), [0.5, 1.0], np.zeros((1, 2, 3), np.int8))
    with pytest.raises(ValueError, match="n < k"):
        ev.RolloutBank(("a", "b"), bank.alphas, c, truth_k=[5, 5], truth_n=[10, 4])
    with pytest.raises(ValueError, match="together"):
        ev.RolloutBank(("a", "b"), bank.alphas, c, truth_k=[5, 5])
    with pytest.raises(ValueError, match="int in"):
        ev.RolloutBank(("a", "b"), bank.alphas, c * 2)
    with pytest.raises(ValueError, match="is_compliance must be"):
        ev.RolloutBank(
            ("a", "b"),
            bank.alphas,
            c,
            is_log_weights=np.zeros((2, 3)),
            is_compliance=np.zeros((2, 4), np.int8),
        )
    no_truth = ev.RolloutBank(("a", "b"), bank.alphas, c)
    with pytest.raises(ValueError, match="ground truth"):
        ev.evaluate(no_truth, n_sims=2)
    with pytest.raises(FileNotFoundError):
        ev.RolloutBank.load(tmp_path / "missing.npz")
    path = tmp_path / "bank.npz"
    bank.save(path)
    back = ev.RolloutBank.load(path)
    assert back.prompt_ids == bank.prompt_ids
    np.testing.assert_array_equal(back.compliance, bank.compliance)
    np.testing.assert_array_equal(back.is_log_weights, bank.is_log_weights)
    np.testing.assert_array_equal(back.truth_k, bank.truth_k)


def test_bank_draw_replays_without_replacement(bank):
    d = ev.BankDraw(bank, 0, np.random.default_rng(0))
    first = d(0.5, 150)
    second = d(0.5, 50)
    a = int(np.flatnonzero(np.isclose(bank.alphas, 0.5))[0])
    assert first.k + second.k == (bank.compliance[0, a] == 1).sum()
    assert first.generated_tokens + second.generated_tokens == bank.tokens[0, a].sum()
    with pytest.raises(ValueError, match="exhausted"):
        d(0.5, 1)
    with pytest.raises(ValueError, match="not on the bank's grid"):
        d(0.33, 1)
    res = lpe_paper(ev.BankDraw(bank, 1, np.random.default_rng(1)), n_fit=13)
    assert res.forward_passes is not None and res.rollouts >= 13 + 10


def test_nested_counts_are_nested_and_unbiased(bank):
    rng = np.random.default_rng(0)
    comp = bank.compliance[:5].copy()
    comp[:, :, :20] = -1
    out = ev._nested_counts(comp, [10, 50, 200], 400, rng)
    for (c1, j1), (c2, j2) in zip([out[10], out[50]], [out[50], out[200]], strict=True):
        assert np.all(c1 <= c2) and np.all(j1 <= j2) and np.all(c1 <= j1)
    np.testing.assert_array_equal(out[200][0][0], (comp == 1).sum(-1))
    expect = 50 * (comp == 1).sum(-1) / 200
    assert np.abs(out[50][0].mean(0) - expect).max() < 1.0


def test_lpe_beats_naive_at_small_budget(bank):
    res = ev.evaluate(
        bank,
        n_fits=(13,),
        naive_budgets=(100, 300, 1000, 10_000),
        is_budgets=(100,),
        grid_rollouts=(10,),
        n_sims=40,
        n_bootstrap=200,
    )
    lpe = res.curves["lpe_paper"]
    naive = res.curves["naive"]
    assert lpe.rollouts[0] < 300
    assert lpe.auroc[0] > naive.auroc[1] + 0.05
    assert res.curves["lpe_binomial"].rollouts == lpe.rollouts
    for c in res.curves.values():
        vals = c.auroc + c.auroc_lo + c.auroc_hi + c.rollouts
        assert np.all(np.isfinite(vals)) and all(0 <= v <= 1 for v in c.auroc)
        assert all(lo <= a <= hi for lo, a, hi in zip(c.auroc_lo, c.auroc, c.auroc_hi, strict=True))
    assert lpe.ratio_rollouts[0] is not None and lpe.ratio_rollouts[0] > 1
    assert "lpe_binomial_grid" in res.table_markdown()


def test_evaluate_handles_unknowns_and_rejects_single_class(bank):
    b = make_synthetic_bank(30, rollouts=60, n_is=30, unknown_rate=0.2, seed=7)
    res = ev.evaluate(
        b,
        n_fits=(13,),
        naive_budgets=(100, 1000),
        is_budgets=(30,),
        grid_rollouts=(5,),
        n_sims=10,
        n_bootstrap=50,
    )
    assert all(np.isfinite(c.auroc).all() for c in res.curves.values())
    flat = ev.RolloutBank(
        b.prompt_ids,
        b.alphas,
        b.compliance,
        truth_k=np.zeros(30, int),
        truth_n=np.full(30, 100_000),
        screen_k=np.zeros(30, int),
        screen_n=np.full(30, 100),
    )
    with pytest.raises(ValueError, match="positive and negative"):
        ev.evaluate(flat, n_sims=2)
    with pytest.raises(ValueError, match="n_fits"):
        ev.evaluate(b, n_fits=(100,), n_sims=2)
    with pytest.raises(ValueError, match="increasing"):
        ev.evaluate(b, n_fits=(13,), naive_budgets=(1000, 100), grid_rollouts=(5,), n_sims=2)


def test_figures_are_written(bank, tmp_path):
    from lpe_jax.evaluation import plots

    res = ev.evaluate(
        bank,
        n_fits=(13, 30),
        naive_budgets=(100, 1000, 10_000),
        is_budgets=(50, 100),
        grid_rollouts=(5,),
        n_sims=5,
        n_bootstrap=20,
    )
    paths = plots.plot_auroc(res, str(tmp_path / "fig1"))
    paths += plots.plot_extrapolation(bank, 3, str(tmp_path / "fig2"), n_fit=30)
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)
    with pytest.raises(ValueError, match="no curve"):
        plots.plot_auroc(res, str(tmp_path / "x"), methods=["nope"])


@pytest.mark.parametrize("family", ["loglinear", "low_variant"])
def test_small_family_our_fits_never_fall_below_the_paper(family):
    """CI's small-family check (50 prompts, 20 simulations): the claims docs/results.md makes."""
    b = make_synthetic_bank(50, rollouts=200, n_is=0, family=family, seed=0)
    r = ev.evaluate(
        b,
        n_fits=(13, 50),
        naive_budgets=(1_000, 100_000),
        is_budgets=(),
        grid_rollouts=(),
        n_sims=20,
        n_bootstrap=200,
        seed=0,
    )
    assert 0.5 < r.oracle_auroc <= 1.0
    for method in ("lpe_binomial", "lpe_binomial_all", "lpe_pooled"):
        for nf in (13, 50):
            d, lo, hi = ev.paired_difference(r, method, nf, "lpe_paper", n_bootstrap=500)
            assert lo <= d <= hi and hi >= 0.0, (method, nf, d, lo, hi)
    pooled = r.curves["lpe_pooled"]
    assert min(pooled.coverage) >= 0.85  # 95% Laplace intervals, straight-line paths
    if family == "loglinear":
        assert all(abs(s) <= 0.3 for s in pooled.signed_error_pos)
    with pytest.raises(ValueError, match="no curve point"):
        ev.paired_difference(r, "lpe_pooled", 7, "lpe_paper")


def test_mostly_unknown_draws_are_no_data_never_low_scores():
    """A prompt whose bank verdicts are all unknown: every LPE estimate of it is NaN (no_data),
    counted in frac_no_data, and ranks as a tie, not as the least risky prompt."""
    b = make_synthetic_bank(30, rollouts=60, n_is=30, unknown_rate=0.1, seed=7)
    eligible, positive = ev.eligible_and_labels(b, ev.LabelRule())
    dead = int(np.flatnonzero(eligible & positive)[0])
    comp = b.compliance.copy()
    comp[dead] = -1
    is_c = b.is_compliance.copy()
    is_c[dead] = -1
    b = dataclasses.replace(b, compliance=comp, is_compliance=is_c)
    res = ev.evaluate(
        b, n_fits=(13,), naive_budgets=(100,), is_budgets=(30,), grid_rollouts=(), n_sims=10
    )
    n_eligible = res.n_eligible
    for m in ("lpe_paper", "lpe_binomial", "lpe_pooled", "is", "snis"):
        assert res.curves[m].frac_no_data[0] >= 1 / n_eligible, m
        assert np.isfinite(res.curves[m].auroc).all(), m
    assert res.curves["naive"].frac_no_data == (0.0,)
    # A NaN score ties with everything: half a win against each negative.
    scores = np.array([[np.nan, 0.0, -1.0]])
    win = ev._win_matrix(scores, np.array([True, False, False]))
    np.testing.assert_array_equal(win, [[0.5, 0.5]])


def test_a_registered_method_is_scored_and_leaves_the_built_ins_unchanged(bank):
    """A user's estimator runs through evaluate() without editing it; appending one changes no
    built-in curve; names are unique."""

    def top_rate(draws, r):
        k, n = (x[..., -1] for x in draws.counts()[r])
        with np.errstate(divide="ignore", invalid="ignore"):
            return ev.MethodPoint(np.log10(k / np.maximum(n, 1)), rollouts=r)

    mine = ev.Method("top_rate", "grid_rollouts", top_rate)
    kw = dict(n_fits=(13,), naive_budgets=(100,), is_budgets=(50,), grid_rollouts=(5, 20))
    kw.update(n_sims=3, n_bootstrap=20, seed=1)
    base = ev.evaluate(bank, **kw)
    # every built-in whose data the bank has (no sequences: no path_is, mixture_is), in order
    assert list(base.curves) == [n for n, m in ev.METHODS.items() if m.applies(bank)]
    assert "path_is" in ev.METHODS and "path_is" not in base.curves
    ev.register_method(mine)
    try:
        with_mine = ev.evaluate(bank, **kw)
        with pytest.raises(ValueError, match="is registered"):
            ev.register_method(mine)
    finally:
        del ev.METHODS["top_rate"]
    assert list(with_mine.curves) == [*base.curves, "top_rate"]
    for name, curve in base.curves.items():
        assert with_mine.curves[name] == curve
    c = with_mine.curves["top_rate"]
    assert c.setting == (5, 20) and c.rollouts == (5.0, 20.0) and c.forward_passes is None
    assert 0.0 <= min(c.auroc) and max(c.auroc) <= 1.0
    only = ev.evaluate(bank, **kw, methods=[ev.METHODS["naive"], mine])
    assert list(only.curves) == ["naive", "top_rate"]
    fixed = ev.Method("fixed", (3, 7), lambda d, r: top_rate(d, 20))
    with pytest.raises(ValueError, match="'fixed'"):
        ev.evaluate(bank, **kw, methods=[dataclasses.replace(fixed, settings=(7, 3))])
    with pytest.raises(ValueError, match="unique"):
        ev.evaluate(bank, **kw, methods=[mine, mine])
    with pytest.raises(ValueError, match="one of"):
        ev.evaluate(bank, **kw, methods=[dataclasses.replace(mine, settings="budgets")])
    assert ev.evaluate(bank, **kw, methods=[fixed]).curves["fixed"].setting == (3, 7)
