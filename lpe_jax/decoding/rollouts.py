"""The decoding core's shared pieces: the rollout record, validation, row keys, the sampling step,
prompt buckets and the compile counter.

`lpe_jax.decoding.engine` (the one decoder) and `lpe_jax.decoding.sampler.PairedSampler` (its
one-prompt API) build
on these; nothing here decodes.

Randomness (`row_keys`, `sample_step`): row (alpha, r) of a stream uses the key
fold_in(fold_in(key(seed), round(alpha / ALPHA_QUANTUM)), r) and fold_in(row_key, t) for its token
t, so a row's tokens do not depend on slots, batch-mates, sharding or call order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from lpe_jax.decoding.paths import PathFn, PathShape
from lpe_jax.decoding.row_block import ALPHA_QUANTUM  # the one alpha resolution
from lpe_jax.model.qwen3 import Qwen3, Qwen3Config
from lpe_jax.model.qwen35 import Qwen35

PAD_ID = -1
"""Value of `Rollouts.tokens` after a row ends (never a real token id)."""


@dataclasses.dataclass(frozen=True)
class Rollouts:
    """Rollouts of one prompt: A alphas x R rollouts x T = max_new_tokens.

    tokens: int32 [A, R, T], generated ids, PAD_ID (-1) after the row ends.
    lengths: int32 [A, R], generated tokens kept, EOS included.
    logp_original, logp_variant: float32 [A, R], sum over the kept tokens of each endpoint model's
        float32 log-softmax (temperature 1, untruncated vocabulary) at the sampled token. NaN for
        `nonfinite` rows.
    logp_sampled: float32 [A, R], sum over the kept tokens of the float32 log-softmax of the
        distribution each token was drawn from (the path at the row's alpha, temperature applied):
        the row's log-probability under its own sampler, for path importance sampling. NaN for
        `nonfinite` rows.
    truncated: bool [A, R], rows cut at max_new_tokens without EOS.
    nonfinite: bool [A, R], rows stopped because the path or model logits were NaN/+inf (or all
        -inf); the offending step's token is not kept. Drop these rows.
    alphas: float64 [A]; rollout_offset: the rollout index of r = 0.
    token_logp_original/variant/path: float32 [A, R, T] per-token log-probs when requested (0 after
        the row ends); `path` is under the distribution actually sampled (temperature applied).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logp_original: np.ndarray
    logp_variant: np.ndarray
    logp_sampled: np.ndarray
    truncated: np.ndarray
    nonfinite: np.ndarray
    alphas: np.ndarray
    rollout_offset: int = 0
    token_logp_original: np.ndarray | None = None
    token_logp_variant: np.ndarray | None = None
    token_logp_path: np.ndarray | None = None

    def generated_ids(self, a: int, r: int) -> list[int]:
        """Row (a, r)'s kept token ids (EOS included), for detokenizing."""
        return self.tokens[a, r, : self.lengths[a, r]].tolist()

    def token_lists(self) -> list[list[list[int]]]:
        """generated_ids for every row, nested [A][R]."""
        a_n, r_n = self.lengths.shape
        return [[self.generated_ids(a, r) for r in range(r_n)] for a in range(a_n)]

    @property
    def forward_passes(self) -> int:
        """Model forward passes spent on kept tokens (two models per token), prefill excluded."""
        return int(2 * self.lengths.sum())


def make_rollouts(
    tokens: np.ndarray,
    lengths: np.ndarray,
    logp_o: np.ndarray,
    logp_v: np.ndarray,
    logp_p: np.ndarray,
    nonfinite: np.ndarray,
    alphas: np.ndarray,
    rollout_offset: int,
    eos: Sequence[int],
    tok_lp: np.ndarray | None = None,
) -> Rollouts:
    """Rollouts from raw row arrays [A, R(, T)]: derives `truncated` and NaNs nonfinite log-probs.

    tok_lp: optional float32 [3, A, R, T] (original, variant, path) per-token log-probs.
    """
    t_n = tokens.shape[-1]
    truncated = (lengths == t_n) & ~nonfinite & ~np.isin(tokens[..., t_n - 1], list(eos))
    tok = [None] * 3 if tok_lp is None else list(tok_lp)
    return Rollouts(
        tokens=tokens,
        lengths=lengths,
        logp_original=np.where(nonfinite, np.nan, logp_o).astype(np.float32),
        logp_variant=np.where(nonfinite, np.nan, logp_v).astype(np.float32),
        logp_sampled=np.where(nonfinite, np.nan, logp_p).astype(np.float32),
        truncated=truncated,
        nonfinite=nonfinite,
        alphas=alphas,
        rollout_offset=rollout_offset,
        token_logp_original=tok[0],
        token_logp_variant=tok[1],
        token_logp_path=tok[2],
    )


# --- validation ---


def check_same_tokenizer(original_id: str, variant_id: str) -> None:
    """Raise ValueError unless the two tokenizer identities (names or hashes) are equal."""
    if original_id != variant_id:
        raise ValueError(
            f"original and variant tokenizers differ ({original_id!r} vs {variant_id!r}); the "
            "logit path needs both models to share one tokenizer."
        )


def as_int(name: str, value: Any, lo: int, hi: float = math.inf) -> int:
    """value as an int in [lo, hi], or a ValueError naming `name` (bools are not integers)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r}.")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}]; got {value}.")
    return int(value)


def check_pair(
    original: Any,
    variant: Any,
    max_new_tokens: Any,
    eos_token_ids: Sequence[int],
    temperature: float,
    tokenizer_ids: tuple[str, str] | None,
) -> tuple[int, ...]:
    """Validate the setup shared by PairedSampler and RolloutEngine; returns the EOS ids."""
    for name, model in (("original", original), ("variant", variant)):
        if not isinstance(model, (Qwen3, Qwen35)):
            raise TypeError(
                f"{name} must be a lpe_jax.model.qwen3.Qwen3 or lpe_jax.model.qwen35.Qwen35 model."
            )
    v_o, v_v = original.cfg.vocab_size, variant.cfg.vocab_size
    if v_o != v_v:
        raise ValueError(
            f"vocab sizes differ: original {v_o}, variant {v_v}; the path mixes logits token "
            "by token, so both models must share one tokenizer and vocabulary."
        )
    if tokenizer_ids is not None:
        check_same_tokenizer(*tokenizer_ids)
    as_int("max_new_tokens", max_new_tokens, 1)
    eos = tuple(int(e) for e in eos_token_ids)
    if any(not 0 <= e < v_o for e in eos):
        raise ValueError(f"eos_token_ids must lie in [0, {v_o}); got {list(eos)}.")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0; got {temperature}.")
    return eos


def check_prompt(prompt_ids: Any, cfgs: Sequence[Qwen3Config], max_new_tokens: int) -> np.ndarray:
    """prompt_ids as int32 [P]; raises ValueError if not 1-D integer ids in the vocabulary, or if
    P + max_new_tokens exceeds either model's max_position_embeddings."""
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"prompt_ids must be a 1-D integer array; got {ids.dtype} {ids.shape}.")
    if ids.size == 0:
        raise ValueError("prompt_ids is empty; the models need at least one prompt token.")
    vocab = cfgs[0].vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise ValueError(
            f"prompt ids must lie in [0, {vocab}); got range [{ids.min()}, {ids.max()}]."
        )
    limit = min(c.max_position_embeddings for c in cfgs)
    if ids.size + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {ids.size} + max_new_tokens {max_new_tokens} exceeds "
            f"max_position_embeddings {limit}; shorten the prompt or max_new_tokens."
        )
    return ids.astype(np.int32)


