"""Benchmark the main job (estimate.py's draws) on the rollout engine against one big sampler call.

Two workloads:
- ``--model=toy``: the toy organism's 32 prompts with its rule judge, as `make demo` runs them.
- ``--model=<preset>`` (e.g. qwen3_4b, tiny): random weights of that shape, prompts with the token
  lengths of the 200 HarmBench standard behaviours under Qwen3's chat template, no EOS (every row
  runs --max_new_tokens), and the draw pattern of adaptive LPE from a synthetic verdict: a row
  complies when a hash of its tokens falls below r(alpha) = 0.8 * (r1 / 0.8) ** alpha, with r1
  log-uniform in [1e-6, 1e-3] per prompt.

Parts (--parts; draws only, model load and compilation excluded; the sampler runs last, after the
engine has freed its memory):
- ``ideal``: one PairedSampler.sample call of as many rows as the LPE part drew (toy; one prompt,
  20 alphas) or of --max_rows rows (random weights). PairedSampler is a thin API over the engine
  (since issue 18), so this is the engine on one prompt's rows, submitted at once.
- ``engine``: the same rows as ``ideal`` as one job on the scheduler and engine (every draw
  submitted at once, no judge): the engine's throughput with no waiting on verdicts.
- ``lpe``: adaptive LPE of every prompt at once on the scheduler; rollouts/s and its ratio to
  ``ideal`` (the issue's goal: >= 0.7).
- ``full``: LPE with IS and naive at LPE's budget drawn alongside (Ahead draws), every prompt
  at once: what estimate.py runs.
- ``overlap`` (toy): ``full`` again with a judge that sleeps so that its throughput equals the
  decode throughput measured by ``full`` (judge seconds = decode seconds D); reports wall time
  W / max(D, J) (goal <= 1.2) and W / (D + J) (what judging after decoding would give, 1.0).

  .venv/bin/python experiments/benchmark_main_job.py                       # toy, every part
  .venv/bin/python experiments/benchmark_main_job.py --model=tiny --parts=ideal,full \\
      --prompts=8 --max_new_tokens=64 --n_fit=30 --max_rows=64              # CPU dry run
"""

from __future__ import annotations

import gc
import hashlib
import math
import time
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lpe_jax.estimators.lpe import DrawResult, adaptive_search
from lpe_jax.judges import make_judge
from lpe_jax.model import qwen3
from lpe_jax.organisms import toy
from lpe_jax.runs.pipeline import load_pair, main_job, method_seed
from lpe_jax.runs.scheduler import Ahead, Collect, Draw, Job, JobPrompt, Scheduler, search_job

