"""The main job's draws on a simulated device and judge: is W close to max(D, J) when J ~ D?

Wall-time figures of the toy organism swing with the load of this shared 2-core box (the decode
runs on its CPU). Here both sides only sleep, as a device and a remote judge cost the host little
CPU, so the figures hold under load:

- the engine: continuous batching over --slots slots, --steps_per_call decode steps per poll,
  --step_ms per step whatever the slots hold (a device step); row r of stream (seed, alpha) has a
  length in [1, --max_new_tokens] and complies with probability
  r(alpha) = 0.8 * (r1 / 0.8) ** alpha (r1 log-uniform in [1e-6, 1e-3] per prompt), both from a
  hash of (seed, alpha, r), so rows do not depend on timing;
- the judge: --concurrency threads, each sleeping --latency_s per row (a fixed-latency endpoint;
  every row distinct, no deduplication), verdict read from the row.

Each prompt runs the main job (adaptive LPE, --n_fit; IS and naive at LPE's budget), shaped two
ways: ``after`` (IS and naive drawn once LPE ends: the main job before Ahead draws) and
``ahead`` (pipeline.main_job: IS and naive drawn alongside LPE). Per shape: D = wall with an
instant judge, W = wall with the sleeping judge, J = rows x latency / concurrency; the goal is
W <= 1.2 x max(D, J) with >= 0.9 x concurrency requests in flight while >= concurrency are
wanted. Results must be equal across judges and shapes (same seed, same rows; checked).

  .venv/bin/python experiments/benchmark_judge_overlap.py --prompts=16 --latency_s=0.2
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import threading
import time
from collections.abc import Hashable
from typing import Any

import numpy as np
from absl import app, flags

from lpe_jax.decoding.engine import BlockResult
from lpe_jax.decoding.rollouts import Rollouts
from lpe_jax.decoding.row_block import RowBlock
from lpe_jax.estimators.lpe import adaptive_search
from lpe_jax.judges.base import JudgeStats, Verdict
from lpe_jax.runs.pipeline import main_job, method_seed
from lpe_jax.runs.scheduler import Draw, Job, JobPrompt, Scheduler, search_job

FLAGS = flags.FLAGS
flags.DEFINE_integer("prompts", 16, "Prompts, all in flight.")
flags.DEFINE_integer("n_fit", 30, "Rollouts per fit-phase alpha.")
flags.DEFINE_integer("slots", 256, "Engine slots.")
flags.DEFINE_integer("max_new_tokens", 32, "Row length at most (uniform in [1, this]).")
flags.DEFINE_integer("steps_per_call", 4, "Decode steps per engine poll.")
flags.DEFINE_float("step_ms", 20.0, "Simulated device time per decode step (ms).")
flags.DEFINE_float("latency_s", 0.2, "The judge's fixed latency per row (s).")
flags.DEFINE_integer("concurrency", 64, "The judge's requests in flight at most.")
flags.DEFINE_list("shapes", ["after", "ahead"], "Main-job shapes, of after, ahead.")
flags.DEFINE_integer("seed", 0, "Run seed.")
flags.DEFINE_integer("ahead_engine_rows", None, "Scheduler ahead_engine_rows (default: slots).")


def _uniforms(seed: int, alpha: float, r: int) -> tuple[float, float]:
    h = hashlib.sha256(f"{seed}:{round(alpha * 1e6)}:{r}".encode()).digest()
    return int.from_bytes(h[:4], "little") / 2**32, int.from_bytes(h[4:8], "little") / 2**32


def rate_of(prompt_key: Hashable) -> Any:
    """r(alpha) of one prompt (see the module docstring)."""
    h = hashlib.sha256(str(prompt_key).encode()).digest()
    r1 = 10 ** (-6 + 3 * int.from_bytes(h[:4], "little") / 2**32)
    return lambda alpha: 0.8 * (r1 / 0.8) ** alpha


class SleepEngine:
    """The scheduler's engine contract; every decode step sleeps step_ms (see module docstring)."""

    def __init__(self, slots: int, step_s: float, steps: int, max_new_tokens: int) -> None:
        self.slots, self.step_s, self.steps, self.t_n = slots, step_s, steps, max_new_tokens
        self.queue: list[tuple[Any, int]] = []
        self.live: list[list] = []  # [block id, remaining steps]
        self.left: dict[int, int] = {}
        self.open: dict[int, tuple[RowBlock, Rollouts]] = {}
        self.steps_run = self.slot_steps = 0  # decode steps, and busy slots summed over them

    def submit(self, block: RowBlock) -> None:
        rate = rate_of(block.prompt_key)(block.alpha)
        lengths = np.zeros(block.count, np.int32)
        tokens = np.full((block.count, self.t_n), -1, np.int32)
        for i in range(block.count):
            u_c, u_len = _uniforms(block.seed, block.alpha, block.rollout_start + i)
            lengths[i] = 1 + int(u_len * self.t_n)
            tokens[i, : lengths[i]] = 7
            tokens[i, 0] = int(u_c < rate)
        lp = -lengths.astype(np.float32)
        rows = Rollouts(
            tokens[None], lengths[None], lp[None], 1.1 * lp[None], 1.05 * lp[None],
            (lengths == self.t_n)[None], np.zeros((1, block.count), bool),
            np.array([block.alpha], np.float64), block.rollout_start,
        )  # fmt: skip
        self.open[id(block)] = (block, rows)
        self.left[id(block)] = block.count
        self.queue += [(id(block), int(n)) for n in lengths]

    @property
    def idle(self) -> bool:
        return not self.queue and not self.live

    def poll(self) -> list[BlockResult]:
        done = []
        for _ in range(self.steps):
            if self.idle:
                break
            free = self.slots - len(self.live)
            self.live += [[b, n] for b, n in self.queue[:free]]
            del self.queue[:free]
            time.sleep(self.step_s)
            self.steps_run += 1
            self.slot_steps += len(self.live)
            for row in self.live:
                row[1] -= 1
            for b, _ in (r for r in self.live if r[1] <= 0):
                self.left[b] -= 1
                if self.left[b] == 0:
                    done.append(BlockResult(*self.open.pop(b)))
            self.live = [r for r in self.live if r[1] > 0]
        return done


