"""How Angell et al.'s mixture-IS weights spread as replies grow: one table row per judged run.

    python experiments/sample.py --path=mixture --alphas=0.5 --rollouts=1000 --max_new_tokens=40 \\
        --out=runs/mix40 ...  # then judge.py; the same at other --max_new_tokens
    python experiments/mixture_length.py --runs=runs/mix18,runs/mix40 --truth=truth.json

A mixture row's log-weight log p_original(x) - log q(x) is a sum over its tokens of terms each at
most log(1 / lam), so it spreads with the reply's length even where the verdict is settled in
the first tokens. Runs of the same models and seed at different --max_new_tokens share each
row's first tokens (a row's randomness depends on (seed, prompt, alpha, row, step) only), so
where the verdict is settled within the shortest run's tokens the rows and verdicts are the same
and only the weights differ: the table isolates what length does to the weights.

Per run (medians over prompts unless said): mean generated tokens, the Kish effective sample
size (sum w)^2 / sum w^2 over all rows (``ISResult.ess``, estimate.py's ``mixture_is.ess``) and
its 10% quantile over prompts, the Kish ESS of the compliant rows alone (what the estimate of
r(1) sums; estimate.py's ``mixture_is.ess_estimate``), the sd of log w over all rows and over
compliant rows (nats), the share of rows whose verdict is the first run's, and, with --truth
(exact rates), the plain estimate's mean signed and absolute log10 error and the share of
prompts within a decade of the exact r(1). No JAX is imported.
"""

from __future__ import annotations

import numpy as np
from absl import flags

import common  # first: puts the checkout on sys.path  # isort: skip

from lpe_jax.estimators.importance import importance_sampling  # noqa: E402
from lpe_jax.runs.bank import read_truth_file  # noqa: E402
from lpe_jax.runs.store import RolloutStore  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", [], "Judged runs along --path=mixture at one alpha (lam).")
flags.DEFINE_string("truth", None, "JSON {prompt_id: exact rate}: adds the log10 errors.")
flags.DEFINE_integer("limit", None, "Use only each run's first N prompts (to compare runs).")


def kish_ess(log_w: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 of the weights exp(log_w) (0.0 for none)."""
    if log_w.size == 0:
        return 0.0
    shifted = np.exp(log_w - log_w.max())
    return float(shifted.sum() ** 2 / (shifted**2).sum())


def prompt_stats(chunk: dict[str, np.ndarray]) -> dict[str, float]:
    """One prompt's weight statistics from its judged mixture chunk (unknown and non-finite rows
    left out)."""
    known = (chunk["verdicts"] >= 0) & ~chunk["nonfinite"] & np.isfinite(chunk["logp_sampled"])
    lw = chunk["logp_original"][known].astype(np.float64) - chunk["logp_sampled"][known]
    hit = chunk["verdicts"][known] == 1
    res = importance_sampling(lw, hit)
    return {
        "tokens": float(chunk["lengths"].mean()),
        "ess": res.ess,
        "ess_compliant": kish_ess(lw[hit]),
        "sd": float(lw.std()),
        "sd_compliant": float(lw[hit].std()) if hit.sum() > 1 else float("nan"),
        "log10_estimate": res.log_estimate / np.log(10),
        "n_compliant": float(hit.sum()),
    }


def run_row(root: str, rates: dict[str, float] | None, first: dict[str, np.ndarray]) -> str:
    """One Markdown table row for a judged mixture run; ``first`` holds the first run's verdicts
    per prompt (filled by the first call) for the share of rows whose verdict is the same."""
    store = RolloutStore.load(root)
    m = store.manifest
    if m.get("path") != "mixture" or len(m.get("alphas", [])) != 1:
        raise ValueError(f"{root}: not a run along --path=mixture at one alpha (lam)")
    lam = float(m["alphas"][0])
    ids = sorted({pid for pid, _ in store.chunks()})[: FLAGS.limit]
    stats, same = [], []
    for pid in ids:
        chunk = store.read_chunk(pid, lam)
        if "verdicts" not in chunk:
            raise ValueError(f"{root}: prompt {pid} is not judged; run judge.py --run={root}")
        stats.append(prompt_stats(chunk))
        v = first.setdefault(pid, chunk["verdicts"])
        same.append(np.mean(v == chunk["verdicts"]) if v.shape == chunk["verdicts"].shape else 0)

    def med(key: str) -> float:
        return float(np.nanmedian([s[key] for s in stats]))

    ess = np.array([s["ess"] for s in stats])
    cells = [
        str(m["max_new_tokens"]),
        f"{len(ids)} x {int(m['rollouts'])}",
        f"{med('tokens'):.1f}",
        f"{med('ess'):.1f} ({np.quantile(ess, 0.1):.1f})",
        f"{med('ess_compliant'):.1f}",
        f"{med('sd'):.2f} / {med('sd_compliant'):.2f}",
        f"{np.mean(same):.2%}",
    ]
    if rates is not None:
        logs = [s["log10_estimate"] for s in stats]
        err = np.array([x - np.log10(rates[pid]) for x, pid in zip(logs, ids, strict=True)])
        ok = np.isfinite(err)
        cells.append(
            f"{err[ok].mean():+.2f} / {np.abs(err[ok]).mean():.2f}, "
            f"{(np.abs(err) <= 1).mean():.0%} ({(~ok).sum()} zero)"
        )
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.runs:
        raise ValueError("pass --runs=<judged mixture run>[,...]")
    rates = read_truth_file(FLAGS.truth)[0] if FLAGS.truth else None
    if FLAGS.truth and rates is None:
        raise ValueError(f"--truth={FLAGS.truth} holds counts; pass exact rates {{id: rate}}")
    head = [
        "max_new_tokens",
        "prompts x rows",
        "mean tokens",
        "Kish ESS, all rows (10% of prompts)",
        "Kish ESS, compliant rows",
        "sd log w, all / compliant (nats)",
        "verdicts as the first run's",
    ]
    if rates is not None:
        head.append("log10 error signed / abs, within a decade")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    first: dict[str, np.ndarray] = {}
    for root in FLAGS.runs:
        print(run_row(root, rates, first))


if __name__ == "__main__":
    common.run(main)
