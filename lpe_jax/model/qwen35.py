"""Qwen3.5 text model (dense and MoE), a standalone reference forward in Flax NNX.

HF `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` (text towers; `Qwen3_5TextModel`): embeddings,
then per layer `x += mixer(rms_norm_offset(x))` with the mixer chosen by `layer_types`
('linear_attention': `GatedDeltaNet`, 'full_attention': `GatedAttention`), then
`x += mlp(rms_norm_offset(x))` with a SwiGLU MLP (dense) or a `SparseMoE` (MoE, every layer), the
final zero-centred norm and the LM head. Logits in float32.

Not wired into the engine (the lead wires these layers into the shared model loop): `__call__`
gives logits for a token batch (the parity reference); `prefill` and `decode_step` thread one
state per layer (`GatedDeltaNetState` for linear layers, `AttentionKV` for full-attention
layers) to show the layer kinds compose and to test token-by-token decoding.

The multi-token-prediction head that Qwen3.5 checkpoints carry (`mtp.*`) only drafts tokens for
speculative decoding; sampling never needs it, and it is not loaded. Neither is the vision tower
(`model.visual.*`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from lpe_jax.model import gated_attention, gated_deltanet, moe
from lpe_jax.model.f32_dot import einsum_f32
from lpe_jax.model.gated_attention import GatedAttention, GatedAttentionConfig
from lpe_jax.model.gated_deltanet import GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaNetState
from lpe_jax.model.hf_keymap import HFParam, nested, same, text_prefix, transposed
from lpe_jax.model.moe import MoEConfig, SparseMoE, SwiGLU
from lpe_jax.model.qwen3 import attend
from lpe_jax.model.qwen35_norms import rms_norm_offset

Array = jax.Array
LAYER_TYPES = ("linear_attention", "full_attention")
MODEL_TYPES = ("qwen3_5_text", "qwen3_5", "qwen3_5_moe_text", "qwen3_5_moe")


@dataclasses.dataclass(frozen=True)
class Qwen35Config:
    """Static shape of a Qwen3.5 text model. moe None: dense MLPs of `intermediate_size`."""

    vocab_size: int
    hidden_size: int
    layer_types: tuple[str, ...]
    linear: GatedDeltaNetConfig
    attention: GatedAttentionConfig
    intermediate_size: int = 0
    moe: MoEConfig | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types has {unknown}; supported: {list(LAYER_TYPES)}.")
        if self.moe is None and self.intermediate_size <= 0:
            raise ValueError("a dense Qwen3.5 needs intermediate_size > 0.")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> Qwen35Config:
        """From config.json: a text config, or a multimodal one (its `text_config` is read)."""
        if hf.get("model_type") in ("qwen3_5", "qwen3_5_moe") and "text_config" in hf:
            hf = {"model_type": hf["model_type"] + "_text", **hf["text_config"]}
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not Qwen3.5; supported: {MODEL_TYPES}.")
        n = int(hf["num_hidden_layers"])
        types = hf.get("layer_types") or [
            "full_attention"
            if (i + 1) % int(hf.get("full_attention_interval", 4)) == 0
            else "linear_attention"
            for i in range(n)
        ]
        if len(types) != n:
            raise ValueError(f"layer_types has {len(types)} entries for num_hidden_layers={n}.")
        is_moe = model_type.startswith("qwen3_5_moe")
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            layer_types=tuple(types),
            linear=GatedDeltaNetConfig.from_hf(hf),
            attention=GatedAttentionConfig.from_hf(hf),
            intermediate_size=0 if is_moe else int(hf["intermediate_size"]),
            moe=MoEConfig.from_hf(hf) if is_moe else None,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


@struct.dataclass
class AttentionKV:
    """One full-attention layer's keys/values per row: k, v [B, kv, N, hd] (slot n holds the
    token at position n); lengths int [B], how many slots each row has filled."""

    k: Array
    v: Array
    lengths: Array


LayerState = GatedDeltaNetState | AttentionKV


class DecoderLayer(nnx.Module):
    """HF Qwen3_5DecoderLayer: a linear- or full-attention mixer, then the MLP, both pre-norm."""

    def __init__(self, cfg: Qwen35Config, kind: str, dtype: Any, rngs: nnx.Rngs):
        self.cfg, self.kind = cfg, kind
        h = cfg.hidden_size
        self.input_layernorm = nnx.Param(jnp.zeros((h,), dtype))  # zero-centred
        self.post_attention_layernorm = nnx.Param(jnp.zeros((h,), dtype))
        if kind == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg.linear, dtype, rngs)
        else:
            self.self_attn = GatedAttention(cfg.attention, dtype, rngs)
        if cfg.moe is None:
            self.mlp = SwiGLU(h, cfg.intermediate_size, dtype, rngs)
        else:
            self.mlp = SparseMoE(cfg.moe, dtype, rngs)

    def __call__(self, x: Array, positions: Array) -> Array:
        """Full causal pass: x [B, T, H] -> [B, T, H]."""
        eps = self.cfg.rms_norm_eps
        h = rms_norm_offset(x, self.input_layernorm[...], eps)
        if self.kind == "linear_attention":
            mixed, _ = self.linear_attn.prefill(h)
        else:
            mixed, _, _ = self.self_attn(h, positions)
        return self._mlp_residual(x + mixed)

    def _mlp_residual(self, x: Array) -> Array:
        eps = self.cfg.rms_norm_eps
        return x + self.mlp(rms_norm_offset(x, self.post_attention_layernorm[...], eps))

    def prefill(self, x: Array, lengths: Array, capacity: int) -> tuple[Array, LayerState]:
        """Right-padded rows x [B, T, H] of true `lengths` int [B] -> (x' [B, T, H], this
        layer's state after each row's tokens; K/V buffers hold `capacity` >= T tokens)."""
        h = rms_norm_offset(x, self.input_layernorm[...], self.cfg.rms_norm_eps)
        if self.kind == "linear_attention":
            mixed, state = self.linear_attn.prefill(h, lengths)
            return self._mlp_residual(x + mixed), state
        b, t, _ = x.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        mixed, k, v = self.self_attn(h, positions)
        pad = [(0, 0), (0, 0), (0, capacity - t), (0, 0)]
        return self._mlp_residual(x + mixed), AttentionKV(jnp.pad(k, pad), jnp.pad(v, pad), lengths)

    def decode(self, x: Array, state: LayerState) -> tuple[Array, LayerState]:
        """One new token per row, x [B, 1, H], at position = the row's length so far."""
        h = rms_norm_offset(x, self.input_layernorm[...], self.cfg.rms_norm_eps)
        if self.kind == "linear_attention":
            mixed, state = self.linear_attn.decode(h, state)
            return self._mlp_residual(x + mixed), state
        n = state.lengths
        q, k, v, gate = self.self_attn.project_qkv(h, n[:, None])
        rows = jnp.arange(x.shape[0])
        ck = state.k.at[rows, :, n].set(k[:, 0], mode="drop")
        cv = state.v.at[rows, :, n].set(v[:, 0], mode="drop")
        mask = (jnp.arange(ck.shape[2]) <= n[:, None])[:, None]
        mixed = self.self_attn.output(attend(q, [(ck, cv, mask)]), gate)
        return self._mlp_residual(x + mixed), AttentionKV(ck, cv, n + 1)


