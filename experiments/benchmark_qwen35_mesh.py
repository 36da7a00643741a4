"""Collectives per Qwen3.5 layer on a mesh: what XLA inserts in one decode step for each layer kind.

For each (rows, tensor, experts) mesh and each layer kind (Gated DeltaNet + MLP, gated attention
+ MLP; dense MLP or MoE), compiles one decode step (`Qwen35.decode_step`, 8 rows, one token) of a
model of 1 and of 2 such layers with params and states placed by `lpe_jax.decoding.sharding`'s
rules, and reports the difference: the collectives one more layer adds (count by kind, result
bytes summed), and parameter bytes per device (`memory.param_bytes_per_device`). Shapes are
small (hidden 256) but every split dimension divides by 8, as a real model's do.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      .venv/bin/python experiments/benchmark_qwen35_mesh.py
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from lpe_jax.decoding import memory, sharding  # noqa: E402
from lpe_jax.model.gated_attention import GatedAttentionConfig  # noqa: E402
from lpe_jax.model.gated_deltanet import GatedDeltaNetConfig  # noqa: E402
from lpe_jax.model.moe import MoEConfig  # noqa: E402
from lpe_jax.model.qwen35 import AttentionKV, Qwen35, Qwen35Config  # noqa: E402

MESHES = ((1, 8, 1), (2, 4, 1), (2, 2, 2))
ROWS = 8
_COLLECTIVE = re.compile(
    r"= (\([^)]*\)|\S+) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"(f32|bf16|s32|u32|pred)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "bf16": 2, "s32": 4, "u32": 4, "pred": 1}


def config(kind: str, layers: int, moe: bool) -> Qwen35Config:
    h = 256
    return Qwen35Config(
        vocab_size=4096,
        hidden_size=h,
        layer_types=(kind,) * layers,
        linear=GatedDeltaNetConfig(h, 8, 16, 32, 32),
        attention=GatedAttentionConfig(h, 8, 8, 32, 8),
        intermediate_size=0 if moe else 512,
        moe=MoEConfig(h, 8, 2, 64, True, 128) if moe else None,
    )


def collectives(cfg: Qwen35Config, mesh_shape: tuple[int, int, int]) -> collections.Counter:
    """(kind -> count) and (kind + ' bytes' -> result bytes) of one compiled decode step, params
    and layer states (zeros: only shapes matter) placed by the sharding rules."""
    graph, params = nnx.split(nnx.eval_shape(lambda: Qwen35(cfg, rngs=nnx.Rngs(0))))
    mesh = sharding.pair_mesh(mesh_shape, jax.devices(), [cfg])
    params = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        params,
        sharding.param_shardings(mesh, params),
    )
    states = cfg.empty_prompt_states(jnp.float32, ROWS, 16)
    placed = jax.device_put(states, sharding.state_shardings(mesh, cfg, states, sharding.ROWS))
    lengths = jnp.full((ROWS,), 4, jnp.int32)

    def step(params, states, tok):
        states = [AttentionKV(s[0], s[1], lengths) if isinstance(s, tuple) else s for s in states]
        return nnx.merge(graph, params).decode_step(tok, tuple(states))[0]

    tokens = jnp.zeros((ROWS,), jnp.int32)
    text = jax.jit(step).lower(params, placed, tokens).compile().as_text()
    out = collections.Counter()
    for m in _COLLECTIVE.finditer(text):
        out[m.group(2)] += 1
        for dtype, dims in _ARRAY.findall(m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            out[m.group(2) + " bytes"] += n * _BYTES[dtype]
    return out


def main(argv: list[str]) -> None:
    del argv
    print(f"decode step, {ROWS} rows, f32; collectives one more layer adds (count, result bytes)")
    print("| mesh | layer | all-reduce | all-gather | other | params per device (1 layer) |")
    print("|---|---|---|---|---|---|")
    for shape in MESHES:
        for moe in (False, True):
            if shape[2] > 1 and not moe:
                continue  # an experts axis splits nothing in a dense model (check_mesh refuses)
            for kind in ("linear_attention", "full_attention"):
                one, two = (collectives(config(kind, n, moe), shape) for n in (1, 2))
                d = {k: two[k] - one[k] for k in set(one) | set(two)}
                other = sum(
                    v for k, v in d.items() if not k.startswith(("all-reduce", "all-gather"))
                    and not k.endswith("bytes")
                )  # fmt: skip
                name = f"{'Gated DeltaNet' if kind[0] == 'l' else 'gated attention'} + "
                name += "MoE" if moe else "MLP"
                params = memory.param_bytes_per_device(config(kind, 1, moe), np.float32, shape)
                print(
                    f"| {','.join(map(str, shape))} | {name} | {d.get('all-reduce', 0)} "
                    f"({d.get('all-reduce bytes', 0)} B) | {d.get('all-gather', 0)} "
                    f"({d.get('all-gather bytes', 0)} B) | {other} | {params / 2**20:.2f} MiB |"
                )


if __name__ == "__main__":
    app.run(main)