def alpha_keys(path: PathShape, alphas: Any) -> tuple[np.ndarray, np.ndarray]:
    """(alphas float64 [A], their key words uint32 [A]); raises ValueError for alphas outside the
    path's domain, non-finite, too large, or equal at ALPHA_QUANTUM resolution."""
    a = path.check_alphas(alphas)
    q = np.round(a / ALPHA_QUANTUM)
    if np.any(np.abs(q) >= 2**31):
        raise ValueError(f"|alpha| must be < {2**31 * ALPHA_QUANTUM:g}; got {a.tolist()}.")
    q = q.astype(np.int64)
    if np.unique(q).size != q.size:
        raise ValueError(
            f"alphas must be distinct at resolution {ALPHA_QUANTUM} (equal alphas would share "
            f"random keys); got {a.tolist()}. For more rollouts at one alpha raise "
            "rollouts_per_alpha or call again with rollout_offset."
        )
    return a, (q % 2**32).astype(np.uint32)


# --- the sampling rule ---


def row_keys(seed: jax.Array, alpha_q: jax.Array, rollout: jax.Array) -> jax.Array:
    """Typed PRNG keys [B]: fold_in(fold_in(key(seed), alpha_q), rollout) per row.

    seed, alpha_q, rollout: uint32, each [B] or scalar (broadcast).
    """
    seed, alpha_q, rollout = jnp.broadcast_arrays(seed, alpha_q, rollout)

    def one(s: jax.Array, q: jax.Array, r: jax.Array) -> jax.Array:
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(s), q), r)

    return jax.vmap(one)(seed, alpha_q, rollout)


@struct.dataclass
class Sampled:
    """One sampling step for B rows (see `sample_step`)."""

    token: jax.Array  # int32 [B]
    logp_o: jax.Array  # f32 [B], log p_original(token) at temperature 1
    logp_v: jax.Array  # f32 [B]
    logp_path: jax.Array  # f32 [B], under the distribution sampled (temperature applied)
    bad: jax.Array  # bool [B]: NaN/+inf/all -inf logits; `token` is meaningless there


def _invalid(logits: jax.Array) -> jax.Array:
    """bool [B]: any NaN or +inf, or no finite entry (nothing to sample)."""
    bad = jnp.any(jnp.isnan(logits) | (logits == jnp.inf), axis=-1)
    return bad | jnp.all(logits == -jnp.inf, axis=-1)


