"""Slot use and rollouts/s of RolloutEngine, all blocks at once vs one PairedSampler call per block.

Random weights; every prompt gets its own alpha, and a path shape `eos_skew` (the linear path with
the EOS logit set so that P(EOS) per token falls from 1/--short_len at alpha = 0 to 1/--long_len at
alpha = 1) makes row lengths differ by prompt (and, geometrically, within one). The sampler (a
thin API over the engine, --slots slots) runs one `sample` call per block, so its slots drain at
the end of every call; the engine takes every block at once. Both draw the same rows (checked:
tokens must match).

slot use = generated tokens / (slots x steps), draining steps included. rollouts/s excludes
compilation (both run a warm-up of the same shapes first). The memory line compares
memory.plan_engine's model with the device's peak (GPU) or the compiled generate step's memory
analysis (CPU).

  .venv/bin/python experiments/benchmark_engine.py --preset=tiny --dtype=float32

--preset qwen3_5_*: a Qwen3.5 pair (hybrid Gated DeltaNet / gated attention, random weights).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.decoding.paths import PathShape
from lpe_jax.decoding.sampler import PairedSampler, prompt_bucket
from lpe_jax.model import qwen3, qwen35

FLAGS = flags.FLAGS
flags.DEFINE_enum(
    "preset",
    "tiny",
    sorted(qwen3.PRESETS) + sorted(qwen35.PRESETS),
    "Model shape (random weights).",
)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("prompts", 16, "Prompts (each with its own alpha, hence EOS rate).")
flags.DEFINE_integer("rows_per_prompt", 64, "Rollouts per prompt.")
flags.DEFINE_integer("block_rows", 64, "Rows per block (one sampler call per block).")
flags.DEFINE_integer("max_new_tokens", 256, "Generated tokens per row at most.")
flags.DEFINE_float("short_len", 8.0, "Mean row length (1 / P(EOS)) of the shortest prompt.")
flags.DEFINE_float("long_len", 1024.0, "Mean row length before the cap of the longest prompt.")
flags.DEFINE_integer("min_prompt_len", 16, "Shortest prompt (tokens).")
flags.DEFINE_integer("max_prompt_len", 64, "Longest prompt (tokens).")
flags.DEFINE_integer("slots", 64, "Engine slots = sampler rows per chunk.")
flags.DEFINE_integer("steps_per_call", 16, "Engine decode steps per generate call.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")

EOS = 0


def _eos_skew(short_len: float, long_len: float) -> PathShape:
    log_hi, log_lo = -np.log(short_len), -np.log(long_len)

    def fn(l_o: jax.Array, l_v: jax.Array, alpha: jax.Array) -> jax.Array:
        logits = alpha * l_o + (1.0 - alpha) * l_v
        log_p = log_hi + alpha * (log_lo - log_hi)  # [B, 1]: log P(EOS) per token
        others = jax.nn.logsumexp(logits.at[:, EOS].set(-jnp.inf), axis=-1, keepdims=True)
        eos = others + log_p - jnp.log1p(-jnp.exp(log_p))
        return logits.at[:, EOS].set(eos[:, 0])

    return PathShape("eos_skew", fn, (0.0, 1.0))


def _workload(cfg: qwen3.Qwen3Config) -> list[RowBlock]:
    rng = np.random.default_rng(0)
    blocks = []
    alphas = (np.arange(FLAGS.prompts) + 0.5) / FLAGS.prompts
    for i, alpha in enumerate(rng.permutation(alphas)):
        n = int(rng.integers(FLAGS.min_prompt_len, FLAGS.max_prompt_len + 1))
        ids = rng.integers(1, cfg.vocab_size, n).astype(np.int32)
        for start in range(0, FLAGS.rows_per_prompt, FLAGS.block_rows):
            count = min(FLAGS.block_rows, FLAGS.rows_per_prompt - start)
            blocks.append(RowBlock(f"p{i}", ids, float(alpha), FLAGS.seed, start, count))
    return blocks


def _run_sampler(s: PairedSampler, blocks: list[RowBlock]) -> tuple[float, list, float]:
    before = (0, 0) if s.stats is None else (s.stats.tokens, s.stats.steps)
    t0 = time.perf_counter()
    out = [
        s.sample(b.prompt_ids, [b.alpha], b.count, b.seed, rollout_offset=b.rollout_start)
        for b in blocks
    ]
    wall = time.perf_counter() - t0
    tokens, steps = s.stats.tokens - before[0], s.stats.steps - before[1]
    return wall, out, tokens / max(1, s.stats.slots * steps)


def _run_engine(
    make: Callable[[], RolloutEngine], blocks: list[RowBlock]
) -> tuple[float, dict, RolloutEngine]:
    e = make()
    t0 = time.perf_counter()
    for b in blocks:
        e.submit(b)
    out = {(r.block.prompt_key, r.block.rollout_start): r.rollouts for r in e.run()}
    return time.perf_counter() - t0, out, e


def _memory_line(e: RolloutEngine) -> str:
    plan = e.planned_bytes()
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        measured, what = stats["peak_bytes_in_use"], "device peak"
    else:
        measured, what = e.compiled_bytes(), "compiled generate (args + outputs - aliased + temp)"
    mib = 2**20
    return (
        f"memory: model {plan['total'] / mib:.1f} MiB (params {plan['params'] / mib:.1f} + table "
        f"{plan['table'] / mib:.1f} + {e.slots} slots x {plan['slot'] / mib:.3f}) vs {what} "
        f"{measured / mib:.1f} MiB"
    )


def _params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _pair(preset: str, dtype: jnp.dtype) -> tuple:
    """(config, original, variant) with random weights: a Qwen3 or a Qwen3.5 preset."""
    if preset in qwen35.PRESETS:
        cfg = qwen35.PRESETS[preset]
        make = lambda seed: qwen35.Qwen35(cfg, dtype=dtype, rngs=nnx.Rngs(params=seed))  # noqa: E731
        return cfg, make(0), make(1)
    cfg = qwen3.PRESETS[preset]
    return (
        cfg,
        qwen3.init_random(cfg, dtype=dtype, seed=0),
        qwen3.init_random(cfg, dtype=dtype, seed=1),
    )


def main(argv: list[str]) -> None:
    del argv
    dtype = jnp.dtype(FLAGS.dtype)
    cfg, m_o, m_v = _pair(FLAGS.preset, dtype)
    path = _eos_skew(FLAGS.short_len, FLAGS.long_len)
    t_n = FLAGS.max_new_tokens
    blocks = _workload(cfg)
    rows = sum(b.count for b in blocks)

    def make() -> RolloutEngine:
        return RolloutEngine(
            m_o,
            m_v,
            path,
            t_n,
            [EOS],
            slots=FLAGS.slots,
            max_prompts=FLAGS.prompts,
            steps_per_call=FLAGS.steps_per_call,
            max_prompt_len=FLAGS.max_prompt_len,
        )

    sampler = PairedSampler(
        original=m_o,
        variant=m_v,
        path=path,
        max_new_tokens=t_n,
        eos_token_ids=[EOS],
        max_rows=FLAGS.slots,
    )
    # Warm-up on the same shapes: the whole workload for the engine (its insert sizes and the
    # growth follow the workload), one block per prompt bucket for the sampler.
    t0 = time.perf_counter()
    _run_engine(make, blocks)
    engine_compile = time.perf_counter() - t0
    seen, warm = set(), []
    for b in blocks:
        if prompt_bucket(b.prompt_ids.size) not in seen:
            seen.add(prompt_bucket(b.prompt_ids.size))
            warm.append(b)
    t0 = time.perf_counter()
    _run_sampler(sampler, warm)
    sampler_compile = time.perf_counter() - t0

    e_wall, e_out, e = _run_engine(make, blocks)
    mem = _memory_line(e)
    s_wall, s_out, s_use = _run_sampler(sampler, blocks)

    lengths = np.concatenate([r.lengths.ravel() for r in s_out])
    per_prompt = {}
    for b, r in zip(blocks, s_out, strict=True):
        per_prompt.setdefault(b.prompt_key, []).extend(r.lengths.ravel().tolist())
    means = [statistics.mean(v) for v in per_prompt.values()]
    differ = 0
    for b, r in zip(blocks, s_out, strict=True):
        got = e_out[(b.prompt_key, b.rollout_start)]
        differ += int((got.tokens != r.tokens).any(-1).sum())
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  preset={FLAGS.preset} "
        f"({_params(m_o) / 1e6:.1f}M params/model) dtype={FLAGS.dtype}"
    )
    print(
        f"workload: {FLAGS.prompts} prompts x {FLAGS.rows_per_prompt} rows = {rows} rows in "
        f"blocks of {FLAGS.block_rows}, max_new_tokens={t_n}; row length min {lengths.min()} "
        f"p10 {np.percentile(lengths, 10):.0f} median {np.median(lengths):.0f} p90 "
        f"{np.percentile(lengths, 90):.0f} max {lengths.max()}; per-prompt mean "
        f"{min(means):.1f}..{max(means):.1f} ({max(means) / min(means):.1f}x)"
    )
    print(
        f"sampler (one call per block, {FLAGS.slots} slots): slot use {s_use:.3f}, {s_wall:.2f} s, "
        f"{rows / s_wall:.1f} rollouts/s, {lengths.sum() / s_wall:.0f} pair-tokens/s "
        f"(warm-up/compile {sampler_compile:.1f} s)"
    )
    st = e.stats
    print(
        f"engine ({e.slots} slots, {FLAGS.steps_per_call} steps/call): slot use "
        f"{st.slot_use:.3f}, {e_wall:.2f} s, {rows / e_wall:.1f} rollouts/s, "
        f"{st.tokens / e_wall:.0f} pair-tokens/s; {st.steps} steps in {st.calls} calls, "
        f"{st.prefills} prefills, {st.compilations} compilations in the timed run "
        f"(warm-up run incl. compile {engine_compile:.1f} s)"
    )
    print(
        f"engine vs sampler: {s_wall / e_wall:.2f}x rollouts/s; rows whose tokens differ: {differ}"
    )
    print(mem)


if __name__ == "__main__":
    app.run(main)
