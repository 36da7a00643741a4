"""The low-rank variant: an abliteration is held as the original's arrays plus rank-1 factors and
runs exactly as the full variant; a random variant is refused (loaded whole)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import make_tokenizer
from script_main import run_script

from lpe_jax.abliteration.orthogonalize import orthogonalize_model, write_abliterated
from lpe_jax.decoding import paths
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.model import qwen3
from lpe_jax.model.checkpoint import load_model
from lpe_jax.model.forward import model_logits
from lpe_jax.model.low_rank import (
    LowRankQwen3,
    as_low_rank,
    load_low_rank_variant,
    pair_whole_tensors,
    paired_model,
    unique_param_bytes,
)
from lpe_jax.organisms import toy
from lpe_jax.runs.store import MANIFEST

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")

ROOT = Path(__file__).resolve().parents[1]
CFG = qwen3.Qwen3Config(96, 32, 2, 4, 2, 16, 64)
RESIDUAL_WRITERS = ("embed_tokens", "o_proj", "down_proj")


def _abliterated_checkpoint(hf_checkpoint, tmp_path, storage_dtype):
    """(source dir, abliterated dir written by the project's orthogonalize): a tied source with
    an o_proj bias, so the head unties and a 1-D tensor differs."""
    src = tmp_path / "source"
    ckpt = hf_checkpoint(
        tie_word_embeddings=True, attention_bias=True, num_kv_heads=1, storage_dtype=storage_dtype
    )
    shutil.copytree(ckpt, src)
    for f in make_tokenizer(tmp_path / "tok", words=60).iterdir():
        shutil.copy2(f, src / f.name)
    h = json.loads((src / "config.json").read_text())["hidden_size"]
    direction = np.random.default_rng(7).normal(size=h)
    return src, write_abliterated(src, tmp_path / "abl", direction)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_abliteration_is_detected_rank_one_and_exact(hf_checkpoint, tmp_path, dtype):
    src, abl = _abliterated_checkpoint(hf_checkpoint, tmp_path, dtype)
    original, variant = load_model(src, dtype=dtype), load_model(abl, dtype=dtype)
    assert original.cfg.tie_word_embeddings and not variant.cfg.tie_word_embeddings
    model, plan = as_low_rank(original, variant)
    assert isinstance(model, LowRankQwen3) and plan.used
    kinds = {t.name: t for t in plan.tensors}
    for t in plan.tensors:
        if t.name.endswith(RESIDUAL_WRITERS):
            assert (t.kind, t.rank) == ("low_rank", 1), t
            assert t.max_ulp <= 2.0 and t.rel_error < (1e-6 if dtype == "float32" else 1e-2), t
        elif t.name.endswith("o_bias"):
            assert (t.kind, t.reason) == ("whole", "1-D, differs"), t
        else:  # the head stays the original's embedding; everything else is untouched
            assert t.kind == "shared", t
    assert kinds["lm_head"].kind == "shared"
    assert "5 whole" not in plan.summary() and "saved" in plan.summary()
    tokens = np.random.default_rng(1).integers(0, variant.cfg.vocab_size, (2, 9)).astype(np.int32)
    want, got = model_logits(variant, tokens), model_logits(model, tokens)
    # float32: rounding only (1e-6 of the largest logit); bfloat16: the variant's own rounding
    tol = (1e-6 if dtype == "float32" else 0.02) * np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    assert np.abs(model_logits(original, tokens) - want).max() > 5 * tol  # the check can fail
    # memory: the original's buffers plus factors and the whole bias, nothing of the variant's
    assert unique_param_bytes(original, variant) == plan.two_model_bytes
    assert unique_param_bytes(original, model) == plan.low_rank_bytes
    c = original.cfg
    # rank-1 factors of embed [V, H], o_proj [heads*hd, H], down_proj [F, H]; the o_bias [H] whole
    per_layer = (c.num_heads * c.head_dim + c.hidden_size) + (c.intermediate_size + c.hidden_size)
    elements = c.vocab_size + c.hidden_size + c.num_layers * (per_layer + c.hidden_size)
    extra = elements * np.dtype(original.dtype).itemsize
    assert plan.low_rank_bytes == unique_param_bytes(original) + extra
    # streamed from the checkpoint tensor by tensor: the same plan, factors and logits
    streamed, plan_s = load_low_rank_variant(original, abl, dtype)
    assert isinstance(streamed, LowRankQwen3)
    assert plan_s == plan, (plan_s.summary(), plan.summary())
    np.testing.assert_array_equal(model_logits(streamed, tokens), got)
    assert unique_param_bytes(original, streamed) == plan.low_rank_bytes


def test_streamed_load_refuses_a_random_variant_whole(hf_checkpoint):
    """A variant with no matrix shared or low rank: the streamed load says so and returns the
    variant loaded whole, equal to load_model's."""
    original = load_model(hf_checkpoint(), dtype="float32")
    other = hf_checkpoint(seed=1)
    model, plan = load_low_rank_variant(original, other, "float32", max_rank=2)
    assert not plan.used and "refused" in plan.summary()
    assert type(model) is qwen3.Qwen3
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
    want = model_logits(load_model(other, dtype="float32"), tokens)
    np.testing.assert_array_equal(model_logits(model, tokens), want)


def test_random_variant_is_refused_whole():
    original, variant = qwen3.init_random(CFG, seed=0), qwen3.init_random(CFG, seed=1)
    model, plan = as_low_rank(original, variant, max_rank=4)
    assert model is variant and not plan.used
    assert plan.low_rank_bytes == plan.two_model_bytes
    for t in plan.tensors:
        if len(t.shape) == 2:
            assert t.kind == "whole" and t.reason.startswith("rank > 4"), t
    assert "refused" in plan.summary()


def test_mismatched_pair_is_refused_with_a_clear_error():
    original = qwen3.init_random(CFG, seed=0)
    other = qwen3.init_random(dataclasses.replace(CFG, intermediate_size=32), seed=1)
    with pytest.raises(ValueError, match="same architecture"):
        as_low_rank(original, other)
    with pytest.raises(ValueError, match="max_rank"):
        as_low_rank(original, original, max_rank=0)


def test_engine_rows_equal_the_two_model_run():
    """Through the engine (PairedSampler), f32: identical tokens and lengths, log-probs within
    1e-5, at alphas covering the variant, a mixture and the original."""
    original = qwen3.init_random(CFG, seed=0)
    variant = orthogonalize_model(original, np.random.default_rng(3).normal(size=CFG.hidden_size))
    low_rank, plan = as_low_rank(original, variant)
    assert isinstance(low_rank, LowRankQwen3)
    assert {t.rank for t in plan.of_kind("low_rank")} == {1}
    assert len(plan.of_kind("low_rank")) == 1 + 2 * CFG.num_layers
    prompt = np.array([5, 17, 2, 40, 9], np.int32)
    out = []
    for v in (variant, low_rank):
        s = PairedSampler(original, v, paths.linear, max_new_tokens=8, eos_token_ids=(3, 11))
        out.append(s.sample(prompt, alphas=np.array([0.0, 0.5, 1.0]), rollouts_per_alpha=4, seed=1))
    full, lr = out
    np.testing.assert_array_equal(lr.tokens, full.tokens)
    np.testing.assert_array_equal(lr.lengths, full.lengths)
    np.testing.assert_allclose(lr.logp_variant, full.logp_variant, rtol=0, atol=1e-5)
    np.testing.assert_allclose(lr.logp_original, full.logp_original, rtol=0, atol=1e-5)
    # the variant's logits differ from the original's, so equal rows mean something
    assert np.abs(full.logp_variant - full.logp_original).max() > 1e-2


def test_sample_script_runs_the_low_rank_variant_and_logs_the_plan(tmp_path):
    """--variant_low_rank=auto on the toy original and its abliteration: the plan's log line names
    every residual writer low rank, and the run's manifest records the setting."""
    src = toy.TOY_DIR / "original"
    h = json.loads((src / "config.json").read_text())["hidden_size"]
    abl = write_abliterated(src, tmp_path / "abl", np.random.default_rng(0).normal(size=h))
    out = tmp_path / "run"
    args = [f"--original={src}", f"--variant={abl}", "--variant_low_rank=auto", f"--out={out}"]
    args += ["--limit=1", "--rollouts=2", "--alphas=0,1", "--max_new_tokens=4"]
    p = run_script("sample.py", *args)  # in this process (tests/script_main.py)
    line = next(x for x in p.stderr.splitlines() if "low-rank variant" in x)
    assert "5 tensors low rank (ranks [1]" in line and "0 whole" in line, line
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["variant_low_rank"] == "auto"


MOE_CFG = dataclasses.replace(
    CFG, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2
)


def _mixed_pair():
    """(original, variant, low-rank variant) of MOE_CFG (layer 0 a dense MLP, layer 1 sparse):
    the original tied with nonzero o_proj biases, the variant its abliteration (rank 1 per
    residual writer, every expert's down_proj included; the biases 1-D whole tensors) with layer
    0's up_proj and layer 1's stacked experts' up_proj perturbed at full rank (whole 2-D and 3-D
    tensors)."""
    original = qwen3.init_random(dataclasses.replace(MOE_CFG, attention_bias=True), seed=0)
    original.embed_tokens[...] = original.embed_tokens[...] * 20.0  # tokens depend on the rows
    rng = np.random.default_rng(5)
    for layer in original.layers:  # nonzero biases, so the abliteration changes them
        layer.self_attn.o_bias[...] = jnp.asarray(rng.normal(scale=0.1, size=CFG.hidden_size))
    variant = orthogonalize_model(original, rng.normal(size=CFG.hidden_size))
    for mod in (variant.layers[0].mlp, variant.layers[1].mlp.experts):
        noise = rng.normal(scale=0.02, size=mod.up_proj.shape)
        mod.up_proj = nnx.Param(mod.up_proj[...] + jnp.asarray(noise, jnp.float32))
    low_rank, plan = as_low_rank(original, variant)
    assert isinstance(low_rank, LowRankQwen3)
    whole = {t.name for t in plan.of_kind("whole")}
    assert whole == {
        "layers.0.mlp.up_proj",
        "layers.1.mlp.experts.up_proj",
        "layers.0.self_attn.o_bias",
        "layers.1.self_attn.o_bias",
    }, whole
    ranks = {t.name: t.rank for t in plan.of_kind("low_rank")}
    assert ranks["layers.0.mlp.down_proj"] == ranks["layers.1.mlp.experts.down_proj"] == 1
    return original, variant, low_rank


def test_paired_decode_equals_the_two_model_run():
    """Through the engine, f32, on a Qwen3-MoE pair: the low-rank variant decoded with the
    original as 2S rows through one weight copy (PairedWeight: shared, rank-1 2-D and stacked
    experts', whole 2-D, 3-D and 1-D tensors) draws the two-model run's tokens; log-probs within
    1e-5. The low-rank variant alone (two passes) gives the variant's logits."""
    original, variant, low_rank = _mixed_pair()
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
    want = model_logits(variant, tokens)
    np.testing.assert_allclose(model_logits(low_rank, tokens), want, rtol=0, atol=1e-5)
    prompts = {"a": np.array([5, 17, 2, 40, 9], np.int32), "b": np.array([60, 61, 62], np.int32)}
    blocks = [
        RowBlock("a", prompts["a"], 0.5, 3, 0, 9),
        RowBlock("b", prompts["b"], 0.0, 3, 0, 3),
        RowBlock("a", prompts["a"], 1.0, 4, 0, 4),
    ]
    out = []
    for v in (variant, low_rank):
        e = RolloutEngine(original, v, "linear", 8, (3, 11), slots=4, max_prompts=2,
                          steps_per_call=4, max_prompt_len=8)  # fmt: skip
        assert e.paired is (v is low_rank)
        for b in blocks:
            e.submit(b)
        out.append({(r.block.prompt_key, r.block.alpha): r.rollouts for r in e.run()})
    full, paired = out
    for key, want_rows in full.items():
        got = paired[key]
        np.testing.assert_array_equal(got.tokens, want_rows.tokens)
        np.testing.assert_array_equal(got.lengths, want_rows.lengths)
        for f in ("logp_original", "logp_variant", "logp_sampled"):
            np.testing.assert_allclose(getattr(got, f), getattr(want_rows, f), rtol=0, atol=1e-5)
    rows = full[("a", 0.5)]
    assert np.abs(rows.logp_variant - rows.logp_original).max() > 1e-2  # the halves differ


def _decode_bytes(original, low_rank, paired: bool) -> float:
    """XLA's bytes accessed by one decode step of both models' S slots (cost analysis)."""
    s, cap = 2, 4
    cfg, dt = original.cfg, original.dtype
    st = lambda: (cfg.empty_prompt_states(dt, s, 8), cfg.empty_own_states(dt, s, cap))  # noqa: E731
    z = jnp.zeros((s,), jnp.int32)
    whole = pair_whole_tensors(original, low_rank)
    gd_o, p_o = nnx.split(original)
    gd_v, p_v = nnx.split(low_rank)

    def step(p_o, p_v, kv_o, kv_v):
        o, v = nnx.merge(gd_o, p_o), nnx.merge(gd_v, p_v)
        args = (z, z + 3, z + 3, z, z >= 0)
        if paired:
            l_o, l_v, *_ = paired_model(o, v, whole).decode_slots_pair(*args, kv_o, kv_v)
        else:
            l_o, l_v = o.decode_slots(*args, *kv_o)[0], v.decode_slots(*args, *kv_v)[0]
        return jnp.argmax(l_o + l_v, axis=-1)

    cost = jax.jit(step).lower(p_o, p_v, st(), st()).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["bytes accessed"])


