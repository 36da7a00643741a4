"""Decode step of a pair: the variant as a second full model vs as low-rank deltas on the original.

Random weights at a memory-bound shape (few rows, weights dominate); the variant is the original
abliterated along a random direction (`orthogonalize_model`) and then copied into buffers of its
own, as two loaded checkpoints would be. One jitted step = both models decode one token per row
(lockstep `Qwen3.decode`, caches donated) and the next token is the argmax of the mean logits.

--mode=both: step time, alternating the two ways round by round (a loaded box drifts), the params
held (distinct buffers) and XLA's cost-analysis bytes accessed per step. --mode=two|low_rank: one
way only, with the live JAX buffers at the end (what a device would hold) and the process's RSS
(run each in its own process; freed host memory is not always returned, so RSS lags).

  .venv/bin/python experiments/benchmark_low_rank.py --mode=both
"""

from __future__ import annotations

import dataclasses
import functools
import resource
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from lpe_jax.abliteration.orthogonalize import orthogonalize_model
from lpe_jax.model import qwen3
from lpe_jax.model.low_rank import as_low_rank, unique_bytes, unique_param_bytes

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "both", ["both", "two", "low_rank"], "Which pair(s) to run.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("hidden", 1024, "Hidden size.")
flags.DEFINE_integer("layers", 4, "Decoder layers.")
flags.DEFINE_integer("vocab", 32768, "Vocabulary (tied embeddings in the original).")
flags.DEFINE_integer("rows", 8, "Rows decoded per step.")
flags.DEFINE_integer("steps", 32, "Timed steps per round.")
flags.DEFINE_integer("rounds", 5, "Rounds (--mode=both alternates the pairs each round).")

MIB = 2.0**20


def _config() -> qwen3.Qwen3Config:
    h = FLAGS.hidden
    return qwen3.Qwen3Config(FLAGS.vocab, h, FLAGS.layers, h // 128, max(1, h // 256), 128, 3 * h)


def _own_copy(model: qwen3.Qwen3) -> qwen3.Qwen3:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(4, 5))
def _step(gd_o: Any, gd_v: Any, st_o: Any, st_v: Any, c_o: Any, c_v: Any, tokens: Any, i: Any):
    l_o, c_o = nnx.merge(gd_o, st_o).decode(tokens, i, c_o)
    l_v, c_v = nnx.merge(gd_v, st_v).decode(tokens, i, c_v)
    return c_o, c_v, jnp.argmax(l_o + l_v, axis=-1).astype(jnp.int32)


class Pair:
    """One way of holding the pair, with its caches, ready to step."""

    def __init__(self, original: qwen3.Qwen3, variant: qwen3.Qwen3):
        self.gd_o, self.st_o = nnx.split(original)
        self.gd_v, self.st_v = nnx.split(variant)
        self.param_bytes = unique_param_bytes(original, variant)
        prompt = jnp.arange(16, dtype=jnp.int32) % original.cfg.vocab_size
        capacity = FLAGS.steps * FLAGS.rounds + 1
        self.c_o = original.init_cache(prompt, FLAGS.rows, capacity)[1]
        self.c_v = variant.init_cache(prompt, FLAGS.rows, capacity)[1]
        self.tokens = jnp.zeros((FLAGS.rows,), jnp.int32)
        self.i = 0

    def args(self) -> tuple[Any, ...]:
        return (self.gd_o, self.gd_v, self.st_o, self.st_v, self.c_o, self.c_v, self.tokens)

    def bytes_accessed(self) -> float:
        cost = _step.lower(*self.args(), jnp.int32(0)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("bytes accessed", float("nan")))

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            self.c_o, self.c_v, self.tokens = _step(*self.args(), jnp.int32(self.i))
            self.i += 1
        self.tokens.block_until_ready()
        return (time.perf_counter() - t0) / steps


def _pairs(mode: str) -> dict[str, Pair]:
    cfg = _config()
    original = qwen3.init_random(cfg, dtype=FLAGS.dtype, seed=0)
    direction = np.random.default_rng(1).normal(size=cfg.hidden_size)
    variant = _own_copy(orthogonalize_model(original, direction))
    pairs = {}
    if mode in ("both", "two"):
        pairs["two models"] = Pair(original, variant)
    if mode in ("both", "low_rank"):
        low_rank, plan = as_low_rank(original, variant)
        print(plan.summary())
        pairs["low rank"] = Pair(original, low_rank)
    del variant
    return pairs


def main(argv: list[str]) -> None:
    del argv
    cfg = _config()
    print(f"config {dataclasses.asdict(cfg)}; dtype {FLAGS.dtype}; rows {FLAGS.rows}")
    print(f"device {jax.devices()[0].device_kind}")
    pairs = _pairs(FLAGS.mode)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    for name, p in pairs.items():
        p.run(2)  # compile and warm up
        print(
            f"{name}: params held {p.param_bytes / MIB:.1f} MiB; XLA bytes accessed per step "
            f"{p.bytes_accessed() / MIB:.1f} MiB"
        )
    times: dict[str, list[float]] = {n: [] for n in pairs}
    for _ in range(FLAGS.rounds):
        for name, p in pairs.items():
            times[name].append(p.run(FLAGS.steps))
    for name, ts in times.items():
        print(
            f"{name}: {1e3 * statistics.median(ts):.2f} ms/step (median of {len(ts)} rounds of "
            f"{FLAGS.steps}; min {1e3 * min(ts):.2f}, max {1e3 * max(ts):.2f})"
        )
    if FLAGS.mode != "both":
        with open("/proc/self/status") as fh:
            now = next(int(x.split()[1]) for x in fh if x.startswith("VmRSS")) / 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        live = unique_bytes(jax.live_arrays()) / MIB  # what a device would hold
        print(
            f"live JAX buffers at the end {live:.0f} MiB; RSS: peak during setup {rss:.0f} MiB, "
            f"at the end {now:.0f}, peak {peak:.0f}"
        )


if __name__ == "__main__":
    app.run(main)
