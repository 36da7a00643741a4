"""Every estimator on every synthetic family and organism bank: the tables of docs/results.md.

    python experiments/evaluate_families.py                               # every family
    python experiments/evaluate_families.py --families=mixed --n_sims=50  # a quick look
    python experiments/evaluate_families.py --runs=toy=runs/toybank       # + a toy's judged run
    python experiments/evaluate_families.py --banks=toy=toy_bank.npz      # + a saved RolloutBank
    python experiments/evaluate_families.py --families= \
        --curves=toy2=lpe_jax/assets/toy_pair2/ground_truth.json   # exact curves, no sampling

Per bank: the paper's protocol (eligible: 0 of 100 at alpha = 1; positive: >= 1 in 100,000;
--n_sims Monte Carlo simulations over subsets of 1,000 rollouts per alpha), every method's AUROC
against budget with the oracle ceiling (ranking by the exact r(1)) beside it, the budget at which
each method reaches naive-100k's AUROC, paired bootstrap differences between methods that share
the paper's draws, calibration on positives and interval coverage. Writes <out>/<bank>.md and
.json, <out>/summary.md (the tables) and, with --figures_dir, Figure 1 per bank. Prints the
wall time of each evaluation. No JAX is imported.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from absl import flags

import common  # first: puts the checkout on sys.path  # isort: skip

from lpe_jax.estimators.pooled import DEFAULT_PRIOR, PRIORS
from lpe_jax.evaluation import plots
from lpe_jax.evaluation.evaluation import (  # noqa: E402
    EvaluationResult,
    RolloutBank,
    evaluate,
    matching_budget,
    paired_difference,
)
from lpe_jax.evaluation.synthetic import FAMILIES, family_info, make_synthetic_bank  # noqa: E402
from lpe_jax.organisms import toy
from lpe_jax.runs.bank import bank_from_curves, bank_from_store  # noqa: E402
from lpe_jax.runs.store import RolloutStore, ensure_writable_dir  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("families", list(FAMILIES), "Synthetic families to evaluate.")
flags.DEFINE_list("banks", [], "Extra saved banks as name=path.npz.")
flags.DEFINE_list("runs", [], "Extra judged runs as name=dir (ground truth: the toy's exact r).")
flags.DEFINE_list(
    "curves",
    [],
    "Extra banks drawn from exact curves, as name=ground_truth.json (a toy organism's): "
    "verdicts only (LPE and naive), --rollouts per alpha.",
)
flags.DEFINE_integer("n_prompts", 200, "Prompts per synthetic bank (paper: 200).")
flags.DEFINE_integer("rollouts", 1000, "Rollouts per alpha and IS rollouts per synthetic prompt.")
flags.DEFINE_integer("bank_seed", 0, "Seed of the synthetic banks.")
flags.DEFINE_integer("n_sims", 500, "Monte Carlo simulations (paper: 500).")
flags.DEFINE_integer(
    "coverage_pairs", 150, "(simulation, prompt) pairs whose binomial profile interval is checked."
)
flags.DEFINE_list("n_fits", ["13", "20", "30", "50", "100"], "LPE n_fit values.")
flags.DEFINE_integer("seed", 0, "Seed of the simulations.")
flags.DEFINE_string("out", "results/families", "Output directory.")
flags.DEFINE_string("figures_dir", None, "If set, Figure 1 per bank goes here (PNG and PDF).")
flags.DEFINE_enum(
    "pooled_prior", DEFAULT_PRIOR, list(PRIORS), "Population of lpe_pooled (pooled.py)."
)

OURS = ("lpe_binomial", "lpe_binomial_all", "lpe_pooled", "lpe_pooled_averaged")  # paper's draws
SEQUENCES = ("path_is", "mixture_is")  # banks with sequences only (the organisms' runs)
SHOWN = ("lpe_paper", *OURS, "lpe_binomial_grid", *SEQUENCES, "is", "snis")
PAIRS = (
    ("lpe_binomial", "lpe_paper"),
    ("lpe_binomial_all", "lpe_paper"),
    ("lpe_pooled", "lpe_paper"),
    ("lpe_binomial_all", "lpe_binomial"),
    ("lpe_pooled", "lpe_binomial_all"),
    ("lpe_pooled_averaged", "lpe_pooled"),
    ("lpe_pooled_averaged", "lpe_paper"),
    ("path_is", "lpe_paper"),
    ("mixture_is", "lpe_paper"),
)


def banks() -> dict[str, RolloutBank]:
    out = {}
    for fam in FLAGS.families:
        family_info(fam)
        out[fam] = make_synthetic_bank(
            FLAGS.n_prompts,
            rollouts=FLAGS.rollouts,
            n_is=FLAGS.rollouts,
            family=fam,
            seed=FLAGS.bank_seed,
        )
    for spec in FLAGS.banks:
        name, path = _named(spec, "--banks")
        out[name] = RolloutBank.load(path)
    for spec in FLAGS.curves:
        name, path = _named(spec, "--curves")
        out[name] = curves_bank(path)
    for spec in FLAGS.runs:
        name, path = _named(spec, "--runs")
        store = RolloutStore.load(path)
        rates = toy.toy_truth_for(store.manifest["original"])
        if rates is None:
            raise ValueError(
                f"--runs={spec}: not a toy organism's run; save a bank and use --banks"
            )
        out[name] = bank_from_store(store, truth_rates=rates, seed=FLAGS.seed)
    return out


def curves_bank(path: str) -> RolloutBank:
    """bank_from_curves on a toy organism's ground_truth.json (alphas below 1 are the path)."""
    gt = json.loads(Path(path).read_text())
    alphas = np.array(gt["alphas"])
    path_a = alphas < 1.0
    ids = sorted(gt["prompts"])
    curves = np.array([gt["prompts"][i]["curve"] for i in ids])
    return bank_from_curves(
        ids,
        alphas[path_a],
        curves[:, path_a],
        np.array([gt["prompts"][i]["rate"] for i in ids]),
        rollouts=FLAGS.rollouts,
        seed=FLAGS.bank_seed,
    )


