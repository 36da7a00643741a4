"""Should Qwen3.5's Gated DeltaNet state be stored in bfloat16? Its numerics cost and memory gain.

Numerics: the gated delta rule over --tokens tokens at Qwen3.5's head shape (128 x 128 per value
head), random L2-normalised q/k, unit-normal v, beta ~ U(0, 1) and log-decay g ~ -U(decay_min,
decay_max) (small |g|: heads that remember long, where rounding accumulates), once with the
library's float32 state (`recurrent_gated_delta_rule`) and once storing the state in bfloat16
after every token (the update itself in float32). Printed: max |o_bf16 - o_f32| / max |o_f32|
at a few tokens, and the mean relative error over all tokens (a bf16 rounding is 3.9e-3).

Memory: `lpe_jax.decoding.memory.bytes_per_slot` of a bf16 pair at the Qwen3.5-4B shape and at
Qwen3-4B's, with the delta state counted in float32 (as stored) and in bfloat16 (hypothetical).

  .venv/bin/python experiments/benchmark_delta_state.py --decay_min=1e-4 --decay_max=1e-2
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from lpe_jax.decoding import memory
from lpe_jax.model import qwen3, qwen35
from lpe_jax.model.gated_deltanet import GatedDeltaNetConfig, l2norm, recurrent_gated_delta_rule

FLAGS = flags.FLAGS
flags.DEFINE_integer("tokens", 512, "Sequence length.")
flags.DEFINE_integer("heads", 8, "Value heads (head dims 128 x 128).")
flags.DEFINE_float("decay_min", 1e-4, "Smallest -g (log decay per token).")
flags.DEFINE_float("decay_max", 1e-2, "Largest -g.")
flags.DEFINE_integer("seed", 0, "Random inputs.")

MiB = 2**20


def _bf16_state_rule(q, k, v, g, beta):
    """The recurrent rule with the state rounded to bfloat16 after every token."""

    def step(s, xs):
        qt, kt, vt, gt, bt = xs
        s = s.astype(jnp.float32) * jnp.exp(gt)[..., None, None]
        delta = (vt - jnp.einsum("bhde,bhd->bhe", s, kt)) * bt[..., None]
        s = (s + kt[..., :, None] * delta[..., None, :]).astype(jnp.bfloat16)
        return s, jnp.einsum("bhde,bhd->bhe", s.astype(jnp.float32), qt)

    b, _, h, d = q.shape
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    return jnp.moveaxis(jax.lax.scan(step, jnp.zeros((b, h, d, d), jnp.bfloat16), xs)[1], 0, 1)


def numerics() -> None:
    t, h, d = FLAGS.tokens, FLAGS.heads, 128
    ks = jax.random.split(jax.random.key(FLAGS.seed), 5)
    q = l2norm(jax.random.normal(ks[0], (1, t, h, d))) * d**-0.5
    k = l2norm(jax.random.normal(ks[1], (1, t, h, d)))
    v = jax.random.normal(ks[2], (1, t, h, d))
    g = -jax.random.uniform(ks[3], (1, t, h), minval=FLAGS.decay_min, maxval=FLAGS.decay_max)
    beta = jax.random.uniform(ks[4], (1, t, h))
    ref, _ = recurrent_gated_delta_rule(q, k, v, g, beta, jnp.zeros((1, h, d, d), jnp.float32))
    ref, low = np.asarray(ref), np.asarray(_bf16_state_rule(q, k, v, g, beta))
    err = np.abs(low - ref).max(axis=(0, 2, 3)) / np.abs(ref).max(axis=(0, 2, 3))
    for i in sorted({15, 63, 255, t - 1} & set(range(t))):
        print(f"token {i + 1:4d}: max |o_bf16 - o_f32| / max |o_f32| = {err[i]:.2e}")
    print(
        f"mean relative error over {t} tokens: {np.abs(low - ref).mean() / np.abs(ref).mean():.2e}"
    )


def slot_mib(cfg, new_tokens: int) -> float:
    bf16 = jnp.bfloat16
    return memory.bytes_per_slot(cfg, cfg, bf16, bf16, new_tokens, 128, 16) / MiB


def memory_table() -> None:
    q3, q35 = qwen3.PRESETS["qwen3_4b"], qwen35.PRESETS["qwen3_5_4b"]
    stored = GatedDeltaNetConfig.state_bytes
    for label, state_bytes in (
        ("float32 (stored)", stored),
        (
            "bfloat16 (hypothetical)",
            lambda self, dtype: (
                stored(self, dtype) - 2 * self.num_v_heads * self.head_k_dim * self.head_v_dim
            ),
        ),
    ):
        GatedDeltaNetConfig.state_bytes = state_bytes
        fixed = q35.fixed_state_bytes(jnp.bfloat16) / MiB
        for n in (512, 1024):
            print(
                f"delta state {label}: fixed state {fixed:.1f} MiB/row/model; bytes per slot "
                f"(bf16 pair, {n} new tokens): Qwen3.5-4B shape {slot_mib(q35, n):.1f} MiB, "
                f"Qwen3-4B {slot_mib(q3, n):.1f} MiB"
            )
    GatedDeltaNetConfig.state_bytes = stored


def main(argv: list[str]) -> None:
    del argv
    jax.config.update("jax_default_matmul_precision", "highest")
    numerics()
    memory_table()


if __name__ == "__main__":
    app.run(main)