def _token_logp(logits: jax.Array, tok: jax.Array) -> jax.Array:
    """float32 log-softmax(logits)[b, tok[b]] without materialising the log-softmax."""
    picked = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _gumbel_max(
    keys: jax.Array, logits: jax.Array, sharding: Any, vocab_size: int | None = None
) -> jax.Array:
    """int32 [B]: argmax over V of logits [B, V] + Gumbel noise drawn from keys [B].

    The same draw as `jax.vmap(jax.random.categorical)(keys, logits)` (its Gumbel noise and
    argmax). `sharding` (a [B, V] sharding, or None) places the noise like the logits: JAX's
    partitionable threefry makes noise element v a function of (key, v) alone, so each device
    draws only its vocabulary shard and the tokens do not depend on the mesh; the argmax over a
    sharded V is a per-shard argmax and a cross-shard max of [B, shards] (ties: lowest index).
    vocab_size: the real V of logits padded wider (their padded columns -inf). Partitionable
    threefry draws the same noise for columns < V whatever the width (tested); without it the
    draw depends on the width, so only V columns are drawn and the rest padded with zeros.
    """
    v = logits.shape[-1]
    if vocab_size is not None and vocab_size < v and not jax.config.jax_threefry_partitionable:
        real = jax.vmap(lambda k: jax.random.gumbel(k, (vocab_size,), logits.dtype))(keys)
        noise = jnp.pad(real, ((0, 0), (0, v - vocab_size)))
    else:
        noise = jax.vmap(lambda k: jax.random.gumbel(k, (v,), logits.dtype))(keys)
    if sharding is not None:
        noise = jax.lax.with_sharding_constraint(noise, sharding)
        logits = jax.lax.with_sharding_constraint(logits, sharding)
    return jnp.argmax(noise + logits, axis=-1).astype(jnp.int32)


def sample_step(
    path_fn: PathFn,
    temperature: float,
    l_o: jax.Array,
    l_v: jax.Array,
    alpha: jax.Array,
    row_key: jax.Array,
    token_index: jax.Array,
    vocab_sharding: Any = None,
    vocab_size: int | None = None,
) -> Sampled:
    """Sample token `token_index` ([B] or scalar) of each row from the path at alpha f32 [B].

    l_o, l_v: float32 logits [B, V] of both models on each row's context. The key is
    fold_in(row_key, token_index), so the draw depends only on the row and its own token index.
    vocab_sharding: None, or the [B, V] sharding of the logits on a mesh (rows by vocabulary
    shards): the path is mixed per shard, the Gumbel-max's noise drawn per shard, and the
    log-softmaxes are reductions XLA partitions (a cross-shard max and sum); no full-vocabulary
    array is gathered. Tokens equal the unsharded draw's.
    vocab_size: the real vocabulary V where the logits are padded wider (`sharding.pad_vocab`):
    columns >= V are set to -inf in l_o, l_v and the mixed path (after the mix, whose -inf - -inf
    would be NaN), so they are never sampled and add nothing to a log-sum-exp; the Gumbel noise of
    columns < V does not depend on the width (`_gumbel_max`), so tokens and log-probs equal the
    unpadded draw's. None: no padding.
    """
    l_path = path_fn(l_o, l_v, alpha[:, None]).astype(jnp.float32)
    if temperature != 1.0:
        l_path = l_path / temperature
    padded = vocab_size is not None and vocab_size < l_o.shape[-1]
    if padded:
        real = jnp.arange(l_o.shape[-1]) < vocab_size
        l_o, l_v, l_path = (jnp.where(real, x, -jnp.inf) for x in (l_o, l_v, l_path))
    if vocab_sharding is not None:
        l_path = jax.lax.with_sharding_constraint(l_path, vocab_sharding)
    bad = _invalid(l_path) | _invalid(l_o) | _invalid(l_v)
    index = jnp.broadcast_to(token_index, alpha.shape)
    keys = jax.vmap(jax.random.fold_in)(row_key, index)
    safe = jnp.where(bad[:, None], 0.0, l_path)
    if padded:  # a bad row's token too stays a real id
        safe = jnp.where(real, safe, -jnp.inf)
    tok = _gumbel_max(keys, safe, vocab_sharding, vocab_size if padded else None)
    return Sampled(tok, _token_logp(l_o, tok), _token_logp(l_v, tok), _token_logp(safe, tok), bad)


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def prompt_bucket(length: int) -> int:
    """Static prompt slots for a prompt of `length`: powers of two (>= 16) up to 256, then
    multiples of 256; prompts in one bucket share a compiled prefill and decode loop."""
    if length <= 256:
        return max(16, _next_pow2(length))
    return -(-length // 256) * 256


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_events = [0]


def _count_compiles(event: str, duration: float, **kwargs: Any) -> None:
    if event == _COMPILE_EVENT:
        _compile_events[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


def compilations() -> int:
    """XLA compilations in this process so far (any thread): the one compile counter; callers
    report the difference across their own calls."""
    return _compile_events[0]
