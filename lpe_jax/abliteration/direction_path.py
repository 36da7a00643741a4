"""The direction path: a model and its abliteration joined inside the model, one pass per token.

Given a refusal direction r (unit [H]), M(alpha) is the original with a fraction (1 - alpha) of r
projected out of every write to its residual stream: the embedding and each attention and MLP
output keep alpha times their component along r. alpha = 1 is the original, alpha = 0 its
abliteration (`lpe_jax.abliteration.orthogonalize`), and every M(alpha) equals the original with its
weights orthogonalized at strength 1 - alpha (`orthogonalize_model`; tested). Per token it costs one
forward pass of one model, where the logit path between the original and the abliteration costs two.

It is not a path shape (`lpe_jax.decoding.paths` mixes two models' logits): the strength acts inside
the model, per row, so a prompt's K/V differ per alpha and are prefilled per (prompt, alpha).
`RolloutEngine(directional(model, r), None, "linear", ...)` runs it: rows of any alphas share the
slots, each row sampled from its own M(alpha). `directional` wraps a Qwen3 (`DirectionalQwen3`)
or a Qwen3.5 (`DirectionalQwen35`: the Gated DeltaNet writes and every expert's are projected
too; a prompt's linear-layer states, like its K/V, differ per alpha). It gives LPE its draws
(compliance at each alpha) but not the endpoint log-probs log p_original(x) and log p_variant(x)
that importance sampling weights need: the engine returns them as NaN.
"""

from __future__ import annotations

from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpe_jax.abliteration.abliterate import project_out
from lpe_jax.abliteration.orthogonalize import unit_direction
from lpe_jax.model.qwen3 import DecodeKV, Hook, Qwen3
from lpe_jax.model.qwen35 import LayerState, Qwen35

Array = jax.Array


def directional(
    model: Qwen3 | Qwen35, direction: np.ndarray
) -> DirectionalQwen3 | DirectionalQwen35:
    """The direction path's model of `model` (parameters shared, not copied) and `direction`
    [H] (normalized here): a `DirectionalQwen3` or a `DirectionalQwen35`, by the model's family."""
    if isinstance(model, Qwen35):
        return DirectionalQwen35.wrap(model, direction)
    return DirectionalQwen3.wrap(model, direction)


def _hook(alpha: Array | float | None, unit: Array) -> Hook:
    """Every write to the residual stream (embedding, mixer, MLP) keeps alpha of its component
    along `unit`; the stream between writes is left alone."""
    strength = _strength(alpha)

    def hook(layer: int, site: str, x: Array) -> Array:
        return x if site == "input" else project_out(x, unit, strength)

    return hook


D = TypeVar("D", bound="_Directional")


