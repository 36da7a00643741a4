"""bfloat16 at a realistic width (hidden 256) on CPU: every pass runs, and agrees with float32.

XLA:CPU has no BF16 x BF16 -> F32 dot kernel, and whether a dot reaches it depends on its shape:
at hidden 16 everything ran, at 48 or 256 the sampler crashed. `einsum_f32` (lpe_jax.model.f32_dot)
upcasts on CPU and keeps bf16 operands with float32 accumulation elsewhere (checked on the traced
program here, since CI has no GPU). The models are untied with a scaled head (logit std ~2) so the
sampled tokens depend on the logits; 2 layers and a small vocabulary keep the tests fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import make_tokenizer
from scipy import special
from script_main import run_script as run

from lpe_jax.abliteration import abliterate as ab
from lpe_jax.abliteration.direction_path import DirectionalQwen3
from lpe_jax.abliteration.orthogonalize import DIRECTION_FILE
from lpe_jax.decoding import paths
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.decoding.sampler import PairedSampler
from lpe_jax.model import f32_dot, qwen3
from lpe_jax.model.forward import model_logits

ROOT = Path(__file__).resolve().parents[1]
CFG = qwen3.Qwen3Config(64, 256, 2, 4, 2, 64, 512, tie_word_embeddings=False)
EOS = [3, 11]
PROMPT = np.array([5, 17, 2, 40, 9, 33], np.int32)
T = 6


def _model(seed: int) -> qwen3.Qwen3:
    m = qwen3.init_random(CFG, dtype=jnp.bfloat16, seed=seed)
    m.lm_head[...] = m.lm_head[...] * 20.0
    return m


def _in_f32(model: qwen3.Qwen3) -> qwen3.Qwen3:
    """The same (bf16-valued) weights in a float32 model."""
    out = qwen3.init_random(CFG, seed=0)
    nnx.update(out, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(model, nnx.Param)))
    return out


@pytest.fixture(scope="module")
def models():
    return _model(0), _model(1)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _dot_eqns(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("backend", ["gpu", "tpu", "cpu"])
def test_einsum_f32_accumulates_in_f32_and_upcasts_only_on_cpu(monkeypatch, backend):
    a = jnp.ones((2, 256), jnp.bfloat16)
    b = jnp.ones((64, 256), jnp.bfloat16)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    (eqn,) = _dot_eqns(lambda x, y: f32_dot.einsum_f32("bh,vh->bv", x, y), a, b)
    operand = jnp.float32 if backend == "cpu" else jnp.bfloat16
    assert [v.aval.dtype for v in eqn.invars] == [operand, operand]
    assert eqn.outvars[0].aval.dtype == jnp.float32
    # float32 operands: the plain float32 dot on every backend (f32 rows stay as they were)
    (eqn,) = _dot_eqns(
        lambda x, y: f32_dot.einsum_f32("bh,vh->bv", x, y), a.astype("f4"), b.astype("f4")
    )
    assert eqn.params["preferred_element_type"] in (None, jnp.float32)


def test_model_logits_in_bf16_match_float32(models):
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
    got = model_logits(models[0], tokens)
    assert got.dtype == np.float32 and np.isfinite(got).all()
    # the same (bf16-valued) weights in float32: bf16 activations cost ~1% of the logit scale
    want = model_logits(_in_f32(models[0]), tokens)
    assert rel(got, want) < 0.05


def _teacher_forced_logp(model, prompt, tokens, lengths):
    """Σ_t log p(token_t | prefix) of each row from model_logits, float64 [R]."""
    out = []
    for row, n in zip(tokens, lengths, strict=True):
        logits = model_logits(model, np.concatenate([prompt, row[:n]])).astype(np.float64)
        logp = special.log_softmax(logits[prompt.size - 1 : -1], axis=-1)
        out.append(logp[np.arange(n), row[:n]].sum())
    return np.array(out)


def test_sampler_and_engine_run_in_bf16_with_consistent_log_probs(models):
    """The sampler's and the engine's rows in bf16: deterministic, and their log-probs those of
    the bf16 model's own teacher-forced logits (up to bf16 rounding of the decode path)."""
    original, variant = models
    sampler = PairedSampler(
        original=original, variant=variant, path=paths.linear, max_new_tokens=T, eos_token_ids=EOS
    )
    r = sampler.sample(PROMPT, alphas=np.array([0.5]), rollouts_per_alpha=4, seed=3)
    again = sampler.sample(PROMPT, alphas=np.array([0.5]), rollouts_per_alpha=4, seed=3)
    np.testing.assert_array_equal(r.tokens, again.tokens)
    lo = _teacher_forced_logp(original, PROMPT, r.tokens[0], r.lengths[0])
    lv = _teacher_forced_logp(variant, PROMPT, r.tokens[0], r.lengths[0])
    np.testing.assert_allclose(r.logp_original[0], lo, rtol=0.05, atol=0.1)
    np.testing.assert_allclose(r.logp_variant[0], lv, rtol=0.05, atol=0.1)

    engine = RolloutEngine(original, variant, "linear", T, EOS, slots=4, max_prompts=2)
    engine.submit(RowBlock("p", PROMPT, 0.5, seed=3, rollout_start=0, count=4, tag="a"))
    (res,) = list(engine.run())
    rows = res.rollouts
    assert np.isfinite(rows.logp_original).all() and (rows.lengths >= 1).all()
    lo = _teacher_forced_logp(original, PROMPT, rows.tokens[0], rows.lengths[0])
    np.testing.assert_allclose(rows.logp_original[0], lo, rtol=0.05, atol=0.1)


