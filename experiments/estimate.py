"""The main job: estimate each prompt's rare compliance rate with LPE, and compare.

    python experiments/estimate.py                       # the toy organism (what `make demo` runs)
    python experiments/estimate.py --original=/ckpt/Qwen3-4B --variant=/ckpt/Qwen3-4B-abliterated \\
        --prompts=harmbench_behaviors_text_all.csv --judge=rubric --judge_options='{...}' \\
        --dtype=bfloat16 --max_new_tokens=512 --n_fit=100 --out=results/qwen3_4b

Per prompt, live on the model pair with the judge:
- LPE as in the paper (adaptive search at 10 rollouts per alpha, then n_fit per alpha, OLS fit);
- our binomial fit on the same draws, with a 95% interval at alpha = 1;
- once every prompt's draws are in: our pooled fit (lpe_jax.estimators.pooled) of all prompts'
  LPE draws together, search draws included, with per-prompt 95% intervals (it depends on the
  prompt set, so it lives in results.json, not in the per-prompt files);
- importance sampling from the variant and naive sampling from the original, each with as many
  rollouts as LPE spent;
- path importance sampling (lpe_jax.estimators.path_is) from LPE's own draws, search draws
  included: each draw at alpha weighed by p_original(x) / p_alpha(x), combined over the alphas
  visited; unbiased, at no extra rollouts (left out, and said so, on the direction path and at
  --temperature other than 1);
- Angell et al.'s mixture-proposal IS (--mixture_lambda = lam): as many rollouts as LPE spent,
  drawn per token from lam p_original + (1 - lam) p_variant (the `mixture` path at alpha = lam,
  on a second engine once every prompt's LPE draws are in), each weighed by p_original(x) /
  p_mixture(x) = exp(logp_original - logp_sampled): sequence sums, no per-token arrays. Left out
  like path IS, and with --mixture_lambda=0. Its draws are not journaled: a kill while they run
  redraws them (the same rows, same seed).
After the table: scores against the truth (within a decade, interval coverage, log10 errors) and
the Jones et al. forecast of the worst per-prompt rate at --forecast_prompts prompts from each
method's estimates (with a truth: the exact rates' own forecast and worst rate beside it).
--path=direction --direction=r.npy draws along the direction path (one model, the original with
1 - alpha of r projected out of its residual stream; --variant is not loaded); it has no
endpoint log-probs, so IS and path IS are left out (status "left_out" with the reason).
Every prompt's draws run at once (--prompts_in_flight at a time) on one rollout engine, through
lpe_jax.runs.scheduler: rows of many prompts decode side by side, and the judge scores finished rows
while the engine decodes the next ones. Each prompt's result equals the one-prompt-at-a-time
order's for the same seed.
Writes <out>/prompts/<id>.json per prompt (a rerun skips finished prompts; the finished draws of
unfinished prompts are journaled in <out>/journal/ and not drawn again), <out>/results.json,
<out>/figures/<id>.png|pdf (Figure 2) and prints a table; with a ground truth (the toy organism's
exact rates, or --truth) it also scores each method against it.

Unknown is not zero: a verdict the judge could not give never counts as a refusal. A prompt whose
draws are mostly unknown has status no_data (no estimate) and is left out of the scores; the
table counts each prompt's unknown verdicts. When the judge fails on more than
--max_judge_failure_share of the last --judge_failure_window rows it judged, the job stops with
one line naming the judge and its last error, and exits 3; the rows it drew are journaled, so a
rerun with the judge working again resumes and draws none of them again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from absl import flags, logging

from lpe_jax.estimators import importance, naive
from lpe_jax.estimators.binomial import fit_trace_binomial
from lpe_jax.estimators.lpe import LPEStep, fit_paper
from lpe_jax.estimators.path_is import path_importance_sampling
from lpe_jax.estimators.pooled import DEFAULT_PRIOR, PRIORS, fit_pooled
from lpe_jax.evaluation import plots, report
from lpe_jax.evaluation.report import LEFT_OUT
from lpe_jax.organisms import toy
from lpe_jax.runs.bank import read_truth_file
from lpe_jax.runs.journal import Journal
from lpe_jax.runs.pipeline import MainDraws, PathDraws, main_job, method_seed
from lpe_jax.runs.scheduler import Draw, JobPrompt, JudgeFailedError, judge_utilisation
from lpe_jax.runs.store import RolloutStore, atomic_write_json

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
flags.DEFINE_integer(
    "prompts_in_flight",
    128,
    "Prompts whose draws run at once on the engine: enough to fill its slots (a prompt's search "
    "draws only 10 rows at a time); a kill loses none of their finished draws (journaled).",
)
flags.DEFINE_float(
    "max_judge_failure_share",
    0.05,
    "Stop (exit 3, draws journaled) when the judge gives no verdict for more than this share of "
    "the last --judge_failure_window rows it judged (before that many: for more than share x "
    "window rows); below it, unknown verdicts are kept as unknown (never refusals) and counted "
    "in the table.",
)
flags.DEFINE_integer(
    "judge_failure_window",
    200,
    "Rows judged that --max_judge_failure_share is measured over (the last ones); rows the judge "
    "failed on wait until this many were judged, or nothing else is in flight.",
)
flags.DEFINE_integer(
    "forecast_prompts",
    None,
    "Deployment size for the worst-prompt forecast (Jones et al.'s Gumbel tail over each "
    "method's per-prompt estimates); default 10 x the prompts.",
    lower_bound=1,
)
flags.DEFINE_float(
    "mixture_lambda",
    0.5,
    "Angell et al.'s mixture IS at LPE's budget: the original's share lam of the per-token "
    "proposal lam p_original + (1 - lam) p_variant; 0 leaves it out.",
    lower_bound=0.0,
    upper_bound=1.0,
)
flags.DEFINE_integer(
    "steps_per_call",
    4,
    "Engine decode steps per call: the host sees finished rows after each call, and each "
    "adaptive draw waits on the verdicts of the one before, so short calls keep slots full.",
)

flags.DEFINE_enum(
    "pooled_prior",
    DEFAULT_PRIOR,
    list(PRIORS),
    "Population and line of the pooled fit (lpe_jax/estimators/pooled.py); 'averaged' is the "
    "mean of the log-rate and log-odds lines, for paths that saturate (docs/results.md).",
)


def load_truth() -> dict[str, float]:
    """Ground-truth rates per prompt id: from --truth (counts become k / n), else the toy's."""
    if FLAGS.truth:
        rates, counts = read_truth_file(FLAGS.truth)
        return rates if rates is not None else {k: c / n for k, (c, n) in counts.items()}
    return toy.toy_truth_for(FLAGS.original) or {}


