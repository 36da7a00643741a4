"""RolloutEngine: paired decoding of many prompts at once in S slots, refilled as rows end.

Callers submit `RowBlock`s (rollouts start..start+count-1 of one (prompt, alpha, seed) stream) from
any number of prompts; `poll()` advances the device and returns the blocks whose rows have all
finished. Every row is drawn exactly as `PairedSampler.sample` draws it (same keys, same sampling
step), so results do not depend on slots, batch-mates, submission order or timing.

Device side: three jitted functions on one `EngineState` (each donates the part it updates):
- `_prefill`: a prompt's K/V and first-token logits (both models) into an entry of the prompt
  table, once per `prompt_key` while it is resident.
- `_insert`: pending rows into a ring queue on the device.
- `_generate`: `steps` decode steps over all S slots in one `lax.while_loop`. At the start of each
  step, free slots take the next queued rows and copy their prompt's K/V from the table (refill
  inside the loop: a row that ends frees its slot for the very next step, so slots stay full while
  the queue has rows). A step then reads only per-slot buffers. Each step emits, per slot, the
  token it drew (`StepOut`); the host assembles rows from that stream.
Host side (`RolloutEngine`): admit blocks (prefill new prompts, queue rows), dispatch the next
generate call, then read the previous call's stream while the device works (one call in flight).

Why refill in the loop rather than between calls: the host reads each call's results one call
late (so the device never waits for the host), and a slot freed by a row would otherwise idle for
the rest of its call plus one more call; at K steps per call that costs ~1.5 K slot-steps per row.
The device queue removes that idle time whatever K is; K only sets how often the host looks.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lpe_jax import memory, sharding
from lpe_jax.paths import PathFn, PathShape, as_path
from lpe_jax.qwen3 import DecodeKV, Qwen3, Qwen3Config, empty_kv
from lpe_jax.row_block import RowBlock
from lpe_jax.sampler import (
    PAD_ID,
    Rollouts,
    alpha_keys,
    as_int,
    check_pair,
    check_prompt,
    make_rollouts,
    prompt_bucket,
    row_keys,
    sample_step,
)

Array = jax.Array

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_events = [0]


def _count_compiles(event: str, duration: float, **kwargs: Any) -> None:
    if event == _COMPILE_EVENT:
        _compile_events[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


# --- the request / result interface (the request, RowBlock, lives in lpe_jax.row_block) ---


@dataclasses.dataclass(frozen=True)
class BlockResult:
    """A finished block: rollouts has A = 1, R = block.count (PairedSampler's schema and dtypes),
    rollout_offset = block.rollout_start."""

    block: RowBlock
    rollouts: Rollouts


@dataclasses.dataclass
class EngineStats:
    """Counters since construction. slot_use = tokens / (slots * steps)."""

    slots: int
    calls: int = 0  # generate calls
    steps: int = 0  # decode steps run (summed over calls; draining steps included)
    tokens: int = 0  # generated tokens kept
    rows: int = 0  # rows finished
    blocks: int = 0  # blocks finished
    prefills: int = 0  # prompts prefilled into the table
    evictions: int = 0  # resident prompts replaced by another
    compilations: int = 0  # XLA compilations while this engine's methods ran (any thread)
    refills_per_step: int = 0  # the current refill cap (see RolloutEngine refills_per_step)

    @property
    def slot_use(self) -> float:
        return self.tokens / max(1, self.slots * self.steps)


# --- device state ---


@struct.dataclass
class PromptKV:
    """One model's prefilled prompts: P entries of Pb positions."""

    k: tuple[Array, ...]  # per layer [P, kv, Pb, hd]
    v: tuple[Array, ...]
    logits: Array  # f32 [P, V]: next-token logits after each prompt


@struct.dataclass
class PromptTable:
    """The prompts the device holds, both models; slots point into it by entry."""

    length: Array  # int32 [P]: true prompt lengths (positions >= length are padding)
    original: PromptKV
    variant: PromptKV


@struct.dataclass
class RowQueue:
    """Rows waiting for a slot: a ring of Q entries; positions head..tail-1 (mod Q) are pending.

    head/tail count rows since construction in int32: an engine serves < 2**31 rows.
    """

    handle: Array  # int32 [Q]: the host's id for the row
    prompt: Array  # int32 [Q]: prompt table entry
    alpha: Array  # f32 [Q]
    seed: Array  # uint32 [Q]
    alpha_q: Array  # uint32 [Q]: the alpha's key word (sampler.alpha_keys)
    rollout: Array  # uint32 [Q]
    head: Array  # int32 scalar: rows taken by slots so far
    tail: Array  # int32 scalar: rows queued so far


@struct.dataclass
class SlotKV:
    """One model's keys/values of every slot: its prompt, copied from the table when the slot takes
    a row (so a decode step reads only per-slot buffers), and the row's own tokens."""

    prefix_k: tuple[Array, ...]  # per layer [S, kv, Pb, hd]
    prefix_v: tuple[Array, ...]
    k: tuple[Array, ...]  # per layer [S, kv, T, hd]; slot n holds the row's token n
    v: tuple[Array, ...]


@struct.dataclass
class Slots:
    """The rows being decoded, S of them; handle < 0 marks a free slot."""

    handle: Array  # int32 [S]
    prompt: Array  # int32 [S]
    alpha: Array  # f32 [S]
    key: Array  # uint32 [S, key words]: the row's key data (sampler.row_keys)
    count: Array  # int32 [S]: tokens drawn so far = index of the next token
    last: Array  # int32 [S]: the latest token, fed to the models next
    logp_o: Array  # f32 [S]: running sums over kept tokens
    logp_v: Array  # f32 [S]
    poisoned: Array  # bool [S]: a non-finite row left its cache; zeroed before reuse
    kv_o: SlotKV
    kv_v: SlotKV


@struct.dataclass
class EngineState:
    """Everything the device keeps between calls; each device function donates what it updates."""

    prompts: PromptTable
    queue: RowQueue
    slots: Slots


@struct.dataclass
class StepOut:
    """What every slot did at each step of one generate call: [K, S] per field."""

    handle: Array  # int32: the row's handle, -1 where the slot was free
    index: Array  # int32: the row's own token index
    token: Array  # int32: the token kept, PAD_ID where none was (non-finite step)
    logp: Array  # f32 [K, S, 3]: log p_original, log p_variant, log p_path of the token
    ended: Array  # bool: the row ended (EOS, max_new_tokens or non-finite) at this step
    nonfinite: Array  # bool: the row's logits were non-finite at this step
    sum_o: Array  # f32: running sums after this step (the row's totals where ended)
    sum_v: Array


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Everything static about the engine's device functions; hashable (jax's compile key)."""

    gd_o: nnx.GraphDef
    gd_v: nnx.GraphDef | None  # None: one model (variant=None), sampled from its own logits
    path_fn: PathFn
    max_new_tokens: int
    eos: tuple[int, ...]
    temperature: float
    mesh: jax.sharding.Mesh
    kv_shapes: tuple[tuple[Qwen3Config, Any], tuple[Qwen3Config, Any]]  # (config, dtype)
    conditioned: bool = False  # the model takes each row's alpha (see RolloutEngine)
    refills: int = 0  # most slots refilled per step, 1..S (set once the slot count is known)


def _own_logits(l_o: Array, l_v: Array, alpha: Array) -> Array:
    """One model's sampling 'path': its own logits (l_v is the same array)."""
    del l_v, alpha
    return l_o


