"""Teacher-forced logits: the reference every sampler log-prob is checked against."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from lpe_jax.model.qwen3 import Qwen3
from lpe_jax.model.qwen35 import Qwen35


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array) -> jax.Array:
    out = nnx.merge(graphdef, state)(tokens)
    return out[0] if isinstance(out, tuple) else out  # Qwen3 also returns its K/V, Qwen35 not


def model_logits(model: Qwen3 | Qwen35, token_ids: np.ndarray) -> np.ndarray:
    """Causal logits of `model` over `token_ids`.

    token_ids: integer array [B, T] (or [T]), each id in [0, vocab). Returns float32 NumPy logits
    [B, T, V] ([T, V] for 1-D input); position t sees tokens 0..t only, so right padding never
    changes earlier positions.
    """
    ids = np.asarray(token_ids)
    if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"token_ids must be an integer array [B, T] or [T]; got {ids.dtype} {ids.shape}"
        )
    if ids.size == 0:
        raise ValueError("token_ids is empty; pass at least one token.")
    vocab = model.cfg.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(f"token ids must lie in [0, {vocab}); got [{ids.min()}, {ids.max()}].")
    graphdef, state = nnx.split(model)
    out = np.asarray(_logits(graphdef, state, ids.reshape(-1, ids.shape[-1]).astype(np.int32)))
    return out[0] if ids.ndim == 1 else out
