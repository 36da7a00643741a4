"""Decode step of a pair, three ways: two models, the low-rank variant in its own pass, and the
low-rank pair as 2B rows through one copy of the weights (issue 20).

Random weights at a memory-bound shape (few rows, weights dominate); the variant is the original
abliterated along a random direction (`orthogonalize_model`) and then copied into buffers of its
own, as two loaded checkpoints would be. One jitted step is the engine's decode step of both
models (the layer-state protocol `decode_slots`, per-slot prompt and own K/V, states donated):
- two: `decode_slots` of the original and of the full variant;
- low_rank: the same with the variant as `as_low_rank`'s deltas (two passes, one weight copy held);
- paired: `paired_model(...).decode_slots_pair`: one pass over 2B rows (what `RolloutEngine` runs
  when the variant is low rank).
The argmax of the summed logits is fed back as the next token.

--mode=all: the three ways' step time, alternating them round by round (a loaded box drifts), the
params held (distinct buffers), XLA's cost-analysis bytes accessed per step and the step's device
memory (distinct argument buffers + outputs - donated + temporaries, from XLA's memory analysis).
--mode=two|low_rank|paired: one way per process, with the live JAX buffers at the end and the
process's peak RSS.
--mesh=rows,tensor,experts: params and states placed on that mesh of the local devices by the
engine's sharding rules (the low-rank variant's bases are the original's placed arrays); params
held and bytes accessed are then per device (XLA's figures of the partitioned program).

  .venv/bin/python experiments/benchmark_pair_batch.py --mode=all
  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
      .venv/bin/python experiments/benchmark_pair_batch.py --mode=all --mesh=1,4,1
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
from lpe_jax.decoding import sharding
from lpe_jax.model import qwen3
from lpe_jax.model.low_rank import (
    as_low_rank,
    pair_whole_tensors,
    paired_model,
    unique_bytes,
    unique_param_bytes,
)

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "all", ["all", "two", "low_rank", "paired"], "Which way(s) to run.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("hidden", 1024, "Hidden size.")
flags.DEFINE_integer("layers", 4, "Decoder layers.")
flags.DEFINE_integer("vocab", 32768, "Vocabulary (tied embeddings in the original).")
flags.DEFINE_integer("rows", 8, "Rows per model decoded per step.")
flags.DEFINE_integer("prompt", 16, "Prompt positions per row.")
flags.DEFINE_integer("steps", 16, "Timed steps per round.")
flags.DEFINE_integer("rounds", 5, "Rounds (--mode=all alternates the ways each round).")
flags.DEFINE_string("mesh", None, "rows,tensor,experts mesh of the local devices; unset: one.")

MIB = 2.0**20
WAYS = ("two", "low_rank", "paired")


def _config() -> qwen3.Qwen3Config:
    h = FLAGS.hidden
    return qwen3.Qwen3Config(FLAGS.vocab, h, FLAGS.layers, h // 128, max(1, h // 256), 128, 3 * h)


def _own_copy(model: qwen3.Qwen3) -> qwen3.Qwen3:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(5, 6))
def _step(
    gd_o: Any, gd_v: Any, whole: Any, st_o: Any, st_v: Any, kv_o: Any, kv_v: Any, last: Any, i: Any
) -> tuple[Any, Any, Any]:
    o, v = nnx.merge(gd_o, st_o), nnx.merge(gd_v, st_v)
    rows = last.shape[0]
    plen = jnp.full((rows,), FLAGS.prompt, jnp.int32)
    write = jnp.full((rows,), i, jnp.int32)
    args = (last, plen + i, plen, write, write >= 0)
    if whole is None:  # two passes
        l_o, po, oo = o.decode_slots(*args, *kv_o)
        l_v, pv, ov = v.decode_slots(*args, *kv_v)
        kv_o, kv_v = (po, oo), (pv, ov)
    else:
        l_o, l_v, kv_o, kv_v = paired_model(o, v, whole).decode_slots_pair(*args, kv_o, kv_v)
    return kv_o, kv_v, jnp.argmax(l_o + l_v, axis=-1).astype(jnp.int32)


class Way:
    """One way of running the pair, with its states, ready to step."""

    def __init__(self, original: qwen3.Qwen3, variant: qwen3.Qwen3, paired: bool):
        self.gd_o, self.st_o = nnx.split(original)
        self.gd_v, self.st_v = nnx.split(variant)
        whole = pair_whole_tensors(original, variant) if paired else None
        if isinstance(whole, str):
            raise ValueError(f"cannot pair: {whole}")
        self.whole = whole
        self.param_bytes = unique_param_bytes(original, variant)
        cfg, dt, rows = original.cfg, original.dtype, FLAGS.rows
        capacity = FLAGS.steps * (FLAGS.rounds + 1) + 4
        prompt = lambda: cfg.empty_prompt_states(dt, rows, FLAGS.prompt)  # noqa: E731
        self.kv = [(prompt(), cfg.empty_own_states(dt, rows, capacity)) for _ in range(2)]
        self.last = jnp.zeros((rows,), jnp.int32)
        self.i = 0
        self.devices = 1
        if FLAGS.mesh is not None:
            self._place(sharding.parse_mesh_shape(FLAGS.mesh), cfg)

    def _place(self, shape: tuple[int, int, int], cfg: qwen3.Qwen3Config) -> None:
        """Params and states on the mesh by the engine's rules; param_bytes per device."""
        mesh = sharding.pair_mesh(shape, cfgs=[cfg])
        placed_o = sharding.place_params(mesh, self.st_o, cfg.vocab_size)
        self.st_v = sharding.place_params(
            mesh, self.st_v, cfg.vocab_size, like=(self.st_o, placed_o)
        )
        self.st_o = placed_o
        self.kv = [
            jax.device_put(kv, sharding.state_shardings(mesh, cfg, kv, sharding.ROWS))
            for kv in self.kv
        ]
        self.last = jax.device_put(self.last, sharding.rows_sharding(mesh))
        # every array is split evenly or replicated: one device holds the total / devices
        self.devices = mesh.size
        self.param_bytes = unique_bytes(self.st_o, self.st_v) // self.devices

    def _args(self) -> tuple[Any, ...]:
        gd = (self.gd_o, self.gd_v, self.whole, self.st_o, self.st_v)
        return (*gd, self.kv[0], self.kv[1], self.last, jnp.int32(self.i))

    def analysis(self) -> tuple[float, float]:
        """(XLA bytes accessed per step, device bytes of one step: distinct argument buffers +
        outputs - donated + temporaries, from XLA's memory analysis)."""
        compiled = _step.lower(*self._args()).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        ma = compiled.memory_analysis()
        # XLA counts an argument buffer once per parameter; the low-rank variant's bases are the
        # original's buffers, so the arguments are counted by distinct buffer instead.
        args = unique_bytes(self.st_o, self.st_v, self.kv) // self.devices
        held = args + ma.output_size_in_bytes - ma.alias_size_in_bytes + ma.temp_size_in_bytes
        return float(cost.get("bytes accessed", float("nan"))), float(held)

    def run(self, steps: int) -> float:
        """Seconds per step over `steps` steps."""
        t0 = time.perf_counter()
        for _ in range(steps):
            kv_o, kv_v, self.last = _step(*self._args())
            self.kv = [kv_o, kv_v]
            self.i += 1
        self.last.block_until_ready()
        return (time.perf_counter() - t0) / steps


