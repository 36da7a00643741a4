"""Benchmark the main job with an HTTP judge of fixed latency: is the judge's concurrency full?

The toy organism's main job (estimate.py's draws: adaptive LPE, then IS and naive at its
budget, every prompt at once) runs three times on one warm engine:

- ``rule``: the toy's rule judge in process (instant): decode alone, D seconds.
- ``rubric``: RubricJudge over HTTP against experiments/loopback_judge_server.py in its own
  process, which applies the toy's rule and answers after --latency_s; wall W. Its verdicts equal
  the rule's, so the results must equal ``rule``'s prompt for prompt (checked). J = requests x
  latency / concurrency: the judge's own time at full concurrency. Goal: W <= 1.2 x max(D, J)
  and >= 0.9 x concurrency requests in flight on average while rows are pending at the judge.
- ``sleep``: the same with an in-process judge that sleeps --latency_s per item on
  `concurrency` threads (no HTTP, almost no CPU): what the scheduler does without the HTTP
  client's CPU cost; the gap between ``sleep`` and ``rubric`` is the client's.

Also printed: CPU seconds of this process per run (the HTTP client's share is rubric - rule)
and of the server process.

  .venv/bin/python experiments/benchmark_http_judge.py --prompts=16 --n_fit=30 --latency_s=0.2
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import benchmark_main_job as bmj  # same folder; defines --prompts, --n_fit, ... (FLAGS)
import numpy as np
from absl import app, flags

from lpe_jax.judges import JudgeStats, RubricJudge, Verdict
from lpe_jax.runs.scheduler import Scheduler, judge_utilisation

FLAGS = flags.FLAGS
flags.DEFINE_float("latency_s", 0.2, "The loopback server's fixed latency per request (s).")
flags.DEFINE_integer("concurrency", 64, "The judge's max_concurrency.")
flags.DEFINE_list("runs", ["rule", "rubric", "sleep"], "Which runs, of rule, rubric, sleep.")


class Server:
    """experiments/loopback_judge_server.py in its own process (stops with this one)."""

    def __init__(self, latency_s: float) -> None:
        script = Path(__file__).with_name("loopback_judge_server.py")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), f"--latency_s={latency_s}", "--rule=toy"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.base_url = self.proc.stdout.readline().strip()
        self.root = self.base_url.rsplit("/v1", 1)[0]

    def get(self, what: str) -> Any:
        with urllib.request.urlopen(f"{self.root}/{what}", timeout=30) as reply:
            return json.loads(reply.read())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class SleepJudge:
    """The rule judge behind `concurrency` threads that each sleep `latency_s` per item."""

    def __init__(self, inner: Any, latency_s: float, concurrency: int) -> None:
        self.inner, self.latency_s, self.concurrency = inner, latency_s, concurrency
        self.judge_id, self.stats = inner.judge_id, JudgeStats()  # its own counts, not inner's
        self._pool = cf.ThreadPoolExecutor(concurrency)
        self._lock = threading.Lock()

    def _one(self, item: tuple[str, str]) -> Verdict:
        t0 = time.perf_counter()
        time.sleep(self.latency_s)
        with self._lock:
            self.stats.items += 1
            self.stats.request_s += time.perf_counter() - t0
        return self.inner.judge([item])[0]

    def judge(self, items: list) -> list[Verdict]:
        return list(self._pool.map(self._one, items))

    def close(self) -> None:
        self._pool.shutdown()


def run(engine: Any, work: bmj.Workload, judge: Any) -> dict:
    """Every prompt's main job at once; results by prompt, seconds, CPU seconds, stats."""
    slots = engine.slots
    sched = Scheduler(
        engine,
        judge=judge,
        decode=work.decode,
        block_rows=min(64, slots),
        max_inflight_rows=max(4 * slots, 64),
        max_jobs=FLAGS.prompts_in_flight,
    )
    for i, p in enumerate(work.prompts):
        sched.add(p.key, p, work.full_job(i))
    cpu0, t0 = os.times(), time.perf_counter()
    results = dict(sched.run())
    seconds, cpu1 = time.perf_counter() - t0, os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return dict(results=results, seconds=seconds, cpu=cpu, stats=sched.stats)