def left_out(why: str | None) -> dict[str, Any] | None:
    """A method's entry when it cannot run on this path: status "left_out" and the reason."""
    return None if why is None else {"estimate": None, "status": LEFT_OUT, "reason": why}


def importance_left_out() -> str | None:
    """Why variant IS is left out on this run, or None when it runs."""
    if FLAGS.path == common.DIRECTION:
        return "the direction path gives no endpoint log-probs (log p_original, log p_variant)"
    return None


def path_is_left_out() -> str | None:
    """Why path IS is left out on this run, or None when it runs: it weighs each draw by
    p_original(x) / q_alpha(x), so it needs the original's log-prob of the draw, at the
    temperature the target r(1) is defined at (logp_original is at temperature 1)."""
    if FLAGS.path == common.DIRECTION:
        return "the direction path gives no log p_original of its draws"
    if FLAGS.temperature != 1.0:
        return (
            f"--temperature={FLAGS.temperature}: logp_original is at temperature 1, so the "
            "weights would target another r(1)"
        )
    return None


def mixture_left_out() -> str | None:
    """Why mixture IS is left out on this run, or None when it runs."""
    if FLAGS.mixture_lambda == 0.0:
        return "--mixture_lambda=0"
    if FLAGS.path == common.DIRECTION:
        return "the direction path has no variant model to mix with"
    return path_is_left_out()  # the same weights p_original(x) / q(x), at temperature 1


