"""Orthogonalized checkpoints are exact: the residual stream never carries the direction, the
logits equal run-time ablation of the original, and transformers reads the result as we do."""

from __future__ import annotations

import functools
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import QWEN3_MOE, hf_logits, make_tokenizer

from lpe_jax.abliteration.abliterate import residual_forward
from lpe_jax.abliteration.orthogonalize import (
    DIRECTION_FILE,
    PROVENANCE_FILE,
    orthogonalize,
    write_abliterated,
)
from lpe_jax.model.checkpoint import load_model, read_headers, weight_files
from lpe_jax.model.forward import model_logits

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")

SOURCES = {
    "untied": dict(tie_word_embeddings=False),
    "tied": dict(tie_word_embeddings=True, attention_bias=True, num_kv_heads=1),  # o_proj bias
    "moe": QWEN3_MOE,  # Qwen3-MoE: each expert's down_proj writes to the stream
}


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"), words=60, generation_eos=[2, 0])


def with_tokenizer(ckpt, tok_dir, tmp_path):
    """A copy of the checkpoint directory with the tokenizer files beside it."""
    import shutil

    dst = tmp_path / "source"
    shutil.copytree(ckpt, dst)
    for f in tok_dir.iterdir():
        shutil.copy2(f, dst / f.name)
    return dst


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, tokens, ablate):
    model = nnx.merge(graphdef, state)
    x, resid = residual_forward(model, tokens, ablate=ablate)
    return model.logits(x), [*resid, x]


def run(model, tokens, ablate=None):
    """(logits [B, T, V], every layer's input and the final hidden state), jitted, as NumPy."""
    ablate = np.zeros(model.cfg.hidden_size, np.float32) if ablate is None else ablate
    logits, hs = _run(*nnx.split(model), tokens, np.asarray(ablate, np.float32))
    return np.asarray(logits), [np.asarray(h, np.float64) for h in hs]


def random_tokens(vocab, shape=(3, 11), seed=1):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def abliterate(hf_checkpoint, tokenizer_files, tmp_path, kind, **kw):
    src = with_tokenizer(hf_checkpoint(**SOURCES[kind]), tokenizer_files, tmp_path)
    h = json.loads((src / "config.json").read_text())["hidden_size"]
    direction = np.random.default_rng(7).normal(size=h)
    out = write_abliterated(src, tmp_path / "abl", direction, provenance={"layer": 1}, **kw)
    return src, out, direction / np.linalg.norm(direction)


def rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_no_layer_ever_sees_the_direction_and_logits_equal_runtime_ablation(
    hf_checkpoint, tokenizer_files, tmp_path
):
    """For every source kind: after orthogonalization, every layer's input and the final hidden
    state have no component along r (<= 1e-5 of their norm), and the logits equal the original's
    with r projected out at run time after the embedding and every write (<= 1e-4)."""
    for kind in SOURCES:
        src, out, r = abliterate(hf_checkpoint, tokenizer_files, tmp_path / kind, kind)
        orig, abl = load_model(src), load_model(out)
        tokens = random_tokens(orig.cfg.vocab_size)
        logits, hs = run(abl, tokens)
        for layer, h in enumerate(hs):
            along = np.abs(h @ r) / np.linalg.norm(h, axis=-1)
            assert along.max() <= 1e-5, (kind, layer, along.max())
        # the original does carry it, so the check above can fail
        h = run(orig, tokens)[1][-1]
        assert (np.abs(h @ r) / np.linalg.norm(h, axis=-1)).max() > 1e-2
        expected = run(orig, tokens, ablate=r)[0]
        assert rel(logits, expected) <= 1e-4, kind
        assert rel(logits, run(orig, tokens)[0]) > 1e-2


