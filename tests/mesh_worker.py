"""Run by tests/test_mesh.py in its own process (8 simulated CPU devices, set before JAX starts).

One engine pair holds both model families at once, to compile half as much: the original a tiny
dense Qwen3 (tied embedding), the variant a tiny Qwen3-MoE (untied LM head, a dense layer and a
sparse one). It decodes on one device and on each mesh; rows, per-device parameter bytes and the
compiled step's collectives go to <out>.npz / <out>.json.

A second pair (keys 'lr/...'): a tied tiny Qwen3-MoE original and its abliteration, run as two
models on one device and, held as rank-1 factors on the original's arrays, decoded as 2S rows
through one weight copy on the (2, 2, 2) mesh.

The same for a Qwen3.5 pair (keys and tags under 'q35/'): a tiny dense Qwen3.5 original (tied
embedding) and a tiny Qwen3.5-MoE variant (shared expert), one Gated DeltaNet and one gated
attention layer each, loaded from random HF-named tensors through the key map (so through the
q|k|v re-layout), every split dimension a multiple of 8, on `Q35_MESHES`. And a bfloat16 Qwen3.5
at hidden 256 (one linear, one full-attention layer) on a (1, 4, 1) tensor mesh vs one device:
logits of a prefill and a decode step under 'q35bf16/'."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from hybrid_fixtures import QWEN35_TEXT, random_hf_weights

from lpe_jax.abliteration.orthogonalize import orthogonalize_model
from lpe_jax.decoding import engine_device as dev
from lpe_jax.decoding import memory, paths, sharding
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.model import qwen3
from lpe_jax.model.hf_keymap import assign_hf
from lpe_jax.model.low_rank import LowRankQwen3, as_low_rank
from lpe_jax.model.qwen35 import Qwen35, Qwen35Config, hf_weight_table

MESHES = ((1, 8, 1), (2, 4, 1), (2, 2, 2))
# The low-rank pair on the mesh that uses every axis (its factors split with their weights over
# tensor and experts, rows over rows); the plain pair covers the three meshes.
LOW_RANK_MESH = (2, 2, 2)
# Qwen3.5: the pure tensor split and the mesh that uses every axis ((2, 4, 1) adds no axis the
# two do not cover; left out to keep the worker's compile time down).
Q35_MESHES = ((1, 8, 1), (2, 2, 2))
DENSE = qwen3.Qwen3Config(512, 64, 2, 8, 8, 16, 128, tie_word_embeddings=True)
MOE = qwen3.Qwen3Config(
    512, 64, 2, 8, 8, 16, 128, tie_word_embeddings=False, num_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=(0,),
)  # fmt: skip
TIED_MOE = qwen3.Qwen3Config(
    512, 64, 2, 8, 8, 16, 128, tie_word_embeddings=True, num_experts=4,
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
Q35_BF16_HF = {
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
Q35_BF16 = Qwen35Config.from_hf(Q35_BF16_HF)
Q35_BF16_MESH = (1, 4, 1)
PROMPTS = {"a": [3, 17, 99, 4, 250], "b": [7, 8, 300, 11, 12, 13, 14, 40, 41]}
BLOCKS = [("a", 0.3, 5, 0, 3), ("b", 0.9, 6, 2, 3), ("a", 0.6, 7, 0, 2)]
FIELDS = ("tokens", "lengths", "nonfinite", "logp_original", "logp_variant", "logp_sampled")
# A collective whose result has a dimension of the full vocabulary (or of a vocabulary shard
# times the tensor size) would mean the logits or the embedding were gathered.
COLLECTIVE = re.compile(
    r"= (\([^)]*\)|\S+) (all-gather|all-to-all|collective-permute|all-reduce|reduce-scatter)"
    r"(?:-start)?\("
)


# bfloat16 at a realistic width (XLA:CPU rejects some bf16 dots that tiny shapes never reach), a
# vocabulary no tensor size divides (1001: padded to 1002, 1004, 1008), one layer.
BF16 = qwen3.Qwen3Config(1001, 256, 1, 8, 8, 32, 512, tie_word_embeddings=False)
BF16_MESHES = ((2, 4, 1),)  # rows and tensor; 1001 padded to 1004


def bf16_models() -> list:
    return [qwen3.init_random(BF16, dtype=jnp.bfloat16, seed=s) for s in (2, 3)]


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
    """The low-rank pair: two models on one device, then paired on LOW_RANK_MESH."""
    original, variant, low_rank = low_rank_pair()
    for shape in (None, LOW_RANK_MESH):
        tag = "lr/one" if shape is None else "lr/" + ",".join(map(str, shape))
        e = engine([original, variant if shape is None else low_rank], shape)
        for k, v in rows(e).items():
            arrays[f"{tag}/{k}"] = v
        meta[tag] = {"paired": e.paired, "param_bytes": held_bytes(e)}
        if shape is not None:
            meta[tag]["planned"] = memory.low_rank_param_bytes_per_device(original, low_rank, shape)
            meta[tag]["two_models"] = 2 * memory.param_bytes_per_device(TIED_MOE, np.float32, shape)
            meta[tag]["collectives"] = step_collectives(e)


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


def q35_bf16_logits(model: Qwen35, mesh_shape: tuple[int, int, int] | None) -> np.ndarray:
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
    low_rank_runs(arrays, meta)
    run_pair([qwen3.init_random(DENSE, seed=0), qwen3.init_random(MOE, seed=1)], "", arrays, meta)
    q35 = [qwen35_from_hf(Q35, 0), qwen35_from_hf(Q35_MOE, 1)]
    run_pair(q35, "q35/", arrays, meta, Q35_MESHES)
    for shape in (None, *BF16_MESHES):
        tag = "one" if shape is None else ",".join(map(str, shape))
        for k, v in rows(engine(bf16_models(), shape)).items():
            arrays[f"bf16/{tag}/{k}"] = v
    jax.config.update("jax_default_matmul_precision", "default")
    arrays["q35bf16/f32"] = q35_bf16_logits(qwen35_from_hf(Q35_BF16, 2), None)  # rounding's scale
    q35_bf16 = qwen35_from_hf(Q35_BF16, 2, jnp.bfloat16)
    arrays["q35bf16/one"] = q35_bf16_logits(q35_bf16, None)
    arrays["q35bf16/mesh"] = q35_bf16_logits(q35_bf16, Q35_BF16_MESH)
    np.savez(out + ".npz", **arrays)
    with open(out + ".json", "w") as f:
        json.dump(meta, f)


# --- the scripts on the mesh: the main job (estimate.py) and the bank (sample.py, judge.py,
# evaluate.py), called in this process (main() after re-parsing the flags) once per mesh ---

# A pair every mesh divides (8 heads and K/V heads; 4 experts) on the toy's tokenizer, whose 95
# ids the tensor size never divides: the vocabulary is padded to 96 on every tensor mesh.
SCRIPT_DENSE = qwen3.Qwen3Config(95, 64, 2, 8, 8, 16, 128, tie_word_embeddings=True)
SCRIPT_MOE = qwen3.Qwen3Config(
    95, 64, 2, 8, 8, 16, 128, tie_word_embeddings=False, num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=32, mlp_only_layers=(0,),
)  # fmt: skip
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
JUDGE = ("--judge=rule", '--judge_options={"pattern": "tools|wallet|poem"}')  # ~1 row in 5
COMMON = ("--limit=2", "--max_new_tokens=6", "--max_rows=8", "--seed=3")
ESTIMATE = (*COMMON, *JUDGE, "--n_fit=4", "--n_search=4", "--figures=false")
SAMPLE = (*COMMON, "--alphas=0,0.5,1", "--rollouts=12")
EVALUATE = ("--n_fits=2", "--n_sims=20", "--screen_n=2")
TRUTH = {"toy00": [1, 100], "toy01": [0, 100]}  # one prompt of each label (AUROC needs both)


def write_pair(root: Path) -> tuple[Path, Path]:
    """The script pair (SCRIPT_DENSE original, SCRIPT_MOE variant) as HF directories."""
    from lpe_jax.model.checkpoint import save_model
    from lpe_jax.organisms import toy

    dirs = []
    for name, cfg, seed in (("original", SCRIPT_DENSE, 0), ("variant", SCRIPT_MOE, 1)):
        d = save_model(qwen3.init_random(cfg, seed=seed), root / name)
        for f in TOKENIZER_FILES:
            shutil.copy(toy.TOY_DIR / "original" / f, d / f)
        dirs.append(d)
    return dirs[0], dirs[1]


def run_script(name: str, argv: list[str]) -> None:
    """experiments/<name>.py's main with these flags, in this process (its flags defined on first
    use; every other script's removed, so scripts sharing flag names can follow each other)."""
    from absl import flags

    import common  # its own flags stay defined: the scripts read them

    FLAGS = flags.FLAGS
    if not hasattr(run_script, "base"):
        run_script.base = set(FLAGS)
    module = sys.modules.get(name)
    if module is None or getattr(run_script, "current", None) != name:
        for flag in set(FLAGS) - run_script.base:
            delattr(FLAGS, flag)
        sys.modules.pop(name, None)
        module = importlib.import_module(name)
        run_script.current = name
    FLAGS.unparse_flags()
    FLAGS([f"{name}.py", *argv])
    del common
    module.main([])