def _slot_sharded(spec: _Spec, tree: Any) -> Any:
    return jax.lax.with_sharding_constraint(tree, sharding.rows_sharding(spec.mesh))


@functools.partial(
    jax.jit, static_argnames=("spec", "slots", "prompts", "prompt_slots", "queue_rows")
)
def _init_state(
    spec: _Spec, slots: int, prompts: int, prompt_slots: int, queue_rows: int
) -> EngineState:
    """An empty engine: zeroed prompt table, empty queue, all slots free."""

    def table(cfg: Qwen3Config, dtype: Any) -> PromptKV:
        k, v = empty_kv(cfg, dtype, prompts, prompt_slots)
        return PromptKV(k, v, jnp.zeros((prompts, cfg.vocab_size), jnp.float32))

    q = jnp.zeros((queue_rows,), jnp.int32)
    u = jnp.zeros((queue_rows,), jnp.uint32)
    queue = RowQueue(q, q, q.astype(jnp.float32), u, u, u, jnp.int32(0), jnp.int32(0))
    z = jnp.zeros((slots,), jnp.int32)
    key_data = jax.random.key_data(row_keys(jnp.zeros((slots,), jnp.uint32), 0, 0))
    kvs = [
        SlotKV(
            *empty_kv(cfg, dtype, slots, prompt_slots),
            *empty_kv(cfg, dtype, slots, spec.max_new_tokens),
        )
        for cfg, dtype in spec.kv_shapes
    ]
    slot_state = Slots(
        handle=z - 1,
        prompt=z,
        alpha=z.astype(jnp.float32),
        key=key_data,
        count=z,
        last=z,
        logp_o=z.astype(jnp.float32),
        logp_v=z.astype(jnp.float32),
        poisoned=z.astype(bool),
        kv_o=kvs[0],
        kv_v=kvs[1],
    )
    (cfg_o, dt_o), (cfg_v, dt_v) = spec.kv_shapes
    no_table = PromptKV((), (), jnp.zeros((prompts, 0), jnp.float32))
    return EngineState(
        prompts=PromptTable(
            jnp.ones((prompts,), jnp.int32),
            table(cfg_o, dt_o),
            table(cfg_v, dt_v) if spec.gd_v is not None else no_table,
        ),
        queue=queue,
        slots=_slot_sharded(spec, slot_state),
    )