def test_residual_forward_without_interventions_is_the_models_pass(hf_checkpoint):
    model = load_model(hf_checkpoint(**SOURCES["untied"]))
    tokens = random_tokens(model.cfg.vocab_size)
    logits, hs = run(model, tokens)
    assert len(hs) == model.cfg.num_layers + 1
    np.testing.assert_allclose(logits, model_logits(model, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["untied", "tied", "moe"])
def test_transformers_reads_the_written_checkpoint_as_we_do(
    kind, hf_checkpoint, tokenizer_files, tmp_path
):
    """transformers' Qwen3ForCausalLM and load_model agree on the abliterated logits (float32,
    <= 1e-4 relative); a tied source comes back untied with the original embedding as head."""
    src, out, _ = abliterate(hf_checkpoint, tokenizer_files, tmp_path, kind)
    tokens = random_tokens(load_model(src).cfg.vocab_size)
    ours = model_logits(load_model(out), tokens)
    assert rel(hf_logits(out, tokens), ours) <= 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert record["untied_embeddings"] is (kind == "tied") and record["layer"] == 1
    assert len(record["source_hash"]) == 32
    names = read_headers(weight_files(out))
    assert "lm_head.weight" in names
    if kind == "moe":  # every expert's down_proj edited, the router left alone
        edited = set(record["edited"])
        assert {f"model.layers.1.mlp.experts.{e}.down_proj.weight" for e in range(6)} <= edited
        assert "model.layers.1.mlp.gate.weight" not in edited
    if kind == "tied":
        head = load_model(out).lm_head[...]
        np.testing.assert_array_equal(
            np.asarray(head).T, np.asarray(load_model(src).embed_tokens[...])
        )
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", DIRECTION_FILE):
        assert (out / f).is_file(), f


def test_bf16_source_is_written_in_bf16_and_sharded(hf_checkpoint, tokenizer_files, tmp_path):
    src = with_tokenizer(
        hf_checkpoint(storage_dtype="bfloat16", tie_word_embeddings=True), tokenizer_files, tmp_path
    )
    h = json.loads((src / "config.json").read_text())["hidden_size"]
    direction = np.random.default_rng(3).normal(size=h)
    out = write_abliterated(src, tmp_path / "abl", direction, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    headers = read_headers(weight_files(out))
    assert len({f for f, _, _ in headers.values()}) > 1
    assert {info["dtype"] for _, _, info in headers.values()} == {"BF16"}
    # each edited tensor is the float32 edit of the source rounded once to bf16
    src_embed = np.asarray(load_model(src).embed_tokens[...]).astype(ml_dtypes.bfloat16)
    unit = (direction / np.linalg.norm(direction)).astype(np.float32)
    expected = orthogonalize("model.embed_tokens.weight", src_embed, unit)
    got = np.asarray(load_model(out, dtype="bfloat16").embed_tokens[...])
    np.testing.assert_array_equal(got, expected)
    tokens = random_tokens(load_model(src).cfg.vocab_size)
    ours = model_logits(load_model(out), tokens)
    assert rel(hf_logits(out, tokens), ours) <= 1e-4


def test_tied_config_with_a_different_stored_head_needs_a_reading(
    hf_checkpoint, tokenizer_files, tmp_path
):
    """Readers disagree on such a checkpoint (load_model refuses it too): refused unless
    tied_head picks the head the abliterated copy keeps."""
    from safetensors.numpy import load_file, save_file

    src = with_tokenizer(hf_checkpoint(tie_word_embeddings=True), tokenizer_files, tmp_path)
    tensors = load_file(src / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    head = embed + np.float32(0.5)
    save_file({**tensors, "lm_head.weight": head}, src / "model.safetensors")
    d = np.ones(embed.shape[1])
    with pytest.raises(ValueError, match="tied_head='embedding' or 'lm_head'"):
        write_abliterated(src, tmp_path / "refused", d)
    for reading, expected in (("lm_head", head), ("embedding", embed)):
        out = write_abliterated(src, tmp_path / reading, d, tied_head=reading)
        got = load_file(out / "model.safetensors")["lm_head.weight"]
        np.testing.assert_array_equal(got, expected)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