def same_results(a: dict, b: dict) -> bool:
    """Whether two runs' MainDraws are equal prompt for prompt."""

    def flat(r: Any) -> tuple:
        d = dataclasses.asdict(r)
        path = d.pop("path")  # the LPE rows' arrays: compared bit for bit (NaN rows included)
        d.update({f"path.{k}": np.asarray(v).tobytes() for k, v in path.items()})
        return tuple(
            (k, v if k.startswith("path.") else repr(v) if k == "trace" else np.asarray(v).tolist())
            for k, v in d.items()
        )

    return a.keys() == b.keys() and all(flat(a[k]) == flat(b[k]) for k in a)


def main(argv: list[str]) -> None:
    del argv
    from lpe_jax.decoding.engine import RolloutEngine

    if FLAGS.model != "toy":
        raise ValueError("--model: this benchmark runs the toy organism only (--model=toy)")
    work = bmj.Workload()
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
    lat, width = FLAGS.latency_s, FLAGS.concurrency
    print(
        f"prompts={len(work.prompts)} n_fit={FLAGS.n_fit} slots={engine.slots} latency={lat} s "
        f"concurrency={width} cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}",
        flush=True,
    )
    bmj.warm_up(engine, work)
    rule = run(engine, work, work.judge)
    d = rule["seconds"]
    rows, cpu = rule["stats"].rows, rule["cpu"]
    print(f"rule: D = {d:.1f} s, {rows} rollouts, CPU {cpu:.1f} s", flush=True)
    if "rubric" in FLAGS.runs:
        server = Server(lat)
        judge = RubricJudge(
            base_url=server.base_url, model="toy-rule", api_key_env=None, max_concurrency=width
        )
        try:
            res = run(engine, work, judge)
            srv = server.get("stats")
        finally:
            judge.close()
            server.close()
        report("rubric", res, rule, judge.stats.requests, srv, judge)
        print(f"  {judge.stats.summary()}")
    if "sleep" in FLAGS.runs:
        judge = SleepJudge(work.judge, lat, width)
        try:
            res = run(engine, work, judge)
        finally:
            judge.close()
        report("sleep", res, rule, judge.stats.items, None, judge)


def report(name: str, res: dict, rule: dict, requests: int, srv: dict | None, judge: Any) -> None:
    """One block of lines for a judged run."""
    lat, width, d = FLAGS.latency_s, FLAGS.concurrency, rule["seconds"]
    w, st = res["seconds"], res["stats"]
    j = requests * lat / width
    js = judge.stats
    if js.backlog_s > 0:  # the judge's own count: while >= width requests were wanted
        inflight, during = js.backlog_request_s / js.backlog_s, f">= {width} requests were wanted"
    else:  # SleepJudge: while any rows were at the judge
        inflight, during = js.request_s / st.judge_busy_s, "any rows were at the judge"
    print(
        f"{name}: W = {w:.1f} s; {requests} requests, J = {j:.1f} s; W / max(D, J) = "
        f"{w / max(d, j):.2f}; {inflight:.1f} of {width} in flight on average while {during} "
        f"({inflight / width:.2f}); results equal the rule judge's: "
        f"{same_results(res['results'], rule['results'])}; CPU {res['cpu']:.1f} s "
        f"(+{res['cpu'] - rule['cpu']:.1f} s over rule)",
        flush=True,
    )
    print(f"  {judge_utilisation(st, judge)}")
    if srv is not None:
        print(
            f"  server: {srv['requests']} requests, peak {srv['peak']} in flight, "
            f"{srv['mean_inflight']:.1f} on average while busy ({srv['busy_s']:.1f} s), "
            f"CPU {srv['cpu_s']:.1f} s",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
