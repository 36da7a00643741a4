"""Loading Qwen3.5 checkpoints (lpe_jax.model.qwen35_checkpoint, and load_model's dispatch on
model_type): sharded bf16 from `save_pretrained`, the Hub's multimodal layout with vision and
MTP tensors skipped, and the errors. Params are compared with the torch state dict converted
through the key map; logits parity of that key map is tests/test_qwen35.py's."""

import copy
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hybrid_fixtures import QWEN35_TEXT, qwen35_text_config, randomize, state_dict_numpy
from script_main import run_script

from lpe_jax.model.checkpoint import load_model
from lpe_jax.model.hf_keymap import assign_hf
from lpe_jax.model.qwen35 import Qwen35, Qwen35Config, hf_weight_table
from lpe_jax.model.qwen35_checkpoint import load_qwen35

LAYERS = dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])


def _expected(hf, dtype) -> dict:
    weights = state_dict_numpy(hf)
    cfg = Qwen35Config.from_hf(hf.config.to_dict())
    model = Qwen35(cfg, dtype=dtype, rngs=nnx.Rngs(0))
    assign_hf(model, hf_weight_table(cfg, weights.keys()), weights)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _assert_params(model, expected) -> None:
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_got, flat_exp = jax.tree.leaves_with_path(got), jax.tree.leaves_with_path(expected)
    assert [p for p, _ in flat_got] == [p for p, _ in flat_exp]
    for (path, a), (_, b) in zip(flat_got, flat_exp, strict=True):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


@pytest.fixture(scope="module")
def hf_dense():
    import transformers

    return randomize(transformers.Qwen3_5ForCausalLM(qwen35_text_config(**LAYERS)), seed=4)


def test_sharded_bf16_checkpoint_loads_through_load_model_and_the_cache(
    hf_dense, tmp_path, monkeypatch
):
    """bf16 shards load exactly; with cache_dir the first load writes an orbax entry and the
    second restores it (the safetensors reader is not called) with the same params."""
    import torch

    from lpe_jax.model import qwen35_checkpoint

    ckpt = tmp_path / "ckpt"
    copy.deepcopy(hf_dense).to(torch.bfloat16).save_pretrained(ckpt, max_shard_size="20KB")
    assert (ckpt / "model.safetensors.index.json").exists()
    model = load_model(ckpt, dtype="bfloat16")
    assert isinstance(model, Qwen35) and model.dtype == jnp.bfloat16
    # bf16 on disk -> bf16 params: exactly the torch bf16 weights.
    expected = _expected(hf_dense, jnp.bfloat16)
    _assert_params(model, expected)
    cache = tmp_path / "cache"
    _assert_params(load_model(ckpt, dtype="bfloat16", cache_dir=cache), expected)
    assert len([p for p in cache.iterdir() if p.name != "digests"]) == 1

    def no_read(*args, **kwargs):
        raise AssertionError("the second load read safetensors instead of the cache")

    monkeypatch.setattr(qwen35_checkpoint, "load_qwen35", no_read)
    cached = load_model(ckpt, dtype="bfloat16", cache_dir=cache)
    assert isinstance(cached, Qwen35)
    _assert_params(cached, expected)
    with pytest.raises(ValueError, match="tied_head applies to Qwen3 only"):
        load_model(ckpt, tied_head="embedding")


def test_multimodal_moe_layout_skips_vision_and_mtp(tmp_path, caplog):
    import safetensors.numpy
    import transformers

    text = {k: v for k, v in QWEN35_TEXT.items() if k != "intermediate_size"}
    cfg = transformers.Qwen3_5MoeTextConfig(
        **{**text, **LAYERS},
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
    )
    hf = randomize(transformers.Qwen3_5MoeForCausalLM(cfg), seed=5)
    weights = {
        k.replace("model.", "model.language_model.", 1): v for k, v in state_dict_numpy(hf).items()
    }
    weights["model.visual.patch_embed.proj.weight"] = np.zeros((4, 3), np.float32)
    weights["mtp.fc.weight"] = np.zeros((4, 4), np.float32)
    safetensors.numpy.save_file(weights, str(tmp_path / "model.safetensors"))
    config = {"model_type": "qwen3_5_moe", "text_config": cfg.to_dict()}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.INFO, logger="lpe_jax.model.qwen35_checkpoint"):
        model = load_qwen35(tmp_path, dtype="float32")
    assert "skipping 2 vision / multi-token-prediction tensors" in caplog.text
    _assert_params(model, _expected(hf, jnp.float32))

    weights["model.language_model.layers.0.extra.weight"] = np.zeros((2,), np.float32)
    safetensors.numpy.save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="does not use.*extra"):
        load_qwen35(tmp_path)


