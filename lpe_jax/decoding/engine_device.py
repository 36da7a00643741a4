"""The rollout engine's device part: its state, static config and three pure jitted functions.

- `prefill`: a prompt's per-layer state and first-token logits (both models) into an entry of the
  prompt table (donated and updated in place).
- `insert`: pending rows into a ring queue on the device (donated).
- `generate`: `steps` decode steps over all S slots in one `lax.while_loop` (the state donated).
  At the start of each step, free slots take the next queued rows and copy their prompt's state
  from the table (refill inside the loop: a row that ends frees its slot for the very next step).
  A step then reads only per-slot buffers, and emits per slot the token it drew (`StepOut`).

The engine never looks inside a layer's state. Each model holds, per layer, a *prompt state*
(what the prompt left: K/V for an attention layer, the conv window and delta state for a Gated
DeltaNet layer) and an *own state* (what the row's generated tokens add: K/V for attention, nothing
for a recurrent layer). The layer-state protocol, on the model config (`empty_prompt_states`,
`empty_own_states`, `without_layers`, `fixed_state_bytes`) and the model (`prefill_states`,
`decode_slots`), says how to allocate, fill and step them; the engine allocates, copies (whole
leaves, indexed by slot or entry) and donates them as opaque pytrees. Implemented by
`lpe_jax.model.qwen3.Qwen3` and `lpe_jax.model.qwen35.Qwen35`.

On the mesh (`lpe_jax.decoding.sharding`: 'rows', 'tensor', 'experts') the params and the state
are placed by rules and XLA partitions every function: slots split over rows, K/V by heads,
logits [S, V] by vocabulary shards, which the step mixes and samples without gathering them.
Where the tensor size does not divide the vocabulary V, the vocabulary dimensions of the params
are zero-padded to the next multiple Vp (`sharding.pad_vocab`) and the logits are [S, Vp]; the
step masks columns >= V to -inf after the mix (never sampled, nothing added to any log-sum-exp),
so rows equal the unpadded model's.

`DeviceSpec` is everything static apart from tunables: the refill cap (`refills`) is a static
argument of `generate` alone, so changing it compiles one more step and never a prefill. Shapes
(slots S, prompt entries P, prompt positions Pb, queue Q) come from the state `init_state` builds.
The host part (slots' owners, handles, prompt-table eviction, harvesting) is
`lpe_jax.decoding.engine`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lpe_jax.decoding import sharding
from lpe_jax.decoding.paths import PathFn
from lpe_jax.decoding.rollouts import PAD_ID, row_keys, sample_step
from lpe_jax.model.low_rank import pair_whole_tensors, paired_model

Array = jax.Array

# Default block length of the decode step's bounded attention (`DeviceSpec.attention_block`).
ATTENTION_BLOCK = 64


@struct.dataclass
class PromptKV:
    """One model's prefilled prompts: P entries (of Pb positions where a layer keeps K/V)."""

    states: tuple[Any, ...]  # per layer, the model's prompt state, every leaf [P, ...]
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
    alpha_q: Array  # uint32 [Q]: the alpha's key word (rollouts.alpha_keys)
    rollout: Array  # uint32 [Q]
    head: Array  # int32 scalar: rows taken by slots so far
    tail: Array  # int32 scalar: rows queued so far


@struct.dataclass
class SlotKV:
    """One model's per-layer state of every slot: its prompt's state, copied from the table when
    the slot takes a row (so a decode step reads only per-slot buffers), and the row's own state
    (attention: K/V of its tokens, slot n holding token n). Every leaf [S, ...]."""

    prompt: tuple[Any, ...]
    own: tuple[Any, ...]


