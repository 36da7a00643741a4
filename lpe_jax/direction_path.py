"""The direction path: a model and its abliteration joined inside the model, one pass per token.

Given a refusal direction r (unit [H]), M(alpha) is the original with a fraction (1 - alpha) of r
projected out of every write to its residual stream: the embedding and each attention and MLP
output keep alpha times their component along r. alpha = 1 is the original, alpha = 0 its
abliteration (`lpe_jax.orthogonalize`), and every M(alpha) equals the original with its weights
orthogonalized at strength 1 - alpha (`orthogonalize_model`; tested). Per token it costs one
forward pass of one model, where the logit path between the original and the abliteration costs
two.

It is not a path shape (`lpe_jax.paths` mixes two models' logits): the strength acts inside the
model, per row, so a prompt's K/V differ per alpha and are prefilled per (prompt, alpha).
`RolloutEngine(DirectionalQwen3.wrap(model, r), None, "linear", ...)` runs it: rows of any alphas
share the slots, each row sampled from its own M(alpha). It gives LPE its draws (compliance at
each alpha) but not the endpoint log-probs log p_original(x) and log p_variant(x) that importance
sampling weights need: the engine returns them as NaN.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpe_jax.abliterate import project_out
from lpe_jax.orthogonalize import unit_direction
from lpe_jax.qwen3 import DecodeKV, Qwen3, Qwen3Config, rms_norm

Array = jax.Array


class DirectionalQwen3(Qwen3):
    """A Qwen3 plus a unit direction; every pass takes alpha (a scalar, or [B] per row).

    Build with `DirectionalQwen3.wrap(model, direction)` (shares the model's parameters).
    `conditioned_on_alpha` tells `RolloutEngine` to pass each row's alpha and to prefill prompts
    per alpha.
    """

    conditioned_on_alpha = True

    def __init__(self, cfg: Qwen3Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.direction = nnx.Variable(jnp.zeros((cfg.hidden_size,), jnp.float32))

    @classmethod
    def wrap(cls, model: Qwen3, direction: np.ndarray) -> DirectionalQwen3:
        """`model`'s parameters (shared, not copied) with `direction` [H] (normalized here)."""
        unit = unit_direction(direction, model.cfg.hidden_size)
        out = nnx.eval_shape(lambda: cls(model.cfg, dtype=model.dtype, rngs=nnx.Rngs(0)))
        nnx.update(out, nnx.state(model, nnx.Param))
        out.direction = nnx.Variable(jnp.asarray(unit))
        return out

    def _write(self, y: Array, strength: Array) -> Array:
        return project_out(y, self.direction[...], strength)

    def _block(self, layer: Any, x: Array, attn: Array, strength: Array) -> Array:
        """x + attention write, then + MLP write, each keeping alpha of its r component."""
        x = x + self._write(attn, strength)
        h = rms_norm(x, layer.post_attention_layernorm[...], self.cfg.rms_norm_eps)
        return x + self._write(layer.mlp(h), strength)

    def hidden_states(  # type: ignore[override]
        self, tokens: Array, alpha: Array | float | None = None
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """Full causal pass of M(alpha) over tokens int [B, T] (alpha scalar or [B]); returns
        (hidden [B, T, H] before the final norm, keys and values per layer [B, kv, T, hd])."""
        b, t = tokens.shape
        strength = _strength(alpha)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self._write(self.embed_tokens[...][tokens], strength)
        ks, vs = [], []
        for layer in self.layers:
            h = rms_norm(x, layer.input_layernorm[...], self.cfg.rms_norm_eps)
            attn, k, v = layer.self_attn(h, positions)
            x = self._block(layer, x, attn, strength)
            ks.append(k)
            vs.append(v)
        return x, tuple(ks), tuple(vs)

    def __call__(  # type: ignore[override]
        self, tokens: Array, alpha: Array | float | None = None
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """(float32 logits [B, T, V], keys, values) of M(alpha) over tokens int [B, T]."""
        x, ks, vs = self.hidden_states(tokens, alpha)
        return self.logits(x), ks, vs

    def prefill(  # type: ignore[override]
        self,
        prompt_tokens: Array,
        length: Array | int | None = None,
        *,
        alpha: Array | float | None = None,
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """`Qwen3.prefill` of M(alpha) (alpha a scalar): logits [V] after token length - 1, and
        the prompt's keys and values per layer [1, kv, Pb, hd]."""
        x, ks, vs = self.hidden_states(prompt_tokens[None, :], alpha)
        last = prompt_tokens.shape[0] - 1 if length is None else jnp.asarray(length) - 1
        return self.logits(jax.lax.dynamic_index_in_dim(x[0], last, 0, keepdims=False)), ks, vs

    def decode_step(  # type: ignore[override]
        self, tokens: Array, positions: Array, kv: DecodeKV, *, alpha: Array | None = None
    ) -> tuple[Array, DecodeKV]:
        """`Qwen3.decode_step` with row b of M(alpha[b]) (alpha f32 [B])."""
        strength = _strength(alpha)
        x = self._write(self.embed_tokens[...][tokens][:, None], strength)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_layernorm[...], self.cfg.rms_norm_eps)
            attn, kv = layer.self_attn.decode(h, positions[:, None], kv, i)
            x = self._block(layer, x, attn, strength)
        return self.logits(x[:, 0]), kv


def _strength(alpha: Array | float | None) -> Array:
    """1 - alpha, shaped to broadcast against [B, T, 1] (alpha scalar or [B])."""
    if alpha is None:  # a caller built for Qwen3 (PairedSampler, model_logits)
        raise ValueError(
            "DirectionalQwen3 takes alpha on every pass (1: the original, 0: its abliteration); "
            "sample it with RolloutEngine(model, None, ...), or use orthogonalize_model for a "
            "plain Qwen3 at one alpha."
        )
    s = 1.0 - jnp.asarray(alpha, jnp.float32)
    return s if s.ndim == 0 else s[:, None, None]