class _Directional:
    """What both families' directional models add to their model class (listed first among the
    bases): a unit direction [H] as a variable, `wrap`, and the hook of M(alpha).
    `conditioned_on_alpha` tells `RolloutEngine` to pass each row's alpha and to prefill prompts
    per alpha."""

    conditioned_on_alpha = True

    def __init__(self, cfg: Any, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.direction = nnx.Variable(jnp.zeros((cfg.hidden_size,), jnp.float32))

    @classmethod
    def wrap(cls: type[D], model: Qwen3 | Qwen35, direction: np.ndarray) -> D:
        """`model`'s parameters (shared, not copied) with `direction` [H] (normalized here)."""
        unit = unit_direction(direction, model.cfg.hidden_size)
        out = nnx.eval_shape(lambda: cls(model.cfg, dtype=model.dtype, rngs=nnx.Rngs(0)))
        nnx.update(out, nnx.state(model, nnx.Param))
        out.direction = nnx.Variable(jnp.asarray(unit))
        return out

    def _hook(self, alpha: Array | float | None) -> Hook:
        return _hook(alpha, self.direction[...])


class DirectionalQwen3(_Directional, Qwen3):
    """A Qwen3 plus a unit direction; every pass takes alpha (a scalar, or [B] per row).

    Build with `DirectionalQwen3.wrap(model, direction)` (shares the model's parameters).
    """

    def hidden_states(  # type: ignore[override]
        self, tokens: Array, alpha: Array | float | None = None
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """Full causal pass of M(alpha) over tokens int [B, T] (alpha scalar or [B]); returns
        (hidden [B, T, H] before the final norm, keys and values per layer [B, kv, T, hd])."""
        return super().hidden_states(tokens, self._hook(alpha))

    def __call__(  # type: ignore[override]
        self, tokens: Array, alpha: Array | float | None = None
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """(float32 logits [B, T, V], keys, values) of M(alpha) over tokens int [B, T]."""
        return super().__call__(tokens, self._hook(alpha))

    def prefill(  # type: ignore[override]
        self,
        prompt_tokens: Array,
        length: Array | int | None = None,
        *,
        alpha: Array | float | None = None,
    ) -> tuple[Array, tuple[Array, ...], tuple[Array, ...]]:
        """`Qwen3.prefill` of M(alpha) (alpha a scalar): logits [V] after token length - 1, and
        the prompt's keys and values per layer [1, kv, Pb, hd]."""
        return super().prefill(prompt_tokens, length, self._hook(alpha))

    def decode_step(  # type: ignore[override]
        self, tokens: Array, positions: Array, kv: DecodeKV, *, alpha: Array | None = None
    ) -> tuple[Array, DecodeKV]:
        """`Qwen3.decode_step` with row b of M(alpha[b]) (alpha f32 [B])."""
        return super().decode_step(tokens, positions, kv, self._hook(alpha))


class DirectionalQwen35(_Directional, Qwen35):
    """A Qwen3.5 (dense or MoE) plus a unit direction; every pass takes alpha (a scalar, or [B]
    per row), as `DirectionalQwen3`. Build with `DirectionalQwen35.wrap(model, direction)`."""

    def __call__(self, tokens: Array, alpha: Array | float | None = None) -> Array:  # type: ignore[override]
        """float32 logits [B, T, V] of M(alpha) over tokens int [B, T]."""
        return super().__call__(tokens, self._hook(alpha))

    def prefill_states(  # type: ignore[override]
        self, prompt_tokens: Array, length: Array, *, alpha: Array | float | None = None
    ) -> tuple[Array, tuple[Any, ...]]:
        """`Qwen35.prefill_states` of M(alpha) (alpha a scalar)."""
        return super().prefill_states(prompt_tokens, length, self._hook(alpha))

    def decode_slots(  # type: ignore[override]
        self,
        tokens: Array,
        positions: Array,
        prompt_length: Array,
        write: Array,
        active: Array,
        prompt: tuple[Any, ...],
        own: tuple[Any, ...],
        block: int = 0,
        *,
        alpha: Array | None = None,
    ) -> tuple[Array, tuple[Any, ...], tuple[Any, ...]]:
        """`Qwen35.decode_slots` with slot s of M(alpha[s]) (alpha f32 [S])."""
        hook = self._hook(alpha)
        return super().decode_slots(
            tokens, positions, prompt_length, write, active, prompt, own, block, hook
        )

    def prefill(  # type: ignore[override]
        self, tokens: Array, lengths: Array, capacity: int, *, alpha: Array | float | None = None
    ) -> tuple[Array, tuple[LayerState, ...]]:
        """`Qwen35.prefill` of row b of M(alpha[b]) (alpha a scalar or f32 [B])."""
        return super().prefill(tokens, lengths, capacity, self._hook(alpha))

    def decode_step(  # type: ignore[override]
        self, tokens: Array, states: tuple[LayerState, ...], *, alpha: Array | None = None
    ) -> tuple[Array, tuple[LayerState, ...]]:
        """`Qwen35.decode_step` with row b of M(alpha[b]) (alpha f32 [B])."""
        return super().decode_step(tokens, states, self._hook(alpha))


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
