"""Abliteration on the hybrid Qwen3.5 families (dense and MoE): the orthogonalized checkpoint is
exact, the direction path equals the in-memory orthogonalization through the engine's protocol,
and the direction is found through the model's hook.

Two tiny 2-layer sources (one Gated DeltaNet layer, one gated attention layer), float32 and
'highest' precision: a tied dense model in the text layout (`save_pretrained`), and an untied MoE
in the Hub's multimodal layout (`model.language_model.`, with vision and MTP tensors) whose
experts are stored fused (transformers' in-memory layout; one tensor per expert, what
save_pretrained writes, is edited in tests/test_qwen35_checkpoint.py's script run).
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hybrid_fixtures import (
    QWEN35_TEXT,
    direction_path_decode,
    make_qwen35_tokenizer,
    qwen35_text_config,
    randomize,
    state_dict_numpy,
)

from lpe_jax.abliteration import abliterate as ab
from lpe_jax.abliteration.direction_path import DirectionalQwen35, directional
from lpe_jax.abliteration.orthogonalize import (
    orthogonalize_model,
    write_abliterated,
)
from lpe_jax.model.checkpoint import load_model
from lpe_jax.model.forward import model_logits
from lpe_jax.model.qwen35 import Qwen35

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")
LAYERS = dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"])
EXTRA = {"model.visual.patch_embed.proj.weight": (4, 3), "mtp.fc.weight": (4, 4)}


def _moe_config():
    import transformers

    text = {k: v for k, v in QWEN35_TEXT.items() if k != "intermediate_size"}
    return transformers.Qwen3_5MoeTextConfig(
        **{**text, **LAYERS},
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
    )


def _write_multimodal(hf, path):
    """hf's weights in the Hub's multimodal layout, with vision and MTP tensors beside them."""
    import safetensors.numpy

    weights = {
        k.replace("model.", "model.language_model.", 1): v for k, v in state_dict_numpy(hf).items()
    }
    rng = np.random.default_rng(0)
    weights |= {k: rng.normal(size=s).astype(np.float32) for k, s in EXTRA.items()}
    path.mkdir()
    safetensors.numpy.save_file(weights, str(path / "model.safetensors"))
    config = {"model_type": "qwen3_5_moe", "text_config": hf.config.to_dict()}
    (path / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """{'dense': tied text-layout dir, 'moe': multimodal-layout dir}, each with a tokenizer."""
    import transformers

    root = tmp_path_factory.mktemp("hybrid_abl")
    dense = randomize(
        transformers.Qwen3_5ForCausalLM(qwen35_text_config(**LAYERS, tie_word_embeddings=True)),
        seed=2,
    )
    dense.save_pretrained(root / "dense")
    _write_multimodal(randomize(transformers.Qwen3_5MoeForCausalLM(_moe_config()), 3), root / "moe")
    for name in ("dense", "moe"):
        make_qwen35_tokenizer(root / name)
    return {"dense": root / "dense", "moe": root / "moe"}


@functools.partial(jax.jit, static_argnums=0)
def _run(graphdef, state, tokens, ablate):
    model = nnx.merge(graphdef, state)
    x, resid = ab.residual_forward(model, tokens, ablate=ablate)
    return model.logits(x), [*resid, x]


def run(model, tokens, ablate=None):
    """(logits [B, T, V], every layer's input and the final hidden state) as NumPy."""
    ablate = np.zeros(model.cfg.hidden_size, np.float32) if ablate is None else ablate
    logits, hs = _run(*nnx.split(model), tokens, np.asarray(ablate, np.float32))
    return np.asarray(logits), [np.asarray(h, np.float64) for h in hs]


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


TOKENS = np.random.default_rng(1).integers(0, QWEN35_TEXT["vocab_size"], (3, 9)).astype(np.int32)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_written_abliteration_is_runtime_ablation(kind, sources, tmp_path):
    """After write_abliterated no layer's input nor the final hidden state has a component along
    r, and the logits equal the original's with r projected out at run time after the embedding
    and every write (mixer of either kind, MLP or experts). Every residual writer is edited,
    nothing that reads the stream is, and vision / MTP tensors are copied byte for byte."""
    src = sources[kind]
    direction = np.random.default_rng(7).normal(size=QWEN35_TEXT["hidden_size"])
    out = write_abliterated(src, tmp_path / "abl", direction)
    r = direction / np.linalg.norm(direction)
    orig, abl = load_model(src), load_model(out)
    assert isinstance(abl, Qwen35) and not abl.cfg.tie_word_embeddings
    logits, hs = run(abl, TOKENS)
    for layer, h in enumerate(hs):
        along = np.abs(h @ r) / np.linalg.norm(h, axis=-1)
        assert along.max() <= 1e-5, (layer, along.max())
    h = run(orig, TOKENS)[1][-1]
    assert (np.abs(h @ r) / np.linalg.norm(h, axis=-1)).max() > 1e-2  # the check can fail
    assert rel(logits, run(orig, TOKENS, ablate=r)[0]) <= 1e-4
    assert rel(logits, run(orig, TOKENS)[0]) > 1e-2
    # the orthogonalized model in memory is the written one
    assert rel(model_logits(orthogonalize_model(orig, direction), TOKENS), logits) <= 1e-5

    edited = set(json.loads((out / "abliteration.json").read_text())["edited"])
    pre = "model.language_model." if kind == "moe" else "model."
    writers = {pre + "embed_tokens.weight", pre + "layers.0.linear_attn.out_proj.weight"}
    writers.add(pre + "layers.1.self_attn.o_proj.weight")
    for i in range(2):
        if kind == "dense":
            writers.add(f"{pre}layers.{i}.mlp.down_proj.weight")
        else:
            writers.add(f"{pre}layers.{i}.mlp.experts.down_proj")  # fused [E, H, F]
            writers.add(f"{pre}layers.{i}.mlp.shared_expert.down_proj.weight")
    assert edited == writers
    if kind == "moe":
        import safetensors.numpy

        a = safetensors.numpy.load_file(src / "model.safetensors")
        b = safetensors.numpy.load_file(out / "model.safetensors")
        for name in EXTRA:
            np.testing.assert_array_equal(a[name], b[name])
    else:  # untied with the original embedding as head, in a config transformers reads alike
        import torch
        import transformers

        hf = transformers.Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = hf(torch.from_numpy(TOKENS.astype(np.int64))).logits.double().numpy()
        assert rel(logits, ref) <= 1e-4
        head = np.asarray(abl.lm_head[...]).T
        np.testing.assert_array_equal(head, np.asarray(orig.embed_tokens[...]))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_direction_path_through_the_engine_protocol_is_the_orthogonalized_model(kind, sources):
    """DirectionalQwen35 at alpha: its full pass, and prefill_states then decode_slots (two
    slots at different alphas, so the per-row strength is exercised), equal the weights
    orthogonalized at strength 1 - alpha, token by token; alpha 1 is the original."""
    model = load_model(sources[kind])
    direction = np.asarray(model.embed_tokens[...]).mean(0) + 0.1
    dm = directional(model, direction)
    assert isinstance(dm, DirectionalQwen35)
    alphas = (0.0, 0.6)
    refs = [model_logits(orthogonalize_model(model, direction, 1 - a), TOKENS) for a in alphas]
    full = jax.jit(lambda t, a: dm(t, a))
    for a, ref in zip(alphas, refs, strict=True):
        assert rel(full(TOKENS, a), ref) <= 1e-5, a
    assert rel(full(TOKENS, 1.0), model_logits(model, TOKENS)) <= 1e-5
    assert rel(refs[0], model_logits(model, TOKENS)) > 1e-2

    n, new = 4, TOKENS.shape[1] - 4
    got = direction_path_decode(dm, model.cfg, jnp.float32, TOKENS, alphas, n)  # [2, new, V]
    for row in range(2):
        assert rel(got[row], refs[row][row, n - 1 : n - 1 + new]) <= 1e-4, row


def test_direction_is_found_through_the_hook(sources):
    """mean_activations (the host-stepped layers) equals each layer's input read by the model's
    own loop; candidates of layer 1 are nonzero, the embedding's (layer 0, same template
    tokens) zero; last_token_logits with ablation equals the hooked loop's."""
    from lpe_jax.model.tokenizer import load_tokenizer

    model = load_model(sources["moe"])
    tok = load_tokenizer(sources["moe"])
    harmful, suffix = ab.encode_instructions(tok, ["a b c", "d e", "f g h i"])
    harmless, _ = ab.encode_instructions(tok, ["u v", "w x y", "z q"])
    p = len(suffix)
    means = [ab.mean_activations(model, ids, p, batch_size=2) for ids in (harmful, harmless)]
    for ids, mean in zip((harmful, harmless), means, strict=True):
        ref = np.zeros_like(mean)
        for x in ids:
            hs = run(model, x[None])[1][:-1]  # each layer's input, [1, T, H]
            ref += np.stack([h[0, -p:] for h in hs], axis=1) / len(ids)
        np.testing.assert_allclose(mean, ref, rtol=1e-4, atol=1e-4)  # other padding: rounding
    _, unit, valid = ab.candidate_directions(*means)
    # layer 0 reads the embedding of the same template tokens; layer 1 the prompt's history
    # through the delta state (positions past the decay of this random model's state read none)
    assert not valid[:, 0].any() and valid[:, 1].sum() >= p // 2
    r = unit[np.flatnonzero(valid[:, 1])[-1], 1]
    ablated = ab.last_token_logits(model, harmful, ablate=r, batch_size=2)
    direct = [run(model, x[None], ablate=r)[0][0, -1] for x in harmful]
    np.testing.assert_allclose(ablated, np.stack(direct), rtol=1e-5, atol=1e-4)
    assert np.abs(ablated - ab.last_token_logits(model, harmful, batch_size=2)).max() > 1e-2
