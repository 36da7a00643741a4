"""Qwen3-MoE end to end: the loader (per-expert tensors stacked, bf16, shards, the orbax cache,
the architecture dispatch), logit parity with transformers' Qwen3MoeForCausalLM for a full pass,
cached decoding and the engine's rows, and the engine against the lockstep oracle."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import QWEN3_MOE, hf_logits, hf_reference, make_tokenizer
from sampler_oracle import LockstepSampler
from script_main import run_script

from lpe_jax.abliteration.direction_path import DirectionalQwen3
from lpe_jax.abliteration.orthogonalize import orthogonalize_model, unit_direction
from lpe_jax.decoding import paths
from lpe_jax.decoding.engine import RolloutEngine, RowBlock
from lpe_jax.model import qwen3
from lpe_jax.model.checkpoint import ARCHITECTURES, config_from_hf, load_model, save_model
from lpe_jax.model.forward import model_logits
from lpe_jax.model.moe import SparseMoE
from lpe_jax.runs.store import RolloutStore

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")


def _rel(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@nnx.jit
def _decode(model, tokens, step, cache):
    return model.decode(tokens, step, cache)


@pytest.fixture(scope="module")
def moe_dir(hf_checkpoint):
    # sharded, so the loader reads experts spread over several files through the index
    return hf_checkpoint(**QWEN3_MOE, max_shard_size="40KB")


def test_loader_parity_prefill_and_cached_decode(moe_dir, tmp_path):
    assert (moe_dir / "model.safetensors.index.json").is_file()
    model = load_model(moe_dir, dtype="float32")
    assert [type(layer.mlp).__name__ for layer in model.layers] == ["MLP", "SparseMoE"]
    assert model.layers[1].mlp.experts.down_proj.shape == (6, 32, 64)  # [E, F, H], stacked
    rng = np.random.default_rng(0)
    prompt, generated = rng.integers(0, 96, 7), rng.integers(0, 96, (3, 5))
    tokens = np.concatenate([np.tile(prompt, (3, 1)), generated], axis=1)
    ref = hf_logits(moe_dir, tokens)
    assert np.abs(ref).max() > 1.0
    assert _rel(model_logits(model, tokens), ref) <= 1e-4
    assert _rel(model_logits(load_model(moe_dir, dtype="bfloat16"), tokens), ref) <= 3e-2
    # token-by-token decode through the shared-prefix cache, one row per continuation
    last, cache = model.init_cache(jnp.asarray(prompt, jnp.int32), 3, 8)
    assert _rel(last, ref[0, 6]) <= 1e-4
    for step in range(5):
        logits, cache = _decode(model, jnp.asarray(generated[:, step], jnp.int32), step, cache)
        assert _rel(logits, ref[:, 7 + step]) <= 1e-4, step
    # the orbax cache restores the same params; save_model writes what transformers reads
    for _ in range(2):
        cached = load_model(moe_dir, cache_dir=tmp_path / "cache")
        np.testing.assert_array_equal(
            np.asarray(cached.layers[1].mlp.experts.gate_proj[...]),
            np.asarray(model.layers[1].mlp.experts.gate_proj[...]),
        )
    saved = save_model(model, tmp_path / "saved")
    assert _rel(hf_logits(saved, tokens), ref) <= 1e-5


def test_engine_decode_matches_transformers(moe_dir):
    """The engine's per-token log-probs (alpha 1: the original model) equal log-softmax of
    transformers' logits at the sampled tokens."""
    model = load_model(moe_dir)
    engine = RolloutEngine(
        model, model, paths.linear, 6, (95,), slots=4, max_prompts=2, max_prompt_len=16,
        per_token=True,
    )  # fmt: skip
    prompt = np.array([5, 17, 2, 40, 9], np.int32)
    engine.submit(RowBlock("p", prompt, 1.0, 3, 0, 4))
    (result,) = engine.run()
    rows = result.rollouts
    reference = hf_reference(moe_dir)
    for r in range(4):
        n = int(rows.lengths[0, r])
        tokens = np.concatenate([prompt, rows.tokens[0, r, :n]])[None]
        logits = hf_logits(reference, tokens)[0, len(prompt) - 1 : -1]
        logp = jax.nn.log_softmax(logits, axis=-1)[np.arange(n), tokens[0, len(prompt) :]]
        np.testing.assert_allclose(rows.token_logp_original[0, r, :n], logp, atol=1e-4)


def test_engine_rows_equal_the_oracle_on_moe():
    cfg = qwen3.Qwen3Config(
        96, 32, 2, 4, 2, 16, 64, tie_word_embeddings=False,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=2,
    )  # fmt: skip
    assert [cfg.is_sparse(i) for i in range(2)] == [False, True]
    models = []
    for seed in (0, 1):
        m = qwen3.init_random(cfg, seed=seed)
        m.lm_head[...] = m.lm_head[...] * 20.0  # logits that make tokens depend on the model
        models.append(m)
    assert isinstance(models[0].layers[1].mlp, SparseMoE)
    eos, t = (3, 11, 29), 6
    oracle = LockstepSampler(
        original=models[0], variant=models[1], path=paths.linear, max_new_tokens=t,
        eos_token_ids=eos, max_rows=8,
    )  # fmt: skip
    engine = RolloutEngine(
        *models, paths.linear, t, eos, slots=4, max_prompts=2, max_prompt_len=16, per_token=True
    )
    blocks = [
        RowBlock("a", np.array([5, 17, 2, 40, 9], np.int32), 0.3, 3, 0, 6),
        RowBlock("b", np.array([60, 61, 62], np.int32), 0.7, 5, 2, 3),
    ]
    for b in blocks:
        engine.submit(b)
    got = {r.block.prompt_key: r.rollouts for r in engine.run()}
    for b in blocks:
        ref = oracle.sample(b.prompt_ids, [b.alpha], b.count, b.seed, b.rollout_start, True)
        for f in ("tokens", "lengths", "truncated", "nonfinite"):
            np.testing.assert_array_equal(getattr(got[b.prompt_key], f), getattr(ref, f))
        for f in ("logp_original", "logp_variant", "logp_sampled"):
            np.testing.assert_allclose(
                getattr(got[b.prompt_key], f), getattr(ref, f), rtol=1e-5, atol=1e-5
            )