LABELS = {"is": "IS", "path_is": "path IS", "mixture_is": "mixture IS"}


def left_out_methods() -> dict[str, str | None]:
    """Each method that may be left out on this run, and why (None: it runs)."""
    return {
        "is": importance_left_out(),
        "path_is": path_is_left_out(),
        "mixture_is": mixture_left_out(),
    }


def path_is_result(path: PathDraws) -> dict[str, Any]:
    """Path IS over the LPE draws (every alpha the search and fit visited), JSON-ready."""
    res = path_importance_sampling(
        path.alphas, path.verdicts, path.logp_sampled, path.logp_original
    )
    return {
        "estimate": None if math.isnan(res.estimate) else res.estimate,
        "log_estimate": None if math.isnan(res.log_estimate) else res.log_estimate,
        "std_error": res.std_error,
        "lower": res.lower,
        "upper": res.upper,
        "ess": res.ess_estimate,
        "ess_total": res.ess_total,
        "status": res.status,
        "n_unknown": int(res.n_unknown.sum()),
        "n_nonfinite": int(res.n_nonfinite.sum()),
        "alphas": res.alphas.tolist(),
        "n": res.n.tolist(),
        "n_compliant": res.n_compliant.tolist(),
        "weights": res.weights.tolist(),
    }


def prompt_result(prompt: Any, ids: np.ndarray, draws: MainDraws) -> dict[str, Any]:
    """All estimates for one prompt from its draws, as a JSON-ready dict."""
    # One set of draws, fitted twice: the paper's OLS and our binomial likelihood.
    paper, binom = fit_paper(draws.trace), fit_trace_binomial(draws.trace)
    is_out = importance_left_out()
    is_res = (
        None if is_out else importance.importance_sampling(draws.is_log_weights, draws.is_verdicts)
    )
    naive_res = naive.naive_estimate(draws.naive_verdicts)
    unknown = {
        "lpe": sum(s.n - s.n_judged for s in draws.trace),
        "is": int((draws.is_verdicts < 0).sum()),
        "naive": naive_res.n_unknown,
    }
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
        "is": left_out(is_out) or _jsonable(is_res),
        "path_is": left_out(path_is_left_out()) or path_is_result(draws.path),
        **({"mixture_is": left_out(mixture_left_out())} if mixture_left_out() else {}),
        "naive": _jsonable(naive_res),
        "rollouts": paper.rollouts,
        "unknown": unknown,
        "forward_passes": {"lpe": paper.forward_passes},
    }


def engine_and_scheduler(
    pair: Any, judge: Any, prompts: list[Any], max_len: int, path: str | None, **kw: Any
) -> tuple[Any, Any]:
    """The rollout engine (along --path, or `path`) and its scheduler for `prompts`' draws: a
    device judge's batch left free on the device (`device_judge_bytes`), --prompts_in_flight
    jobs at once, the judge watched by --max_judge_failure_share / --judge_failure_window.
    kw: the scheduler's (e.g. on_outcome)."""
    reserve = device_judge_bytes(judge, [p.text for p in prompts])
    engine = common.make_engine(
        pair, max_len, path=path, steps_per_call=FLAGS.steps_per_call, reserve_bytes=reserve
    )
    sched = common.make_scheduler(
        engine,
        judge,
        pair.decode,
        max_jobs=FLAGS.prompts_in_flight,
        max_judge_failure_share=FLAGS.max_judge_failure_share,
        judge_failure_window=FLAGS.judge_failure_window,
        **kw,
    )
    return engine, sched