@struct.dataclass
class Slots:
    """The rows being decoded, S of them; handle < 0 marks a free slot."""

    handle: Array  # int32 [S]
    prompt: Array  # int32 [S]
    alpha: Array  # f32 [S]
    key: Array  # uint32 [S, key words]: the row's key data (rollouts.row_keys)
    count: Array  # int32 [S]: tokens drawn so far = index of the next token
    last: Array  # int32 [S]: the latest token, fed to the models next
    logp_o: Array  # f32 [S]: running sums over kept tokens
    logp_v: Array  # f32 [S]
    logp_p: Array  # f32 [S]: under the distribution sampled (path, temperature applied)
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
    sum_p: Array  # f32: of log p_path


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Everything static about the engine's device functions; hashable (jax's compile key)."""

    gd_o: nnx.GraphDef
    gd_v: nnx.GraphDef | None  # None: one model (variant=None), sampled from its own logits
    path_fn: PathFn
    max_new_tokens: int
    eos: tuple[int, ...]
    temperature: float
    mesh: jax.sharding.Mesh
    kv_shapes: tuple[tuple[Any, Any], tuple[Any, Any]]  # (config, dtype); see the module doc
    conditioned: bool = False  # the model takes each row's alpha (see RolloutEngine)
    # > 0: a step reads each slot's token K/V in blocks of this many positions, only up to the
    # longest busy row (qwen3.attend_bounded); 0: all max_new_tokens positions (qwen3.attend).
    attention_block: int = ATTENTION_BLOCK
    # None: each model decodes its S rows in its own pass. A tuple: the variant is low rank on the
    # original's arrays and a step decodes both as 2S rows through one copy of the weights
    # (low_rank.paired_model); it names the variant's whole tensors (read for its half only).
    pair_whole: tuple[str, ...] | None = None
    # The models' vocabulary V and its width on the mesh (`sharding.padded_vocab`): logits are
    # [.., padded_vocab] and columns >= vocab_size are masked before sampling.
    vocab_size: int = 0
    padded_vocab: int = 0

    @classmethod
    def build(
        cls,
        original: Any,
        variant: Any | None,
        path_fn: PathFn,
        max_new_tokens: int,
        eos: tuple[int, ...],
        temperature: float,
        mesh: jax.sharding.Mesh,
        attention_block: int = ATTENTION_BLOCK,
        pair_batch: bool | None = None,
    ) -> tuple[DeviceSpec, tuple[nnx.State, nnx.State | None]]:
        """(spec, params placed on the mesh by `sharding.param_shardings`). variant=None:
        `original` alone, sampled from its own logits; no second state (planned and allocated as
        a model of no layers). Both models implement the layer-state protocol (module
        docstring). mesh: axes ('rows', 'tensor', 'experts') (`sharding.pair_mesh`), checked
        against both models here. attention_block: see the field; 0 or a positive int.
        pair_batch: decode both models as 2S rows through one weight copy (see `pair_whole`);
        None: whenever the variant allows it (`low_rank.pair_whole_tensors`), True: required
        (ValueError saying why it cannot), False: never."""
        if isinstance(attention_block, bool) or not isinstance(attention_block, int):
            raise ValueError(f"attention_block must be an int >= 0; got {attention_block!r}.")
        if attention_block < 0:
            raise ValueError(
                f"attention_block must be >= 0 (0: full-length attention); got {attention_block}."
            )
        single = variant is None
        pair_whole = (
            None if single or pair_batch is False else pair_whole_tensors(original, variant)
        )
        if isinstance(pair_whole, str):
            if pair_batch:
                raise ValueError(
                    f"pair_batch=True, but the pair cannot decode through one weight copy: "
                    f"{pair_whole}; pass pair_batch=None or False."
                )
            pair_whole = None
        elif single and pair_batch:
            raise ValueError("pair_batch=True needs a variant; one model has no pair to batch.")
        cfg_v = original.cfg.without_layers() if single else variant.cfg
        dt_v = original.dtype if single else variant.dtype
        if tuple(mesh.axis_names) != sharding.AXES:
            raise ValueError(
                f"the engine's mesh needs axes {sharding.AXES}; got {mesh.axis_names}. Build it "
                "with lpe_jax.decoding.sharding.pair_mesh."
            )
        cfgs = (original.cfg,) if single else (original.cfg, variant.cfg)
        sharding.check_mesh(tuple(mesh.devices.shape), mesh.size, cfgs)
        gd_o, st_o = nnx.split(original)
        gd_v, st_v = (None, None) if single else nnx.split(variant)

        vocab, tensor = original.cfg.vocab_size, mesh.shape[sharding.TENSOR]
        placed_o = sharding.place_params(mesh, st_o, vocab)
        # a low-rank variant's bases are the original's arrays: placed once, not copied
        params = (
            placed_o,
            None if single else sharding.place_params(mesh, st_v, vocab, like=(st_o, placed_o)),
        )
        spec = cls(
            gd_o=gd_o,
            gd_v=gd_v,
            path_fn=_own_logits if single else path_fn,
            max_new_tokens=max_new_tokens,
            eos=eos,
            temperature=temperature,
            mesh=mesh,
            kv_shapes=((original.cfg, original.dtype), (cfg_v, dt_v)),
            conditioned=bool(getattr(original, "conditioned_on_alpha", False)),
            attention_block=attention_block,
            pair_whole=pair_whole,
            vocab_size=vocab,
            padded_vocab=sharding.padded_vocab(vocab, tensor),
        )
        return spec, params


def _own_logits(l_o: Array, l_v: Array, alpha: Array) -> Array:
    """One model's sampling 'path': its own logits (l_v is the same array)."""
    del l_v, alpha
    return l_o


