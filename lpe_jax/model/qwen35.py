"""Qwen3.5 text model (dense and MoE), a standalone reference forward in Flax NNX.

HF `Qwen3_5ForCausalLM` / `Qwen3_5MoeForCausalLM` (text towers; `Qwen3_5TextModel`): embeddings,
then per layer `x += mixer(rms_norm_offset(x))` with the mixer chosen by `layer_types`
('linear_attention': `GatedDeltaNet`, 'full_attention': `GatedAttention`), then
`x += mlp(rms_norm_offset(x))` with a SwiGLU MLP (dense) or a `SparseMoE` (MoE, every layer), the
final zero-centred norm and the LM head. Logits in float32.

**One loop** (`Qwen35.forward(tokens, positions, states, hook)`), the shape of
`lpe_jax.model.qwen3.Qwen3.forward`: the same residual-stream `Hook` sites ("embed", "input",
"attn" = the mixer's write, linear or full attention, "mlp"), and one state per layer that the
loop never looks inside: None (a full pass; the layer returns what it built: the
`GatedDeltaNetState` after the row's true length, or (k, v) [B, kv, T, hd]), a
`GatedDeltaNetState` (a linear layer decoding one token), a `qwen3.LayerKV` (the engine's
attention cache, shared prompt prefix + the row's tokens) or an `AttentionKV` (a plain per-row
cache, for `decode_step`). Every entry point runs it: `__call__` (logits, the parity reference),
`prefill`/`decode_step` (batched right-padded prompts, then token by token) and the engine's
layer-state protocol (`Qwen35Config.empty_prompt_states`/`empty_own_states`,
`Qwen35.prefill_states`/`decode_slots`; see `lpe_jax.decoding.engine_device`): a linear layer's
prompt state is its fixed-size (conv window, delta state), copied into each slot and updated
there; its own state is empty.

The multi-token-prediction head that Qwen3.5 checkpoints carry (`mtp.*`) only drafts tokens for
speculative decoding; sampling never needs it, and it is not loaded. Neither is the vision tower
(`model.visual.*`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
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
from lpe_jax.model.qwen3 import Hook, LayerKV, _at, attend
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
    max_position_embeddings: int = 262144

    def __post_init__(self) -> None:
        unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"layer_types has {unknown}; supported: {list(LAYER_TYPES)}.")
        if self.moe is None and self.intermediate_size <= 0:
            raise ValueError("a dense Qwen3.5 needs intermediate_size > 0.")

    @property
    def num_layers(self) -> int:
        return len(self.layer_types)

    def count(self, kind: str) -> int:
        """How many layers are of `kind` ('linear_attention' or 'full_attention')."""
        return sum(t == kind for t in self.layer_types)

    def kv_bytes_per_token(self, dtype: Any) -> int:
        """Bytes of K and V one token occupies across the full-attention layers (one model)."""
        a = self.attention
        return 2 * self.count("full_attention") * a.num_kv_heads * a.head_dim * _size(dtype)

    def fixed_state_bytes(self, dtype: Any) -> int:
        """Bytes of one row's linear-layer states (conv window in `dtype`, delta state f32);
        fixed, whatever the sequence length."""
        return self.count("linear_attention") * self.linear.state_bytes(dtype)

    def without_layers(self) -> Qwen35Config:
        """This config with no layers: the absent second model of a one-model engine."""
        return dataclasses.replace(self, layer_types=())

    def empty_prompt_states(self, dtype: Any, n: int, positions: int) -> tuple[Any, ...]:
        """Engine layer-state protocol: zeroed prompt states of `n` rows, one per layer: a
        `GatedDeltaNetState` (conv [n, conv_dim, K-1] in dtype, delta state f32) for a linear
        layer, (k, v) [n, kv, positions, hd] for a full-attention layer."""
        return tuple(
            _zero_delta_state(self.linear, dtype, n)
            if kind == "linear_attention"
            else _zero_kv(self.attention, dtype, n, positions)
            for kind in self.layer_types
        )

    def empty_own_states(self, dtype: Any, n: int, capacity: int) -> tuple[Any, ...]:
        """Engine layer-state protocol: zeroed per-row states for `capacity` generated tokens:
        () for a linear layer (its prompt state is updated in place), (k, v) [n, kv, capacity,
        hd] for a full-attention layer."""
        return tuple(
            () if kind == "linear_attention" else _zero_kv(self.attention, dtype, n, capacity)
            for kind in self.layer_types
        )

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
            max_position_embeddings=int(hf.get("max_position_embeddings", 262144)),
        )


def _size(dtype: Any) -> int:
    return jnp.dtype(dtype).itemsize


def _zero_delta_state(cfg: GatedDeltaNetConfig, dtype: Any, n: int) -> GatedDeltaNetState:
    return GatedDeltaNetState(
        conv=jnp.zeros((n, cfg.conv_dim, cfg.conv_kernel - 1), dtype),
        recurrent=jnp.zeros((n, cfg.num_v_heads, cfg.head_k_dim, cfg.head_v_dim), jnp.float32),
    )


def _zero_kv(cfg: GatedAttentionConfig, dtype: Any, n: int, length: int) -> tuple[Array, Array]:
    shape = (n, cfg.num_kv_heads, length, cfg.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def _shape(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    *,
    vocab: int = 248320,
    head_dim: int = 256,
    linear_heads: tuple[int, int, int, int] = (16, 32, 128, 128),
    tie: bool = False,
    interval: int = 4,
) -> Qwen35Config:
    """A dense Qwen3.5 shape: every `interval`-th layer full attention (HF's
    full_attention_interval), linear_heads = (key heads, value heads, key dim, value dim),
    partial rotary 0.25."""
    types = tuple(
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(layers)
    )
    nk, nv, dk, dv = linear_heads
    return Qwen35Config(
        vocab_size=vocab,
        hidden_size=hidden,
        layer_types=types,
        linear=GatedDeltaNetConfig(hidden, nk, nv, dk, dv),
        attention=GatedAttentionConfig(hidden, heads, kv_heads, head_dim, head_dim // 4),
        intermediate_size=intermediate,
        tie_word_embeddings=tie,
    )


PRESETS: dict[str, Qwen35Config] = {
    # transformers' Qwen3_5TextConfig defaults ("Qwen3.5-9B style" in its docstring).
    "qwen3_5_9b": _shape(4096, 32, 16, 4, 12288),
    # Assumed from the family's pattern, not read from a published config.json: check before
    # quoting numbers as Qwen3.5-4B's.
    "qwen3_5_4b": _shape(2560, 32, 16, 4, 9216, tie=True),
    "qwen3_5_tiny": _shape(
        64, 2, 4, 2, 128, vocab=512, head_dim=16, linear_heads=(2, 4, 16, 16), interval=2
    ),
}


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

    def __call__(
        self,
        x: Array,
        positions: Array,
        state: Any = None,
        *,
        index: int = 0,
        hook: Hook | None = None,
        lengths: Array | None = None,
    ) -> tuple[Array, Any]:
        """x [B, T, H] at positions int [B, T] -> (x' [B, T, H], the mixer's new state).

        state: see the module docstring. lengths int [B]: the rows' true lengths in a full pass
        (right padding; a linear layer's returned state is read there; default T). `index`: this
        layer's place, for the hook's "input", "attn", "mlp" sites.
        """
        eps = self.cfg.rms_norm_eps
        x = _at(hook, index, "input", x)
        h = rms_norm_offset(x, self.input_layernorm[...], eps)
        mixed, state = self._mix(h, positions, state, lengths)
        x = x + _at(hook, index, "attn", mixed)
        mlp = self.mlp(rms_norm_offset(x, self.post_attention_layernorm[...], eps))
        return x + _at(hook, index, "mlp", mlp), state

    def _mix(
        self, h: Array, positions: Array, state: Any, lengths: Array | None
    ) -> tuple[Array, Any]:
        if self.kind == "linear_attention":
            if state is None:
                return self.linear_attn.prefill(h, lengths)
            return self.linear_attn.decode(h, state)
        if state is None:
            mixed, k, v = self.self_attn(h, positions)
            return mixed, (k, v)
        if isinstance(state, LayerKV):
            return self.self_attn.decode(h, positions, state)
        n = state.lengths  # AttentionKV: the token goes to slot n, position n
        q, k, v, gate = self.self_attn.project_qkv(h, n[:, None])
        rows = jnp.arange(h.shape[0])
        ck = state.k.at[rows, :, n].set(k[:, 0], mode="drop")
        cv = state.v.at[rows, :, n].set(v[:, 0], mode="drop")
        mask = (jnp.arange(ck.shape[2]) <= n[:, None])[:, None]
        mixed = self.self_attn.output(attend(q, [(ck, cv, mask)]), gate)
        return mixed, AttentionKV(ck, cv, n + 1)


class Qwen35(nnx.Module):
    """Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM text model; params in `dtype`, logits f32."""

    def __init__(self, cfg: Qwen35Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(dtype)
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

    def forward(
        self,
        tokens: Array,
        positions: Array,
        states: Sequence[Any] | None = None,
        hook: Hook | None = None,
        lengths: Array | None = None,
    ) -> tuple[Array, tuple[Any, ...]]:
        """The model loop: tokens, positions int [B, T] -> (hidden [B, T, H] in the param dtype,
        before the final norm; each layer's new state). states: one per layer (module
        docstring), None: a full pass in every layer, reading linear states at `lengths` int [B]
        (default T). hook: see `lpe_jax.model.qwen3.Hook`."""
        x = _at(hook, 0, "embed", self.embed_tokens[...][tokens])
        states = (None,) * len(self.layers) if states is None else tuple(states)
        if len(states) != len(self.layers):
            raise ValueError(f"{len(states)} layer states for {len(self.layers)} layers")
        out = []
        for i, (layer, state) in enumerate(zip(self.layers, states, strict=True)):
            x, state = layer(x, positions, state, index=i, hook=hook, lengths=lengths)
            out.append(state)
        return x, tuple(out)

    def __call__(self, tokens: Array, hook: Hook | None = None) -> Array:
        """tokens int [B, T] -> float32 logits [B, T, V] (positions 0..T-1 in every row)."""
        x, _ = self.forward(tokens, _positions(*tokens.shape), None, hook)
        return self.logits(x)

    def logits(self, x: Array) -> Array:
        """Final norm and LM head: hidden [..., H] -> float32 logits [..., V]."""
        x = rms_norm_offset(x, self.norm[...], self.cfg.rms_norm_eps)
        if self.cfg.tie_word_embeddings:
            return einsum_f32("...h,vh->...v", x, self.embed_tokens[...])
        return einsum_f32("...h,hv->...v", x, self.lm_head[...])

    def prefill(
        self, tokens: Array, lengths: Array, capacity: int, hook: Hook | None = None
    ) -> tuple[Array, tuple[LayerState, ...]]:
        """Right-padded prompts tokens int [B, T] of true `lengths` int [B] (each >= 1).

        Returns (float32 logits [B, V] after each row's last true token, one state per layer
        holding each row's history; full-attention layers have room for `capacity` tokens).
        hook: a residual-stream intervention.
        """
        t = tokens.shape[1]
        x, states = self.forward(tokens, _positions(*tokens.shape), None, hook, lengths)
        pad = [(0, 0), (0, 0), (0, capacity - t), (0, 0)]
        states = tuple(
            AttentionKV(jnp.pad(s[0], pad), jnp.pad(s[1], pad), lengths)
            if isinstance(s, tuple)
            else s
            for s in states
        )
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return self.logits(last), states

    def decode_step(
        self, tokens: Array, states: tuple[LayerState, ...], hook: Hook | None = None
    ) -> tuple[Array, tuple[LayerState, ...]]:
        """One new token per row, tokens int [B] -> (float32 logits [B, V], updated states); each
        row's position is its length so far (read from an attention layer's state). hook: a
        residual-stream intervention."""
        kv = [s for s in states if isinstance(s, AttentionKV)]
        positions = kv[0].lengths if kv else jnp.zeros(tokens.shape, jnp.int32)
        x, new = self.forward(tokens[:, None], positions[:, None], states, hook)
        return self.logits(x[:, 0]), new

    def prefill_states(
        self, prompt_tokens: Array, length: Array, hook: Hook | None = None
    ) -> tuple[Array, tuple[Any, ...]]:
        """Engine layer-state protocol: one prompt (int [Pb], right-padded, true `length`) ->
        (float32 logits [V] after token length - 1, one prompt state per layer with a leading
        axis of 1: `GatedDeltaNetState` after `length` tokens, or (k, v) [1, kv, Pb, hd]).
        hook: a residual-stream intervention (the direction path's)."""
        length = jnp.asarray(length, jnp.int32)
        tokens = prompt_tokens[None, :]
        x, states = self.forward(tokens, _positions(*tokens.shape), None, hook, length[None])
        h = jax.lax.dynamic_index_in_dim(x[0], length - 1, axis=0, keepdims=False)
        return self.logits(h), states

    def decode_slots(
        self,
        tokens: Array,
        positions: Array,
        prompt_length: Array,
        write: Array,
        active: Array,
        prompt: Sequence[Any],
        own: Sequence[Any],
        block: int = 0,
        hook: Hook | None = None,
    ) -> tuple[Array, tuple[Any, ...], tuple[Any, ...]]:
        """Engine layer-state protocol (see `lpe_jax.model.qwen3.Qwen3.decode_slots`): one token
        per slot. A linear layer steps its prompt state (kept as it was where not `active`); a
        full-attention layer stores the token's K/V in its own state at `write` and attends to
        the prompt's K/V (positions < prompt_length) and the row's own tokens, read in blocks of
        `block` up to the longest busy slot when block > 0 (`qwen3.attend_bounded`), all of them
        when 0. hook: a residual-stream intervention (the direction path's)."""
        states = []
        for kind, p, o in zip(self.cfg.layer_types, prompt, own, strict=True):
            if kind == "linear_attention":
                states.append(p)
                continue
            in_prompt = (jnp.arange(p[0].shape[2]) < prompt_length[:, None])[:, None]
            states.append(LayerKV(p[0], p[1], in_prompt, o[0], o[1], write, block))
        x, new = self.forward(tokens[:, None], positions[:, None], states, hook)
        keep = lambda a, b: jnp.where(active.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)  # noqa: E731
        new_prompt, new_own = [], []
        for kind, p, o, n in zip(self.cfg.layer_types, prompt, own, new, strict=True):
            if kind == "linear_attention":
                new_prompt.append(jax.tree.map(keep, n, p))
                new_own.append(o)
            else:
                new_prompt.append(p)
                new_own.append((n.k, n.v))
        return self.logits(x[:, 0]), tuple(new_prompt), tuple(new_own)


def _positions(b: int, t: int) -> Array:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


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