def test_paired_step_reads_the_weights_once():
    """At a shape where the weights dominate a step's reads, the paired step reads about half
    the bytes of two passes (XLA cost analysis), and a variant that is not low rank on this
    original is not paired (True: a clear error; None: two passes)."""
    cfg = dataclasses.replace(CFG, vocab_size=2048, hidden_size=128, intermediate_size=384)
    original = qwen3.init_random(cfg, seed=0)
    variant = orthogonalize_model(original, np.random.default_rng(3).normal(size=cfg.hidden_size))
    low_rank, _ = as_low_rank(original, variant)
    assert pair_whole_tensors(original, low_rank) == ()
    two, one = _decode_bytes(original, low_rank, False), _decode_bytes(original, low_rank, True)
    weights = unique_param_bytes(original, low_rank)
    assert two > 2 * weights * 0.9  # two passes read every weight twice
    assert one < 0.65 * two, (one, two, weights)
    other = qwen3.init_random(dataclasses.replace(cfg, tie_word_embeddings=True), seed=0)
    assert "another model's array" in pair_whole_tensors(other, low_rank)
    assert "not low rank" in pair_whole_tensors(original, variant)
    with pytest.raises(ValueError, match="pair_batch=True.*not low rank"):
        RolloutEngine(original, variant, "linear", 4, (3,), slots=2, pair_batch=True)