def _kv_sharded(spec: DeviceSpec, i: int, states: Any, lead: str | None) -> Any:
    """Model i's layer states (slots: lead 'rows'; the prompt table: None) by the state rules."""
    cfg = spec.kv_shapes[i][0]
    return jax.lax.with_sharding_constraint(
        states, sharding.state_shardings(spec.mesh, cfg, states, lead)
    )


def _slot_sharded(spec: DeviceSpec, slots: Slots) -> Slots:
    """Every slot array split over 'rows'; layer states also by their rules (K/V heads)."""
    rows = sharding.rows_sharding(spec.mesh)
    kvs = [
        SlotKV(
            _kv_sharded(spec, i, kv.prompt, sharding.ROWS),
            _kv_sharded(spec, i, kv.own, sharding.ROWS),
        )
        for i, kv in enumerate((slots.kv_o, slots.kv_v))
    ]
    rest = jax.lax.with_sharding_constraint(slots.replace(kv_o=(), kv_v=()), rows)
    return rest.replace(kv_o=kvs[0], kv_v=kvs[1])


def _table_sharded(spec: DeviceSpec, table: PromptTable) -> PromptTable:
    """Prompt entries replicated over 'rows'; K/V heads and logits' vocabulary by the rules."""

    def one(i: int, kv: PromptKV) -> PromptKV:
        logits = jax.lax.with_sharding_constraint(
            kv.logits, sharding.logits_sharding(spec.mesh, None)
        )
        return PromptKV(_kv_sharded(spec, i, kv.states, None), logits)

    return table.replace(original=one(0, table.original), variant=one(1, table.variant))


