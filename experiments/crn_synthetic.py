"""What common random numbers across alpha would do to LPE, on synthetic paths (issue 10, item 5).

    python experiments/crn_synthetic.py --family=loglinear --n_sims=20

Each prompt's rollout j draws one uniform U_j; with common random numbers (CRN) rollout j
complies at alpha iff U_j < r(alpha) at every alpha (the strongest coupling: counts nest across
alpha), without them each alpha draws fresh uniforms. Both runs use the paper's search and
advance; the table gives, per fit, the AUROC against labels from Binomial(100,000, r(1)), the
spread of log10 r(1) across simulations (root mean per-prompt variance) and the mean error. The
sampler side (the same key for rollout j at every alpha) is not built; this only says what it
would buy. No JAX is imported.
"""

from __future__ import annotations

import numpy as np
from absl import flags

import common  # first: puts the checkout on sys.path  # isort: skip

from lpe_jax.estimators.binomial import lpe_binomial_from_counts  # noqa: E402
from lpe_jax.estimators.lpe import lpe_paper_from_counts, paper_alpha_grid  # noqa: E402
from lpe_jax.estimators.pooled import lpe_pooled_from_counts  # noqa: E402
from lpe_jax.evaluation.evaluation import auroc  # noqa: E402
from lpe_jax.evaluation.synthetic import FAMILIES, synthetic_rates  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("family", "loglinear", list(FAMILIES), "Synthetic family.")
flags.DEFINE_integer("n_prompts", 200, "Prompts.")
flags.DEFINE_integer("n_sims", 20, "Simulations per setting.")
flags.DEFINE_list("n_fits", ["13", "50", "100"], "LPE n_fit values.")
flags.DEFINE_integer("seed", 0, "Seed.")


def main(argv: list[str]) -> None:
    del argv
    a = paper_alpha_grid()
    rng = np.random.default_rng(FLAGS.seed)
    r, r1, _ = synthetic_rates(FLAGS.n_prompts, a, family=FLAGS.family, rng=rng)
    y = rng.binomial(100_000, r1) > 0
    truth = np.log10(r1)
    print("| n_fit | draws | rollouts | fit | AUROC | spread of log10 r(1) | mean error |")
    print("|---|---|---|---|---|---|---|")
    for nf in (int(v) for v in FLAGS.n_fits):
        for crn in (False, True):
            rng = np.random.default_rng(FLAGS.seed + 1)
            shape = (FLAGS.n_sims, FLAGS.n_prompts, 1 if crn else a.size, 10 + nf)
            c = rng.random(shape) < r[None, :, :, None]
            sk, fk = c[..., :10].sum(-1), c[..., 10:].sum(-1)
            sn, fn = np.full_like(sk, 10), np.full_like(fk, nf)
            res = lpe_paper_from_counts(sk, sn, fk, fn, a, nf)
            fits = {
                "paper": res.log10_estimate,
                "binomial_all": lpe_binomial_from_counts(
                    sk, sn, fk, fn, a, nf, paper=res, draws="all"
                ),
                "pooled": lpe_pooled_from_counts(sk, sn, fk, fn, a, nf, paper=res).log10_estimate,
            }
            for name, est in fits.items():
                err = est - truth
                auc = np.mean([auroc(row, y) for row in est])
                spread = np.sqrt(np.mean(np.var(err, axis=0)))
                print(
                    f"| {nf} | {'CRN' if crn else 'independent'} | {res.rollouts.mean():.0f} | "
                    f"{name} | {auc:.3f} | {spread:.2f} | {err.mean():+.2f} |"
                )


if __name__ == "__main__":
    common.run(main)