def estimate_prompts(
    pair: Any, judge: Any, prompts: list[Any], out: Path, truth: dict[str, float], max_len: int
) -> None:
    """Run the main job of every prompt in `prompts` at once; write each result as it finishes.
    max_len: the longest prompt of the whole run (common.max_prompt_len), the engine's plan."""
    todo = [p for p in prompts if not (out / "prompts" / f"{p.id}.json").exists()]
    progress = common.Progress(len(prompts), "prompts", every=10.0)
    progress.update(len(prompts) - len(todo))
    if not todo:
        return
    ids = {p.id: np.asarray(common.prompt_ids(pair, p.text)) for p in todo}
    journal = Journal(out / "journal")
    engine, sched = engine_and_scheduler(
        pair, judge, todo, max_len, path=None, on_outcome=journal.append
    )
    by_id, replayed, kept = {p.id: p for p in todo}, 0, 0
    for p in todo:
        job = main_job(
            p.id,
            FLAGS.seed,
            FLAGS.n_fit,
            n_search=FLAGS.n_search,
            importance=importance_left_out() is None,
        )
        done, rows = journal.load(p.id), journal.load_rows(p.id)
        replayed += sum(d.draw.n for group in done for d in group)
        kept += sum(len(r.rows["lengths"]) for r in rows)
        sched.add(p.id, JobPrompt(p.id, ids[p.id], p.text), job, replay=done, rows=rows)
    if replayed or kept:
        again = f" ({kept} rollouts drawn before the judge failed are judged again)" if kept else ""
        print(
            f"resuming: {replayed} rollouts of unfinished prompts replayed from {journal.root}"
            + again
        )
    t0 = time.time()
    try:
        for pid, draws in sched.run():
            result = prompt_result(by_id[pid], ids[pid], draws)
            atomic_write_json(out / "prompts" / f"{pid}.json", result)
            journal.remove(pid)
            progress.update()
    except JudgeFailedError as e:
        unjudged = sched.unjudged()
        for pid, blocks in unjudged.items():
            journal.save_rows(pid, blocks)
        log_stats(sched, engine, judge, time.time() - t0)
        n_kept = sum(len(b.rows["lengths"]) for bs in unjudged.values() for b in bs)
        print(
            f"estimate.py: stopped: judge {judge.judge_id} failed on {e.failed} of the last "
            f"{e.window} rows it judged (> --max_judge_failure_share={e.max_share}); last error: "
            f"{e.last_error}; {n_kept} drawn rows kept in {journal.root}: rerun once the judge "
            "works to resume without drawing them again",
            file=sys.stderr,
        )
        sys.exit(3)
    log_stats(sched, engine, judge, time.time() - t0)


def mixture_job(prompt_id: str, n: int) -> Any:
    """n rollouts of the mixture proposal at lam (its own stream per prompt); returns the Drawn."""
    drawn = yield Draw(FLAGS.mixture_lambda, n, method_seed(FLAGS.seed, prompt_id, "mixture"))
    return drawn


def mixture_result(drawn: Any) -> dict[str, Any]:
    """Mixture IS of one prompt from its Drawn rows, JSON-ready: plain and self-normalized
    estimates of importance.importance_sampling with log w = logp_original - logp_sampled (a row
    with a non-finite log-prob is unknown, never a refusal, and counted); ``ess`` is over all
    rows, ``ess_estimate`` over the compliant rows the estimate sums."""
    known = ~drawn.nonfinite & np.isfinite(drawn.logp_sampled) & np.isfinite(drawn.logp_original)
    lw = np.where(known, drawn.logp_original.astype(np.float64) - drawn.logp_sampled, 0.0)
    verdicts = np.where(known, drawn.verdicts, -1)
    res = importance.importance_sampling(lw, verdicts)
    hit = verdicts == 1  # the Kish ESS of the rows the estimate sums (report marks it if < 10)
    ess_estimate = importance.importance_sampling(lw[hit], np.ones(hit.sum(), bool)).ess
    return {
        **_jsonable(res),
        "ess_estimate": ess_estimate,
        "lambda": FLAGS.mixture_lambda,
        "n_nonfinite": int((~known & (drawn.verdicts >= 0)).sum()),
    }


