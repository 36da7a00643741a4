"""AUROC against rollout budget for naive, importance sampling and LPE (the paper's Figure 1).

    python experiments/evaluate.py --run=runs/toy_bank          # a judged sample.py run
    python experiments/evaluate.py --bank=bank.npz              # a saved RolloutBank
    python experiments/evaluate.py --synthetic=200              # a synthetic bank, known rates

Prints the AUROC table (with 95% bootstrap intervals over prompts, budgets in rollouts and in
forward passes, and the naive-matching budget ratio), writes <out>/evaluation.json, the table as
Markdown, and Figure 1 as PNG and PDF. No JAX is imported.
"""

from __future__ import annotations

import dataclasses
import time

from absl import flags

import common  # first: puts the checkout on sys.path  # isort: skip

from lpe_jax import plots, synthetic, toy  # noqa: E402
from lpe_jax.bank import bank_from_store, read_truth_file  # noqa: E402
from lpe_jax.evaluation import LabelRule, RolloutBank, evaluate  # noqa: E402
from lpe_jax.store import RolloutStore, atomic_write_json, ensure_writable_dir  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run", None, "A judged run directory (sample.py then judge.py).")
flags.DEFINE_string("bank", None, "A RolloutBank .npz.")
flags.DEFINE_integer("synthetic", None, "Evaluate a synthetic bank with this many prompts.")
flags.DEFINE_string(
    "truth",
    None,
    "JSON {prompt_id: [k, n]} (counts from a run of the original) or {prompt_id: rate} (exact "
    "rates); default for --run: the toy organism's exact rates.",
)
flags.DEFINE_integer("truth_n", 100_000, "Ground-truth rollouts per prompt (paper: 100,000).")
flags.DEFINE_integer("screen_n", 100, "Screening rollouts at alpha = 1 (paper: 100).")
flags.DEFINE_integer("n_sims", 500, "Monte Carlo simulations (paper: 500).")
flags.DEFINE_list("n_fits", ["13", "20", "30", "50", "100"], "LPE fit-phase rollouts per alpha.")
flags.DEFINE_integer("seed", 0, "Seed of the simulations (and of the synthetic bank).")
flags.DEFINE_string("out", "results/evaluation", "Output directory.")


def load_bank() -> RolloutBank:
    chosen = [f for f in ("run", "bank", "synthetic") if FLAGS[f].value is not None]
    if len(chosen) != 1:
        raise ValueError(f"pass exactly one of --run, --bank, --synthetic (got {chosen or 'none'})")
    if FLAGS.bank:
        return RolloutBank.load(FLAGS.bank)
    if FLAGS.synthetic is not None:
        return synthetic.make_synthetic_bank(n_prompts=FLAGS.synthetic, seed=FLAGS.seed)
    store = RolloutStore.load(FLAGS.run)
    if FLAGS.truth:
        rates, counts = read_truth_file(FLAGS.truth)
    else:
        rates, counts = toy.toy_truth_for(store.manifest["original"]), None
    return bank_from_store(
        store,
        truth_rates=rates,
        truth_counts=counts,
        truth_n=FLAGS.truth_n,
        screen_n=FLAGS.screen_n,
        seed=FLAGS.seed,
    )


def main(argv: list[str]) -> None:
    del argv
    t0 = time.time()
    out = ensure_writable_dir(FLAGS.out)
    bank = load_bank()
    n_r = bank.compliance.shape[-1]
    n_fits = [int(n) for n in FLAGS.n_fits if int(n) + 10 <= n_r]
    if not n_fits:
        raise ValueError(f"the bank has {n_r} rollouts per alpha; --n_fits need n_fit + 10 <= that")
    result = evaluate(
        bank,
        n_fits=n_fits,
        is_budgets=[b for b in (50, 100, 200, 500, 1_000) if b <= bank.is_log_weights.shape[1]]
        if bank.is_log_weights is not None
        else (),
        grid_rollouts=[r for r in (5, 10, 20, 50) if r <= n_r],
        n_sims=FLAGS.n_sims,
        labels=LabelRule(),
        seed=FLAGS.seed,
    )
    table = result.table_markdown()
    (out / "evaluation.md").write_text(table + "\n")
    atomic_write_json(
        out / "evaluation.json",
        {
            "curves": {k: dataclasses.asdict(c) for k, c in result.curves.items()},
            "n_eligible": result.n_eligible,
            "n_positive": result.n_positive,
            "n_negative": result.n_negative,
            "n_sims": result.n_sims,
            "seconds": result.seconds,
        },
    )
    files = plots.plot_auroc(result, str(out / "fig1_auroc"))
    print(table)
    print(
        f"\n{result.n_eligible} eligible prompts ({result.n_positive} positive, "
        f"{result.n_negative} negative), {result.n_sims} simulations, {result.seconds:.1f}s"
    )
    for m in result.curves:
        if m != "naive":
            r = result.best_ratio(m)
            print(f"{m}: best naive-matching budget ratio {r:.1f}x" if r else f"{m}: no match")
    print(f"figure: {files[0]}; total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    common.run(main)