def test_direction_path_in_bf16(models):
    """M(alpha) of a bf16 model: alpha = 1 samples the original's rows, alpha = 0 the abliteration's
    (its logits those of run-time ablation, within bf16 rounding)."""
    model = models[0]
    direction = np.asarray(model.embed_tokens[...], np.float32).mean(0) + 0.01
    dm = DirectionalQwen3.wrap(model, direction)
    tokens = PROMPT[None]
    got = jax.jit(lambda t, a: dm(t, a)[0])(tokens, 0.0)
    unit = jnp.asarray(dm.direction[...])
    want = model.logits(ab.residual_forward(model, tokens, ablate=unit)[0])
    assert np.isfinite(np.asarray(got)).all() and rel(got, want) < 0.05

    def rows(m):
        engine = RolloutEngine(m, None, "linear", T, EOS, slots=4, max_prompts=2)
        for alpha in (1.0, 0.0):
            engine.submit(RowBlock("p", PROMPT, alpha, seed=5, rollout_start=0, count=4, tag=alpha))
        return {r.block.tag: r.rollouts for r in engine.run()}

    directional, plain = rows(dm), rows(model)
    np.testing.assert_array_equal(directional[1.0].tokens, plain[1.0].tokens)
    assert (directional[0.0].lengths >= 1).all()


def test_abliteration_passes_in_bf16(models):
    """mean_activations and last_token_logits (the direction search's passes) in bf16: the
    unablated last-token logits are model_logits' at the last prompt token."""
    model = models[0]
    prompts = [PROMPT, PROMPT[:4], np.array([7, 8, 9], np.int32)]
    acts = ab.mean_activations(model, prompts, n_post=2, batch_size=2)
    assert acts.shape == (2, CFG.num_layers, CFG.hidden_size) and np.isfinite(acts).all()
    logits = ab.last_token_logits(model, prompts, batch_size=2)
    for p, row in zip(prompts, logits, strict=True):
        assert rel(row, model_logits(model, p)[-1]) < 0.02  # bf16 rounding, other fusions
    unit = np.asarray(acts[-1, 1] / np.linalg.norm(acts[-1, 1]), np.float32)
    ablated = ab.last_token_logits(model, prompts, ablate=unit, batch_size=2)
    assert np.isfinite(ablated).all() and rel(ablated, logits) > 0.05


# The scripts as a user runs them (in this process: tests/script_main.py), --dtype=bfloat16, on
# HF checkpoints of hidden size 256.
WIDE = {"hidden_size": 256, "num_layers": 2, "head_dim": 64, "intermediate_size": 512}


@pytest.fixture(scope="module")
def wide_pair(hf_checkpoint, tmp_path_factory):
    """Original and variant (hidden 256) with a Qwen3-style tokenizer, and a prompts file."""
    root = tmp_path_factory.mktemp("bf16_scripts")
    pair = []
    for name, seed in (("original", 0), ("variant", 1)):
        shutil.copytree(hf_checkpoint(**WIDE, seed=seed), root / name)
        make_tokenizer(root / name, words=80, generation_eos=[2, 0])
        pair.append(root / name)
    rng = np.random.default_rng(0)
    prompts = root / "prompts.jsonl"
    lines = [
        {"id": f"p{i}", "prompt": " ".join(f"w{j}" for j in rng.integers(0, 80, 4))}
        for i in range(2)
    ]
    prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root, pair[0], pair[1], prompts


def test_estimate_runs_in_bf16(wide_pair):
    root, original, variant, prompts = wide_pair
    out = root / "estimate"
    # mixture IS off: the dtype is the point here (test_experiments_estimate runs mixture IS)
    run(
        "estimate.py", f"--original={original}", f"--variant={variant}", "--dtype=bfloat16",
        f"--prompts={prompts}", "--judge=string", "--n_fit=3", "--n_search=3",
        "--max_new_tokens=3", "--max_rows=8", "--mixture_lambda=0", "--nofigures",
        f"--out={out}",
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results["manifest"]["dtype"] == "bfloat16"
    assert [p["id"] for p in results["prompts"]] == ["p0", "p1"]


def test_abliterate_runs_in_bf16(wide_pair):
    """The direction search, the orthogonalized checkpoint and the judged before/after rollouts,
    all in bf16 at hidden 256."""
    root, original, _, _ = wide_pair
    rng = np.random.default_rng(1)

    def text(lo: int, hi: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(lo, hi, rng.integers(2, 6)))

    harmful, harmless = root / "harmful.jsonl", root / "harmless.json"
    harmful.write_text(
        "".join(json.dumps({"id": f"h{i}", "prompt": text(0, 40)}) + "\n" for i in range(8))
    )
    harmless.write_text(json.dumps([{"instruction": text(40, 80)} for _ in range(8)]))
    out = root / "abliterated"
    p = run(
        "abliterate.py", f"--original={original}", f"--out={out}", f"--harmful={harmful}",
        f"--harmless={harmless}", "--dtype=bfloat16", "--harmful_split=4,2,2",
        "--harmless_split=4,2,2", "--refusal_tokens=w0,w1", "--nofilter_train",
        "--prune_layer_fraction=0", "--noinduce_filter", "--kl_threshold=0", "--n_rollouts=2",
        "--max_new_tokens=3",
    )  # fmt: skip
    report = json.loads((out / "abliteration_report.json").read_text())
    assert report["before"]["compliance"]["prompts_judged"] == 2
    assert report["after"]["harmless_kl"] > 0
    assert np.linalg.norm(np.load(out / DIRECTION_FILE)) == pytest.approx(1, abs=1e-6)
    assert "refusal score" in p.stdout
