"""The pair on a device mesh ('rows', 'tensor', 'experts'): mesh checks, sharding rules, and rows
identical to one device on 8 simulated devices (tests/mesh_worker.py, in its own process).

The worker compiles one engine per mesh (4 in all, ~50 s of CPU on the loaded 2-core box): a
candidate for the slow list; its models are as small as the meshes allow (8 heads and K/V heads,
so tensor=8 splits them). Its Qwen3.5 cases add 3 engines and a bf16 model (~45 s wall at load
~4, docs/benchmarks.md): candidates too."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.tree_util import DictKey, GetAttrKey

from lpe_jax.decoding import memory, sharding
from lpe_jax.model import qwen3

DENSE = qwen3.Qwen3Config(512, 64, 2, 8, 8, 16, 128)
MOE = qwen3.Qwen3Config(
    512, 64, 2, 8, 4, 16, 128, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=20
)


def test_parse_mesh_shape():
    assert sharding.parse_mesh_shape("2,4,1") == (2, 4, 1)
    for bad in ("2,4", "2,0,1", "a,b,c", "8"):
        with pytest.raises(ValueError, match="rows,tensor,experts"):
            sharding.parse_mesh_shape(bad)


def test_check_mesh_names_what_does_not_divide_and_the_fix():
    sharding.check_mesh((2, 4, 1), 8, [DENSE])
    sharding.check_mesh((4, 2, 1), 8, [DENSE, MOE])
    with pytest.raises(ValueError, match=r"holds 4 devices but 8 .* \(8, 1, 1\)"):
        sharding.check_mesh((2, 2, 1), 8, [DENSE])
    with pytest.raises(ValueError) as err:
        sharding.check_mesh((1, 8, 1), 8, [DENSE, MOE])
    msg = str(err.value)
    assert "num_kv_heads=4 does not divide over tensor=8" in msg
    assert "moe_intermediate_size=20 does not divide over tensor=8" in msg
    assert "tensor in [1, 2, 4]" in msg  # the common divisors of every tensor-split size
    with pytest.raises(ValueError, match="num_experts=6 does not divide over experts=4"):
        sharding.check_mesh((1, 2, 4), 8, [MOE])
    with pytest.raises(ValueError, match="experts=2 splits nothing"):
        sharding.check_mesh((2, 2, 2), 8, [DENSE])


def _path(*names: str) -> tuple:
    return tuple(DictKey(n) for n in names) + (GetAttrKey("value"),)


def test_param_rules_by_name():
    assert sharding.param_axes(_path("embed_tokens"), 2) == ("vocab", "embed")
    assert sharding.param_axes(_path("layers", "3", "self_attn", "k_proj"), 2) == (
        "embed",
        "kv_heads",
    )
    experts = _path("layers", "0", "mlp", "experts", "down_proj")
    assert sharding.param_axes(experts, 3) == ("experts", "expert_ffw", "embed")
    assert sharding.param_axes(_path("layers", "0", "mlp", "down_proj"), 2) == ("ffw", "embed")
    # a low-rank factor follows its weight's rows or columns
    lr = (*_path("layers", "0", "self_attn", "o_proj"), GetAttrKey("u"))
    assert sharding.param_axes(lr, 2) == ("heads", None)
    assert sharding.param_axes(_path("layers", "0", "linear_attn", "in_proj_qkvz"), 2) is None
    spec = sharding.logical_to_spec(("experts", "embed", "expert_ffw"))
    assert spec == jax.sharding.PartitionSpec("experts", None, "tensor")


def test_one_device_mesh_places_everything_whole():
    m = qwen3.init_random(DENSE)
    mesh = sharding.pair_mesh((1, 1, 1), jax.devices()[:1], [DENSE])
    params = nnx.split(m)[1]
    specs = jax.tree.leaves(sharding.param_shardings(mesh, params))
    leaves = jax.tree.leaves(params)
    assert len(specs) == len(leaves) > 0
    assert all(s.shard_shape(x.shape) == x.shape for s, x in zip(specs, leaves, strict=True))


_SHAPE = re.compile(r"\[([0-9,]*)\]")


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh") / "run"
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu"
    )
    worker = Path(__file__).with_name("mesh_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), str(out)], env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(f"{out}.npz"), json.loads(Path(f"{out}.json").read_text())


@pytest.mark.parametrize("shape", ["1,8,1", "2,4,1", "2,2,2"])
def test_mesh_rows_match_one_device(mesh_run, shape):
    arrays, _ = mesh_run
    keys = [k.removeprefix("one/") for k in arrays.files if k.startswith("one/")]
    assert len(keys) == 3 * 6
    for k in keys:
        one, mesh = arrays[f"one/{k}"], arrays[f"{shape}/{k}"]
        if one.dtype.kind == "f":  # split contractions sum in another order
            np.testing.assert_allclose(mesh, one, rtol=1e-5, atol=1e-5, err_msg=k)
        else:
            np.testing.assert_array_equal(mesh, one, err_msg=k)
    assert arrays["one/a0.3/lengths"].min() > 1  # rows decoded past their first token


@pytest.mark.parametrize("shape", ["1,8,1", "2,4,1", "2,2,2"])
def test_mesh_step_never_gathers_the_vocabulary(mesh_run, shape):
    _, meta = mesh_run
    vocab = meta[shape]["vocab"]
    collectives = meta[shape]["collectives"]
    assert any(c.startswith("all-gather") for c in collectives)  # the cross-shard argmax's
    assert not [c for c in collectives if vocab in _dims(c)]
    # the control: gathering the logits shows up as a collective with a vocabulary dimension
    assert [c for c in meta[shape]["control"] if vocab in _dims(c)]


def _dims(collective: str) -> list[int]:
    return [int(d) for m in _SHAPE.findall(collective) for d in m.split(",") if d]


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 4, 1), (2, 2, 2)])
def test_mesh_param_bytes_per_device_match_the_plan(mesh_run, shape):
    _, meta = mesh_run
    worker = _worker_configs()
    planned = sum(memory.param_bytes_per_device(c, np.float32, shape) for c in worker)
    held = meta[",".join(map(str, shape))]["param_bytes"]
    assert held == [planned] * 8
    whole = sum(memory.param_bytes_per_device(c, np.float32, (1, 1, 1)) for c in worker)
    assert meta["one"]["param_bytes"] == [whole]
    assert planned < whole / 2


def _worker_configs() -> tuple:
    sys.path.insert(0, str(Path(__file__).parent))
    import mesh_worker  # noqa: PLC0415

    return mesh_worker.DENSE, mesh_worker.MOE


def _script(*args: str, devices: int) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(root),
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    return subprocess.run(
        [sys.executable, str(root / "experiments" / "sample.py"), *args],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )  # fmt: skip


def test_sample_mesh_flag_is_planned_recorded_and_checked(tmp_path):
    """--mesh on the toy pair (vocabulary 95: only rows can split it): a rows mesh runs, logs its
    per-device plan and lands in the manifest; a tensor split is refused naming the vocabulary."""
    common = ["--limit=1", "--alphas=0,1", "--rollouts=4", "--max_rows=4", "--max_new_tokens=8"]
    p = _script(f"--out={tmp_path / 'rows'}", "--mesh=2,1,1", *common, devices=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "plan per device, mesh rows=2 tensor=1 experts=1: weights" in p.stderr
    manifest = json.loads((tmp_path / "rows" / "manifest.json").read_text())
    assert manifest["mesh"] == "2,1,1"
    p = _script(f"--out={tmp_path / 'tensor'}", "--mesh=1,2,1", *common, devices=2)
    assert p.returncode != 0
    assert "vocab_size=95 does not divide over tensor=2" in p.stderr, p.stderr[-2000:]
    assert "tensor in [1]" in p.stderr


# --- Qwen3.5 (dense and MoE) on the mesh ---


def _qwen35(moe: bool = False, **linear):
    from lpe_jax.model.gated_attention import GatedAttentionConfig  # noqa: PLC0415
    from lpe_jax.model.gated_deltanet import GatedDeltaNetConfig  # noqa: PLC0415
    from lpe_jax.model.moe import MoEConfig  # noqa: PLC0415
    from lpe_jax.model.qwen35 import Qwen35Config  # noqa: PLC0415

    lin = {"num_k_heads": 8, "num_v_heads": 16, **linear}
    return Qwen35Config(
        vocab_size=512,
        hidden_size=64,
        layer_types=("linear_attention", "full_attention"),
        linear=GatedDeltaNetConfig(64, lin["num_k_heads"], lin["num_v_heads"], 8, 8),
        attention=GatedAttentionConfig(64, 8, 4, 8, 2),
        intermediate_size=0 if moe else 128,
        moe=MoEConfig(64, 6, 2, 16, True, 20) if moe else None,
    )


def test_check_mesh_names_qwen35_dimensions():
    """Qwen3.5's split dimensions by their HF config keys, incl. the Gated DeltaNet heads."""
    sharding.check_mesh((2, 4, 1), 8, [_qwen35()])
    sharding.check_mesh((4, 2, 1), 8, [_qwen35(), _qwen35(moe=True)])
    with pytest.raises(ValueError) as err:
        sharding.check_mesh((1, 8, 1), 8, [_qwen35(num_k_heads=2, num_v_heads=6)])
    msg = str(err.value)
    assert "linear_num_key_heads=2 does not divide over tensor=8" in msg
    assert "linear_num_value_heads=6 does not divide over tensor=8" in msg
    assert "num_key_value_heads=4 does not divide over tensor=8" in msg
    assert "tensor in [1, 2]" in msg
    sharding.check_mesh((1, 4, 2), 8, [_qwen35(moe=True)])
    with pytest.raises(ValueError, match="shared_expert_intermediate_size=20 does not divide over"):
        sharding.check_mesh((1, 8, 1), 8, [_qwen35(moe=True)])
    with pytest.raises(ValueError, match="num_experts=6 does not divide over experts=4"):
        sharding.check_mesh((1, 2, 4), 8, [_qwen35(moe=True)])


