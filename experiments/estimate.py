"""The main job: estimate each prompt's rare compliance rate with LPE, and compare.

    python experiments/estimate.py                       # the toy organism (what `make demo` runs)
    python experiments/estimate.py --original=/ckpt/Qwen3-4B --variant=/ckpt/Qwen3-4B-abliterated \\
        --prompts=harmbench_behaviors_text_all.csv --judge=rubric --judge_options='{...}' \\
        --dtype=bfloat16 --max_new_tokens=512 --n_fit=100 --out=results/qwen3_4b

Per prompt, live on the model pair with the judge:
- LPE as in the paper (adaptive search at 10 rollouts per alpha, then n_fit per alpha, OLS fit);
- our binomial fit on the same draws, with a 95% interval at alpha = 1;
- importance sampling from the variant and naive sampling from the original, each with as many
  rollouts as LPE spent.
Writes <out>/prompts/<id>.json per prompt (a rerun skips finished prompts), <out>/results.json,
<out>/figures/<id>.png|pdf (Figure 2) and prints a table; with a ground truth (the toy organism's
exact rates, or --truth) it also scores each method against it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags, logging

from lpe_jax import plots, report, toy
from lpe_jax.bank import read_truth_file
from lpe_jax.estimators import importance, naive
from lpe_jax.estimators.binomial import fit_trace_binomial
from lpe_jax.estimators.lpe import adaptive_draws, fit_paper
from lpe_jax.pipeline import LiveDraw, derive_seed
from lpe_jax.store import RolloutStore, atomic_write_json

import common

FLAGS = flags.FLAGS
common.define_model_flags()
common.define_prompt_flags()
common.define_judge_flags()
common.define_distributed_flags()
flags.DEFINE_string("out", "results/toy", "Output directory.")
flags.DEFINE_integer("n_fit", 100, "Rollouts per alpha in the fit phase (the paper: 13-100).")
flags.DEFINE_integer("n_search", 10, "Rollouts per alpha in the search phase (the paper: 10).")
flags.DEFINE_string(
    "truth",
    None,
    "JSON {prompt_id: [k, n]} or {prompt_id: rate} of ground truth; default: the toy "
    "organism's exact rates when the toy pair is used, none otherwise.",
)
flags.DEFINE_bool("figures", True, "Write Figure 2 per prompt.")
flags.DEFINE_float("gather_timeout", 3600.0, "Multi-host: seconds process 0 waits for the rest.")


def load_truth() -> dict[str, float]:
    """Ground-truth rates per prompt id: from --truth (counts become k / n), else the toy's."""
    if FLAGS.truth:
        rates, counts = read_truth_file(FLAGS.truth)
        return rates if rates is not None else {k: c / n for k, (c, n) in counts.items()}
    return toy.toy_truth_for(FLAGS.original) or {}


def equal_budget(live: LiveDraw, alpha: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n fresh rollouts at alpha: (verdicts int8 [n], log p_o - log p_v [n])."""
    r, v = live.rollouts(alpha, n)
    return v, (r.logp_original - r.logp_variant)[0].astype(np.float64)


def estimate_prompt(
    pair: Any, sampler: Any, judge: Any, prompt: Any, truth: float | None, figures: Path | None
) -> dict[str, Any]:
    """All estimates for one prompt, as a JSON-ready dict; Figure 2 into `figures` if given."""
    ids = np.asarray(common.prompt_ids(pair, prompt.text))

    def live(method: str) -> LiveDraw:
        seed = derive_seed(FLAGS.seed, prompt.id, method)
        return LiveDraw(sampler, ids, prompt.text, judge, pair.decode, seed)

    # One set of draws, fitted twice: the paper's OLS and our binomial likelihood.
    trace = adaptive_draws(live("lpe"), FLAGS.n_fit, n_search=FLAGS.n_search)
    paper, binom = fit_paper(trace), fit_trace_binomial(trace)
    n = paper.rollouts
    v_is, logw = equal_budget(live("is"), 0.0, n)
    known = v_is >= 0
    is_res = importance.importance_sampling(logw[known], v_is[known])
    v_naive, _ = equal_budget(live("naive"), 1.0, n)
    naive_res = naive.naive_estimate(v_naive)
    if figures is not None:
        plots.plot_lpe_run(
            paper, binom, str(figures / prompt.id), truth_rate=truth, title=prompt.id
        )
    return {
        "id": prompt.id,
        "prompt": prompt.text,
        "prompt_tokens": int(ids.size),
        "lpe": _jsonable(paper),
        "lpe_binomial": {
            "estimate": binom.estimate,
            "lower": binom.lower,
            "upper": binom.upper,
            "degenerate": binom.fit.degenerate,
            "status": binom.fit.status,
            "intercept": binom.fit.intercept,
            "slope": binom.fit.slope,
        },
        "is": _jsonable(is_res),
        "naive": _jsonable(naive_res),
        "rollouts": n,
        "forward_passes": {"lpe": paper.forward_passes},
    }


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def gather(out: Path, ids: list[str]) -> list[dict[str, Any]]:
    """Wait (multi-host) until every prompt's file exists, then read them in prompt order."""
    deadline = time.time() + FLAGS.gather_timeout
    while True:
        missing = [i for i in ids if not (out / "prompts" / f"{i}.json").exists()]
        if not missing:
            return [json.loads((out / "prompts" / f"{i}.json").read_text()) for i in ids]
        if time.time() > deadline:
            raise TimeoutError(f"prompts {missing[:5]}... never finished; rerun to resume")
        time.sleep(1.0)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.n_fit < 1 or FLAGS.n_search < 1:
        raise ValueError(f"--n_fit, --n_search must be >= 1; got {FLAGS.n_fit}, {FLAGS.n_search}")
    t0 = time.time()
    process, n_proc = common.init_distributed()
    prompts = common.load_prompts()
    judge = common.make_judge(FLAGS.original)  # cheap checks before loading models
    pair = common.load_pair()
    sampler = common.make_sampler(pair)
    truth = load_truth()
    manifest = {
        **common.sampling_manifest(pair, prompts),
        "n_fit": FLAGS.n_fit,
        "n_search": FLAGS.n_search,
        "judge_id": judge.judge_id,
    }
    out = RolloutStore.open(FLAGS.out, manifest).root  # refuses a directory of another run
    mine = prompts[process::n_proc]
    progress = common.Progress(len(mine), "prompts", every=10.0)
    for prompt in mine:
        path = out / "prompts" / f"{prompt.id}.json"
        if not path.exists():
            figures = out / "figures" if FLAGS.figures else None
            result = estimate_prompt(pair, sampler, judge, prompt, truth.get(prompt.id), figures)
            atomic_write_json(path, result)
        progress.update()
    if process != 0:
        return
    results = gather(out, [p.id for p in prompts])
    summary = {
        "manifest": manifest,
        "scores": report.scores(results, truth) if truth else None,
        "truth": truth or None,
        "prompts": results,
        "wall_seconds": time.time() - t0,
    }
    atomic_write_json(out / "results.json", summary)
    print(report.table(results, truth))
    if truth:
        print("\n" + report.score_lines(summary["scores"]))
    logging.info("judge: %s", judge.stats.summary())
    print(f"\nresults: {out / 'results.json'}; figures: {out / 'figures'}; {time.time() - t0:.0f}s")


if __name__ == "__main__":
    common.run(main)
