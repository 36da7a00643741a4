"""save_model / load_model: round trips, transformers compatibility, the params cache, bad input."""

import dataclasses
import json
import logging
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lpe_jax.model import checkpoint
from lpe_jax.model.checkpoint import config_from_hf, load_model, save_model
from lpe_jax.model.forward import model_logits
from lpe_jax.model.qwen3 import PRESETS, init_random

# float32 parity needs full-precision matmuls (a conftest fixture sets and restores it).
pytestmark = pytest.mark.usefixtures("highest_matmul_precision")

TINY = PRESETS["tiny"]
UNTIED = dataclasses.replace(TINY, tie_word_embeddings=False, attention_bias=True, head_dim=16)


def _params(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(model)]


def _assert_same(a, b) -> None:
    pa, pb = _params(a), _params(b)
    assert len(pa) == len(pb)
    for x, y in zip(pa, pb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# round trips and transformers compatibility


@pytest.mark.parametrize("cfg", [TINY, UNTIED], ids=["tied", "untied_bias"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_load_round_trip_is_exact(tmp_path, cfg, dtype):
    model = init_random(cfg, dtype=np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype))
    save_model(model, tmp_path / "m")
    with open(tmp_path / "m/model.safetensors", "rb") as fh:  # bf16 is beyond load_file's numpy
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    assert ("lm_head.weight" in header) == (not cfg.tie_word_embeddings)
    assert header["model.embed_tokens.weight"]["dtype"] == {"float32": "F32"}.get(dtype, "BF16")
    back = load_model(tmp_path / "m", dtype=dtype)
    assert back.cfg == cfg
    _assert_same(model, back)


def test_save_as_bfloat16_rounds_once(tmp_path):
    model = init_random(TINY)
    save_model(model, tmp_path / "m", dtype="bfloat16")
    assert json.loads((tmp_path / "m/config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_model(tmp_path / "m", dtype="float32")
    want = np.asarray(model.embed_tokens[...]).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(back.embed_tokens[...]), want)


@pytest.mark.parametrize("cfg", [TINY, UNTIED], ids=["tied", "untied_bias"])
def test_saved_model_loads_in_transformers(tmp_path, cfg):
    from hf_fixtures import hf_logits, hf_reference
    from transformers import AutoConfig

    model = init_random(cfg)
    save_model(model, tmp_path / "m")
    hf_cfg = AutoConfig.from_pretrained(tmp_path / "m")
    assert hf_cfg.model_type == "qwen3" and hf_cfg.head_dim == cfg.head_dim
    assert hf_cfg.tie_word_embeddings == cfg.tie_word_embeddings
    ref_model = hf_reference(tmp_path / "m")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 9))
    ref = hf_logits(ref_model, tokens)
    ours = model_logits(model, tokens)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()


def test_float16_storage_is_read_and_transposed(hf_checkpoint):
    path = hf_checkpoint(storage_dtype="float16")
    raw = load_file(path / "model.safetensors")
    assert raw["model.embed_tokens.weight"].dtype == np.float16
    model = load_model(path, dtype="float32")
    np.testing.assert_array_equal(
        np.asarray(model.embed_tokens[...]), raw["model.embed_tokens.weight"].astype(np.float32)
    )
    q = raw["model.layers.1.self_attn.q_proj.weight"].astype(np.float32)  # HF [out, in]
    np.testing.assert_array_equal(np.asarray(model.layers[1].self_attn.q_proj[...]), q.T)
    head = raw["lm_head.weight"].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.lm_head[...]), head.T)


