"""The low-rank variant: an abliteration is held as the original's arrays plus rank-1 factors and
runs exactly as the full variant; a random variant is refused (loaded whole)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hf_fixtures import make_tokenizer

from lpe_jax.abliteration.orthogonalize import orthogonalize_model, write_abliterated
from lpe_jax.decoding import paths
from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.model import qwen3
from lpe_jax.model.checkpoint import load_model
from lpe_jax.model.forward import model_logits
from lpe_jax.model.low_rank import LowRankQwen3, as_low_rank, unique_param_bytes
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
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    args = [f"--original={src}", f"--variant={abl}", "--variant_low_rank=auto", f"--out={out}"]
    args += ["--limit=1", "--rollouts=2", "--alphas=0,1", "--max_new_tokens=4"]
    p = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "sample.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    line = next(x for x in p.stderr.splitlines() if "low-rank variant" in x)
    assert "5 tensors low rank (ranks [1]" in line and "0 whole" in line, line
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["variant_low_rank"] == "auto"