def test_loader_errors(hf_dense, tmp_path):
    hf_dense.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="dtype"):
        load_qwen35(tmp_path, dtype="float16")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 50}))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight: shape"):
        load_qwen35(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(ValueError, match="not Qwen3.5"):
        load_qwen35(tmp_path)


def test_estimate_runs_on_a_tiny_qwen35_pair(tmp_path):
    """experiments/estimate.py end to end on two tiny dense Qwen3.5 checkpoints (HF
    save_pretrained + a Qwen3-style tokenizer): load_model's dispatch, the engine's hybrid state
    and the pipeline, through the script's own flags."""
    import transformers
    from hybrid_fixtures import make_qwen35_tokenizer

    dirs = []
    for seed in (0, 1):
        cfg = qwen35_text_config(**LAYERS, vocab_size=96)
        path = tmp_path / f"m{seed}"
        randomize(transformers.Qwen3_5ForCausalLM(cfg), seed=seed).save_pretrained(path)
        make_qwen35_tokenizer(path)  # a word-level one would lose its words (see there)
        dirs.append(path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "a b c"}) + "\n")
    out = tmp_path / "estimate"
    args = [
        f"--original={dirs[0]}", f"--variant={dirs[1]}", f"--prompts={prompts}",
        "--judge=string", "--n_fit=3", "--n_search=3", "--max_new_tokens=3", "--max_rows=8",
        "--nofigures", f"--out={out}",
    ]  # fmt: skip
    run_script("estimate.py", *args)
    results = json.loads((out / "results.json").read_text())
    assert [r["id"] for r in results["prompts"]] == ["p0"]


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_abliterate_then_sample_on_a_tiny_qwen35(family, tmp_path):
    """abliterate.py makes the variant of a tiny Qwen3.5 (dense, or MoE saved one tensor per
    expert by save_pretrained), searching the direction through the hook; sample.py then draws
    on the (original, abliterated) pair unchanged, and on the MoE pair estimate.py runs too. (CI
    candidate: ~1 min per family on 2 cores, mostly compiling.)"""
    import transformers
    from hybrid_fixtures import make_qwen35_tokenizer

    from lpe_jax.runs.store import RolloutStore

    src, variant = tmp_path / "original", tmp_path / "abliterated"
    if family == "dense":
        hf = transformers.Qwen3_5ForCausalLM(qwen35_text_config(**LAYERS))
    else:
        text = {k: v for k, v in QWEN35_TEXT.items() if k != "intermediate_size"}
        cfg = transformers.Qwen3_5MoeTextConfig(
            **{**text, **LAYERS}, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=4, num_experts_per_tok=2,
        )  # fmt: skip
        hf = transformers.Qwen3_5MoeForCausalLM(cfg)
    randomize(hf, seed=6).save_pretrained(src)
    make_qwen35_tokenizer(src)
    rng = np.random.default_rng(0)

    def text(letters: str) -> str:
        return " ".join(rng.choice(list(letters), rng.integers(2, 5)))

    harmful, harmless = tmp_path / "harmful.jsonl", tmp_path / "harmless.json"
    harmful.write_text(
        "".join(
            json.dumps({"id": f"h{i}", "prompt": text("abcdefghijklm")}) + "\n" for i in range(6)
        )
    )
    harmless.write_text(json.dumps([{"instruction": text("nopqrstuvwxyz")} for _ in range(6)]))
    run_script(
        "abliterate.py", f"--original={src}", f"--out={variant}", f"--harmful={harmful}",
        f"--harmless={harmless}", "--harmful_split=2,2,2", "--harmless_split=2,2,2",
        "--refusal_tokens=a,b", "--nofilter_train", "--prune_layer_fraction=0",
        "--noinduce_filter", "--kl_threshold=0", "--max_new_tokens=3",
        # the judged before/after rollouts once (they run on the sampler, family-blind)
        f"--n_rollouts={2 if family == 'dense' else 0}",
    )  # fmt: skip
    record = json.loads((variant / "abliteration.json").read_text())
    assert record["layer"] == 1 and "model.layers.0.linear_attn.out_proj.weight" in record["edited"]
    abliterated = load_model(variant)
    assert isinstance(abliterated, Qwen35)
    if family == "moe":  # one tensor per expert, each edited; transformers reads them as we do
        import torch

        from lpe_jax.model.forward import model_logits

        assert "model.layers.1.mlp.experts.3.down_proj.weight" in record["edited"]
        tokens = np.random.default_rng(2).integers(0, QWEN35_TEXT["vocab_size"], (2, 7))
        with torch.no_grad():
            ref = transformers.Qwen3_5MoeForCausalLM.from_pretrained(variant).eval()(
                torch.from_numpy(tokens)
            )
        ref = ref.logits.double().numpy()
        with jax.default_matmul_precision("highest"):
            ours = model_logits(abliterated, tokens)
        assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "p0", "prompt": "a b c"}) + "\n")
    run_script(
        "sample.py", f"--original={src}", f"--variant={variant}", f"--prompts={prompts}",
        "--alphas=0,1", "--rollouts=3", "--max_new_tokens=3", "--max_rows=8",
        f"--out={tmp_path / 'sample'}",
    )  # fmt: skip
    assert len(list(RolloutStore.load(tmp_path / "sample").chunks())) == 2
    if family == "moe":  # and the main job on the same MoE pair (the dense pair: test above)
        out = tmp_path / "estimate"
        run_script(
            "estimate.py", f"--original={src}", f"--variant={variant}", f"--prompts={prompts}",
            "--judge=string", "--n_fit=3", "--n_search=3", "--max_new_tokens=3", "--max_rows=8",
            "--mixture_lambda=0", "--nofigures", f"--out={out}",
        )  # fmt: skip
        results = json.loads((out / "results.json").read_text())
        assert [r["id"] for r in results["prompts"]] == ["p0"]
