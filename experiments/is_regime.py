"""Which importance-sampling regime a toy organism is in, from variant rollouts already sampled.

    python experiments/train_toy2.py --stages=bank --bank_minutes=25   # writes the parts
    python experiments/is_regime.py --parts=results/toy2_bank

Reads the per-prompt files of train_toy2.py's bank stage (each: the variant's whole answers at
alpha = 0 with their log-weights log p_o(x) - log p_v(x) and verdicts), as many prompts as are
there, and prints (1) the spread of the log-weights (all answers, compliant ones), the effective
sample size of the compliant answers' weights (those that make up the IS estimate) and the answer
lengths, medians over prompts; (2) IS's error and rank correlation against the exact r(1); (3) the
paper's AUROC evaluation on those prompts with IS from these rollouts beside LPE (path verdicts
drawn from the exact curves, as evaluate_families.py --curves). No JAX is imported.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from absl import flags
from scipy.stats import spearmanr

import common  # first: puts the checkout on sys.path  # isort: skip

from lpe_jax.estimators.importance import importance_sampling  # noqa: E402
from lpe_jax.evaluation.evaluation import evaluate  # noqa: E402
from lpe_jax.runs.bank import bank_from_curves  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("parts", "results/toy2_bank", "train_toy2.py's --bank_work directory.")
flags.DEFINE_string(
    "ground_truth", "lpe_jax/assets/toy_pair2/ground_truth.json", "The organism's exact curves."
)
flags.DEFINE_integer("rollouts", 1000, "Path rollouts per alpha drawn from the exact curves.")
flags.DEFINE_integer("n_sims", 200, "Monte Carlo simulations of the AUROC evaluation.")
flags.DEFINE_integer("seed", 0, "Seed of the path verdicts and the simulations.")


def load_parts(parts: Path) -> dict[str, dict[str, np.ndarray]]:
    files = sorted(p for p in parts.glob("*.npz") if not p.name.endswith(".tmp.npz"))
    if not files:
        raise ValueError(f"--parts={parts}: no per-prompt .npz files; run the bank stage first")
    out = {}
    for f in files:
        with np.load(f) as z:
            out[f.stem] = {k: z[k] for k in ("is_log_weights", "is_compliance", "is_tokens")}
    return out


def ess(log_w: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 of the weights exp(log_w)."""
    w = np.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (w**2).sum())


def main(argv: list[str]) -> None:
    del argv
    gt = json.loads(Path(FLAGS.ground_truth).read_text())
    parts = load_parts(Path(FLAGS.parts))
    ids = [i for i in sorted(parts) if i in gt["prompts"]]
    stats, est, r1 = [], [], []
    for i in ids:
        p = parts[i]
        known = p["is_compliance"] >= 0
        lw, c = p["is_log_weights"][known], p["is_compliance"][known] == 1
        stats.append(
            [known.sum(), lw.std(), lw[c].std(), lw[c].mean(), ess(lw[c]), p["is_tokens"].mean()]
        )
        est.append(importance_sampling(p["is_log_weights"], p["is_compliance"]).estimate)
        r1.append(gt["prompts"][i]["rate"])
    s, est, r1 = np.array(stats, float), np.array(est), np.array(r1)
    med = np.median(s, axis=0)
    print(
        f"{len(ids)} prompts, {med[0]:.0f} variant answers each: log-weight sd {med[1]:.1f} nats "
        f"(compliant {med[2]:.1f}, their mean {med[3]:.1f}); ESS of the compliant weights "
        f"{med[4]:.1f}; mean length {med[5]:.0f} tokens (medians over prompts)"
    )
    err = np.log10(np.maximum(est, 1e-300)) - np.log10(r1)
    print(
        f"IS with all {med[0]:.0f}: log10 error median {np.median(err):+.2f} "
        f"(range {err.min():+.2f} .. {err.max():+.2f}); Spearman with r(1) "
        f"{spearmanr(est, r1)[0]:.2f}"
    )
    alphas = np.array(gt["alphas"])
    path = alphas < 1.0
    curves = np.array([gt["prompts"][i]["curve"] for i in ids])[:, path]
    bank = bank_from_curves(ids, alphas[path], curves, r1, rollouts=FLAGS.rollouts, seed=FLAGS.seed)
    n_is = min(p["is_log_weights"].size for p in parts.values())
    bank = dataclasses.replace(
        bank,
        is_log_weights=np.stack([parts[i]["is_log_weights"][:n_is] for i in ids]),
        is_compliance=np.stack([parts[i]["is_compliance"][:n_is] for i in ids]),
        is_tokens=np.stack([parts[i]["is_tokens"][:n_is] for i in ids]),
    )
    res = evaluate(
        bank,
        is_budgets=[b for b in (50, 100, 200, 500, 1000) if b <= n_is],
        n_sims=FLAGS.n_sims,
        seed=FLAGS.seed,
    )
    print(f"oracle AUROC {res.oracle_auroc:.3f}")
    print(res.table_markdown())


if __name__ == "__main__":
    common.run(main)