@functools.partial(
    jax.jit, static_argnames=("spec", "slots", "prompts", "prompt_slots", "queue_rows")
)
def init_state(
    spec: DeviceSpec, slots: int, prompts: int, prompt_slots: int, queue_rows: int
) -> EngineState:
    """An empty engine: zeroed prompt table, empty queue, all slots free."""

    def table(cfg: Any, dtype: Any) -> PromptKV:
        states = cfg.empty_prompt_states(dtype, prompts, prompt_slots)
        return PromptKV(states, jnp.zeros((prompts, spec.padded_vocab), jnp.float32))

    q = jnp.zeros((queue_rows,), jnp.int32)
    u = jnp.zeros((queue_rows,), jnp.uint32)
    queue = RowQueue(q, q, q.astype(jnp.float32), u, u, u, jnp.int32(0), jnp.int32(0))
    z = jnp.zeros((slots,), jnp.int32)
    key_data = jax.random.key_data(row_keys(jnp.zeros((slots,), jnp.uint32), 0, 0))
    kvs = [
        SlotKV(
            cfg.empty_prompt_states(dtype, slots, prompt_slots),
            cfg.empty_own_states(dtype, slots, spec.max_new_tokens),
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
        logp_p=z.astype(jnp.float32),
        poisoned=z.astype(bool),
        kv_o=kvs[0],
        kv_v=kvs[1],
    )
    (cfg_o, dt_o), (cfg_v, dt_v) = spec.kv_shapes
    no_table = PromptKV((), jnp.zeros((prompts, 0), jnp.float32))
    prompt_table = PromptTable(
        jnp.ones((prompts,), jnp.int32),
        table(cfg_o, dt_o),
        table(cfg_v, dt_v) if spec.gd_v is not None else no_table,
    )
    return EngineState(
        prompts=_table_sharded(spec, prompt_table),
        queue=queue,
        slots=_slot_sharded(spec, slot_state),
    )


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("table",))
def prefill(
    spec: DeviceSpec,
    params: tuple[nnx.State, nnx.State],
    table: PromptTable,
    entry: Array,
    tokens: Array,
    length: Array,
    alpha: Array,
) -> PromptTable:
    """Both models' prompt states and first-token logits of one prompt (int [Pb], true length)
    into table entry `entry`, in place. A conditioned model prefills at `alpha` (f32 scalar)."""
    cond = {"alpha": alpha} if spec.conditioned else {}

    def fill(gd: nnx.GraphDef, st: nnx.State, kv: PromptKV) -> PromptKV:
        logits, states = nnx.merge(gd, st).prefill_states(tokens, length, **cond)
        put = lambda t, x: t.at[entry].set(x[0])  # noqa: E731
        return PromptKV(
            states=jax.tree.map(put, kv.states, tuple(states)),
            logits=kv.logits.at[entry].set(logits),
        )

    filled = PromptTable(
        length=table.length.at[entry].set(length),
        original=fill(spec.gd_o, params[0], table.original),
        variant=table.variant if spec.gd_v is None else fill(spec.gd_v, params[1], table.variant),
    )
    return _table_sharded(spec, filled)


@functools.partial(jax.jit, donate_argnames=("queue",))
def insert(queue: RowQueue, rows: dict[str, Array], n: Array) -> RowQueue:
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
        copy = jax.tree.map(lambda a, b: put(a, b[entry]), kv.prompt, table.states)
        return kv.replace(prompt=copy)

    keys = jax.random.key_data(row_keys(q.seed[src], q.alpha_q[src], q.rollout[src]))
    slots = s.replace(
        handle=put(s.handle, q.handle[src]),
        prompt=put(s.prompt, q.prompt[src]),
        alpha=put(s.alpha, q.alpha[src]),
        key=put(s.key, keys),
        count=put(s.count, 0),
        logp_o=put(s.logp_o, 0.0),
        logp_v=put(s.logp_v, 0.0),
        logp_p=put(s.logp_p, 0.0),
        kv_o=copy_prompt(s.kv_o, p.original),
        kv_v=copy_prompt(s.kv_v, p.variant),
    )
    return state.replace(slots=slots, queue=q.replace(head=q.head + jnp.sum(take)))