# Deciles of the 200 HarmBench standard behaviours' lengths in tokens under Qwen3's chat template
# (harmbench_behaviors_text_all.csv, FunctionalCategory == standard, chat_prompt_ids with the
# Qwen3 tokenizer, thinking off): min 17, median 27, max 44, mean 27.8.
HARMBENCH_TOKEN_DECILES = (17, 22, 24, 25, 26, 27, 28, 30, 32, 35, 44)
PARTS = ("ideal", "engine", "lpe", "full", "overlap")

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "toy", "'toy', or a qwen3 preset name for random weights.")
flags.DEFINE_list("parts", list(PARTS), f"Which measurements, of {PARTS}.")
flags.DEFINE_integer("prompts", 32, "Prompts (toy: at most 32).")
flags.DEFINE_integer("n_fit", 100, "Rollouts per fit-phase alpha.")
flags.DEFINE_integer("max_new_tokens", 32, "Generated tokens per row at most.")
flags.DEFINE_integer("max_rows", None, "Engine slots (default: the engine's choice).")
flags.DEFINE_integer("prompts_in_flight", 64, "Jobs running at once (estimate.py's default).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_float("max_seconds", None, "Stop a part after this many seconds (rates so far).")
flags.DEFINE_integer("seed", 0, "Run seed.")
flags.DEFINE_integer("steps_per_call", 4, "Engine decode steps per call (estimate.py's default).")
flags.DEFINE_float("judge_grace", 0.5, "Scheduler judge_grace.")


class SleepyJudge:
    """Wraps a judge; every call first sleeps seconds_per_item * len(items)."""

    def __init__(self, inner: Any, seconds_per_item: float) -> None:
        self.inner, self.seconds_per_item = inner, seconds_per_item
        self.judge_id, self.stats = inner.judge_id, inner.stats
        self.slept = 0.0

    def judge(self, items: list) -> list:
        t = self.seconds_per_item * len(items)
        time.sleep(t)
        self.slept += t
        return self.inner.judge(items)


def synthetic_job(
    search: Any,
    seed: int,
    rate: Callable[[float], float],
    ahead: Callable[[int], Ahead] | None = None,
) -> Job:
    """search_job, but k counts rows whose token hash falls below rate(alpha) (no judge);
    ``ahead(n)`` as in search_job."""
    try:
        request = next(search)
        while True:
            if ahead is not None:
                yield ahead(int(request.n))
            drawn = yield Draw(request.alpha, request.n, seed)
            rows = zip(drawn.tokens, drawn.lengths, strict=True)
            u = np.array([_row_uniform(t, n) for t, n in rows])
            k = int((u < rate(request.alpha)).sum())
            request = search.send(DrawResult(k, int(drawn.lengths.sum()), request.n))
    except StopIteration as stop:
        return stop.value


def synthetic_main_job(prompt_id: str, rate: Callable[[float], float]) -> Job:
    """main_job's draw pattern with synthetic verdicts: IS and naive rows started alongside
    LPE's draws (Ahead), collected at its end."""
    s_is, s_naive = (method_seed(FLAGS.seed, prompt_id, m) for m in ("is", "naive"))

    def companions(m: int) -> Ahead:
        return Ahead([Draw(0.0, m, s_is), Draw(1.0, m, s_naive)])

    search = adaptive_search(FLAGS.n_fit)
    seed = method_seed(FLAGS.seed, prompt_id, "lpe")
    trace = yield from synthetic_job(search, seed, rate, ahead=companions)
    yield Collect()
    return trace


def _row_uniform(tokens: np.ndarray, length: int) -> float:
    digest = hashlib.sha256(np.ascontiguousarray(tokens[:length]).tobytes()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32


def _rate(i: int) -> Callable[[float], float]:
    r1 = 10 ** np.random.default_rng([FLAGS.seed, i]).uniform(-6, -3)
    return lambda alpha: 0.8 * (r1 / 0.8) ** alpha


class Workload:
    """The models, prompts, judge and job factories of one --model."""

    def __init__(self) -> None:
        if FLAGS.model == "toy":
            pair = load_pair(*toy.toy_pair_paths())
            self.original, self.variant, self.eos = pair.original, pair.variant, pair.eos_token_ids
            rows = toy.toy_prompts()[: FLAGS.prompts]
            self.prompts = [
                JobPrompt(p["id"], toy.chat_ids(p["prompt"]), p["prompt"]) for p in rows
            ]
            self.judge = make_judge("rule", predicate=toy.toy_complied, name="toy")
            self.decode = pair.decode
        else:
            cfg = qwen3.PRESETS[FLAGS.model]
            dtype = jnp.dtype(FLAGS.dtype)
            self.original = qwen3.init_random(cfg, dtype=dtype, seed=0)
            self.variant = qwen3.init_random(cfg, dtype=dtype, seed=1)
            self.eos = ()  # random weights: every row runs max_new_tokens, as in benchmark_decode
            rng = np.random.default_rng(FLAGS.seed)
            self.prompts = [
                JobPrompt(f"p{i:03d}", rng.integers(0, cfg.vocab_size, n), "")
                for i, n in enumerate(
                    HARMBENCH_TOKEN_DECILES[i % len(HARMBENCH_TOKEN_DECILES)]
                    for i in range(FLAGS.prompts)
                )
            ]
            self.judge = self.decode = None

    def lpe_job(self, i: int) -> Job:
        key = self.prompts[i].key
        search = adaptive_search(FLAGS.n_fit)
        if self.judge is None:
            return synthetic_job(search, method_seed(FLAGS.seed, key, "lpe"), _rate(i))
        return search_job(search, method_seed(FLAGS.seed, key, "lpe"))

    def full_job(self, i: int) -> Job:
        key = self.prompts[i].key
        if self.judge is None:
            return synthetic_main_job(key, _rate(i))
        return main_job(key, FLAGS.seed, FLAGS.n_fit)


def run_jobs(engine: Any, work: Workload, make_job: Callable[[int], Job], judge: Any) -> dict:
    """All prompts' jobs at once on a fresh scheduler; rows, tokens and seconds of the draws."""
    slots = engine.slots
    sched = Scheduler(
        engine,
        judge=judge,
        decode=work.decode if judge is not None else None,
        block_rows=min(64, slots),
        max_inflight_rows=max(4 * slots, 64),
        max_jobs=FLAGS.prompts_in_flight,
        judge_grace=FLAGS.judge_grace,
    )
    for i, p in enumerate(work.prompts):
        sched.add(p.key, p, make_job(i))
    t0, tokens0, steps0 = time.perf_counter(), engine.stats.tokens, engine.stats.steps

    def out_of_time() -> bool:
        return bool(FLAGS.max_seconds) and time.perf_counter() - t0 > FLAGS.max_seconds

    finished = sum(1 for _ in sched.run(stop=out_of_time))
    seconds = time.perf_counter() - t0
    st = sched.stats
    # Tokens the engine generated, rows still in flight at a time limit included.
    tokens, steps = engine.stats.tokens - tokens0, engine.stats.steps - steps0
    return dict(
        rows=st.rows_done, tokens=tokens, seconds=seconds, jobs=finished, stats=st, steps=steps
    )


def warm_up(engine: Any, work: Workload) -> None:
    """Compile what the parts will use: one short draw per prompt (every prompt bucket)."""

    def one(i: int) -> Job:
        yield Draw(0.5, 2, 2**32 - 1 - i)

    sched = Scheduler(engine, block_rows=2, max_inflight_rows=4 * engine.slots)
    for i, p in enumerate(work.prompts):
        sched.add(p.key, p, one(i))
    for _ in sched.run():
        pass


IDEAL_ALPHAS = np.round(np.linspace(0, 0.95, 20), 2)


def engine_one_job(engine: Any, work: Workload, rows: int) -> dict:
    """`ideal`'s rows (first prompt, 20 alphas) as one job drawing everything at once."""
    per = math.ceil(rows / IDEAL_ALPHAS.size)

    def everything() -> Job:
        yield [Draw(float(a), per, 3) for a in IDEAL_ALPHAS]

    sched = Scheduler(engine, block_rows=min(64, engine.slots), max_inflight_rows=4 * engine.slots)
    sched.add("all", work.prompts[0], everything())
    t0, steps0 = time.perf_counter(), engine.stats.steps
    for _ in sched.run():
        pass
    st = sched.stats
    seconds, steps = time.perf_counter() - t0, engine.stats.steps - steps0
    return dict(rows=st.rows_done, tokens=st.tokens, seconds=seconds, steps=steps)


def ideal(work: Workload, rows: int) -> dict:
    """One PairedSampler.sample call of `rows` rows on the first prompt, 20 alphas (timed warm)."""
    from lpe_jax.decoding.sampler import PairedSampler

    s = PairedSampler(
        original=work.original,
        variant=work.variant,
        path="linear",
        max_new_tokens=FLAGS.max_new_tokens,
        eos_token_ids=work.eos,
        max_rows=FLAGS.max_rows,
    )
    per = math.ceil(rows / IDEAL_ALPHAS.size)
    ids = work.prompts[0].ids
    s.sample(ids, IDEAL_ALPHAS, per, seed=1)  # compiles
    t0 = time.perf_counter()
    r = s.sample(ids, IDEAL_ALPHAS, per, seed=2)
    seconds = time.perf_counter() - t0
    return dict(rows=r.lengths.size, tokens=int(r.lengths.sum()), seconds=seconds)


def line(name: str, res: dict, ref: dict | None, slots: int) -> str:
    """One part's throughput; for engine parts also its slot use (tokens / (slots x steps)),
    which does not depend on how busy the machine is."""
    rate, tok = res["rows"] / res["seconds"], res["tokens"] / res["seconds"]
    out = (
        f"{name:>8}: {res['rows']:>7} rollouts {res['tokens']:>9} tokens in {res['seconds']:7.2f} s"
        f" = {rate:8.1f} rollouts/s, {tok:9.0f} pair-tokens/s"
    )
    if ref is not None:
        out += f"  ({rate / (ref['rows'] / ref['seconds']):.2f}x the one-call sampler)"
    if "steps" in res:
        out += f"  [{res['steps']} steps, slot use {res['tokens'] / (slots * res['steps']):.2f}]"
    return out


def main(argv: list[str]) -> None:
    del argv
    import jax

    from lpe_jax.decoding.engine import RolloutEngine

    unknown = set(FLAGS.parts) - set(PARTS)
    if unknown:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; choose from {PARTS}")
    if FLAGS.model != "toy" and FLAGS.model not in qwen3.PRESETS:
        raise ValueError(f"--model={FLAGS.model}: use 'toy' or one of {sorted(qwen3.PRESETS)}")
    work = Workload()
    engine = RolloutEngine(
        work.original,
        work.variant,
        "linear",
        FLAGS.max_new_tokens,
        work.eos,
        slots=FLAGS.max_rows,
        steps_per_call=FLAGS.steps_per_call,
        max_prompt_len=max(p.ids.size for p in work.prompts),
    )
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  model={FLAGS.model} "
        f"prompts={len(work.prompts)} n_fit={FLAGS.n_fit} max_new_tokens={FLAGS.max_new_tokens} "
        f"slots={engine.slots} steps_per_call={engine.steps_per_call} "
        f"prompts_in_flight={FLAGS.prompts_in_flight} judge_grace={FLAGS.judge_grace}"
    )
    t0 = time.perf_counter()
    warm_up(engine, work)
    print(f"warm-up (compilation): {time.perf_counter() - t0:.1f} s")
    results: dict[str, dict] = {}
    if "lpe" in FLAGS.parts:
        results["lpe"] = run_jobs(engine, work, work.lpe_job, work.judge)
    if "full" in FLAGS.parts or "overlap" in FLAGS.parts:
        results["full"] = run_jobs(engine, work, work.full_job, work.judge)
    if "overlap" in FLAGS.parts:
        results["overlap"] = overlap(engine, work, results["full"])
    rows = results["lpe"]["rows"] if "lpe" in results else engine.slots
    if "engine" in FLAGS.parts:
        results["engine"] = engine_one_job(engine, work, rows)
    print(f"engine stats (all parts): {engine.stats}", flush=True)
    slots = engine.slots
    del engine  # free its device memory for the sampler's own chunk
    gc.collect()
    ref = ideal(work, rows) if "ideal" in FLAGS.parts else None
    if ref is not None:
        print(line("ideal", ref, None, slots))
    for name in ("engine", "lpe", "full"):
        if name in results:
            res = results[name]
            done = f"  [{res['jobs']}/{len(work.prompts)} prompts]" if "jobs" in res else ""
            print(line(name, res, ref, slots) + done)
    if "overlap" in results:
        print(results["overlap"]["line"])


def overlap(engine: Any, work: Workload, full: dict) -> dict:
    """`full` again with a judge as slow as the decoding was (see the module docstring)."""
    if work.judge is None:
        raise ValueError("--parts=overlap needs a real judge: use --model=toy")
    decode_s = full["seconds"]
    judge = SleepyJudge(work.judge, decode_s / full["rows"])
    res = run_jobs(engine, work, work.full_job, judge)
    wall, busy = res["seconds"], judge.slept
    st = res["stats"]
    res["line"] = (
        f" overlap: decode alone D = {decode_s:.2f} s; judge asleep J = {busy:.2f} s over "
        f"{st.judge_batches} calls; wall W = {wall:.2f} s = {wall / max(decode_s, busy):.2f} x "
        f"max(D, J) = {wall / (decode_s + busy):.2f} x (D + J); engine polls while judging "
        f"{st.polls_while_judging}/{st.polls}"
    )
    return res


if __name__ == "__main__":
    app.run(main)