def add_mixture(pair: Any, judge: Any, prompts: list[Any], out: Path, max_len: int) -> None:
    """Mixture IS for every prompt whose result lacks it, at the rollouts LPE spent on it, on an
    engine along the ``mixture`` path (built once LPE's engine is done, so one is in memory)."""
    files = {p.id: out / "prompts" / f"{p.id}.json" for p in prompts}
    results = {pid: json.loads(f.read_text()) for pid, f in files.items()}
    todo = [p for p in prompts if "mixture_is" not in results[p.id]]
    if not todo:
        return
    _, sched = engine_and_scheduler(pair, judge, todo, max_len, path="mixture")
    for p in todo:
        ids = np.asarray(common.prompt_ids(pair, p.text))
        sched.add(p.id, JobPrompt(p.id, ids, p.text), mixture_job(p.id, results[p.id]["rollouts"]))
    progress = common.Progress(len(todo), "mixture IS prompts", every=10.0)
    try:
        for pid, drawn in sched.run():
            results[pid]["mixture_is"] = mixture_result(drawn)
            atomic_write_json(files[pid], results[pid])
            progress.update()
    except JudgeFailedError as e:
        print(
            f"estimate.py: stopped: judge {judge.judge_id} failed on {e.failed} of the last "
            f"{e.window} rows of mixture IS (> --max_judge_failure_share={e.max_share}); last "
            f"error: {e.last_error}; rerun once the judge works: LPE's results are kept and the "
            "mixture rows are drawn again (the same rows)",
            file=sys.stderr,
        )
        sys.exit(3)


def device_judge_bytes(judge: Any, texts: list[str]) -> int:
    """For a judge that scores on the engine's device (``--judge=local`` with a checkpoint): log
    its params and one batch's bytes (memory.judge_batch_bytes, for questions of the longest
    prompt and a --max_new_tokens reply) and return the batch's, which the engine leaves free
    (the params are resident already). 0 for other judges."""
    sizer = getattr(judge, "device_bytes", None)
    longest = max(texts, key=len, default="")
    tokens = len(judge.encode(longest, "")) + FLAGS.max_new_tokens if sizer else 0
    if judge_cap := getattr(judge, "max_length", None):
        tokens = min(tokens, judge_cap)
    sized = sizer(tokens) if sizer else None
    if sized is None:
        return 0
    logging.info(
        "device judge: params %.1f MiB, %.1f MiB per batch of %d questions x %d tokens (left "
        "free by the engine)",
        sized["params"] / 2**20,
        sized["batch"] / 2**20,
        judge.batch_size,
        sized["tokens"],
    )
    return sized["batch"]


def log_stats(sched: Any, engine: Any, judge: Any, seconds: float) -> None:
    """Two log lines: rows drawn, judge failures and engine use; how full the judge was."""
    st = sched.stats
    logging.info(
        "drew %d rollouts in %.1fs (%.0f/s; model load excluded), judged %d drawn earlier; judge: "
        "%d rows without a verdict, %d calls raised; judge waits %d, engine polls "
        "%d (%d while judging); engine: %d slots, slot use %.2f, refill cap %d, %d compilations",
        st.rows,
        seconds,
        st.rows / max(seconds, 1e-9),
        st.reused_rows,
        st.judge_failed_rows,
        st.judge_errors,
        st.judge_waits,
        st.polls,
        st.polls_while_judging,
        engine.stats.slots,
        engine.stats.slot_use,
        engine.stats.refills_per_step,
        engine.stats.compilations,
    )
    logging.info("%s", judge_utilisation(st, judge))


