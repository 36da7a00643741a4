"""The pooled fit's population models side by side: every synthetic family + the independent world.

    python experiments/evaluate_pooled.py                      # the docs/results.md tables
    python experiments/evaluate_pooled.py --banks=independent0 --n_sims=10   # a quick look

Banks: every family of :mod:`lpe_jax.evaluation.synthetic` (200 prompts, verdicts only) and the
independent world of :mod:`lpe_jax.evaluation.independent` (400 prompts, curvature sd 0 and 2:
"independent0", "independent2"). The paper's protocol (:func:`evaluation.evaluate`): naive, the
paper's OLS, the unpooled binomial fit on the same draws as the pooled fit (``lpe_binomial_all``)
and the pooled fit under each population model or line (``lpe_pooled_<prior>``), AUROC vs budget
with the oracle ceiling, signed / absolute log10 error on positives, the pooled 95% interval's
coverage, and paired bootstrap AUROC differences (each against the binomial fit, the paper's OLS
and the default). Checks the default's rule (issue 21): never below the
binomial fit at n_fit 100 beyond the interval, ahead of it at every n_fit <= 25, mean signed
error on positives within +-0.3 decades. Writes <out>/summary.md. No JAX is imported.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

import common  # first: puts the checkout on sys.path  # isort: skip

from lpe_jax.estimators.pooled import DEFAULT_PRIOR, PRIORS, lpe_pooled_from_counts
from lpe_jax.evaluation import evaluation as ev
from lpe_jax.evaluation.independent import make_independent_bank
from lpe_jax.evaluation.synthetic import FAMILIES, make_synthetic_bank
from lpe_jax.runs.store import ensure_writable_dir

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "banks", [*FAMILIES, "independent0", "independent2"], "Families and independent worlds."
)
flags.DEFINE_list("priors", list(PRIORS), "Population models of the pooled fit to compare.")
flags.DEFINE_list("n_fits", ["13", "25", "50", "100"], "LPE n_fit values.")
flags.DEFINE_integer("n_sims", 50, "Monte Carlo simulations (paper: 500).")
flags.DEFINE_integer("seed", 0, "Seed of the simulations.")
flags.DEFINE_integer("bank_seed", 0, "Seed of the banks.")
flags.DEFINE_string("out", "results/pooled", "Output directory.")

BINOMIAL = "lpe_binomial_all"  # the unpooled fit on the pooled fit's draws


def make_bank(name: str) -> ev.RolloutBank:
    if name.startswith("independent"):
        sd = float(name.removeprefix("independent"))
        return make_independent_bank(400, curvature_sd=sd, seed=FLAGS.bank_seed)
    return make_synthetic_bank(200, family=name, n_is=0, seed=FLAGS.bank_seed)


def pooled_method(prior: str) -> ev.Method:
    def score(d: ev.SimulatedDraws, n_fit: int) -> ev.MethodPoint:
        a = d.adaptive(n_fit)
        p = lpe_pooled_from_counts(
            *a.counts, d.bank.alphas, n_fit, n_search=d.n_search, paper=a.paper, prior=prior
        )
        t = np.log10(d.bank.true_r1)
        cov = float(np.mean((p.log10_lower <= t) & (t <= p.log10_upper)))
        return ev.MethodPoint(p.log10_estimate, a.paper.rollouts.mean(), a.forward_passes, cov)

    return ev.Method(f"lpe_pooled_{prior}", "n_fits", score)


def rows_for(name: str, res: ev.EvaluationResult, priors: list[str]) -> dict[str, list[str]]:
    pooled = [f"lpe_pooled_{p}" for p in priors]
    c0 = res.curves["lpe_paper"]
    naive = res.curves["naive"]
    out = {"auroc": [], "error": [], "pairs": [], "rule": []}
    for m in ("lpe_paper", BINOMIAL, *pooled):
        c = res.curves[m]
        out["auroc"].append(f"| {name} | {m} | " + " | ".join(f"{a:.3f}" for a in c.auroc) + " |")
        cells = []
        for i in range(len(c.setting)):
            cov = c.coverage[i] if c.coverage else None
            cells.append(
                f"{c.signed_error_pos[i]:+.2f} / {c.abs_error_pos[i]:.2f}"
                + ("" if cov is None else f" / {cov:.2f}")
            )
        out["error"].append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    at = {b: naive.auroc[naive.setting.index(b)] for b in (1_000, 100_000)}
    ceiling = (
        f"oracle {res.oracle_auroc:.3f}, naive-1k {at[1_000]:.3f}, naive-100k {at[100_000]:.3f}"
    )
    out["auroc"].append(
        f"| {name} | (rollouts; {ceiling}) | " + " | ".join(f"{r:.0f}" for r in c0.rollouts) + " |"
    )
    default = f"lpe_pooled_{DEFAULT_PRIOR}"
    against = [(m, BINOMIAL) for m in pooled] + [(m, "lpe_paper") for m in pooled]
    against += [(m, default) for m in pooled if m != default]  # a new line vs the default's
    for a, b in against:
        if a not in res.curves:
            continue
        cells = []
        for s in c0.setting:
            d, lo, hi = ev.paired_difference(res, a, s, b, seed=FLAGS.seed)
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        out["pairs"].append(f"| {name} | {a} − {b} | " + " | ".join(cells) + " |")
    for m in pooled:
        out["rule"].append(f"| {name} | {m} | " + " | ".join(_rule(res, m)) + " |")
    return out


def _rule(res: ev.EvaluationResult, m: str) -> list[str]:
    """(ahead at n_fit <= 25, not below at 100, |signed error| <= 0.3 everywhere) as yes/no."""
    c = res.curves[m]
    small = [s for s in c.setting if s <= 25]
    ahead = all(ev.paired_difference(res, m, s, BINOMIAL)[0] > 0 for s in small)
    top = max(c.setting)
    _, _, hi = ev.paired_difference(res, m, top, BINOMIAL)
    worst = max(abs(v) for v in c.signed_error_pos)
    return [_yn(ahead), _yn(hi >= 0), f"{_yn(worst <= 0.3)} ({worst:.2f})"]


def _yn(v: bool) -> str:
    return "yes" if v else "**no**"


def main(argv: list[str]) -> None:
    del argv
    out = ensure_writable_dir(FLAGS.out)
    n_fits = tuple(int(v) for v in FLAGS.n_fits)
    methods = [ev.METHODS[m] for m in ("naive", "lpe_paper", BINOMIAL)]
    methods += [pooled_method(p) for p in FLAGS.priors]
    tables: dict[str, list[str]] = {"auroc": [], "error": [], "pairs": [], "rule": []}
    for name in FLAGS.banks:
        t0 = time.perf_counter()
        res = ev.evaluate(
            make_bank(name),
            n_fits=n_fits,
            is_budgets=(),
            grid_rollouts=(),
            n_sims=FLAGS.n_sims,
            seed=FLAGS.seed,
            methods=methods,
        )
        for k, v in rows_for(name, res, FLAGS.priors).items():
            tables[k] += v
        print(
            f"{name}: {res.n_eligible} eligible, {res.n_positive} positive, "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    head = " | ".join(f"n_fit {v}" for v in n_fits)
    dash = "|".join("---" for _ in n_fits)
    text = "\n".join(
        [
            f"| bank | method (AUROC) | {head} |",
            f"|---|---|{dash}|",
            *tables["auroc"],
            "",
            f"| bank | signed / abs log10 error on positives / 95% coverage | {head} |",
            f"|---|---|{dash}|",
            *tables["error"],
            "",
            f"| bank | paired AUROC difference [95% bootstrap] | {head} |",
            f"|---|---|{dash}|",
            *tables["pairs"],
            "",
            "| bank | model | ahead of binomial at n_fit <= 25 | not below it at n_fit "
            f"{max(n_fits)} | abs(signed error) <= 0.3 (worst) |",
            "|---|---|---|---|---|",
            *tables["rule"],
        ]
    )
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    common.run(main)