def test_every_qwen35_parameter_has_a_rule():
    """No Qwen3.5 parameter is left to a silent copy: each leaf of a dense and a MoE model has
    logical axes, and the split ones are the heads, experts and hidden units named here."""
    from lpe_jax.model.qwen35 import Qwen35  # noqa: PLC0415

    seen = {}
    for cfg in (_qwen35(), _qwen35(moe=True)):
        model = nnx.eval_shape(lambda c=cfg: Qwen35(c, rngs=nnx.Rngs(0)))
        for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param)):
            axes = sharding.param_axes(path, x.ndim)
            assert axes is not None, path
            seen[".".join(n for n in sharding._names(path) if n != "layers")] = axes
    assert seen["linear_attn.in_proj_qkv"] == ("embed", "lin_groups")
    assert seen["linear_attn.conv1d"] == ("lin_groups", None)
    assert seen["linear_attn.out_proj"] == ("lin_v_heads", "embed")
    assert seen["linear_attn.A_log"] == ("lin_v_heads",)
    assert seen["linear_attn.norm"] == (None,) and seen["norm"] == ("embed",)
    assert seen["self_attn.q_proj"] == ("embed", "heads")
    assert seen["mlp.shared_expert.down_proj"] == ("shared_ffw", "embed")
    assert seen["mlp.shared_expert_gate"] == ("embed", None)
    assert seen["mlp.experts.up_proj"] == ("experts", "embed", "expert_ffw")