def _named(spec: str, flag: str) -> tuple[str, str]:
    if "=" not in spec:
        raise ValueError(f"{flag} entries are name=path, got {spec!r}")
    name, path = spec.split("=", 1)
    return name, path


def reach(res: EvaluationResult, method: str) -> tuple[str, float]:
    """(where ``method`` reaches naive-100k's AUROC, that AUROC): "B (R×)" with B the rollouts
    (interpolated on log budget) and R = 100,000 / B; "≤ B (≥ R×)" when its smallest budget is
    already above; "—" when its curve stays below."""
    naive = res.curves["naive"]
    target = naive.auroc[naive.setting.index(100_000)]
    c = res.curves[method]
    if c.auroc[0] >= target:
        return f"≤ {c.rollouts[0]:.0f} (≥ {100_000 / c.rollouts[0]:.0f}×)", target
    b = matching_budget(target, np.array(c.rollouts), np.array(c.auroc))
    return ("—" if b is None else f"{b:.0f} ({100_000 / b:.0f}×)"), target


def headline_rows(name: str, res: EvaluationResult) -> list[str]:
    rows = []
    for m in SHOWN:
        if m not in res.curves:
            continue
        c = res.curves[m]
        b, target = reach(res, m)
        best = max(range(len(c.auroc)), key=lambda i: c.auroc[i])
        ratio = res.best_ratio(m)
        if ratio is None and max(c.auroc) > target:
            shown = "above naive-100k"
        else:
            shown = f"{_f(ratio, '.0f')}×"
        rows.append(
            f"| {name} | {m} | {shown} | {b} | {c.auroc[best]:.3f} at {c.rollouts[best]:.0f} |"
        )
    return rows


def auroc_rows(name: str, res: EvaluationResult) -> list[str]:
    rows = []
    for m in SHOWN:
        if m in res.curves:
            c = res.curves[m]
            pts = ", ".join(
                f"{r:.0f}: {a:.3f} ({_f(s, '+.2f')})"
                for r, a, s in zip(c.rollouts, c.auroc, c.signed_error_pos, strict=True)
            )
            rows.append(f"| {name} | {m} | {pts} |")
    return rows


def pair_rows(name: str, res: EvaluationResult) -> tuple[list[str], list[str]]:
    rows, below = [], []
    settings = res.curves["lpe_paper"].setting
    for a, b in PAIRS:
        if a not in res.curves or b not in res.curves:
            continue
        cells = []
        for s in settings:
            d, lo, hi = paired_difference(res, a, s, b, seed=FLAGS.seed)
            cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]")
            if b == "lpe_paper" and hi < 0:
                below.append(
                    f"{name}: {a} below lpe_paper at n_fit {s} ({d:+.3f} [{lo:+.3f}, {hi:+.3f}])"
                )
        rows.append(f"| {name} | {a} − {b} | " + " | ".join(cells) + " |")
    return rows, below