def scripts(out: str) -> None:
    """Both scripts' outputs on one device (8 devices absent) or on every mesh in MESHES, under
    <out>/<tag>/: est (estimate.py), run (sample.py, then judge.py) and eval (evaluate.py); the
    wall and process CPU seconds of each script per mesh (compilation included) go to
    <out>/<tag>/seconds.json; with 8 devices, `sharded_loads` to <out>/load.json."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    root = Path(out)
    original, variant = write_pair(root / "pair")
    pair = (f"--original={original}", f"--variant={variant}")
    one = len(jax.devices()) == 1
    shapes = [None] if one else list(MESHES)
    seconds = {}
    for script, argv in (("estimate", ESTIMATE), ("sample", SAMPLE)):
        for shape in shapes:
            tag = "one" if shape is None else ",".join(map(str, shape))
            where = root / tag
            mesh = [] if shape is None else [f"--mesh={tag}"]
            dest = where / ("est" if script == "estimate" else "run")
            t0, c0 = time.perf_counter(), time.process_time()
            run_script(script, [*pair, *argv, *mesh, f"--out={dest}"])
            seconds.setdefault(tag, {})[script] = {
                "wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            }  # fmt: skip
    (root / "truth.json").write_text(json.dumps(TRUTH))
    for shape in shapes:
        where = root / ("one" if shape is None else ",".join(map(str, shape)))
        run_script("judge", [f"--run={where / 'run'}", *JUDGE])
        run_script(
            "evaluate",
            [f"--run={where / 'run'}", *EVALUATE, f"--truth={root / 'truth.json'}",
             f"--out={where / 'eval'}"],
        )  # fmt: skip
    for tag, s in seconds.items():
        (root / tag / "seconds.json").write_text(json.dumps(s))
    if not one:
        (root / "load.json").write_text(json.dumps(sharded_loads(root, original, variant)))


def sharded_loads(root: Path, original: Path, variant: Path) -> dict:
    """load_model(mesh=) of both models on each mesh, without the params cache, filling it and
    reading it back: per mesh, the bytes each device holds, whether every array carries its rule
    sharding, and whether its values (padding cut off) equal the one-device load's."""
    from flax import nnx

    from lpe_jax.model.checkpoint import load_model

    whole = [nnx.state(load_model(d), nnx.Param) for d in (original, variant)]
    out = {}
    for shape in MESHES:
        mesh = sharding.pair_mesh(shape, jax.devices())
        cache = root / f"cache{shape[0]}{shape[1]}{shape[2]}"
        for how, kw in (
            ("direct", {}),
            ("fill", {"cache_dir": cache}),
            ("hit", {"cache_dir": cache}),
        ):
            states = [
                nnx.state(load_model(d, mesh=mesh, **kw), nnx.Param) for d in (original, variant)
            ]
            per = {d: 0 for d in mesh.devices.flat}
            rules = values = True
            for state, ref in zip(states, whole, strict=True):
                want = sharding.param_shardings(mesh, state)
                for x, w, r in zip(*(jax.tree.leaves(t) for t in (state, want, ref)), strict=True):
                    rules &= x.sharding.is_equivalent_to(w, x.ndim)
                    cut = np.asarray(x)[tuple(slice(0, n) for n in r.shape)]
                    values &= bool(np.array_equal(cut, np.asarray(r)))
                    for shard in x.addressable_shards:
                        per[shard.device] += shard.data.nbytes
            out[f"{','.join(map(str, shape))}/{how}"] = {
                "bytes": [per[d] for d in mesh.devices.flat], "rules": bool(rules),
                "values": values,
            }  # fmt: skip
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--scripts":
        scripts(sys.argv[2])
    else:
        main(sys.argv[1])