class Qwen35(nnx.Module):
    """Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM text model; params in `dtype`, logits f32."""

    def __init__(self, cfg: Qwen35Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden_size))).astype(
                dtype
            )
        )
        self.layers = nnx.List([DecoderLayer(cfg, k, dtype, rngs) for k in cfg.layer_types])
        self.norm = nnx.Param(jnp.zeros((cfg.hidden_size,), dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = nnx.Param(
                (0.02 * jax.random.normal(rngs.params(), (cfg.hidden_size, cfg.vocab_size))).astype(
                    dtype
                )
            )

    def __call__(self, tokens: Array) -> Array:
        """tokens int [B, T] -> float32 logits [B, T, V] (positions 0..T-1 in every row)."""
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed_tokens[...][tokens]
        for layer in self.layers:
            x = layer(x, positions)
        return self.logits(x)

    def logits(self, x: Array) -> Array:
        """Final norm and LM head: hidden [..., H] -> float32 logits [..., V]."""
        x = rms_norm_offset(x, self.norm[...], self.cfg.rms_norm_eps)
        if self.cfg.tie_word_embeddings:
            return einsum_f32("...h,vh->...v", x, self.embed_tokens[...])
        return einsum_f32("...h,hv->...v", x, self.lm_head[...])

    def prefill(
        self, tokens: Array, lengths: Array, capacity: int
    ) -> tuple[Array, tuple[LayerState, ...]]:
        """Right-padded prompts tokens int [B, T] of true `lengths` int [B] (each >= 1).

        Returns (float32 logits [B, V] after each row's last true token, one state per layer
        holding each row's history; full-attention layers have room for `capacity` tokens).
        """
        x = self.embed_tokens[...][tokens]
        states = []
        for layer in self.layers:
            x, state = layer.prefill(x, lengths, capacity)
            states.append(state)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self.logits(last), tuple(states)

    def decode_step(
        self, tokens: Array, states: tuple[LayerState, ...]
    ) -> tuple[Array, tuple[LayerState, ...]]:
        """One new token per row, tokens int [B] -> (float32 logits [B, V], updated states)."""
        x = self.embed_tokens[...][tokens][:, None]
        new = []
        for layer, state in zip(self.layers, states, strict=True):
            x, state = layer.decode(x, state)
            new.append(state)
        return self.logits(x[:, 0]), tuple(new)


def hf_weight_table(cfg: Qwen35Config, names: Collection[str]) -> list[HFParam]:
    """HF names -> `Qwen35` parameters, for the text layout (`model.`) or the multimodal one
    (`model.language_model.`), told apart by `names`. Vision and MTP tensors are not in the
    table (`hf_keymap.skipped_names` lists them); `lm_head.weight` only when untied."""
    pre = text_prefix(names)
    h, v = cfg.hidden_size, cfg.vocab_size
    table = [same(("embed_tokens",), pre + "embed_tokens.weight", (v, h))]
    table.append(same(("norm",), pre + "norm.weight", (h,)))
    if not cfg.tie_word_embeddings:
        table.append(transposed(("lm_head",), "lm_head.weight", (v, h)))
    for i, kind in enumerate(cfg.layer_types):
        lp, at = f"{pre}layers.{i}.", ("layers", i)
        table.append(same((*at, "input_layernorm"), lp + "input_layernorm.weight", (h,)))
        table.append(
            same((*at, "post_attention_layernorm"), lp + "post_attention_layernorm.weight", (h,))
        )
        if kind == "linear_attention":
            sub = gated_deltanet.hf_weight_table(cfg.linear, lp + "linear_attn.")
            table += nested((*at, "linear_attn"), sub)
        else:
            sub = gated_attention.hf_weight_table(cfg.attention, lp + "self_attn.")
            table += nested((*at, "self_attn"), sub)
        if cfg.moe is None:
            f = cfg.intermediate_size
            for name, shape in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f))):
                table.append(
                    transposed((*at, "mlp", f"{name}_proj"), f"{lp}mlp.{name}_proj.weight", shape)
                )
        else:
            table += nested((*at, "mlp"), moe.hf_weight_table(cfg.moe, lp + "mlp.", names))
    return table
