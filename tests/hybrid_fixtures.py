"""Tiny random Hugging Face Qwen3.5 / MoE layers for the hybrid-layer parity tests.

torch and transformers are imported inside the functions. Weights are re-drawn at unit scale
(Linear ~ N(0, 1/fan_in), norm weights and dt_bias ~ 1 + 0.3·N, A_log ~ log U(0.1, 4.1)) so
outputs are O(1) and a parity check compares something; HF's own init gives near-zero outputs.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# A small Qwen3.5 text config: GQA in the linear layers (2 key heads, 4 value heads), partial
# rotary 0.25 of head_dim 16 in the full-attention layers.
QWEN35_TEXT = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    rms_norm_eps=1e-6,
)


def qwen35_text_config(**overrides: Any) -> Any:
    import transformers

    return transformers.Qwen3_5TextConfig(**{**QWEN35_TEXT, **overrides})


def randomize(module: Any, seed: int = 0) -> Any:
    """Re-draw every parameter of a torch module at unit scale, in place; returns it in eval."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight") or leaf == "dt_bias":
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif leaf == "A_log":
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 4 + 0.1))
            elif p.ndim >= 2:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen))
    return module.eval()


def random_hf_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 tensors of these shapes drawn as `randomize` draws them, without torch
    (for processes that should not import it, e.g. tests/mesh_worker.py)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("norm.weight") or leaf == "dt_bias":
            w = 1.0 + 0.3 * rng.standard_normal(shape)
        elif leaf == "A_log":
            w = np.log(rng.random(shape) * 4 + 0.1)
        elif len(shape) >= 2:
            w = rng.standard_normal(shape) / shape[-1] ** 0.5
        else:
            w = rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


def state_dict_numpy(module: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """The module's state dict as float32 NumPy arrays, names prefixed."""
    return {prefix + k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def rel_err(ours: Any, ref: Any) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def make_qwen35_tokenizer(path: Any, *, generation_eos: list[int] | None = (2, 0)) -> Any:
    """Save a tiny byte-level BPE tokenizer with Qwen3's special tokens and chat template into
    `path` (made if absent); returns it as a Path.

    transformers' AutoTokenizer loads a directory whose config.json is a Qwen3.5 one as
    `Qwen3_5Tokenizer`, which rebuilds a byte-level BPE from the stored vocabulary and merges: a
    word-level fixture (`hf_fixtures.make_tokenizer`) would lose every word there. This one
    survives it: its words are the single letters a..z (ids 7..32), '\\n' is 'Ċ' (5) and ' ' is
    'Ġ' (6), after the special tokens 0..4, so prompts are letters separated by spaces.
    """
    from pathlib import Path

    from hf_fixtures import CHAT_TEMPLATE, SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for ch in ["Ċ", "Ġ", *(chr(c) for c in range(ord("a"), ord("z") + 1))]:
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    if generation_eos is not None:
        gen = {"eos_token_id": list(generation_eos), "pad_token_id": 0}
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path


def direction_path_decode(
    dm: Any, cfg: Any, dtype: Any, tokens: np.ndarray, alphas: tuple[float, float], n: int = 4
) -> np.ndarray:
    """A direction-path model `dm` (config `cfg`, states in `dtype`) through the engine's layer
    protocol: rows 0 and 1 of `tokens` [>= 2, T] prefilled from their first n tokens (bucket 8)
    at alphas[0] and alphas[1], then decoded teacher-forced one token per step (`decode_slots`
    with both alphas). float32 logits [2, T - n, V]: position j predicts token n + j."""
    bucket, new = 8, tokens.shape[1] - n
    prefill = nnx.jit(lambda m, t, k, a: m.prefill_states(t, k, alpha=a))
    decode = nnx.jit(lambda m, *args, alpha: m.decode_slots(*args, alpha=alpha))
    entries, firsts = [], []
    for row, a in enumerate(alphas):
        padded = np.zeros(bucket, np.int32)
        padded[:n] = tokens[row, :n]
        logits, entry = prefill(dm, jnp.asarray(padded), jnp.int32(n), jnp.float32(a))
        entries.append(entry)
        firsts.append(np.asarray(logits))
    prompt = jax.tree.map(lambda x, y: jnp.concatenate([x, y]), *entries)
    own = cfg.empty_own_states(dtype, 2, new)
    steps = [np.stack(firsts)]
    for i in range(new - 1):
        args = (
            jnp.asarray(tokens[:2, n + i]), jnp.full(2, n + i, jnp.int32),
            jnp.full(2, n, jnp.int32), jnp.full(2, i, jnp.int32), jnp.ones(2, bool), prompt, own,
        )  # fmt: skip
        out, prompt, own = decode(dm, *args, alpha=jnp.asarray(alphas, jnp.float32))
        steps.append(np.asarray(out))
    return np.stack(steps, axis=1)