@functools.partial(jax.jit, static_argnames=("prompt_slots",))
def _grow_prompts(state: EngineState, prompt_slots: int) -> EngineState:
    """The state with every prompt buffer (table and slots) padded to `prompt_slots` positions."""

    def pad(xs: tuple[Array, ...]) -> tuple[Array, ...]:
        return tuple(
            jnp.pad(x, ((0, 0), (0, 0), (0, prompt_slots - x.shape[2]), (0, 0))) for x in xs
        )

    def table(t: PromptKV) -> PromptKV:
        return t.replace(k=pad(t.k), v=pad(t.v))

    def slot(kv: SlotKV) -> SlotKV:
        return kv.replace(prefix_k=pad(kv.prefix_k), prefix_v=pad(kv.prefix_v))

    p, s = state.prompts, state.slots
    return state.replace(
        prompts=p.replace(original=table(p.original), variant=table(p.variant)),
        slots=s.replace(kv_o=slot(s.kv_o), kv_v=slot(s.kv_v)),
    )


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("table",))
def _prefill(
    spec: _Spec,
    params: tuple[nnx.State, nnx.State],
    table: PromptTable,
    entry: Array,
    tokens: Array,
    length: Array,
    alpha: Array,
) -> PromptTable:
    """Both models' K/V and first-token logits of one prompt (int [Pb], true length) into table
    entry `entry`, in place. A conditioned model prefills at `alpha` (f32 scalar)."""
    cond = {"alpha": alpha} if spec.conditioned else {}

    def fill(gd: nnx.GraphDef, st: nnx.State, kv: PromptKV) -> PromptKV:
        logits, ks, vs = nnx.merge(gd, st).prefill(tokens, length, **cond)
        return PromptKV(
            k=tuple(t.at[entry].set(k[0]) for t, k in zip(kv.k, ks, strict=True)),
            v=tuple(t.at[entry].set(v[0]) for t, v in zip(kv.v, vs, strict=True)),
            logits=kv.logits.at[entry].set(logits),
        )

    return PromptTable(
        length=table.length.at[entry].set(length),
        original=fill(spec.gd_o, params[0], table.original),
        variant=table.variant if spec.gd_v is None else fill(spec.gd_v, params[1], table.variant),
    )


@functools.partial(jax.jit, donate_argnames=("queue",))
def _insert(queue: RowQueue, rows: dict[str, Array], n: Array) -> RowQueue:
    """Append the first n of `rows` (arrays [Nb], Nb a bucket >= n) to the device queue."""
    size = queue.handle.shape[0]
    i = jnp.arange(rows["handle"].shape[0])
    at = jnp.where(i < n, (queue.tail + i) % size, size)  # padding lands out of range: dropped
    fields = {f: getattr(queue, f).at[at].set(rows[f], mode="drop") for f in rows}
    return queue.replace(**fields, tail=queue.tail + n)


def _refill(state: EngineState, refills: int) -> EngineState:
    """Free, clean slots take the next queued rows, in slot order, and copy in their prompt.

    At most `refills` slots are refilled per step, the rest wait a step: every step pays for that
    many prompt copies (and row keys) whether or not they happen, and rows end far less often
    than that once they are a few tokens long.
    """
    s, q, p = state.slots, state.queue, state.prompts
    n_slots = s.handle.shape[0]
    limit = min(n_slots, refills)
    free = (s.handle < 0) & ~s.poisoned
    rank = jnp.cumsum(free) - 1
    take = free & (rank < jnp.minimum(q.tail - q.head, limit))
    dst = jnp.nonzero(take, size=limit, fill_value=n_slots)[0]  # n_slots: nothing, dropped
    src = (q.head + jnp.arange(limit)) % q.handle.shape[0]  # queue entries, in order

    def put(old: Array, new: Array | float) -> Array:
        return old.at[dst].set(new, mode="drop")

    def copy_prompt(kv: SlotKV, table: PromptKV) -> SlotKV:
        entry = q.prompt[src]
        return kv.replace(
            prefix_k=tuple(put(a, b[entry]) for a, b in zip(kv.prefix_k, table.k, strict=True)),
            prefix_v=tuple(put(a, b[entry]) for a, b in zip(kv.prefix_v, table.v, strict=True)),
        )

    keys = jax.random.key_data(row_keys(q.seed[src], q.alpha_q[src], q.rollout[src]))
    slots = s.replace(
        handle=put(s.handle, q.handle[src]),
        prompt=put(s.prompt, q.prompt[src]),
        alpha=put(s.alpha, q.alpha[src]),
        key=put(s.key, keys),
        count=put(s.count, 0),
        logp_o=put(s.logp_o, 0.0),
        logp_v=put(s.logp_v, 0.0),
        kv_o=copy_prompt(s.kv_o, p.original),
        kv_v=copy_prompt(s.kv_v, p.variant),
    )
    return state.replace(slots=slots, queue=q.replace(head=q.head + jnp.sum(take)))


