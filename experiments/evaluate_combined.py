"""Path IS and pooled LPE joined on LPE's own draws, beside both parts: docs/results.md's table.

    python experiments/evaluate_combined.py --n_sims=100   # both organisms' shipped banks

Per bank (the paper's protocol, as evaluate.py): AUROC, signed / abs log10 error and
Itakura-Saito loss on positives of lpe_pooled, path_is and evaluation.COMBINED_METHODS (the
switch at path IS's ESS 10 and the precision-weighted blend), the share of estimates the switch
takes from path IS, and each combination's paired AUROC difference against each part (95%
bootstrap over prompts, same draws). A combination is kept only if it is at least as good as the
better part on every bank. No JAX is imported.
"""

from __future__ import annotations

import time

import numpy as np
from absl import flags

import common  # first: puts the checkout on sys.path  # isort: skip

from lpe_jax.evaluation import evaluation as ev  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list(
    "banks",
    [
        "toy1=lpe_jax/assets/toy_pair/bank.npz",
        "toy2=lpe_jax/assets/toy_pair2/sequence_bank.npz",
    ],
    "Saved banks with path log-weights, as name=path.npz.",
)
flags.DEFINE_integer("n_sims", 100, "Monte Carlo simulations.")
flags.DEFINE_list("n_fits", ["13", "20", "30", "50", "100"], "LPE fit-phase rollouts per alpha.")
flags.DEFINE_integer("seed", 0, "Seed of the simulations and the bootstrap.")

PARTS = ("lpe_pooled", "path_is")


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def one_bank(name: str, path: str) -> list[str]:
    """The table rows of one bank."""
    bank = ev.RolloutBank.load(path)
    if bank.path_log_weights is None:
        raise ValueError(f"--banks={name}={path}: no path log-weights, so no path IS")
    share: dict[int, float] = {}

    def path_is(d: ev.SimulatedDraws, n_fit: int) -> ev.MethodPoint:
        share[n_fit] = float((d.path_is(n_fit)[1] >= 10).mean())
        return ev.METHODS["path_is"].score(d, n_fit)

    methods = [
        ev.METHODS["lpe_pooled"],
        ev.Method("path_is", "n_fits", path_is),
        *ev.COMBINED_METHODS,
    ]
    t = time.time()
    res = ev.evaluate(
        bank,
        n_fits=[int(v) for v in FLAGS.n_fits],
        naive_budgets=(),
        is_budgets=(),
        grid_rollouts=(),
        n_sims=FLAGS.n_sims,
        seed=FLAGS.seed,
        methods=methods,
    )
    print(f"{name}: evaluate() {time.time() - t:.0f} s wall, {FLAGS.n_sims} simulations")
    rows = []
    for m in methods:
        c = res.curves[m.name]
        aur = " | ".join(f"{a:.3f}" for a in c.auroc)
        rows.append(f"| {name} | {m.name} AUROC | {aur} |")
    for m in methods:
        c = res.curves[m.name]
        err = " | ".join(
            f"{_fmt(s, '+.2f')} / {_fmt(a, '.2f')} / {_fmt(loss, '.3g')}"
            for s, a, loss in zip(c.signed_error_pos, c.abs_error_pos, c.is_loss_pos, strict=True)
        )
        rows.append(f"| {name} | {m.name} signed / abs / IS loss | {err} |")
    settings = res.curves["path_is"].setting
    rows.append(
        f"| {name} | switch takes path IS (share of estimates) | "
        + " | ".join(f"{share[s]:.3f}" for s in settings)
        + " |"
    )
    for m in ev.COMBINED_METHODS:
        for part in PARTS:
            cells = []
            for s in settings:
                d, lo, hi = ev.paired_difference(res, m.name, s, part, seed=FLAGS.seed)
                cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            rows.append(f"| {name} | {m.name} − {part} | " + " | ".join(cells) + " |")
    rollouts = " | ".join(f"{np.mean(r):.0f}" for r in res.curves["path_is"].rollouts)
    rows.insert(0, f"| {name} | rollouts per prompt | {rollouts} |")
    return rows


def main(argv: list[str]) -> None:
    del argv
    head = " | ".join(f"n_fit {v}" for v in FLAGS.n_fits)
    rows = [f"| bank | row | {head} |", "|---|---|" + "---|" * len(FLAGS.n_fits)]
    for spec in FLAGS.banks:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--banks entries are name=path.npz; got {spec!r}")
        rows += one_bank(name, path)
    print("\n".join(rows))


if __name__ == "__main__":
    common.run(main)