def decode(ids: list[int]) -> str:
    return "sure" if ids and ids[0] == 1 else "no"


class SleepJudge:
    """`concurrency` threads that sleep `latency_s` per row; 0 latency: answers at once. Counts
    requests in flight over time as RubricJudge does (request_s, backlog_s, ...)."""

    judge_id = "sleep"

    def __init__(self, latency_s: float, concurrency: int) -> None:
        self.latency_s, self.stats = latency_s, JudgeStats()
        self.concurrency = concurrency if latency_s > 0 else None
        self._pool = cf.ThreadPoolExecutor(concurrency) if latency_s > 0 else None
        self._lock = threading.Lock()
        self._active = self._wanted = 0
        self._since = time.perf_counter()

    def _tick(self, active: int = 0, wanted: int = 0) -> None:
        with self._lock:
            now = time.perf_counter()
            dt, self._since = now - self._since, now
            self.stats.request_s += self._active * dt
            if self._wanted >= self.concurrency:
                self.stats.backlog_s += dt
                self.stats.backlog_request_s += self._active * dt
            self._active += active
            self._wanted += wanted

    def _one(self, item: tuple[str, str]) -> Verdict:
        self._tick(active=1)
        time.sleep(self.latency_s)
        self._tick(active=-1, wanted=-1)
        return Verdict(item[1] == "sure", self.judge_id)

    def judge(self, items: list) -> list[Verdict]:
        self.stats.items += len(items)
        if self._pool is None:
            return [Verdict(r == "sure", self.judge_id) for _, r in items]
        self._tick(wanted=len(items))
        return list(self._pool.map(self._one, items))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def after_job(prompt_id: str) -> Job:
    """The main job as it was before Ahead draws: IS and naive once LPE ends."""
    seed = FLAGS.seed
    search = adaptive_search(FLAGS.n_fit)
    trace = yield from search_job(search, method_seed(seed, prompt_id, "lpe"))
    n = sum(s.n for s in trace)
    is_, naive = yield [
        Draw(0.0, n, method_seed(seed, prompt_id, "is")),
        Draw(1.0, n, method_seed(seed, prompt_id, "naive")),
    ]
    return trace, is_.verdicts.tolist(), naive.verdicts.tolist()


def ahead_job(prompt_id: str) -> Job:
    r = yield from main_job(prompt_id, FLAGS.seed, FLAGS.n_fit)
    return r.trace, r.is_verdicts.tolist(), r.naive_verdicts.tolist()


def run(shape: str, latency_s: float) -> dict:
    engine = SleepEngine(
        FLAGS.slots, FLAGS.step_ms / 1e3, FLAGS.steps_per_call, FLAGS.max_new_tokens
    )
    judge = SleepJudge(latency_s, FLAGS.concurrency)
    sched = Scheduler(
        engine,
        judge=judge,
        decode=decode,
        block_rows=min(64, FLAGS.slots),
        max_inflight_rows=4 * FLAGS.slots,
        ahead_engine_rows=FLAGS.ahead_engine_rows,
    )
    make = ahead_job if shape == "ahead" else after_job
    for i in range(FLAGS.prompts):
        key = f"p{i:03d}"
        sched.add(key, JobPrompt(key, np.array([1, 2, 3]), key), make(key))
    t0, cpu0 = time.perf_counter(), os.times()
    try:
        results = dict(sched.run())
    finally:
        judge.close()
    cpu1 = os.times()
    cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
    use = engine.slot_steps / max(1, engine.steps_run * engine.slots)
    return dict(results=results, seconds=time.perf_counter() - t0, cpu=cpu, stats=sched.stats,
                judge=judge, steps=engine.steps_run, use=use)  # fmt: skip


def main(argv: list[str]) -> None:
    del argv
    lat, width = FLAGS.latency_s, FLAGS.concurrency
    print(
        f"prompts={FLAGS.prompts} n_fit={FLAGS.n_fit} slots={FLAGS.slots} "
        f"step={FLAGS.step_ms} ms x {FLAGS.steps_per_call} per poll, latency={lat} s, "
        f"concurrency={width}, load={os.getloadavg()[0]:.1f}",
        flush=True,
    )
    first = None
    for shape in FLAGS.shapes:
        d = run(shape, 0.0)
        w = run(shape, lat)
        rows = w["stats"].rows
        j = rows * lat / width
        js, busy = w["judge"].stats, w["stats"].judge_busy_s
        full = js.backlog_request_s / js.backlog_s if js.backlog_s else float("nan")
        first = first or d["results"]
        same = d["results"] == w["results"] == first
        print(
            f"{shape}: D = {d['seconds']:.1f} s, {rows} rows, J = {j:.1f} s, W = {w['seconds']:.1f}"
            f" s, W / max(D, J) = {w['seconds'] / max(d['seconds'], j):.2f}; in flight "
            f"{js.request_s / busy:.1f} of {width} while any rows were at the judge, {full:.1f} "
            f"({full / width:.2f}) while >= {width} were wanted ({js.backlog_s:.1f} s); results "
            f"equal across judges and shapes: {same}; engine steps {d['steps']} / {w['steps']}, "
            f"slot use {d['use']:.2f} / {w['use']:.2f} (D / W runs); CPU {w['cpu']:.1f} s; "
            f"load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