def _ways(mode: str) -> dict[str, Way]:
    cfg = _config()
    original = qwen3.init_random(cfg, dtype=FLAGS.dtype, seed=0)
    direction = np.random.default_rng(1).normal(size=cfg.hidden_size)
    variant = _own_copy(orthogonalize_model(original, direction))
    ways = {}
    if mode in ("all", "two"):
        ways["two"] = Way(original, variant, paired=False)
    if mode != "two":
        low_rank, plan = as_low_rank(original, variant)
        print(plan.summary())
        if mode in ("all", "low_rank"):
            ways["low_rank"] = Way(original, low_rank, paired=False)
        if mode in ("all", "paired"):
            ways["paired"] = Way(original, low_rank, paired=True)
    del variant
    return ways


def main(argv: list[str]) -> None:
    del argv
    cfg = _config()
    print(f"config {dataclasses.asdict(cfg)}; dtype {FLAGS.dtype}; rows {FLAGS.rows} per model")
    print(f"device {jax.devices()[0].device_kind}; mesh {FLAGS.mesh or 'one device'}")
    ways = _ways(FLAGS.mode)
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    for name, w in ways.items():
        w.run(2)  # compile and warm up
        accessed, held = w.analysis()
        print(
            f"{name}: params held {w.param_bytes / MIB:.1f} MiB; XLA bytes accessed per step "
            f"{accessed / MIB:.1f} MiB; XLA step memory {held / MIB:.1f} MiB"
        )
    times: dict[str, list[float]] = {n: [] for n in ways}
    for _ in range(FLAGS.rounds):
        for name, w in ways.items():
            times[name].append(w.run(FLAGS.steps))
    for name, ts in times.items():
        print(
            f"{name}: {1e3 * statistics.median(ts):.2f} ms/step (median of {len(ts)} rounds of "
            f"{FLAGS.steps}; min {1e3 * min(ts):.2f}, max {1e3 * max(ts):.2f})"
        )
    if FLAGS.mode != "all":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        live = unique_bytes(jax.live_arrays()) / MIB  # what a device would hold
        print(
            f"live JAX buffers at the end {live:.0f} MiB; peak RSS during setup "
            f"{setup_rss:.0f} MiB, overall {peak:.0f} MiB"
        )


if __name__ == "__main__":
    app.run(main)