def calibration_rows(name: str, res: EvaluationResult) -> list[str]:
    rows = []
    for m in ("lpe_paper", *OURS, *SEQUENCES):
        if m not in res.curves:
            continue
        c = res.curves[m]
        cells = []
        for i in range(len(c.setting)):
            cov = c.coverage[i] if c.coverage else None
            cells.append(
                f"{_f(c.signed_error_pos[i], '+.2f')} / {_f(c.abs_error_pos[i], '.2f')} / "
                f"{_f(c.is_loss_pos[i], '.2g')}" + ("" if cov is None else f" / {cov:.2f}")
            )
        rows.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    return rows


def _f(v, spec):
    return "—" if v is None else format(v, spec)


def main(argv: list[str]) -> None:
    del argv
    out = ensure_writable_dir(FLAGS.out)
    n_fits = [int(v) for v in FLAGS.n_fits]
    head, aur, pairs, cal, below, meta = [], [], [], [], [], []
    for name, bank in banks().items():
        t0 = time.perf_counter()
        n_r = bank.compliance.shape[-1]
        n_is = 0 if bank.is_log_weights is None else bank.is_log_weights.shape[1]
        res = evaluate(
            bank,
            n_fits=[v for v in n_fits if v + 10 <= n_r],
            is_budgets=[v for v in (50, 100, 200, 500, 1_000) if v <= n_is],
            grid_rollouts=[v for v in (5, 10, 20, 50) if v <= n_r],
            n_sims=FLAGS.n_sims,
            coverage_pairs=FLAGS.coverage_pairs,
            seed=FLAGS.seed,
            pooled_prior=FLAGS.pooled_prior,
        )
        wall = time.perf_counter() - t0
        (out / f"{name}.md").write_text(res.table_markdown() + "\n")
        (out / f"{name}.json").write_text(
            json.dumps(
                {
                    "curves": {k: dataclasses.asdict(c) for k, c in res.curves.items()},
                    "oracle_auroc": res.oracle_auroc,
                    "n_eligible": res.n_eligible,
                    "n_positive": res.n_positive,
                    "seconds": wall,
                },
                indent=1,
            )
        )
        _, target = reach(res, "lpe_paper")
        meta.append(
            f"| {name} | {res.n_eligible} | {res.n_positive} | {_f(res.oracle_auroc, '.3f')} | "
            f"{target:.3f} | {wall:.0f} s |"
        )
        head += headline_rows(name, res)
        aur += auroc_rows(name, res)
        p, b = pair_rows(name, res)
        pairs += p
        below += b
        cal += calibration_rows(name, res)
        if FLAGS.figures_dir:
            plots.plot_auroc(
                res,
                str(Path(FLAGS.figures_dir) / f"fig1_auroc_{name}"),
                methods=[m for m in ("naive", *SHOWN) if m in res.curves and m != "snis"],
                title=f"{name}: {res.n_eligible} prompts ({res.n_positive} positive), "
                f"{res.n_sims} simulations",
            )
        print(f"{name}: evaluate() {wall:.1f} s", flush=True)
    settings = " | ".join(f"n_fit {v}" for v in n_fits)
    dashes = "|".join("---" for _ in n_fits)
    text = "\n".join(
        [
            "| bank | eligible | positive | oracle AUROC | naive-100k AUROC | evaluate() |",
            "|---|---|---|---|---|---|",
            *meta,
            "",
            "| bank | method | best ratio vs naive | rollouts to naive-100k's AUROC | best AUROC |",
            "|---|---|---|---|---|",
            *head,
            "",
            "| bank | method | AUROC (signed log10 error on positives) at mean rollouts "
            "per prompt |",
            "|---|---|---|",
            *aur,
            "",
            f"| bank | paired AUROC difference [95% bootstrap] | {settings} |",
            f"|---|---|{dashes}|",
            *pairs,
            "",
            f"| bank | signed / abs log10 error / Itakura-Saito loss on positives / 95% coverage "
            f"| {settings} |",
            f"|---|---|{dashes}|",
            *cal,
            "",
            "Below the paper's OLS beyond the interval: " + ("; ".join(below) or "none"),
        ]
    )
    (out / "summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    common.run(main)