def write_figures(results: list[dict[str, Any]], out: Path, truth: dict[str, float]) -> None:
    """Figure 2 of every prompt that lacks it, refitted from its result, with its pooled fit.

    Drawn after the draws and the pooled fit (which needs every prompt's draws), not between
    draws: a figure takes about a second, which would stall the engine. Process 0 draws them all
    (multi-host). Each figure is rendered aside and moved in, so a kill never leaves half of one.
    """
    figures = out / "figures"
    for r in results:
        if (figures / f"{r['id']}.pdf").exists():
            continue
        if r["lpe"]["status"] == "no_data":  # mostly unknown verdicts: nothing to draw
            continue
        trace = tuple(LPEStep(**s) for s in r["lpe"]["trace"])
        pooled = r["lpe_pooled"]
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            paths = plots.plot_lpe_run(
                fit_paper(trace),
                fit_trace_binomial(trace),
                str(Path(tmp) / r["id"]),
                truth_rate=truth.get(r["id"]),
                pooled=(pooled["estimate"], pooled["lower"], pooled["upper"]),
                title=r["id"],
            )
            figures.mkdir(exist_ok=True)
            for path in sorted(paths, key=lambda q: q.endswith(".pdf")):  # the .pdf marks done
                os.replace(path, figures / Path(path).name)


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def add_pooled(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool every prompt's LPE draws (read back from its ``lpe`` trace) in one fit: sets each
    result's ``lpe_pooled`` (estimate, 95% interval, status, slopes) and returns the population
    (JSON-ready). Every estimate depends on the whole prompt set."""
    traces = [[LPEStep(**step) for step in r["lpe"]["trace"]] for r in results]
    fit = fit_pooled(traces, prior=FLAGS.pooled_prior)
    for r, p in zip(results, fit.prompts, strict=True):
        r["lpe_pooled"] = {
            "estimate": p.estimate,
            "lower": p.lower,
            "upper": p.upper,
            "status": p.status,
            "slope": p.slope,
            "prior_slope": p.prior_slope,
        }
    return {**_jsonable(fit.population), "level": fit.level, "prompts": len(results)}


def gather(out: Path, ids: list[str]) -> list[dict[str, Any]]:
    """Wait (multi-host) until every prompt's file exists with its mixture IS (when it runs),
    then read them in prompt order."""
    deadline = time.time() + FLAGS.gather_timeout
    while True:
        files = {i: out / "prompts" / f"{i}.json" for i in ids}
        missing = [i for i, f in files.items() if not f.exists()]
        if not missing:
            results = [json.loads(files[i].read_text()) for i in ids]
            missing = [r["id"] for r in results if "mixture_is" not in r]
            if not missing or mixture_left_out():
                return results
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
    if FLAGS.prompts_in_flight < 1 or FLAGS.steps_per_call < 1:
        raise ValueError(
            f"--prompts_in_flight, --steps_per_call must be >= 1; got {FLAGS.prompts_in_flight}, "
            f"{FLAGS.steps_per_call}"
        )
    judge = common.make_judge(FLAGS.original)  # cheap checks before loading models
    pair = common.load_pair()
    truth = load_truth()
    manifest = {
        **common.sampling_manifest(pair, prompts),
        "n_fit": FLAGS.n_fit,
        "n_search": FLAGS.n_search,
        "judge_id": judge.judge_id,
        "mixture_lambda": FLAGS.mixture_lambda,
    }
    out = RolloutStore.open(FLAGS.out, manifest).root  # refuses a directory of another run
    max_len = common.max_prompt_len(pair, prompts)
    estimate_prompts(pair, judge, prompts[process::n_proc], out, truth, max_len)
    if not mixture_left_out():
        add_mixture(pair, judge, prompts[process::n_proc], out, max_len)
    if process != 0:
        return
    results = gather(out, [p.id for p in prompts])
    population = add_pooled(results)
    if FLAGS.figures:
        write_figures(results, out, truth)
    n_deploy = FLAGS.forecast_prompts or 10 * len(results)
    summary = {
        "manifest": manifest,
        "pooled_population": population,
        "scores": report.scores(results, truth) if truth else None,
        "forecast": report.forecast(results, n_deploy, truth),
        "left_out": {m: why for m, why in left_out_methods().items() if why},
        "truth": truth or None,
        "prompts": results,
        "wall_seconds": time.time() - t0,
    }
    atomic_write_json(out / "results.json", summary)
    print(report.table(results, truth))
    for method, why in summary["left_out"].items():
        print(f"{LABELS[method]} left out: {why}")
    if truth:
        print("\n" + report.score_lines(summary["scores"]))
    print("\n" + report.forecast_lines(summary["forecast"]))
    logging.info("judge: %s", judge.stats.summary())
    print(f"\nresults: {out / 'results.json'}; figures: {out / 'figures'}; {time.time() - t0:.0f}s")


if __name__ == "__main__":
    common.run(main)