def test_architecture_dispatch_and_refusal(moe_dir, tmp_path):
    assert {"qwen3", "qwen3_moe"} <= set(ARCHITECTURES)
    hf = json.loads((moe_dir / "config.json").read_text())
    cfg = config_from_hf(hf)
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.mlp_only_layers) == (6, 2, (0,))
    # without model_type, `architectures` names the family
    no_type = {k: v for k, v in hf.items() if k != "model_type"}
    assert config_from_hf(no_type) == cfg
    with pytest.raises(ValueError, match="inconsistent"):
        config_from_hf({**hf, "model_type": "qwen3"})
    bad = tmp_path / "llama"
    shutil.copytree(moe_dir, bad)
    (bad / "config.json").write_text(
        json.dumps({**hf, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    with pytest.raises(ValueError, match=r"'llama' is not supported.*'qwen3'.*'qwen3_moe'"):
        load_model(bad)


def test_scripts_run_on_a_qwen3_moe_pair(moe_dir, tmp_path):
    """abliterate.py makes the variant of a tiny Qwen3-MoE; estimate.py and sample.py then run on
    the (original, abliterated) pair unchanged (in this process: tests/script_main.py)."""
    src = tmp_path / "original"
    shutil.copytree(moe_dir, src)
    make_tokenizer(src, words=80, generation_eos=[2, 0])
    rng = np.random.default_rng(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(lo, hi, rng.integers(2, 6)))

    harmful, harmless = tmp_path / "harmful.jsonl", tmp_path / "harmless.json"
    harmful.write_text(
        "".join(json.dumps({"id": f"h{i}", "prompt": text(0, 40)}) + "\n" for i in range(8))
    )
    harmless.write_text(json.dumps([{"instruction": text(40, 80)} for _ in range(8)]))
    variant = tmp_path / "abliterated"
    run_script(
        "abliterate.py", f"--original={src}", f"--out={variant}", f"--harmful={harmful}",
        f"--harmless={harmless}", "--harmful_split=4,2,2", "--harmless_split=4,2,2",
        "--refusal_tokens=w0,w1", "--nofilter_train", "--prune_layer_fraction=0",
        "--noinduce_filter", "--kl_threshold=0", "--n_rollouts=2", "--max_new_tokens=3",
    )  # fmt: skip
    edited = json.loads((variant / "abliteration.json").read_text())["edited"]
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in edited
    assert load_model(variant).cfg.num_experts == 6
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": text(0, 80)}) + "\n" for i in range(2))
    )
    pair = (f"--original={src}", f"--variant={variant}", f"--prompts={prompts}")
    # mixture IS off: the family is the point here (test_experiments_estimate runs mixture IS)
    run_script(
        "estimate.py", *pair, "--judge=string", "--n_fit=3", "--n_search=3",
        "--max_new_tokens=3", "--max_rows=8", "--mixture_lambda=0", "--nofigures",
        f"--out={tmp_path / 'estimate'}",
    )  # fmt: skip
    results = json.loads((tmp_path / "estimate" / "results.json").read_text())
    assert [p["id"] for p in results["prompts"]] == ["p0", "p1"]
    run_script(
        "sample.py", *pair, "--alphas=0,1", "--rollouts=4", "--max_new_tokens=3",
        "--max_rows=8", f"--out={tmp_path / 'sample'}",
    )  # fmt: skip
    assert len(list(RolloutStore.load(tmp_path / "sample").chunks())) == 2 * 2


def test_direction_path_is_the_in_memory_orthogonalization_on_moe(moe_dir):
    """M(alpha) of a MoE model equals its weights orthogonalized at strength 1 - alpha, every
    expert's down_proj included (orthogonalize_model), and differs from the original at 0."""
    model = load_model(moe_dir)
    direction = np.asarray(model.embed_tokens[...]).mean(0) + 0.1
    dm = DirectionalQwen3.wrap(model, direction)
    tokens = np.random.default_rng(1).integers(0, 96, (2, 9)).astype(np.int32)
    forward = jax.jit(lambda t, a: dm(t, a)[0])
    for alpha in (0.0, 0.5):
        edited = orthogonalize_model(model, direction, strength=1.0 - alpha)
        if alpha == 0.0:  # the abliteration: no expert writes along r any more
            w = np.asarray(edited.layers[1].mlp.experts.down_proj[...])
            assert np.abs(w @ unit_direction(direction, 64)).max() <= 1e-5
        assert _rel(forward(tokens, alpha), model_logits(edited, tokens)) <= 1e-5, alpha
    assert _rel(forward(tokens, 0.0), model_logits(model, tokens)) > 1e-2