BF16_CFG = qwen3.Qwen3Config(512, 256, 2, 4, 2, 64, 512, tie_word_embeddings=True)


def _bf16_pair():
    """A tied bf16 original at hidden 256, its abliteration, and that held as rank-1 factors."""
    original = qwen3.init_random(BF16_CFG, dtype=jnp.bfloat16, seed=0)
    # Tied: the head reads the embedding, so the layers' writes are scaled up until the next
    # token is not the current one (logit std ~2).
    original.embed_tokens[...] = original.embed_tokens[...] * 4.0
    for layer in original.layers:
        layer.self_attn.o_proj[...] = layer.self_attn.o_proj[...] * 8.0
        layer.mlp.down_proj[...] = layer.mlp.down_proj[...] * 8.0
    direction = np.random.default_rng(3).normal(size=BF16_CFG.hidden_size)
    variant = orthogonalize_model(original, direction)
    low_rank, plan = as_low_rank(original, variant)
    assert isinstance(low_rank, LowRankQwen3) and {t.rank for t in plan.of_kind("low_rank")} == {1}
    assert pair_whole_tensors(original, low_rank) == ()
    return original, variant, low_rank


def test_paired_forward_in_bfloat16_at_hidden_256():
    """bfloat16 at a realistic width (XLA:CPU rejects some bf16 dots by shape; hidden 16 hid
    that): one teacher-forced `forward` of the paired model over 2B rows gives each half its own
    model's logits. The paired way adds the rank-1 correction in bf16 where the variant stores
    W_o + u vt rounded once, so its half differs by bf16 rounding: within 0.03 of the largest
    logit (measured 0.0096; the original's half 2e-7), against 0.2 between the two models."""
    original, variant, low_rank = _bf16_pair()
    tokens = np.random.default_rng(1).integers(0, BF16_CFG.vocab_size, (2, 7)).astype(np.int32)
    want_o, want_v = model_logits(original, tokens), model_logits(variant, tokens)
    pair = paired_model(original, low_rank, ())

    @jax.jit
    def both(t):
        x, _ = pair.forward(t, jnp.broadcast_to(jnp.arange(t.shape[1]), t.shape))
        return pair.logits(x)

    got = np.asarray(both(jnp.asarray(np.concatenate([tokens, tokens]))))
    scale = np.abs(want_v).max()
    err_o, err_v = np.abs(got[:2] - want_o).max(), np.abs(got[2:] - want_v).max()
    assert err_o <= 0.03 * scale and err_v <= 0.03 * scale, (err_o, err_v, scale)
    assert np.abs(want_o - want_v).max() > 0.1 * scale  # the check can fail


