"""Tiny random Hugging Face Qwen3 (and Qwen3-MoE) checkpoints and a Qwen3-style tokenizer, built
with transformers.

torch is imported inside the functions, so importing this module stays cheap. Weights are
re-drawn at unit scale (Linear ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ 1 + 0.3·N)
so logits are O(1..10) and a parity check compares something; HF's own init (std 0.02, unit
norms) gives near-zero logits that would agree with almost anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Qwen3's special tokens, with the ids the real tokenizer gives them relative to each other.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# A reduced Qwen3 chat template: system/user/assistant turns, and the empty think block that
# Qwen3 adds after the generation prompt when enable_thinking is false.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def make_hf_checkpoint(
    path: str | Path,
    *,
    vocab_size: int = 96,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = 32,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10_000.0,
    rope_key: str = "rope_parameters",
    rms_norm_eps: float = 1e-6,
    attention_bias: bool = False,
    storage_dtype: str = "float32",
    max_shard_size: str | None = None,
    eos_token_id: int | list[int] | None = None,
    seed: int = 0,
    moe: dict[str, Any] | None = None,
) -> Path:
    """Save a random `Qwen3ForCausalLM` to `path` with `save_pretrained`; returns `path`.

    rope_key: 'rope_parameters' (what transformers 5 writes) or 'rope_theta' (transformers 4
    layout; config.json is rewritten to carry only the top-level key). head_dim=None builds
    with transformers' default head_dim (128) and drops the key from config.json, so readers
    must apply the same default. storage_dtype: 'float32' | 'bfloat16' |
    'float16'. max_shard_size (e.g. '40KB') makes a sharded checkpoint with an index file.
    moe: Qwen3-MoE fields (num_experts, num_experts_per_tok, moe_intermediate_size,
    norm_topk_prob, decoder_sparse_step, mlp_only_layers) make a `Qwen3MoeForCausalLM` instead;
    `save_pretrained` writes its experts one tensor per expert, as Hub checkpoints store them.
    """
    import torch
    import transformers

    if rope_key not in ("rope_parameters", "rope_theta"):
        raise ValueError(f"rope_key must be 'rope_parameters' or 'rope_theta', got {rope_key!r}")
    path = Path(path)
    # head_dim=None: leave transformers' Qwen3Config default (128, not hidden/heads) in force.
    extra: dict[str, Any] = {} if head_dim is None else {"head_dim": head_dim}
    if moe is not None:
        extra.update(moe)
    config_class = transformers.Qwen3Config if moe is None else transformers.Qwen3MoeConfig
    config = config_class(
        **extra,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
        rms_norm_eps=rms_norm_eps,
        attention_bias=attention_bias,
        max_position_embeddings=512,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p))
            else:  # Linear [out, in], or experts fused [E, out, in]
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model = model.to(getattr(torch, storage_dtype))
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    if rope_key == "rope_theta":
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = rope_theta
    if head_dim is None:
        cfg.pop("head_dim", None)
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return path


def hf_reference(path: str | Path):
    """transformers' model of `path` (Qwen3ForCausalLM, Qwen3MoeForCausalLM), float32, eager
    attention, eval mode (CPU)."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_logits(path_or_model: Any, token_ids: Any) -> Any:
    """float32 NumPy logits [B, T, V] of the HF reference on int token_ids [B, T]."""
    import numpy as np
    import torch

    model = path_or_model
    if isinstance(path_or_model, (str, Path)):
        model = hf_reference(path_or_model)
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(token_ids), dtype=torch.long)).logits
    return out.float().numpy()


def make_tokenizer(
    path: str | Path, *, words: int = 80, generation_eos: list[int] | None = None
) -> Path:
    """Save a word-level fast tokenizer with Qwen3's special tokens and a Qwen3-style template.

    Vocabulary: the special tokens (ids 0..4), '\\n', the roles, then `words` tokens 'w0', 'w1',
    ... Writes tokenizer files to `path`; with `generation_eos`, also a generation_config.json
    listing those ids as eos_token_id. Returns `path`.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for tok in ["\n", "system", "user", "assistant", "[UNK]"] + [f"w{i}" for i in range(words)]:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Split(" ", behavior="removed"),
        ]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=SPECIAL_TOKENS[1:2] + SPECIAL_TOKENS[3:],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    if generation_eos is not None:
        gen = {"eos_token_id": generation_eos, "pad_token_id": 0}
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path


# A tiny Qwen3-MoE: layer 0 dense (mlp_only_layers), layer 1 sparse with 6 experts, top-2,
# renormalised (as Qwen3-30B-A3B). kwargs of `make_hf_checkpoint`, shared by the MoE tests so the
# session builds the checkpoint once.
QWEN3_MOE = dict(
    moe=dict(
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[0],
    )
)