def _model_logits(
    spec: _Spec, models: tuple[Qwen3, Qwen3 | None], state: EngineState
) -> tuple[Array, Array, EngineState]:
    """Both models' float32 logits [S, V] for every slot's next token; stores the fed token's K/V.

    A slot with count > 0 feeds its last token (generated token count - 1, at position
    prompt_len + count - 1), storing its K/V in slot position count - 1, and attends to its prompt
    and its own tokens. A fresh slot (count == 0) takes its prompt's logits from the table; its
    model pass is wasted work and its K/V write falls out of range (dropped).
    """
    s = state.slots
    plen = state.prompts.length[s.prompt]
    fed = s.count - 1
    write = jnp.where((s.handle >= 0) & (fed >= 0), fed, spec.max_new_tokens)
    tables = (state.prompts.original, state.prompts.variant)
    cond = {"alpha": s.alpha} if spec.conditioned else {}
    logits, kvs = [], [s.kv_o, s.kv_v]
    for i, (model, table, skv) in enumerate(zip(models, tables, kvs, strict=True)):
        if model is None:  # one model: its logits serve as both
            logits.append(logits[0])
            continue
        in_prompt = jnp.arange(skv.prefix_k[0].shape[2]) < plen[:, None]
        kv = DecodeKV(skv.prefix_k, skv.prefix_v, in_prompt[:, None], skv.k, skv.v, write)
        decoded, kv = model.decode_step(s.last, plen + fed, kv, **cond)
        fresh = (s.count == 0)[:, None]
        logits.append(jnp.where(fresh, table.logits[s.prompt], decoded))
        kvs[i] = skv.replace(k=kv.k, v=kv.v)
    slots = s.replace(kv_o=kvs[0], kv_v=kvs[1])
    return logits[0], logits[1], state.replace(slots=slots)


def _step(
    spec: _Spec, models: tuple[Qwen3, Qwen3], state: EngineState
) -> tuple[EngineState, StepOut]:
    """One decode step of every slot: refill, both models, sample, record; rows that end free
    their slot at once. Returns the new state and this step's StepOut row ([S] per field)."""
    state = _refill(state, spec.refills)
    l_o, l_v, state = _model_logits(spec, models, state)
    s = state.slots
    keys = jax.random.wrap_key_data(s.key)
    x = sample_step(spec.path_fn, spec.temperature, l_o, l_v, s.alpha, keys, s.count)
    busy = s.handle >= 0
    kept = busy & ~x.bad
    count = s.count + kept
    eos = jnp.isin(x.token, np.asarray(spec.eos, np.int32)) if spec.eos else False
    ended = busy & (x.bad | eos | (count >= spec.max_new_tokens))
    logp_o = s.logp_o + jnp.where(kept, x.logp_o, 0.0)
    logp_v = s.logp_v + jnp.where(kept, x.logp_v, 0.0)
    out = StepOut(
        handle=jnp.where(busy, s.handle, -1),
        index=s.count,
        token=jnp.where(kept, x.token, PAD_ID),
        logp=jnp.stack([x.logp_o, x.logp_v, x.logp_path], axis=-1) * kept[:, None],
        ended=ended,
        nonfinite=busy & x.bad,
        sum_o=logp_o,
        sum_v=logp_v,
    )
    slots = s.replace(
        handle=jnp.where(ended, -1, s.handle),
        count=count,
        last=jnp.where(kept, x.token, s.last),
        logp_o=logp_o,
        logp_v=logp_v,
        poisoned=s.poisoned | (busy & x.bad),
    )
    return state.replace(slots=_slot_sharded(spec, slots)), out


def _clear_poisoned(state: EngineState) -> EngineState:
    """Zero the token caches of slots a non-finite row used (masked attention still multiplies
    their values by 0, and 0 * NaN = NaN), so the next row there starts clean."""

    def clear(st: EngineState) -> EngineState:
        s = st.slots
        mask = s.poisoned[:, None, None, None]

        def zero(kv: SlotKV) -> SlotKV:
            return kv.replace(
                k=tuple(jnp.where(mask, 0, x) for x in kv.k),
                v=tuple(jnp.where(mask, 0, x) for x in kv.v),
            )

        clean = jnp.zeros_like(s.poisoned)
        return st.replace(slots=s.replace(kv_o=zero(s.kv_o), kv_v=zero(s.kv_v), poisoned=clean))

    return jax.lax.cond(jnp.any(state.slots.poisoned), clear, lambda st: st, state)


@functools.partial(jax.jit, static_argnames=("spec", "steps"), donate_argnames=("state",))
def _generate(
    spec: _Spec, params: tuple[nnx.State, nnx.State], state: EngineState, steps: int
) -> tuple[EngineState, StepOut, Array, Array]:
    """Up to `steps` decode steps; stops early once no slot is busy and none can be refilled.

    Returns (state, StepOut [steps, S] per field (rows >= steps_run are junk), steps_run, queue
    head after the call).
    """
    variant = None if spec.gd_v is None else nnx.merge(spec.gd_v, params[1])
    models = (nnx.merge(spec.gd_o, params[0]), variant)
    state = _clear_poisoned(state)
    shapes = jax.eval_shape(lambda st: _step(spec, models, st)[1], state)
    outs = jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), shapes)

    def cond(carry: tuple[Array, EngineState, StepOut]) -> Array:
        k, st, _ = carry
        s, q = st.slots, st.queue
        can_refill = (q.head < q.tail) & jnp.any((s.handle < 0) & ~s.poisoned)
        return (k < steps) & (jnp.any(s.handle >= 0) | can_refill)

    def body(carry: tuple[Array, EngineState, StepOut]) -> tuple[Array, EngineState, StepOut]:
        k, st, buf = carry
        st, out = _step(spec, models, st)
        buf = jax.tree.map(lambda b, o: jax.lax.dynamic_update_index_in_dim(b, o, k, 0), buf, out)
        return k + 1, st, buf

    k, state, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), state, outs))
    return state, outs, k, state.queue.head