def test_qwen35_state_axes():
    cfg = _qwen35()
    assert sharding.state_axes(cfg, 3, "rows", "conv") == ("rows", "lin_groups", None)
    assert sharding.state_axes(cfg, 4, None, "recurrent") == (None, "lin_v_heads", None, None)
    assert sharding.state_axes(cfg, 4, "rows") == ("rows", "kv_heads", None, None)


def test_qwen35_param_bytes_plan_counts_every_parameter():
    """The plan's count on one device is the model's parameter count (dense, MoE, tied)."""
    import dataclasses  # noqa: PLC0415

    for cfg in (
        _qwen35(),
        _qwen35(moe=True),
        dataclasses.replace(_qwen35(), tie_word_embeddings=True),
    ):
        got = memory.param_bytes_per_device(cfg, np.float32, (1, 1, 1))
        assert got == 4 * memory._total_params(cfg)
    assert memory.param_bytes_per_device(_qwen35(), np.float32, (1, 4, 1)) < got / 3


_Q35_MESHES = ["1,8,1", "2,2,2"]  # mesh_worker.Q35_MESHES


@pytest.mark.parametrize("shape", _Q35_MESHES)
def test_qwen35_mesh_rows_match_one_device(mesh_run, shape):
    """A tiny Qwen3.5 dense original and Qwen3.5-MoE variant (f32, highest): tokens, lengths
    and flags identical to one device; log-probs (sums over up to 6 tokens, magnitude ~10-40)
    within 1e-4 absolute + 1e-5 relative (measured <= 1.2e-5)."""
    arrays, _ = mesh_run
    keys = [k.removeprefix("q35/one/") for k in arrays.files if k.startswith("q35/one/")]
    assert len(keys) == 3 * 6
    for k in keys:
        one, mesh = arrays[f"q35/one/{k}"], arrays[f"q35/{shape}/{k}"]
        if one.dtype.kind == "f":
            np.testing.assert_allclose(mesh, one, rtol=1e-5, atol=1e-4, err_msg=k)
        else:
            np.testing.assert_array_equal(mesh, one, err_msg=k)
    assert arrays["q35/one/a0.3/lengths"].min() > 1


