"""Tokens/s of the direction path (one model per token) vs the logit path (two) on RolloutEngine.

Random weights at a Qwen3 shape (--num_layers cuts the preset's depth so that a CPU run stays
short) and a random unit direction. The logit path samples alpha l_o + (1 - alpha) l_a between the
model and its abliteration (`orthogonalize_model`); the direction path samples the model with
(1 - alpha) of the direction projected out of its residual stream (`DirectionalQwen3`). Both get
the same blocks (--prompts prompts x --alphas, --rows each), slots and steps per call; each engine
first runs the same shapes once (compilation excluded), then --repeats timed runs (best kept).

  .venv/bin/python experiments/benchmark_direction_path.py --preset=qwen3_0_6b --num_layers=4
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import app, flags

from lpe_jax.abliteration.direction_path import DirectionalQwen3
from lpe_jax.abliteration.orthogonalize import orthogonalize_model
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.model import qwen3

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "tiny", sorted(qwen3.PRESETS), "Model shape (random weights).")
flags.DEFINE_integer("num_layers", None, "Override the preset's number of layers.")
flags.DEFINE_integer("prompts", 2, "Prompts (random ids, 16 tokens).")
flags.DEFINE_list("alphas", ["0", "0.5", "1"], "Alphas (each prompt at each).")
flags.DEFINE_integer("rows", 16, "Rollouts per (prompt, alpha).")
flags.DEFINE_integer("max_new_tokens", 32, "Tokens per rollout (EOS is never sampled).")
flags.DEFINE_integer("slots", 32, "Engine slots.")
flags.DEFINE_integer("repeats", 2, "Timed runs per path (the fastest is reported).")


def run_blocks(engine: RolloutEngine, prompts: list[np.ndarray], alphas: list[float], seed: int):
    for i, ids in enumerate(prompts):
        for a in alphas:
            engine.submit(RowBlock(i, ids, a, seed, 0, FLAGS.rows))
    start = time.perf_counter()
    tokens = engine.stats.tokens
    got = engine.run()
    secs = time.perf_counter() - start
    return secs, sum(r.rollouts.tokens.shape[1] for r in got), engine.stats.tokens - tokens


def main(argv: list[str]) -> None:
    del argv
    cfg = qwen3.PRESETS[FLAGS.preset]
    if FLAGS.num_layers:
        cfg = dataclasses.replace(cfg, num_layers=FLAGS.num_layers)
    model = qwen3.init_random(cfg, seed=0)
    direction = np.random.default_rng(0).normal(size=cfg.hidden_size)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, cfg.vocab_size, 16).astype(np.int32) for _ in range(FLAGS.prompts)]
    alphas = [float(a) for a in FLAGS.alphas]
    eos = [0]  # random ids start at 1 and random weights almost never draw 0: rows run full
    pairs = {
        "logit": (model, orthogonalize_model(model, direction)),
        "direction": (DirectionalQwen3.wrap(model, direction), None),
    }
    speed = {}
    for name, (m, v) in pairs.items():
        engine = RolloutEngine(m, v, "linear", FLAGS.max_new_tokens, eos, slots=FLAGS.slots)
        run_blocks(engine, prompts, alphas, seed=0)  # compile
        best = min(run_blocks(engine, prompts, alphas, seed=1 + r) for r in range(FLAGS.repeats))
        secs, rows, tokens = best
        speed[name] = tokens / secs
        print(
            f"{name:9} path: {rows / secs:8.1f} rollouts/s {tokens / secs:9.0f} tokens/s "
            f"({secs:.2f} s, {engine.stats.prefills} prefills)"
        )
    print(
        f"{FLAGS.preset} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab "
        f"{cfg.vocab_size}), {FLAGS.slots} slots: direction / logit tokens/s = "
        f"{speed['direction'] / speed['logit']:.2f}"
    )


if __name__ == "__main__":
    app.run(main)