def test_config_from_hf_reads_both_rope_layouts_and_default_head_dim():
    base = dict(
        model_type="qwen3",
        vocab_size=10,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=8,
    )
    old = config_from_hf({**base, "rope_theta": 5e5, "head_dim": 16})
    new = config_from_hf({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.head_dim == 16
    assert new.head_dim == 128  # transformers' Qwen3Config default, not 64 // 4


# ---------------------------------------------------------------------------------------------
# the converted-params cache


def test_cache_second_load_skips_conversion(hf_checkpoint, tmp_path, monkeypatch):
    path = hf_checkpoint(storage_dtype="bfloat16")
    first = load_model(path, dtype="float32", cache_dir=tmp_path)

    def no_convert(*args, **kwargs):
        raise AssertionError("second load converted safetensors instead of using the cache")

    monkeypatch.setattr(checkpoint, "_convert", no_convert)
    second = load_model(path, dtype="float32", cache_dir=tmp_path)
    _assert_same(first, second)
    monkeypatch.undo()
    _assert_same(first, load_model(path, dtype="float32"))


def test_cache_keeps_orbax_info_lines_out_of_the_log(hf_checkpoint, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        load_model(hf_checkpoint(), cache_dir=tmp_path)  # save
        load_model(hf_checkpoint(), cache_dir=tmp_path)  # restore
    orbax = [r for r in caplog.records if "orbax" in r.pathname]
    assert not [r.getMessage() for r in orbax if r.levelno < logging.WARNING]


def test_cache_key_follows_content_not_shapes(hf_checkpoint, tmp_path):
    # An original and its variant share every shape and size; the cache must tell them apart.
    a = load_model(hf_checkpoint(seed=0), cache_dir=tmp_path)
    b = load_model(hf_checkpoint(seed=1), cache_dir=tmp_path)
    assert not np.array_equal(np.asarray(a.embed_tokens[...]), np.asarray(b.embed_tokens[...]))
    _assert_same(b, load_model(hf_checkpoint(seed=1)))
    entries = [p for p in tmp_path.iterdir() if p.name != "digests"]
    assert len(entries) == 2


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def saved(tmp_path):
    """A float32 untied tiny checkpoint written by save_model, free to damage."""
    return save_model(init_random(UNTIED), tmp_path / "m")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_directory_or_config(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(saved)


def test_missing_weights(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights.*model.safetensors"):
        load_model(saved)
    (saved / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safe_serialization"):
        load_model(saved)


def test_unsupported_model_type(saved):
    _edit_config(saved, model_type="llama")
    with pytest.raises(ValueError, match=r"model_type 'llama' is not supported.*qwen3"):
        load_model(saved)


def test_unknown_dtype(saved):
    with pytest.raises(ValueError, match=r"unknown dtype 'fp8'.*bfloat16"):
        load_model(saved, dtype="fp8")
    with pytest.raises(ValueError, match="unknown dtype"):
        save_model(init_random(TINY), saved.parent / "x", dtype="int8")


def test_missing_tensor(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(saved)


def test_shape_mismatch_names_tensor_and_both_shapes(saved):
    _edit_config(saved, intermediate_size=UNTIED.intermediate_size * 2)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(128, 64\).*"
        r"\(256, 64\)",
    ):
        load_model(saved)


def test_unexpected_tensor_is_an_error(saved):
    _edit_config(saved, attention_bias=False)  # weights still carry the biases
    with pytest.raises(ValueError, match=r"does not use.*q_proj\.bias.*attention_bias"):
        load_model(saved)


def test_equal_lm_head_copy_loads_as_tied(tmp_path):
    model = init_random(TINY)
    path = save_model(model, tmp_path / "m")
    _edit_tensors(path, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]))
    _assert_same(model, load_model(path))


@pytest.fixture
def tied_with_other_head(hf_checkpoint, tmp_path):
    """A transformers-written tied checkpoint that also stores a different lm_head.weight."""
    path = shutil.copytree(hf_checkpoint(tie_word_embeddings=True), tmp_path / "m")
    head = np.random.default_rng(0).normal(size=(96, 64)).astype(np.float32)
    head[3, 5] = 40.0  # the largest difference from the embedding is over 30
    _edit_tensors(path, lambda t: t.__setitem__("lm_head.weight", head))
    return path


def test_different_lm_head_under_tied_config_is_refused(tied_with_other_head):
    with pytest.raises(
        ValueError, match=r"lm_head\.weight.*differs.*difference\| 3\d\.\d.*tied_head"
    ):
        load_model(tied_with_other_head)
    with pytest.raises(ValueError, match="tied_head must be one of"):
        load_model(tied_with_other_head, tied_head="head")


def test_both_head_readings_match_transformers_5(tied_with_other_head, tmp_path):
    import transformers
    from hf_fixtures import hf_logits, hf_reference

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4 always ties; the lm_head reading is transformers 5's")
    ids = np.random.default_rng(1).integers(0, 96, size=(2, 7))
    hf = hf_reference(tied_with_other_head)  # transformers 5 unties and reads lm_head.weight
    np.testing.assert_allclose(
        model_logits(load_model(tied_with_other_head, tied_head="lm_head"), ids),
        hf_logits(hf, ids),
        atol=2e-4,
        rtol=1e-4,
    )
    hf.lm_head.weight = hf.model.embed_tokens.weight  # the tied (transformers 4) reading
    as_embedding = load_model(tied_with_other_head, tied_head="embedding")
    np.testing.assert_allclose(
        model_logits(as_embedding, ids), hf_logits(hf, ids), atol=2e-4, rtol=1e-4
    )
    # Each reading has its own params-cache entry.
    cached = load_model(tied_with_other_head, cache_dir=tmp_path / "c", tied_head="lm_head")
    _assert_same(
        cached, load_model(tied_with_other_head, cache_dir=tmp_path / "c", tied_head="lm_head")
    )
    load_model(tied_with_other_head, cache_dir=tmp_path / "c", tied_head="embedding")
    assert len([p for p in (tmp_path / "c").iterdir() if p.name != "digests"]) == 2


def test_index_pointing_at_missing_shard(hf_checkpoint, tmp_path):
    src = hf_checkpoint(max_shard_size="40KB")
    assert (src / "model.safetensors.index.json").exists()
    path = shutil.copytree(src, tmp_path / "m")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"shard.*{shard.name}.*missing"):
        load_model(path)


def test_unsupported_rope_and_tensor_dtype(saved):
    _edit_tensors(saved, lambda t: t.__setitem__("model.norm.weight", np.ones(64, np.int8)))
    with pytest.raises(ValueError, match="model.norm.weight has dtype I8"):
        load_model(saved)
    _edit_config(saved, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6})
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        load_model(saved)