# --- host side ---


@dataclasses.dataclass
class _OpenBlock:
    """A submitted block's host state: rows queued so far and the finished rows' results."""

    block: RowBlock
    ids: np.ndarray  # int32 [P]
    alpha: float
    alpha_q: np.uint32
    tokens: np.ndarray  # int32 [R, T]
    lengths: np.ndarray  # int32 [R]
    logp_o: np.ndarray  # f32 [R]
    logp_v: np.ndarray  # f32 [R]
    nonfinite: np.ndarray  # bool [R]
    tok_lp: np.ndarray | None  # f32 [3, R, T]
    bid: int  # the engine's id for the block
    queued: int = 0  # rows sent to the device so far
    left: int = 0  # rows not finished


class RolloutEngine:
    """Decode rollouts of many (prompt, alpha, seed) streams in S slots, refilling finished rows.

    original, variant, path, max_new_tokens, eos_token_ids, temperature, devices, tokenizer_ids:
        as for `PairedSampler` (rows match its rows for equal seeds).
    slots: rows decoded at once (rounded down to a multiple of the device count); None sizes it
        from free device memory (`memory.plan_engine`), memory.DEFAULT_CPU_ROWS on CPU.
    max_prompts: prompts whose K/V prefix the device holds at once; None: from memory.
    steps_per_call: decode steps per generate call (how often the host reads results).
    max_prompt_len: the longest prompt accepted; memory is planned for it (the prompt table grows
        by bucket up to it as longer prompts arrive).
    per_token: also return per-token log-probs (Rollouts.token_logp_*).
    refills_per_step: at most this many finished slots take a new row per step. Every step pays
        for that many prompt copies whether or not they happen, and full slots need about
        S / mean row length refills per step. None (the default) chooses it: max(8, S // 16) at
        first, then after every 4 S ended rows the power of two >= 1.5 S / L (not below the
        first value), where L = tokens generated / rows ended in that window (the mean row
        length). Each cap compiles the step once: at most log2(S / 8) + 1 compilations. Rows
        never depend on the cap.

    One model (variant=None): every row is sampled from `original`'s own logits, one forward pass
    per token; the path only sets the alpha domain. A model whose class sets
    `conditioned_on_alpha = True` (lpe_jax.direction_path.DirectionalQwen3) receives each row's
    alpha in `prefill(tokens, length, alpha=)` and `decode_step(..., alpha=)`, and its prompt K/V
    are prefilled per (prompt_key, alpha). Rollouts then carry no endpoint log-probs:
    logp_original / logp_variant (and their per-token forms) are NaN; token_logp_path is the
    row's own model's. Memory is planned for the one model's K/V.
    """

    def __init__(
        self,
        original: Qwen3,
        variant: Qwen3 | None,
        path: PathShape | PathFn | str,
        max_new_tokens: int,
        eos_token_ids: Sequence[int],
        temperature: float = 1.0,
        slots: int | None = None,
        max_prompts: int | None = None,
        devices: Sequence[jax.Device] | None = None,
        tokenizer_ids: tuple[str, str] | None = None,
        steps_per_call: int = 16,
        max_prompt_len: int = 256,
        per_token: bool = False,
        refills_per_step: int | None = None,
    ) -> None:
        single = variant is None
        variant = original if single else variant
        refills = None
        if refills_per_step is not None:
            refills = as_int("refills_per_step", refills_per_step, 1)
        eos = check_pair(
            original, variant, max_new_tokens, eos_token_ids, temperature, tokenizer_ids
        )
        conditioned = bool(getattr(original, "conditioned_on_alpha", False))
        if conditioned and not single:
            raise ValueError("an alpha-conditioned model is sampled alone: pass variant=None.")
        self.single, self.conditioned = single, conditioned
        self.path = as_path(path)
        self.max_new_tokens = int(max_new_tokens)
        self.steps_per_call = as_int("steps_per_call", steps_per_call, 1)
        self.max_prompt_len = as_int("max_prompt_len", max_prompt_len, 1)
        if not isinstance(per_token, bool):
            raise ValueError(f"per_token must be a bool; got {per_token!r}.")
        self.per_token = per_token
        self._cfgs = (original.cfg, variant.cfg)
        mesh = sharding.row_mesh(devices)
        # One model: no second K/V, planned and allocated as a model of no layers.
        cfg_v = dataclasses.replace(original.cfg, num_layers=0) if single else variant.cfg
        kv_shapes = ((original.cfg, original.dtype), (cfg_v, variant.dtype))
        gd_o, st_o = nnx.split(original)
        gd_v, st_v = (None, None) if single else nnx.split(variant)
        path_fn = _own_logits if single else self.path.fn
        self._spec = _Spec(
            gd_o,
            gd_v,
            path_fn,
            self.max_new_tokens,
            eos,
            float(temperature),
            mesh,
            kv_shapes,
            conditioned,  # refills: set below, once the slot count is known
        )
        rep = sharding.replicated(mesh)
        self._params = (jax.device_put(st_o, rep), None if single else jax.device_put(st_v, rep))
        self.slots, self.max_prompts = self._plan(slots, max_prompts)
        self._auto_refills = refills is None
        self._refill_floor = min(self.slots, max(8, self.slots // 16))
        self._refill_window = (0, 0)  # engine tokens and ended rows when the window opened
        refills = min(self.slots, refills or self._refill_floor)
        self._spec = dataclasses.replace(self._spec, refills=refills)
        self._queue_rows = 4 * self.slots
        self.stats = EngineStats(slots=self.slots, refills_per_step=refills)
        before = _compile_events[0]
        self._prompt_slots = prompt_bucket(1)
        self._state = _init_state(
            spec=self._spec,
            slots=self.slots,
            prompts=self.max_prompts,
            prompt_slots=self._prompt_slots,
            queue_rows=self._queue_rows,
        )
        self.stats.compilations += _compile_events[0] - before
        # Host bookkeeping: blocks, row handles (the device's row ids), prompt table entries.
        self._pending: collections.deque[_OpenBlock] = collections.deque()
        self._open: dict[int, _OpenBlock] = {}
        self._inflight: collections.deque[tuple[StepOut, Array, Array]] = collections.deque()
        n_handles = self._queue_rows + self.slots
        self._free_handles = list(range(n_handles))[::-1]
        self._h_block = np.full(n_handles, -1, np.int64)
        self._h_row = np.zeros(n_handles, np.int64)
        self._h_entry = np.zeros(n_handles, np.int64)
        self._h_tokens = np.full((n_handles, self.max_new_tokens), PAD_ID, np.int32)
        self._h_logp = (
            np.zeros((n_handles, self.max_new_tokens, 3), np.float32) if per_token else None
        )
        self._queued_total = 0  # rows sent to the device queue
        self._consumed = 0  # rows taken by slots, as of the last call read back
        self._outstanding = 0  # rows queued and not yet seen finished
        self._prompts: dict[Hashable, np.ndarray] = {}  # every prompt_key seen -> its ids
        self._resident: dict[Hashable, int] = {}  # prompt_key -> table entry
        self._entry_key: list[Hashable | None] = [None] * self.max_prompts
        self._entry_rows = np.zeros(self.max_prompts, np.int64)
        self._free_entries = list(range(self.max_prompts))[::-1]
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._next_block = 0

    def _plan(self, slots: int | None, max_prompts: int | None) -> tuple[int, int]:
        if slots is not None:
            as_int("slots", slots, 1)
        if max_prompts is not None:
            as_int("max_prompts", max_prompts, 1)
        (cfg_o, dt_o), (cfg_v, dt_v) = self._spec.kv_shapes
        pb = prompt_bucket(self.max_prompt_len)
        mesh = self._spec.mesh
        n_slots, n_prompts = memory.plan_engine(
            free_bytes=memory.device_free_bytes(mesh.devices.flat[0]),
            slot_bytes=memory.bytes_per_slot(
                cfg_o, cfg_v, dt_o, dt_v, self.max_new_tokens, pb, self.steps_per_call
            ),
            prompt_bytes=memory.bytes_per_prompt(cfg_o, cfg_v, dt_o, dt_v, pb),
            num_devices=mesh.size,
            slots=slots,
            prompts=max_prompts,
        )
        return sharding.round_to_devices(n_slots, mesh.size), n_prompts

    # --- public API ---

    @property
    def idle(self) -> bool:
        """Nothing queued, no row on the device, no result unread."""
        return not self._pending and self._outstanding == 0 and not self._inflight

    def submit(self, block: RowBlock) -> None:
        """Validate `block` (ValueError/TypeError naming the problem) and queue its rows."""
        if not isinstance(block, RowBlock):
            raise TypeError(f"submit takes a RowBlock; got {type(block).__name__}.")
        try:
            hash(block.prompt_key)
        except TypeError:
            raise ValueError(
                f"prompt_key must be hashable (a str, int or tuple); got {block.prompt_key!r}."
            ) from None
        ids = check_prompt(block.prompt_ids, self._cfgs, self.max_new_tokens)
        if ids.size > self.max_prompt_len:
            raise ValueError(
                f"prompt {block.prompt_key!r} has {ids.size} tokens, more than max_prompt_len "
                f"{self.max_prompt_len} this engine was sized for; construct it with "
                f"max_prompt_len >= {ids.size}."
            )
        seen = self._prompts.get(block.prompt_key, ids)
        if not np.array_equal(seen, ids):
            raise ValueError(
                f"prompt_key {block.prompt_key!r} was submitted before with other prompt_ids; "
                "one key names one prompt (its K/V are computed once per key)."
            )
        alpha, alpha_q = alpha_keys(self.path, [block.alpha])
        as_int("seed", block.seed, 0, 2**32 - 1)
        start = as_int("rollout_start", block.rollout_start, 0, 2**32 - 1)
        count = as_int("count", block.count, 1, 2**32 - start)
        self._prompts[block.prompt_key] = seen
        t_n = self.max_new_tokens
        ob = _OpenBlock(
            block=block,
            ids=seen,
            alpha=float(alpha[0]),
            alpha_q=alpha_q[0],
            tokens=np.full((count, t_n), PAD_ID, np.int32),
            lengths=np.zeros(count, np.int32),
            logp_o=np.zeros(count, np.float32),
            logp_v=np.zeros(count, np.float32),
            nonfinite=np.zeros(count, bool),
            tok_lp=np.zeros((3, count, t_n), np.float32) if self.per_token else None,
            bid=self._next_block,
            left=count,
        )
        self._next_block += 1
        self._open[ob.bid] = ob
        self._pending.append(ob)

    def poll(self) -> list[BlockResult]:
        """Queue what fits, dispatch one generate call, and read back the previous one while it
        runs. Returns the blocks whose rows all finished since the last poll (may be [])."""
        before = _compile_events[0]
        self._admit()
        if self._outstanding:
            self._dispatch()
        keep = 1 if self._outstanding else 0  # leave the newest call running on the device
        done: list[BlockResult] = []
        while len(self._inflight) > keep:
            done += self._harvest(*self._inflight.popleft())
        if self._auto_refills:
            self._tune_refill_cap()
        self.stats.compilations += _compile_events[0] - before
        return done

    def run(self) -> list[BlockResult]:
        """Poll until idle; every submitted block's result, in order of completion."""
        done: list[BlockResult] = []
        while not self.idle:
            done += self.poll()
        return done

    def planned_bytes(self) -> dict[str, int]:
        """Device bytes memory.py plans for this engine at its current prompt bucket (per device
        for one device): params, prompt table, per slot, and the total."""
        (cfg_o, dt_o), (cfg_v, dt_v) = self._spec.kv_shapes
        pb = self._prompt_slots
        slot = memory.bytes_per_slot(
            cfg_o, cfg_v, dt_o, dt_v, self.max_new_tokens, pb, self.steps_per_call
        )
        table = self.max_prompts * memory.bytes_per_prompt(cfg_o, cfg_v, dt_o, dt_v, pb)
        params = sum(x.nbytes for x in jax.tree.leaves(self._params))
        total = params + table + self.slots * slot
        return dict(params=params, table=table, slot=slot, total=total)

    def compiled_bytes(self) -> int:
        """Device bytes XLA's memory analysis gives for one generate call at the current shapes:
        arguments + outputs - donated aliases + temporaries (compiles the step once more)."""
        lowered = _generate.lower(
            spec=self._spec, params=self._params, state=self._state, steps=self.steps_per_call
        )
        ma = lowered.compile().memory_analysis()
        out = ma.output_size_in_bytes - ma.alias_size_in_bytes
        return int(ma.argument_size_in_bytes + out + ma.temp_size_in_bytes)

    # --- internals ---

    def _tune_refill_cap(self) -> None:
        """Auto mode: set the refill cap to what the last window of rows needed (see __init__).

        A window closes once 4 S rows have ended in it; L = its tokens / its ended rows counts
        the (at most S) rows running at either edge by the tokens they made inside the window,
        so for rows of similar length it is off by about S / 4 S = 25% at most. Caps are powers
        of two, each compiled once, so a workload whose answers change length switches between
        compiled steps.
        """
        tokens0, rows0 = self._refill_window
        rows = self.stats.rows - rows0
        if rows < 4 * self.slots:
            return
        mean_len = (self.stats.tokens - tokens0) / rows
        want = 1 << max(0, math.ceil(math.log2(1.5 * self.slots / max(mean_len, 1.0))))
        cap = min(self.slots, max(want, self._refill_floor))
        if cap != self._spec.refills:
            self._spec = dataclasses.replace(self._spec, refills=cap)
            self.stats.refills_per_step = cap
        self._refill_window = (self.stats.tokens, self.stats.rows)

    def _admit(self) -> None:
        """Move pending rows into the device queue while it has room and their prompt a table
        entry; blocks whose prompt cannot get an entry yet wait (later blocks may pass them)."""
        space = self._queue_rows - (self._queued_total - self._consumed)
        space = min(space, len(self._free_handles))
        rows: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        waiting: collections.deque[_OpenBlock] = collections.deque()
        while self._pending:
            ob = self._pending.popleft()
            entry = self._entry_for(ob) if space > 0 else None
            if entry is None:
                waiting.append(ob)
                continue
            n = min(ob.block.count - ob.queued, space)
            handles = np.array([self._free_handles.pop() for _ in range(n)], np.int32)
            self._h_block[handles] = ob.bid
            self._h_row[handles] = np.arange(ob.queued, ob.queued + n)
            self._h_entry[handles] = entry
            rows["handle"].append(handles)
            rows["prompt"].append(np.full(n, entry, np.int32))
            rows["alpha"].append(np.full(n, ob.alpha, np.float32))
            rows["seed"].append(np.full(n, ob.block.seed, np.uint32))
            rows["alpha_q"].append(np.full(n, ob.alpha_q, np.uint32))
            rows["rollout"].append(
                np.arange(ob.queued, ob.queued + n, dtype=np.uint32)
                + np.uint32(ob.block.rollout_start)
            )
            ob.queued += n
            space -= n
            self._entry_rows[entry] += n
            if ob.queued < ob.block.count:
                waiting.append(ob)
        self._pending = waiting
        if rows:
            cat = {f: np.concatenate(v) for f, v in rows.items()}
            n = cat["handle"].size
            bucket = max(8, 1 << (n - 1).bit_length())
            padded = {f: np.pad(v, (0, bucket - n)) for f, v in cat.items()}
            queue = _insert(queue=self._state.queue, rows=padded, n=np.int32(n))
            self._state = self._state.replace(queue=queue)
            self._queued_total += n
            self._outstanding += n

    def _entry_for(self, ob: _OpenBlock) -> int | None:
        """The table entry holding ob's prompt, prefilling it into a free (or the least recently
        used idle) entry if needed; None when every entry has rows on the device."""
        # A conditioned model's prompt K/V depend on the alpha: one entry per (prompt, alpha).
        key = (ob.block.prompt_key, ob.alpha_q) if self.conditioned else ob.block.prompt_key
        if key in self._resident:
            entry = self._resident[key]
            self._evictable.pop(entry, None)
            return entry
        if self._free_entries:
            entry = self._free_entries.pop()
        elif self._evictable:
            entry, _ = self._evictable.popitem(last=False)
            del self._resident[self._entry_key[entry]]
            self.stats.evictions += 1
        else:
            return None
        self._resident[key] = entry
        self._entry_key[entry] = key
        self._prefill(entry, ob.ids, ob.alpha)
        return entry

    def _prefill(self, entry: int, ids: np.ndarray, alpha: float) -> None:
        need = prompt_bucket(ids.size)
        if need > self._prompt_slots:
            self._state = _grow_prompts(state=self._state, prompt_slots=need)
            self._prompt_slots = need
        padded = np.zeros(self._prompt_slots, np.int32)
        padded[: ids.size] = ids
        table = _prefill(
            spec=self._spec,
            params=self._params,
            table=self._state.prompts,
            entry=np.int32(entry),
            tokens=padded,
            length=np.int32(ids.size),
            alpha=np.float32(alpha),
        )
        self._state = self._state.replace(prompts=table)
        self.stats.prefills += 1

    def _dispatch(self) -> None:
        self._state, out, steps, head = _generate(
            spec=self._spec, params=self._params, state=self._state, steps=self.steps_per_call
        )
        self._inflight.append((out, steps, head))

    def _harvest(self, out: StepOut, steps: Array, head: Array) -> list[BlockResult]:
        """Read one call's stream: write kept tokens to their rows, close rows that ended."""
        n = int(steps)
        self._consumed = int(head)
        o = jax.tree.map(lambda a: np.asarray(a)[:n], out)
        self.stats.calls += 1
        self.stats.steps += n
        kept = (o.handle >= 0) & (o.token != PAD_ID)
        h, i = o.handle[kept], o.index[kept]
        self._h_tokens[h, i] = o.token[kept]
        if self._h_logp is not None:
            self._h_logp[h, i] = o.logp[kept]
        self.stats.tokens += int(kept.sum())
        done = []
        for k, s in zip(*np.nonzero(o.ended), strict=True):
            result = self._close_row(o, int(k), int(s))
            if result is not None:
                done.append(result)
        return done

    def _close_row(self, o: StepOut, k: int, s: int) -> BlockResult | None:
        hd = int(o.handle[k, s])
        bid, r, entry = int(self._h_block[hd]), int(self._h_row[hd]), int(self._h_entry[hd])
        ob = self._open[bid]
        ob.tokens[r] = self._h_tokens[hd]
        ob.lengths[r] = o.index[k, s] + (o.token[k, s] != PAD_ID)
        ob.logp_o[r], ob.logp_v[r] = (
            (np.nan, np.nan) if self.single else (o.sum_o[k, s], o.sum_v[k, s])
        )
        ob.nonfinite[r] = o.nonfinite[k, s]
        self._h_tokens[hd] = PAD_ID
        if self._h_logp is not None:
            ob.tok_lp[:, r] = self._h_logp[hd].T
            if self.single:  # no endpoint models: only the row's own log-probs are known
                ob.tok_lp[:2, r] = np.nan
            self._h_logp[hd] = 0.0
        self._free_handles.append(hd)
        self._outstanding -= 1
        self._entry_rows[entry] -= 1
        if self._entry_rows[entry] == 0:
            self._evictable[entry] = None
        self.stats.rows += 1
        ob.left -= 1
        if ob.left:
            return None
        del self._open[bid]
        self.stats.blocks += 1
        b = ob.block
        rollouts = make_rollouts(
            tokens=ob.tokens[None],
            lengths=ob.lengths[None],
            logp_o=ob.logp_o[None],
            logp_v=ob.logp_v[None],
            nonfinite=ob.nonfinite[None],
            alphas=np.array([ob.alpha]),
            rollout_offset=b.rollout_start,
            eos=self._spec.eos,
            tok_lp=None if ob.tok_lp is None else ob.tok_lp[:, None],
        )
        return BlockResult(b, rollouts)