def _model_logits(
    spec: DeviceSpec, models: tuple[Any, Any | None], state: EngineState
) -> tuple[Array, Array, EngineState]:
    """Both models' float32 logits [S, V] for every slot's next token; steps the slots' states.

    A slot with count > 0 feeds its last token (generated token count - 1, at position
    prompt_len + count - 1): attention stores its K/V in own-state position count - 1 and attends
    to its prompt and its own tokens (with spec.attention_block > 0, an attention layer's token
    K/V, Qwen3's or gated, is read only up to the longest busy slot's count); a recurrent layer
    updates its state. A fresh or free slot
    (count == 0) takes its prompt's logits from the table; its model pass is wasted work, its
    write index is out of range and its state does not change. With spec.pair_whole set, both
    models decode in one pass over 2S rows through one copy of the weights
    (`low_rank.paired_model`), each on its own state buffers.
    """
    s = state.slots
    plen = state.prompts.length[s.prompt]
    fed = s.count - 1
    active = (s.handle >= 0) & (fed >= 0)
    write = jnp.where(active, fed, spec.max_new_tokens)
    tables = (state.prompts.original, state.prompts.variant)
    fresh = (s.count == 0)[:, None]
    vocab = sharding.logits_sharding(spec.mesh)
    if spec.pair_whole is not None:
        pair = paired_model(models[0], models[1], spec.pair_whole)
        args = (s.last, plen + fed, plen, write, active)
        l_o, l_v, (po, oo), (pv, ov) = pair.decode_slots_pair(
            *args,
            (s.kv_o.prompt, s.kv_o.own),
            (s.kv_v.prompt, s.kv_v.own),
            block=spec.attention_block,
        )
        slots = s.replace(kv_o=SlotKV(po, oo), kv_v=SlotKV(pv, ov))
        l_o = jnp.where(fresh, tables[0].logits[s.prompt], l_o)
        l_v = jnp.where(fresh, tables[1].logits[s.prompt], l_v)
        l_o = jax.lax.with_sharding_constraint(l_o, vocab)
        l_v = jax.lax.with_sharding_constraint(l_v, vocab)
        return l_o, l_v, state.replace(slots=slots)
    cond = {"alpha": s.alpha} if spec.conditioned else {}
    logits, kvs = [], [s.kv_o, s.kv_v]
    for i, (model, table, skv) in enumerate(zip(models, tables, kvs, strict=True)):
        if model is None:  # one model: its logits serve as both
            logits.append(logits[0])
            continue
        decoded, prompt, own = model.decode_slots(
            s.last,
            plen + fed,
            plen,
            write,
            active,
            skv.prompt,
            skv.own,
            block=spec.attention_block,
            **cond,
        )
        mixed = jnp.where(fresh, table.logits[s.prompt], decoded)
        logits.append(jax.lax.with_sharding_constraint(mixed, vocab))
        kvs[i] = SlotKV(prompt, own)
    slots = s.replace(kv_o=kvs[0], kv_v=kvs[1])
    return logits[0], logits[1], state.replace(slots=slots)


def _step(
    spec: DeviceSpec, refills: int, models: tuple[Any, Any | None], state: EngineState
) -> tuple[EngineState, StepOut]:
    """One decode step of every slot: refill, both models, sample, record; rows that end free
    their slot at once. Returns the new state and this step's StepOut row ([S] per field)."""
    state = _refill(state, refills)
    l_o, l_v, state = _model_logits(spec, models, state)
    s = state.slots
    keys = jax.random.wrap_key_data(s.key)
    x = sample_step(
        spec.path_fn, spec.temperature, l_o, l_v, s.alpha, keys, s.count,
        vocab_sharding=sharding.logits_sharding(spec.mesh), vocab_size=spec.vocab_size,
    )  # fmt: skip
    busy = s.handle >= 0
    kept = busy & ~x.bad
    count = s.count + kept
    eos = jnp.isin(x.token, np.asarray(spec.eos, np.int32)) if spec.eos else False
    ended = busy & (x.bad | eos | (count >= spec.max_new_tokens))
    logp_o = s.logp_o + jnp.where(kept, x.logp_o, 0.0)
    logp_v = s.logp_v + jnp.where(kept, x.logp_v, 0.0)
    logp_p = s.logp_p + jnp.where(kept, x.logp_path, 0.0)
    out = StepOut(
        handle=jnp.where(busy, s.handle, -1),
        index=s.count,
        token=jnp.where(kept, x.token, PAD_ID),
        logp=jnp.stack([x.logp_o, x.logp_v, x.logp_path], axis=-1) * kept[:, None],
        ended=ended,
        nonfinite=busy & x.bad,
        sum_o=logp_o,
        sum_v=logp_v,
        sum_p=logp_p,
    )
    slots = s.replace(
        handle=jnp.where(ended, -1, s.handle),
        count=count,
        last=jnp.where(kept, x.token, s.last),
        logp_o=logp_o,
        logp_v=logp_v,
        logp_p=logp_p,
        poisoned=s.poisoned | (busy & x.bad),
    )
    return state.replace(slots=_slot_sharded(spec, slots)), out


