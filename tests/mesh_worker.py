"""Run by tests/test_mesh.py in its own process (8 simulated CPU devices, set before JAX starts).

One engine pair holds both model families at once, to compile half as much: the original a tiny
dense Qwen3 (tied embedding), the variant a tiny Qwen3-MoE (untied LM head, a dense layer and a
sparse one). It decodes on one device and on each mesh; rows, per-device parameter bytes and the
compiled step's collectives go to <out>.npz / <out>.json.

A second pair (keys 'lr/...'): a tied tiny Qwen3-MoE original and its abliteration, run as two
models on one device and, held as rank-1 factors on the original's arrays, decoded as 2S rows
through one weight copy on each mesh."""

from __future__ import annotations

import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from lpe_jax.abliteration.orthogonalize import orthogonalize_model
from lpe_jax.decoding import engine_device as dev
from lpe_jax.decoding import memory, paths, sharding
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.model import qwen3
from lpe_jax.model.low_rank import LowRankQwen3, as_low_rank

MESHES = ((1, 8, 1), (2, 4, 1), (2, 2, 2))
DENSE = qwen3.Qwen3Config(512, 64, 2, 8, 8, 16, 128, tie_word_embeddings=True)
MOE = qwen3.Qwen3Config(
    512, 64, 2, 8, 8, 16, 128, tie_word_embeddings=False, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=(0,),
)  # fmt: skip
TIED_MOE = qwen3.Qwen3Config(
    512, 64, 2, 8, 8, 16, 128, tie_word_embeddings=True, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=(0,),
)  # fmt: skip
PROMPTS = {"a": [3, 17, 99, 4, 250], "b": [7, 8, 300, 11, 12, 13, 14, 40, 41]}
BLOCKS = [("a", 0.3, 5, 0, 3), ("b", 0.9, 6, 2, 3), ("a", 0.6, 7, 0, 2)]
FIELDS = ("tokens", "lengths", "nonfinite", "logp_original", "logp_variant", "logp_sampled")
# A collective whose result has a dimension of the full vocabulary (or of a vocabulary shard
# times the tensor size) would mean the logits or the embedding were gathered.
COLLECTIVE = re.compile(
    r"= (\([^)]*\)|\S+) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
    r"(?:-start)?\("
)


def engine(models: list, shape: tuple[int, int, int] | None) -> RolloutEngine:
    devices = jax.devices()[:1] if shape is None else jax.devices()
    return RolloutEngine(
        *models, paths.linear, 6, (0,), slots=4, max_prompts=2, steps_per_call=4,
        max_prompt_len=16, devices=devices, mesh_shape=shape,
    )  # fmt: skip


def rows(e: RolloutEngine) -> dict[str, np.ndarray]:
    for key, alpha, seed, start, n in BLOCKS:
        e.submit(RowBlock(key, np.array(PROMPTS[key], np.int32), alpha, seed, start, n))
    out = {}
    for r in e.run():
        b = r.block
        for f in FIELDS:
            out[f"{b.prompt_key}{b.alpha}/{f}"] = getattr(r.rollouts, f)
    return out


def step_collectives(e: RolloutEngine) -> list[str]:
    """Result shapes of the collectives in the compiled generate call."""
    lowered = dev.generate.lower(
        spec=e._spec, params=e._params, state=e._state, steps=e.steps_per_call, refills=4
    )
    return [f"{m.group(2)} {m.group(1)}" for m in COLLECTIVE.finditer(lowered.compile().as_text())]


def gather_control(e: RolloutEngine) -> list[str]:
    """Collectives of a program that does gather the vocabulary-sharded logits to every device:
    the control that shows the check on the step's collectives can fail."""
    mesh = e._spec.mesh
    logits = jax.device_put(
        np.zeros((4, DENSE.vocab_size), np.float32), sharding.logits_sharding(mesh)
    )

    def gathered(x: jax.Array) -> jax.Array:
        return jnp.argmax(jax.lax.with_sharding_constraint(x, sharding.replicated(mesh)), -1)

    text = jax.jit(gathered).lower(logits).compile().as_text()
    return [f"{m.group(2)} {m.group(1)}" for m in COLLECTIVE.finditer(text)]


def param_bytes(e: RolloutEngine) -> list[int]:
    """Bytes of both models' parameters held on each device."""
    per = {d: 0 for d in e._spec.mesh.devices.flat}
    for leaf in jax.tree.leaves(e._params):
        for shard in leaf.addressable_shards:
            per[shard.device] += shard.data.nbytes
    return [per[d] for d in e._spec.mesh.devices.flat]


def held_bytes(e: RolloutEngine) -> list[int]:
    """Bytes of the distinct parameter buffers on each device (a buffer both models hold, the
    low-rank variant's base, counted once)."""
    per = {d: {} for d in e._spec.mesh.devices.flat}
    for leaf in jax.tree.leaves(e._params):
        for shard in leaf.addressable_shards:
            per[shard.device][shard.data.unsafe_buffer_pointer()] = shard.data.nbytes
    return [sum(per[d].values()) for d in e._spec.mesh.devices.flat]


def low_rank_pair() -> tuple[qwen3.Qwen3, qwen3.Qwen3, LowRankQwen3]:
    """(original, its abliteration, that as rank-1 factors on the original's arrays). The
    writers are scaled up so a tied head does not just repeat the current token."""
    original = qwen3.init_random(TIED_MOE, seed=2)
    for layer in original.layers:
        layer.self_attn.o_proj[...] = layer.self_attn.o_proj[...] * 8.0
        mlp = getattr(layer.mlp, "experts", layer.mlp)
        mlp.down_proj[...] = mlp.down_proj[...] * 8.0
    variant = orthogonalize_model(original, np.random.default_rng(4).normal(size=64))
    low_rank, _ = as_low_rank(original, variant)
    assert isinstance(low_rank, LowRankQwen3)
    return original, variant, low_rank


def low_rank_runs(arrays: dict, meta: dict) -> None:
    """The low-rank pair: two models on one device, then paired on each mesh."""
    original, variant, low_rank = low_rank_pair()
    for shape in (None, *MESHES):
        tag = "lr/one" if shape is None else "lr/" + ",".join(map(str, shape))
        e = engine([original, variant if shape is None else low_rank], shape)
        for k, v in rows(e).items():
            arrays[f"{tag}/{k}"] = v
        meta[tag] = {"paired": e.paired, "param_bytes": held_bytes(e)}
        if shape is not None:
            meta[tag]["planned"] = memory.low_rank_param_bytes_per_device(original, low_rank, shape)
            meta[tag]["two_models"] = 2 * memory.param_bytes_per_device(TIED_MOE, np.float32, shape)
            meta[tag]["collectives"] = step_collectives(e)


def main(out: str) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    arrays, meta = {}, {}
    low_rank_runs(arrays, meta)
    models = [qwen3.init_random(DENSE, seed=0), qwen3.init_random(MOE, seed=1)]
    for shape in (None, *MESHES):
        tag = "one" if shape is None else ",".join(map(str, shape))
        e = engine(models, shape)
        for k, v in rows(e).items():
            arrays[f"{tag}/{k}"] = v
        meta[tag] = {"param_bytes": param_bytes(e), "vocab": DENSE.vocab_size}
        if shape is not None:
            meta[tag]["collectives"] = step_collectives(e)
            meta[tag]["control"] = gather_control(e)
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main(sys.argv[1])