def test_paired_decode_in_bfloat16_at_hidden_256():
    """The same bf16 pair through the engine, 2S rows through one weight copy vs two models:
    the paired engine runs (no bf16 dot rejected) and, where bf16 rounding of the correction
    flips no near tie, draws the same rows: at least 6 of 8 rows identical (same seeds), and
    those rows' log-prob sums within 0.05 nats per token."""
    original, variant, low_rank = _bf16_pair()
    prompts = {"a": np.array([5, 17, 2, 40, 9, 33], np.int32), "b": np.array([60, 61], np.int32)}
    blocks = [RowBlock("a", prompts["a"], 0.5, 3, 0, 4), RowBlock("b", prompts["b"], 0.0, 4, 0, 4)]
    out = []
    for v in (variant, low_rank):
        e = RolloutEngine(original, v, "linear", 6, (3, 11), slots=4, max_prompts=2,
                          steps_per_call=3, max_prompt_len=8)  # fmt: skip
        assert e.paired is (v is low_rank)
        for b in blocks:
            e.submit(b)
        out.append({r.block.prompt_key: r.rollouts for r in e.run()})
    full, paired = out
    same = 0
    for key, want in full.items():
        got = paired[key]
        assert np.all(np.isfinite(got.logp_variant)) and got.lengths.min() > 1
        for i in range(want.tokens.shape[1]):
            if not np.array_equal(got.tokens[0, i], want.tokens[0, i]):
                continue
            same += 1
            tol = 0.05 * want.lengths[0, i]
            for f in ("logp_original", "logp_variant", "logp_sampled"):
                assert abs(getattr(got, f)[0, i] - getattr(want, f)[0, i]) <= tol, (f, key, i)
    assert same >= 6, same  # measured 7
    rows = full["a"]
    assert np.abs(rows.logp_variant - rows.logp_original).max() > 0.1  # the halves differ