def _clear_poisoned(state: EngineState) -> EngineState:
    """Zero the own states of slots a non-finite row used (masked attention still multiplies
    their values by 0, and 0 * NaN = NaN), so the next row there starts clean. Prompt states are
    overwritten whole when the slot takes its next row."""

    def clear(st: EngineState) -> EngineState:
        s = st.slots

        def zero_rows(x: Array) -> Array:
            return jnp.where(s.poisoned.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x)

        def zero(kv: SlotKV) -> SlotKV:
            return kv.replace(own=jax.tree.map(zero_rows, kv.own))

        clean = jnp.zeros_like(s.poisoned)
        return st.replace(slots=s.replace(kv_o=zero(s.kv_o), kv_v=zero(s.kv_v), poisoned=clean))

    return jax.lax.cond(jnp.any(state.slots.poisoned), clear, lambda st: st, state)


@functools.partial(
    jax.jit, static_argnames=("spec", "steps", "refills"), donate_argnames=("state",)
)
def generate(
    spec: DeviceSpec,
    params: tuple[nnx.State, nnx.State | None],
    state: EngineState,
    steps: int,
    refills: int,
) -> tuple[EngineState, StepOut, Array, Array]:
    """Up to `steps` decode steps; stops early once no slot is busy and none can be refilled. At
    most `refills` (1..S) free slots take a queued row per step.

    Returns (state, StepOut [steps, S] per field (rows >= steps_run are junk), steps_run, queue
    head after the call).
    """
    variant = None if spec.gd_v is None else nnx.merge(spec.gd_v, params[1])
    models = (nnx.merge(spec.gd_o, params[0]), variant)
    state = _clear_poisoned(state)
    shapes = jax.eval_shape(lambda st: _step(spec, refills, models, st)[1], state)
    outs = jax.tree.map(lambda a: jnp.zeros((steps, *a.shape), a.dtype), shapes)

    def cond(carry: tuple[Array, EngineState, StepOut]) -> Array:
        k, st, _ = carry
        s, q = st.slots, st.queue
        can_refill = (q.head < q.tail) & jnp.any((s.handle < 0) & ~s.poisoned)
        return (k < steps) & (jnp.any(s.handle >= 0) | can_refill)

    def body(carry: tuple[Array, EngineState, StepOut]) -> tuple[Array, EngineState, StepOut]:
        k, st, buf = carry
        st, out = _step(spec, refills, models, st)
        buf = jax.tree.map(lambda b, o: jax.lax.dynamic_update_index_in_dim(b, o, k, 0), buf, out)
        return k + 1, st, buf

    k, state, outs = jax.lax.while_loop(cond, body, (jnp.int32(0), state, outs))
    return state, outs, k, state.queue.head


def generate_bytes(
    spec: DeviceSpec,
    params: tuple[nnx.State, nnx.State | None],
    state: EngineState,
    steps: int,
    refills: int,
) -> int:
    """Device bytes XLA's memory analysis gives for one generate call at these shapes:
    arguments + outputs - donated aliases + temporaries (compiles the call once more)."""
    lowered = generate.lower(spec=spec, params=params, state=state, steps=steps, refills=refills)
    ma = lowered.compile().memory_analysis()
    out = ma.output_size_in_bytes - ma.alias_size_in_bytes
    return int(ma.argument_size_in_bytes + out + ma.temp_size_in_bytes)
