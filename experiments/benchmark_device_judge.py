"""Benchmark the device-scored local judge against the host-logits one (issue 22).

A random-weight judge model of --preset scores --rows classification questions of
--question_tokens tokens each in batches of --batch_size, through LocalJudge's scoring path:

- ``device``: lpe_jax.judges.device.answer_scores (what LocalJudge.from_model uses): the forward
  on the device, three floats per row back;
- ``device_one_softmax``: the same with one [T, T] softmax per layer (``qwen3.FULL_PASS_BLOCK``
  raised to T while it is traced), the full pass before its attention ran in blocks;
- ``host``: lpe_jax.model_logits, the whole float32 [B, T, V] logits back to NumPy (LocalJudge
  with logits_fn, the path before issue 22).

Prints rows judged per second and seconds per batch (compilation excluded: one batch is scored
first), the host memory one batch's result takes (the bytes of the arrays the call brings back to
the host) and, for the device modes, XLA's memory figure for one batch beside the plan
(``memory.judge_batch_bytes``).

  .venv/bin/python experiments/benchmark_device_judge.py --preset=tiny --question_tokens=256
  python experiments/benchmark_device_judge.py --preset=qwen3_4b --dtype=bfloat16 \\
      --question_tokens=800 --batch_size=32 --rows=256 --modes=device       # on the GPU
  .venv/bin/python experiments/benchmark_device_judge.py --preset=qwen3_0_6b --num_layers=2 \
      --question_tokens=800 --batch_size=4 --rows=16 --modes=device,device_one_softmax  # blocks
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lpe_jax import model_logits
from lpe_jax.judges.device import answer_scores
from lpe_jax.model import qwen3

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", "tiny", "qwen3 preset of the judge model (random weights).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype.")
flags.DEFINE_integer("question_tokens", 256, "Tokens per classification question (T).")
flags.DEFINE_integer("batch_size", 8, "Rows per forward (B).")
flags.DEFINE_integer("rows", 64, "Rows judged per mode (rounded up to whole batches).")
flags.DEFINE_list(
    "modes", ["device", "host"], "Which scoring paths, of device, device_one_softmax and host."
)
flags.DEFINE_integer("seed", 0, "Seed of the weights and questions.")
flags.DEFINE_integer("vocab_size", None, "Override the preset's vocabulary (e.g. 151936).")
flags.DEFINE_integer("num_layers", None, "Override the preset's layer count (a CPU-sized pass).")


def main(argv: list[str]) -> None:
    del argv
    cfg = qwen3.PRESETS[FLAGS.preset]
    if FLAGS.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=FLAGS.vocab_size)
    if FLAGS.num_layers:
        cfg = dataclasses.replace(cfg, num_layers=FLAGS.num_layers)
    model = qwen3.init_random(cfg, dtype=jnp.dtype(FLAGS.dtype), seed=FLAGS.seed)
    b, t, v = FLAGS.batch_size, FLAGS.question_tokens, cfg.vocab_size
    rng = np.random.default_rng(FLAGS.seed)
    batches = -(-FLAGS.rows // b)
    questions = rng.integers(0, v, (batches, b, t), dtype=np.int32)
    lengths = rng.integers(t // 2, t + 1, (batches, b), dtype=np.int32)  # right-padded rows
    scorers = {"device": _scorer(model, None), "device_one_softmax": _scorer(model, t)}
    answer_scores(model, 1, 2)  # the checks LocalJudge.from_model runs

    def device_mode(name: str) -> Callable[[int], tuple[np.ndarray, int]]:
        def run(i: int) -> tuple[np.ndarray, int]:
            out = np.asarray(scorers[name][0](questions[i], lengths[i] - 1))
            return out, out.nbytes

        return run

    def host(i: int) -> tuple[np.ndarray, int]:
        logits = model_logits(model, questions[i])
        last = logits[np.arange(b), lengths[i] - 1].astype(np.float64)
        out = np.stack([last[:, 1], last[:, 2], np.logaddexp.reduce(last, 1)], 1)
        return out, logits.nbytes

    print(
        f"device: {jax.devices()[0].device_kind}  preset={FLAGS.preset} dtype={FLAGS.dtype} "
        f"B={b} T={t} V={v} rows={batches * b}",
        flush=True,
    )
    outs = {}
    for name in FLAGS.modes:
        fn = host if name == "host" else device_mode(name)
        fn(0)  # compile
        t0 = time.perf_counter()
        out, nbytes = zip(*(fn(i) for i in range(batches)), strict=True)
        seconds = time.perf_counter() - t0
        outs[name] = np.concatenate(out)
        print(
            f"{name:>6}: {batches * b / seconds:8.1f} rows/s ({seconds:.2f} s, "
            f"{seconds / batches:.3f} s per batch); host memory per batch {nbytes[0]:,} bytes",
            flush=True,
        )
        if name != "host":
            print(f"{'':>6}  {plan_line(scorers[name], cfg, questions[0], lengths[0] - 1)}")
    for other in ("host", "device_one_softmax"):
        if "device" in outs and other in outs:
            diff = np.abs(outs["device"] - outs[other]).max()
            print(f"largest difference device vs {other} (logit yes, logit no, log Z): {diff:.2e}")


def _scorer(model: qwen3.Qwen3, block: int | None) -> tuple[Callable, int | None]:
    """(tokens, last) -> the device judge's [B, 3] scores, traced with qwen3.FULL_PASS_BLOCK set
    to `block` (None: left as it is), and `block`. A fresh jit: its own trace cache."""
    from flax import nnx

    from lpe_jax.judges.device import _scores

    graphdef, state = nnx.split(model)
    ids = jnp.array([1, 2], jnp.int32)
    fresh = jax.jit(lambda *args: _scores.__wrapped__(*args), static_argnums=0)

    class Scorer:
        def __call__(self, tokens: np.ndarray, last: np.ndarray) -> jax.Array:
            with _block(block):
                return fresh(graphdef, state, tokens, last, ids)

        def lower(self, tokens: np.ndarray, last: np.ndarray) -> jax.stages.Lowered:
            with _block(block):
                return fresh.lower(graphdef, state, tokens, last, ids)

    return Scorer(), block


def _block(block: int | None) -> mock._patch | contextlib.nullcontext:
    if block is None:
        return contextlib.nullcontext()
    return mock.patch.object(qwen3, "FULL_PASS_BLOCK", block)


def plan_line(
    scorer: tuple[Callable, int | None],
    cfg: qwen3.Qwen3Config,
    tokens: np.ndarray,
    last: np.ndarray,
) -> str:
    """memory.judge_batch_bytes for one batch vs XLA's memory analysis of the scoring call
    (temporaries + output + inputs, params excluded), and the device's peak where it reports
    one: whether the engine leaves enough free for the judge beside it."""
    from lpe_jax.decoding.memory import judge_batch_bytes

    fn, block = scorer
    ma = fn.lower(tokens, last).compile().memory_analysis()
    xla = ma.temp_size_in_bytes + ma.output_size_in_bytes + tokens.nbytes + last.nbytes
    b, t = tokens.shape
    with _block(block):  # the plan of the pass this scorer runs
        plan = judge_batch_bytes(cfg, jnp.dtype(FLAGS.dtype), b, t)
    stats = jax.devices()[0].memory_stats() or {}
    peak = f", device peak {stats['peak_bytes_in_use'] / 2**20:.1f} MiB" if stats else ""
    return (
        f"memory per batch: planned {plan / 2**20:.1f} MiB (memory.judge_batch_bytes), XLA "
        f"{xla / 2**20:.1f} MiB (plan / XLA {plan / xla:.2f}){peak}"
    )


if __name__ == "__main__":
    app.run(main)
