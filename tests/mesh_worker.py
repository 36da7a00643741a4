"""Run by tests/test_mesh.py in its own process (8 simulated CPU devices, set before JAX starts).

One engine pair holds both model families at once, to compile half as much: the original a tiny
dense Qwen3 (tied embedding), the variant a tiny Qwen3-MoE (untied LM head, a dense layer and a
sparse one). It decodes on one device and on each mesh; rows, per-device parameter bytes and the
compiled step's collectives go to <out>.npz / <out>.json.

The same for a Qwen3.5 pair (keys and tags under 'q35/'): a tiny dense Qwen3.5 original (tied
embedding) and a tiny Qwen3.5-MoE variant (shared expert), one Gated DeltaNet and one gated
attention layer each, loaded from random HF-named tensors through the key map (so through the
q|k|v re-layout), every split dimension a multiple of 8, on `Q35_MESHES`. And a bfloat16 Qwen3.5
at hidden 256 (one linear, one full-attention layer) on a (1, 4, 1) tensor mesh vs one device:
logits of a prefill and a decode step under 'bf16/'."""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hybrid_fixtures import QWEN35_TEXT, random_hf_weights

from lpe_jax.decoding import engine_device as dev
from lpe_jax.decoding import paths, sharding
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.model import qwen3
from lpe_jax.model.hf_keymap import assign_hf
from lpe_jax.model.qwen35 import Qwen35, Qwen35Config, hf_weight_table

MESHES = ((1, 8, 1), (2, 4, 1), (2, 2, 2))
# Qwen3.5: the pure tensor split and the mesh that uses every axis ((2, 4, 1) adds no axis the
# two do not cover; left out to keep the worker's compile time down).
Q35_MESHES = ((1, 8, 1), (2, 2, 2))
DENSE = qwen3.Qwen3Config(512, 64, 2, 8, 8, 16, 128, tie_word_embeddings=True)
MOE = qwen3.Qwen3Config(
    512, 64, 2, 8, 8, 16, 128, tie_word_embeddings=False, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=(0,),
)  # fmt: skip
# Qwen3.5 (HF config keys, from the hybrid fixtures' tiny config): heads, K/V heads, linear key
# heads (8) and value heads (16), MLP / expert / shared-expert hidden units and the vocabulary all
# divide by 8; 4 experts by the experts axis.
_ROPE = {"rope_theta": 1e4, "partial_rotary_factor": 0.25, "rope_type": "default"}
Q35_HF = {
    **QWEN35_TEXT,
    "model_type": "qwen3_5_text",
    "rope_parameters": _ROPE,
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "layer_types": ["linear_attention", "full_attention"],
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "head_dim": 8,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 8,
    "linear_num_value_heads": 16,
    "tie_word_embeddings": True,
}
Q35_MOE_HF = {
    **Q35_HF,
    "model_type": "qwen3_5_moe_text",
    "tie_word_embeddings": False,
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "shared_expert_intermediate_size": 32,
}
Q35 = Qwen35Config.from_hf(Q35_HF)
Q35_MOE = Qwen35Config.from_hf(Q35_MOE_HF)
# bfloat16 at a realistic width on a tensor mesh of 4 (K/V and linear key heads 4).
BF16_HF = {
    **Q35_HF,
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "linear_key_head_dim": 64,
    "linear_value_head_dim": 64,
    "linear_num_key_heads": 4,
    "linear_num_value_heads": 8,
}
BF16 = Qwen35Config.from_hf(BF16_HF)
BF16_MESH = (1, 4, 1)
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


def qwen35_from_hf(cfg: Qwen35Config, seed: int, dtype: Any = jnp.float32) -> Qwen35:
    """A `Qwen35` of `cfg` loaded from random HF-named tensors (`random_hf_weights`) through the
    key map, as a checkpoint would be (the q|k|v channels re-laid out)."""
    table = hf_weight_table(cfg, {"model.embed_tokens.weight"})
    shapes = {n: s for e in table for n, s in zip(e.names, e.shapes, strict=True)}
    model = Qwen35(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    assign_hf(model, table, random_hf_weights(shapes, seed))
    return model


def run_pair(models: list, prefix: str, arrays: dict, meta: dict, meshes: tuple = MESHES) -> None:
    """One device and each mesh: rows to `arrays`, bytes and collectives to `meta`."""
    for shape in (None, *meshes):
        tag = prefix + ("one" if shape is None else ",".join(map(str, shape)))
        e = engine(models, shape)
        for k, v in rows(e).items():
            arrays[f"{tag}/{k}"] = v
        meta[tag] = {"param_bytes": param_bytes(e), "vocab": models[0].cfg.vocab_size}
        if shape is not None:
            meta[tag]["collectives"] = step_collectives(e)
            meta[tag]["control"] = gather_control(e)
        if isinstance(models[0], Qwen35):
            meta[tag]["state_shards"] = state_shards(e)


def state_shards(e: RolloutEngine) -> dict[str, list[list[int]]]:
    """Per-device shapes of the original's slot states after the run (layer 0 linear, layer 1
    full attention): name -> the shape of the shard on each device."""
    slots = e._state.slots.kv_o
    arrays = {
        "conv": slots.prompt[0].conv, "recurrent": slots.prompt[0].recurrent,
        "prompt_k": slots.prompt[1][0], "own_k": slots.own[1][0],
        "table_conv": e._state.prompts.original.states[0].conv,
    }  # fmt: skip
    return {k: [list(s.data.shape) for s in x.addressable_shards] for k, x in arrays.items()}


def bf16_logits(model: Qwen35, mesh_shape: tuple[int, int, int] | None) -> np.ndarray:
    """float32 logits [2, 2, V] of a prefill (two rows of lengths 12 and 7) and one decode step
    (fixed tokens), with the params placed by the rules on `mesh_shape` (None: one device)."""
    graph, params = nnx.split(model)
    if mesh_shape is not None:
        devices = jax.devices()[: int(np.prod(mesh_shape))]
        mesh = sharding.pair_mesh(mesh_shape, devices, [model.cfg])
        params = jax.device_put(params, sharding.param_shardings(mesh, params))
    tokens = np.random.default_rng(3).integers(0, model.cfg.vocab_size, (2, 12), np.int32)
    fed = np.random.default_rng(4).integers(0, model.cfg.vocab_size, (1, 2), np.int32)

    @jax.jit
    def run(params: Any) -> jax.Array:
        m = nnx.merge(graph, params)
        logits, states = m.prefill(tokens, np.array([12, 7], np.int32), 16)
        out = [logits]
        for t in fed:
            logits, states = m.decode_step(t, states)
            out.append(logits)
        return jnp.stack(out)

    return np.asarray(run(params))


def main(out: str) -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    arrays, meta = {}, {}
    run_pair([qwen3.init_random(DENSE, seed=0), qwen3.init_random(MOE, seed=1)], "", arrays, meta)
    q35 = [qwen35_from_hf(Q35, 0), qwen35_from_hf(Q35_MOE, 1)]
    run_pair(q35, "q35/", arrays, meta, Q35_MESHES)
    jax.config.update("jax_default_matmul_precision", "default")
    arrays["bf16/f32"] = bf16_logits(qwen35_from_hf(BF16, 2), None)  # the rounding's scale
    bf16 = qwen35_from_hf(BF16, 2, jnp.bfloat16)
    arrays["bf16/one"] = bf16_logits(bf16, None)
    arrays["bf16/mesh"] = bf16_logits(bf16, BF16_MESH)
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(meta, f)


if __name__ == "__main__":
    main(sys.argv[1])