@pytest.mark.parametrize("shape", _Q35_MESHES)
def test_qwen35_mesh_step_never_gathers_the_vocabulary(mesh_run, shape):
    _, meta = mesh_run
    tag = f"q35/{shape}"
    vocab = meta[tag]["vocab"]
    assert not [c for c in meta[tag]["collectives"] if vocab in _dims(c)]
    assert [c for c in meta[tag]["control"] if vocab in _dims(c)]


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_qwen35_mesh_param_bytes_and_state_shards_match_the_rules(mesh_run, shape):
    """Bytes per device = the plan; slot states split as the rules say: the conv window by its
    channels (conv_dim / tensor), the delta state by value heads, K/V by K/V heads, slots by
    rows, the prompt table's copy only by tensor."""
    _, meta = mesh_run
    sys.path.insert(0, str(Path(__file__).parent))
    import mesh_worker  # noqa: PLC0415

    cfgs = mesh_worker.Q35, mesh_worker.Q35_MOE
    tag = "q35/" + ",".join(map(str, shape))
    planned = sum(memory.param_bytes_per_device(c, np.float32, shape) for c in cfgs)
    assert meta[tag]["param_bytes"] == [planned] * 8
    whole = sum(memory.param_bytes_per_device(c, np.float32, (1, 1, 1)) for c in cfgs)
    assert meta["q35/one"]["param_bytes"] == [whole]
    rows, t, _ = shape
    lin, att = mesh_worker.Q35.linear, mesh_worker.Q35.attention
    shards = meta[tag]["state_shards"]
    slots = 4 // rows
    assert shards["conv"] == [[slots, lin.conv_dim // t, lin.conv_kernel - 1]] * 8
    assert shards["recurrent"] == [[slots, lin.num_v_heads // t, 8, 8]] * 8
    assert {tuple(s[:2]) for s in shards["prompt_k"]} == {(slots, att.num_kv_heads // t)}
    assert {tuple(s[:2]) for s in shards["own_k"]} == {(slots, att.num_kv_heads // t)}
    assert {tuple(s[:2]) for s in shards["table_conv"]} == {(2, lin.conv_dim // t)}


def test_qwen35_bf16_tensor_mesh_matches_one_device(mesh_run):
    """bfloat16 Qwen3.5 at hidden 256 (one Gated DeltaNet, one gated attention layer) on a
    (1, 4, 1) tensor mesh vs one device, a prefill and a decode step: logits within 2e-2 of the
    largest |logit| (measured 9.2e-3); the mesh's mean distance from the float32 model within
    1.25x one device's (bf16's own rounding; measured 1.05x); same argmax everywhere."""
    arrays, _ = mesh_run
    f32, one, mesh = arrays["bf16/f32"], arrays["bf16/one"], arrays["bf16/mesh"]
    scale = np.abs(f32).max()
    assert scale > 1
    assert np.abs(mesh - one).max() <= 2e-2 * scale
    assert np.abs(mesh - f32).mean() <= 1.25 * np.abs(one - f32).mean()
    np.testing.assert_array_equal(mesh.argmax(-1), one.argmax(-1))
