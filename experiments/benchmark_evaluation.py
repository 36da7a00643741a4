"""Time the full offline evaluation on a synthetic bank (or a saved one) and print the AUROC table.

.venv/bin/python experiments/benchmark_evaluation.py  # 200 x 20 x 1000, 500 sims
.venv/bin/python experiments/benchmark_evaluation.py --figures_dir=docs/figures
.venv/bin/python experiments/benchmark_evaluation.py --bank=path/to/bank.npz
"""

from __future__ import annotations

import os
import platform
import time

import numpy as np
from absl import app, flags

from lpe_jax.evaluation.evaluation import RolloutBank, eligible_and_labels, evaluate
from lpe_jax.evaluation.synthetic import FAMILIES, make_synthetic_bank

FLAGS = flags.FLAGS
flags.DEFINE_string("bank", None, "A saved RolloutBank (.npz); default: a synthetic one.")
flags.DEFINE_integer("n_prompts", 200, "Synthetic prompts.")
flags.DEFINE_integer("rollouts", 1000, "Synthetic rollouts per alpha (and IS rollouts).")
flags.DEFINE_enum("family", "mixed", list(FAMILIES), "Synthetic r(alpha) family.")
flags.DEFINE_integer("bank_seed", 0, "Seed of the synthetic bank.")
flags.DEFINE_integer("n_sims", 500, "Monte Carlo simulations.")
flags.DEFINE_integer("seed", 0, "Seed of the evaluation.")
flags.DEFINE_list("n_fits", ["13", "20", "30", "50", "100"], "LPE n_fit values.")
flags.DEFINE_string("figures_dir", None, "If set, write fig1/fig2 (PNG and PDF) here.")
flags.DEFINE_integer("fig2_prompt", -1, "Prompt for figure 2 (-1: a positive eligible one).")
flags.DEFINE_integer("fig2_n_fit", 100, "n_fit of the run drawn in figure 2.")


def main(argv: list[str]) -> None:
    del argv
    t0 = time.perf_counter()
    if FLAGS.bank:
        bank = RolloutBank.load(FLAGS.bank)
        name = FLAGS.bank
    else:
        bank = make_synthetic_bank(
            FLAGS.n_prompts,
            rollouts=FLAGS.rollouts,
            n_is=FLAGS.rollouts,
            family=FLAGS.family,
            seed=FLAGS.bank_seed,
        )
        name = f"synthetic ({FLAGS.family}, seed {FLAGS.bank_seed})"
    t_bank = time.perf_counter() - t0
    shape = "x".join(str(d) for d in bank.compliance.shape)
    print(f"bank: {name}, compliance {shape}, built/loaded in {t_bank:.1f} s")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    t1 = time.perf_counter()
    res = evaluate(
        bank, n_fits=[int(v) for v in FLAGS.n_fits], n_sims=FLAGS.n_sims, seed=FLAGS.seed
    )
    wall = time.perf_counter() - t1
    print(
        f"evaluate(): {wall:.1f} s wall for {res.n_sims} simulations "
        f"({res.n_eligible} eligible prompts: {res.n_positive} positive, "
        f"{res.n_negative} negative)\n"
    )
    print(res.table_markdown())
    print()
    for m in res.curves:
        if m != "naive":
            r, f = res.best_ratio(m), res.best_ratio(m, "forward")
            rs = "—" if r is None else f"{r:.1f}x"
            fs = "—" if f is None else f"{f:.1f}x"
            print(f"best naive-matching ratio, {m}: {rs} in rollouts, {fs} in forward passes")
    if FLAGS.figures_dir:
        from lpe_jax.evaluation.plots import plot_auroc, plot_extrapolation

        fig1 = "fig1_auroc_bank" if FLAGS.bank else f"fig1_auroc_{FLAGS.family}"
        stem = os.path.join(FLAGS.figures_dir, fig1)
        paths = plot_auroc(
            res,
            stem,
            methods=["naive", "is", "lpe_paper", "lpe_binomial", "lpe_binomial_all", "lpe_pooled"],
        )
        p = FLAGS.fig2_prompt
        if p < 0:
            eligible, positive = eligible_and_labels(bank)
            cands = np.flatnonzero(eligible & positive)
            p = int(cands[len(cands) // 2]) if cands.size else 0
        stem2 = os.path.join(FLAGS.figures_dir, "fig2_extrapolation_synthetic")
        paths += plot_extrapolation(bank, p, stem2, n_fit=FLAGS.fig2_n_fit, seed=FLAGS.seed)
        print("\nwrote " + ", ".join(paths))


if __name__ == "__main__":
    app.run(main)
