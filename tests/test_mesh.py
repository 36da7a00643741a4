"""The pair on a device mesh ('rows', 'tensor', 'experts'): mesh checks, sharding rules, and rows
identical to one device on 8 simulated devices (tests/mesh_worker.py, in its own process).

The worker compiles one engine per mesh (4 in all, ~50 s of CPU on the loaded 2-core box): a
candidate for the slow list; its models are as small as the meshes allow (8 heads and K/V heads,
so tensor=8 splits them)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
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


# --- a vocabulary the tensor size does not divide: padded at placement, masked when sampled ---

ODD = qwen3.Qwen3Config(95, 64, 1, 8, 8, 8, 64, tie_word_embeddings=False)


def test_check_mesh_pads_the_vocabulary_instead_of_refusing():
    sharding.check_mesh((1, 8, 1), 8, [ODD])  # 95 does not divide over 8: padded to 96
    assert [sharding.padded_vocab(95, t) for t in (1, 2, 4, 8)] == [95, 96, 96, 96]
    wide = qwen3.Qwen3Config(96, 64, 1, 8, 8, 8, 64, tie_word_embeddings=False)
    for shape in [(1, 8, 1), (2, 4, 1), (4, 2, 1)]:  # the plan counts the padded rows exactly
        assert memory.param_bytes_per_device(ODD, np.float32, shape) == (
            memory.param_bytes_per_device(wide, np.float32, shape)
        )
    assert memory.param_bytes_per_device(ODD, np.float32, (1, 1, 1)) == ODD.num_params() * 4


def test_pad_vocab_pads_only_vocabulary_dimensions():
    params = nnx.split(qwen3.init_random(ODD))[1]
    padded = sharding.pad_vocab(params, 95, 8)
    assert padded["embed_tokens"][...].shape == (96, 64)
    assert padded["lm_head"][...].shape == (64, 96)
    for name in ("embed_tokens", "lm_head"):
        x, y = np.asarray(params[name][...]), np.asarray(padded[name][...])
        np.testing.assert_array_equal(y[tuple(slice(0, n) for n in x.shape)], x)
        assert not np.any(y[95:] if name == "embed_tokens" else y[:, 95:])
    same = jax.tree.leaves(params["layers"]), jax.tree.leaves(padded["layers"])
    assert all(a is b for a, b in zip(*same, strict=True))
    again = sharding.pad_vocab(padded, 95, 8)  # already padded: unchanged
    assert again["lm_head"][...].shape == (64, 96)
    host = sharding.pad_vocab({"lm_head": np.ones((4, 95), np.float32)}, 95, 4)
    assert isinstance(host["lm_head"], np.ndarray) and host["lm_head"].shape == (4, 96)


@pytest.mark.parametrize("partitionable", [True, False])
def test_gumbel_noise_of_real_ids_does_not_depend_on_the_padding(partitionable):
    """Partitionable threefry (jax's default) draws the same noise for ids < V at any width;
    the old threefry does not, and `_gumbel_max` then draws V columns only."""
    from lpe_jax.decoding import rollouts

    keys = rollouts.row_keys(np.arange(4, dtype=np.uint32), 3, np.arange(4, dtype=np.uint32))
    with jax.threefry_partitionable(partitionable):
        real = jax.vmap(lambda k: jax.random.gumbel(k, (95,)))(keys)
        wide = jax.vmap(lambda k: jax.random.gumbel(k, (128,)))(keys)
        assert np.array_equal(wide[:, :95], real) == partitionable
        row = np.where(np.arange(128) < 95, 0.0, -np.inf).astype(np.float32)
        tok = rollouts._gumbel_max(keys, jnp.asarray(np.tile(row, (4, 1))), None, 95)
        np.testing.assert_array_equal(tok, jnp.argmax(real, -1))


def test_padded_sample_step_equals_the_unpadded_one():
    """Padded columns (any value, here large) are never sampled and add nothing to a log-sum-exp:
    tokens, log-probs and bad flags equal the unpadded step's; a bad row's token stays < V."""
    from lpe_jax.decoding import paths, rollouts

    rng = np.random.default_rng(0)
    l_o, l_v = (rng.normal(0, 3, (6, 95)).astype(np.float32) for _ in range(2))
    l_o[1, :90] = -np.inf  # few candidates
    l_v[2, 7] = np.nan  # a bad row
    alpha = np.array([0.0, 0.3, 0.5, 1.0, 1.5, 0.7], np.float32)
    keys = rollouts.row_keys(np.uint32(5), 2, np.arange(6, dtype=np.uint32))
    base = rollouts.sample_step(paths.linear.fn, 1.0, l_o, l_v, alpha, keys, 3)
    pad = np.full((6, 33), 50.0, np.float32)
    wide = rollouts.sample_step(
        paths.linear.fn, 1.0, np.concatenate([l_o, pad], 1), np.concatenate([l_v, pad], 1),
        alpha, keys, 3, vocab_size=95,
    )  # fmt: skip
    np.testing.assert_array_equal(wide.bad, base.bad)
    assert bool(base.bad[2]) and int(wide.token.max()) < 95
    ok = ~np.asarray(base.bad)
    np.testing.assert_array_equal(np.asarray(wide.token)[ok], np.asarray(base.token)[ok])
    for f in ("logp_o", "logp_v", "logp_path"):
        np.testing.assert_allclose(
            np.asarray(getattr(wide, f))[ok], np.asarray(getattr(base, f))[ok], rtol=1e-6
        )
