"""A local judge's yes/no scores computed on the device: only three numbers per row come back.

``answer_scores(model, yes_id, no_id)`` gives a function for ``LocalJudge(scores_fn=...)``:
(token ids int32 [B, T] right-padded, last int [B] = each row's last real position) -> float32
NumPy [B, 3] = (logit of yes, logit of no, log-sum-exp over the vocabulary) at that position.
One jitted call runs the model's causal pass (attention in blocks past
``qwen3.FULL_PASS_BLOCK`` tokens, ``qwen3.attend_causal``: memory grows with T, not T^2), takes
each row's last hidden state, applies the LM head to those B rows only ([B, V], never [B, T, V])
and reduces over the vocabulary on the device. Host memory per batch: the token ids and B x 3
floats. A row whose logits there are not all finite gets NaN in all three (its verdict is
unknown). Imports JAX.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lpe_jax.model.qwen3 import Qwen3

ScoresFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


@functools.partial(jax.jit, static_argnums=0)
def _scores(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, last: jax.Array, ids: jax.Array
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    hidden, _, _ = model.hidden_states(tokens)  # K/V outputs unused: XLA drops them
    h = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, H]
    logits = model.logits(h)  # float32 [B, V]
    out = jnp.concatenate([logits[:, ids], jax.nn.logsumexp(logits, axis=-1)[:, None]], axis=1)
    return jnp.where(jnp.all(jnp.isfinite(logits), axis=-1)[:, None], out, jnp.nan)


def answer_scores(model: Qwen3, yes_id: int, no_id: int) -> ScoresFn:
    """The scoring function of the module docstring for ``model`` (a Qwen3 or Qwen3-MoE model
    from ``load_model``; a Qwen3.5 model is refused: its pass is not planned here)."""
    if not isinstance(model, Qwen3):
        raise TypeError(
            f"the device judge runs Qwen3 / Qwen3-MoE judge models; got {type(model).__name__}. "
            "Use a Qwen3 judge checkpoint, or the HTTP judge for another family."
        )
    vocab = model.cfg.vocab_size
    for name, i in (("yes_id", yes_id), ("no_id", no_id)):
        if not 0 <= i < vocab:
            raise ValueError(f"{name}={i} is outside the judge model's vocabulary [0, {vocab})")
    graphdef, state = nnx.split(model)
    ids = jnp.array([yes_id, no_id], jnp.int32)

    def scores(tokens: np.ndarray, last: np.ndarray) -> np.ndarray:
        tokens, last = np.asarray(tokens, np.int32), np.asarray(last, np.int32)
        if tokens.ndim != 2 or last.shape != tokens.shape[:1]:
            raise ValueError(f"need tokens [B, T] and last [B]; got {tokens.shape}, {last.shape}")
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}); got [{tokens.min()}, ...]")
        if last.min() < 0 or last.max() >= tokens.shape[1]:
            raise ValueError(f"last positions must lie in [0, {tokens.shape[1]}); got {last}")
        return np.asarray(_scores(graphdef, state, tokens, last, ids))

    return scores
