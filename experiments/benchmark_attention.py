"""ms per engine decode step, bounded attention (`attention_block` > 0) vs full-length (0).

Drives the engine's device part directly (engine_device: prefill one random prompt, queue every
slot's row, one step to fill the slots), then sets every slot's token count to `--early` or
`--late` and times `--steps` decode steps from there: a step's cost depends on how many positions
its attention reads, not on the values in the cache. No EOS, so every slot stays busy. Variants
alternate within each repetition (the box is shared); the median of `--reps` is reported.

The `noattn` line is the full-length step of an engine of `--early + --steps + 1` new tokens (same
shape otherwise, timed in the early window): attention over the generated tokens is what the late
full-length step adds to it, which is how the share of attention in the step is measured.

  .venv/bin/python experiments/benchmark_attention.py
  .venv/bin/python experiments/benchmark_attention.py --preset=tiny --slots=8 \
      --max_new_tokens=32 --late=16 --steps=4 --reps=1   # dry run
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lpe_jax.decoding import engine_device as dev
from lpe_jax.decoding import sharding
from lpe_jax.decoding.paths import get_path
from lpe_jax.model import qwen3

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "preset", "", "A qwen3.PRESETS shape; empty: the --layers.. shape below (random weights)."
)
flags.DEFINE_integer("layers", 4, "Layers (no --preset).")
flags.DEFINE_integer("hidden", 256, "Hidden size (no --preset).")
flags.DEFINE_integer("heads", 8, "Query heads (no --preset).")
flags.DEFINE_integer("kv_heads", 4, "K/V heads (no --preset).")
flags.DEFINE_integer("head_dim", 64, "Head dim (no --preset).")
flags.DEFINE_integer("intermediate", 768, "MLP width (no --preset).")
flags.DEFINE_integer("vocab", 8192, "Vocabulary (no --preset).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter and cache dtype.")
flags.DEFINE_integer("slots", 64, "Engine slots (rows decoded at once).")
flags.DEFINE_integer("prompt_len", 64, "Prompt tokens (= prompt bucket).")
flags.DEFINE_integer("max_new_tokens", 512, "Token K/V positions per slot (T).")
flags.DEFINE_list("blocks", ["64"], "Bounded attention block lengths to time beside 0.")
flags.DEFINE_integer("early", 1, "Token count of every slot at the start of the early window.")
flags.DEFINE_integer("late", 480, "Token count at the start of the late window.")
flags.DEFINE_integer("steps", 16, "Decode steps per timed generate call.")
flags.DEFINE_integer("reps", 5, "Timed repetitions per (variant, window).")
flags.DEFINE_bool("noattn", True, "Also time the reference engine (see the module docstring).")


def _config() -> qwen3.Qwen3Config:
    if FLAGS.preset:
        return qwen3.PRESETS[FLAGS.preset]
    return qwen3.Qwen3Config(
        FLAGS.vocab, FLAGS.hidden, FLAGS.layers, FLAGS.heads, FLAGS.kv_heads, FLAGS.head_dim,
        FLAGS.intermediate,
    )  # fmt: skip


class _Engine:
    """Both models' device state with every slot busy on one prompt, at a settable count."""

    def __init__(self, models: tuple, block: int, new_tokens: int) -> None:
        mesh = sharding.row_mesh(None)
        path = get_path("linear").fn
        self.spec, self.params = dev.DeviceSpec.build(
            models[0], models[1], path, new_tokens, (), 1.0, mesh, attention_block=block
        )
        s, pb = FLAGS.slots, FLAGS.prompt_len
        state = dev.init_state(spec=self.spec, slots=s, prompts=1, prompt_slots=pb, queue_rows=s)
        ids = np.random.default_rng(0).integers(1, models[0].cfg.vocab_size, pb)
        table = dev.prefill(
            self.spec, self.params, state.prompts, jnp.int32(0), jnp.asarray(ids, jnp.int32),
            jnp.int32(pb), jnp.float32(0.5),
        )  # fmt: skip
        rows = dict(
            handle=np.arange(s, dtype=np.int32),
            prompt=np.zeros(s, np.int32),
            alpha=np.linspace(0, 1, s, dtype=np.float32),
            seed=np.zeros(s, np.uint32),
            alpha_q=np.arange(s, dtype=np.uint32),
            rollout=np.arange(s, dtype=np.uint32),
        )
        queue = dev.insert(state.queue, rows, jnp.int32(s))
        self.state = self._run(state.replace(prompts=table, queue=queue), 1)

    def _run(self, state: dev.EngineState, steps: int) -> dev.EngineState:
        state, _, k, _ = dev.generate(self.spec, self.params, state, steps, FLAGS.slots)
        if int(k) != steps:
            raise RuntimeError(f"ran {int(k)} of {steps} steps: slots went idle")
        return state

    def time_steps(self, count: int) -> float:
        """ms per step of FLAGS.steps steps starting with every slot at `count` tokens."""
        slots = self.state.slots
        if not bool(jnp.all(slots.handle >= 0)):
            raise RuntimeError("a slot went idle (a row ended); the timing would be off")
        state = self.state.replace(slots=slots.replace(count=jnp.full_like(slots.count, count)))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        self.state = jax.block_until_ready(self._run(state, FLAGS.steps))
        return 1e3 * (time.perf_counter() - t0) / FLAGS.steps


def main(argv: list[str]) -> None:
    del argv
    cfg = _config()
    dtype = jnp.dtype(FLAGS.dtype)
    models = (
        qwen3.init_random(cfg, dtype=dtype, seed=0),
        qwen3.init_random(cfg, dtype=dtype, seed=1),
    )
    if not FLAGS.early + FLAGS.steps <= FLAGS.late <= FLAGS.max_new_tokens - FLAGS.steps:
        raise ValueError("need early + steps <= late <= max_new_tokens - steps")
    blocks = [0, *(int(b) for b in FLAGS.blocks)]
    engines = {f"block={b}": _Engine(models, b, FLAGS.max_new_tokens) for b in blocks}
    windows = {"early": FLAGS.early, "late": FLAGS.late}
    if FLAGS.noattn:
        engines["noattn"] = _Engine(models, 0, FLAGS.early + FLAGS.steps + 1)
    for name, e in engines.items():  # compile
        for w, count in windows.items():
            if name != "noattn" or w == "early":
                e.time_steps(count)
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(FLAGS.reps):
        for w, count in windows.items():
            for name, e in engines.items():
                if name == "noattn" and w == "late":
                    continue
                times.setdefault((name, w), []).append(e.time_steps(count))
    print(
        f"shape={FLAGS.preset or dataclasses.asdict(cfg)} dtype={FLAGS.dtype} slots={FLAGS.slots} "
        f"prompt={FLAGS.prompt_len} T={FLAGS.max_new_tokens} steps/call={FLAGS.steps} "
        f"reps={FLAGS.reps} backend={jax.default_backend()}"
    )
    for (name, w), ts in times.items():
        start = windows[w]
        spread = f"{min(ts):.1f}..{max(ts):.1f}"
        print(
            f"{name:>10} {w:>5} (counts {start}..{start + FLAGS.steps - 1}): "
            f"median {statistics.median(ts):.1f} ms/step  [{spread}]"
        )
    if FLAGS.noattn:
        full = statistics.median(times[("block=0", "late")])
        base = statistics.median(times[("noattn", "early")])
        print(
            f"attention over the {FLAGS.max_new_tokens} token positions: "
            f"{100 * (full - base) / full:.0f}% of the full-length step (late)"
        )


if __name__ == "__main__":
    app.run(main)
