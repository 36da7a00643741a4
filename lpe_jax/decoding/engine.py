"""RolloutEngine, the host part of the rollout engine: decode many prompts at once in S slots.

Callers submit `RowBlock`s (rollouts start..start+count-1 of one (prompt, alpha, seed) stream) from
any number of prompts; `poll()` advances the device and returns the blocks whose rows have all
finished. A row's tokens depend only on its (seed, alpha, rollout index)
(`lpe_jax.decoding.rollouts`), so
results do not depend on slots, batch-mates, submission order or timing; `PairedSampler` is a thin
API over this engine for one prompt.

The device part (`lpe_jax.decoding.engine_device`) holds the state and three pure jitted functions
(prefill, insert, generate, each donating what it updates). This host part owns the slots' rows
(handles), the prompt table's entries (which prompt is resident, eviction), the refill cap, and
harvesting: it admits blocks (prefill new prompts, queue rows), dispatches the next generate call,
then reads the previous call's stream while the device works (one call in flight).

Why refill in the loop rather than between calls: the host reads each call's results one call
late (so the device never waits for the host), and a slot freed by a row would otherwise idle for
the rest of its call plus one more call; at K steps per call that costs ~1.5 K slot-steps per row.
The device queue removes that idle time whatever K is; K only sets how often the host looks.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Hashable, Sequence

import jax
import numpy as np

from lpe_jax.decoding import engine_device as dev
from lpe_jax.decoding import memory, sharding
from lpe_jax.decoding.paths import PathFn, PathShape, as_path
from lpe_jax.decoding.rollouts import (
    PAD_ID,
    Rollouts,
    alpha_keys,
    as_int,
    check_pair,
    check_prompt,
    compilations,
    make_rollouts,
    prompt_bucket,
)
from lpe_jax.decoding.row_block import RowBlock
from lpe_jax.model.low_rank import unique_bytes
from lpe_jax.model.qwen3 import Qwen3

__all__ = ["BlockResult", "EngineStats", "RolloutEngine", "RowBlock"]


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
    logp_p: np.ndarray  # f32 [R]: under the distribution sampled
    nonfinite: np.ndarray  # bool [R]
    tok_lp: np.ndarray | None  # f32 [3, R, T]
    bid: int  # the engine's id for the block
    queued: int = 0  # rows sent to the device so far
    left: int = 0  # rows not finished


class _PromptEntries:
    """Which prompt each of the device table's entries holds, and which may be evicted: an entry
    with rows on the device stays; idle ones go least recently used first."""

    def __init__(self, n: int) -> None:
        self.resident: dict[Hashable, int] = {}  # key -> entry
        self.key: list[Hashable | None] = [None] * n
        self.rows = np.zeros(n, np.int64)  # rows queued or decoding per entry
        self.free = list(range(n))[::-1]
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()

    def find(self, key: Hashable) -> int | None:
        """The entry holding `key` (now in use), or None."""
        entry = self.resident.get(key)
        if entry is not None:
            self.idle.pop(entry, None)
        return entry

    def claim(self, key: Hashable) -> tuple[int, bool] | None:
        """(entry, evicted) for a new key: a free entry, else the least recently used idle one;
        None while every entry has rows on the device."""
        evicted = False
        if self.free:
            entry = self.free.pop()
        elif self.idle:
            entry, _ = self.idle.popitem(last=False)
            del self.resident[self.key[entry]]
            evicted = True
        else:
            return None
        self.resident[key], self.key[entry] = entry, key
        return entry, evicted

    def row_done(self, entry: int) -> None:
        self.rows[entry] -= 1
        if self.rows[entry] == 0:
            self.idle[entry] = None


class _Handles:
    """The host's ids for rows on the device (queued or in a slot): which block row each is, and
    the tokens (and per-token log-probs) it has drawn so far."""

    def __init__(self, n: int, max_new_tokens: int, per_token: bool) -> None:
        self.free = list(range(n))[::-1]
        self.block = np.full(n, -1, np.int64)
        self.row = np.zeros(n, np.int64)
        self.entry = np.zeros(n, np.int64)
        self.tokens = np.full((n, max_new_tokens), PAD_ID, np.int32)
        self.logp = np.zeros((n, max_new_tokens, 3), np.float32) if per_token else None

    def take(self, n: int, bid: int, first_row: int, entry: int) -> np.ndarray:
        h = np.array([self.free.pop() for _ in range(n)], np.int32)
        self.block[h], self.row[h], self.entry[h] = bid, np.arange(first_row, first_row + n), entry
        return h

    def release(self, h: int) -> None:
        self.tokens[h] = PAD_ID
        if self.logp is not None:
            self.logp[h] = 0.0
        self.free.append(h)


@dataclasses.dataclass
class _RefillCap:
    """The refill cap (see RolloutEngine refills_per_step): fixed, or chosen from the rows."""

    cap: int
    floor: int
    auto: bool
    window: tuple[int, int] = (0, 0)  # engine tokens and ended rows when the window opened

    def update(self, slots: int, tokens: int, rows: int) -> None:
        """Auto mode: set the cap to what the last window of rows needed.

        A window closes once 4 S rows have ended in it; L = its tokens / its ended rows counts
        the (at most S) rows running at either edge by the tokens they made inside the window,
        so for rows of similar length it is off by about S / 4 S = 25% at most. Caps are powers
        of two, each compiled once, so a workload whose answers change length switches between
        compiled steps.
        """
        ended = rows - self.window[1]
        if not self.auto or ended < 4 * slots:
            return
        mean_len = (tokens - self.window[0]) / ended
        want = 1 << max(0, math.ceil(math.log2(1.5 * slots / max(mean_len, 1.0))))
        self.cap = min(slots, max(want, self.floor))
        self.window = (tokens, rows)


class RolloutEngine:
    """Decode rollouts of many (prompt, alpha, seed) streams in S slots, refilling finished rows.

    original, variant, path, max_new_tokens, eos_token_ids, temperature, devices, tokenizer_ids:
        as for `PairedSampler` (rows match its rows for equal seeds).
    mesh_shape: (rows, tensor, experts) sizes of the device mesh over `devices`
        (`sharding.pair_mesh`; checked against both models: whole heads, experts and equal
        vocabulary shards per device); None: (devices, 1, 1), parameters replicated and rows
        split over every device. Rows do not depend on the mesh (tokens equal; log-probs to
        float32 rounding, since a split contraction sums in another order).
    slots: rows decoded at once (rounded down to a multiple of the mesh's rows size); None sizes it
        from free device memory (`memory.plan_engine`), memory.DEFAULT_CPU_ROWS on CPU.
    max_prompts: prompts whose K/V prefix the device holds at once; None: from memory.
    steps_per_call: decode steps per generate call (how often the host reads results).
    max_prompt_len: the longest prompt accepted; the prompt buffers (table and slots) hold
        prompt_bucket(max_prompt_len) positions from the start, as memory is planned.
    per_token: also return per-token log-probs (Rollouts.token_logp_*).
    refills_per_step: at most this many finished slots take a new row per step. Every step pays
        for that many prompt copies whether or not they happen, and full slots need about
        S / mean row length refills per step. None (the default) chooses it: max(8, S // 16) at
        first, then after every 4 S ended rows the power of two >= 1.5 S / L (not below the
        first value), where L = tokens generated / rows ended in that window (the mean row
        length). Each cap compiles the step once: at most log2(S / 8) + 1 compilations. Rows
        never depend on the cap.
    attention_block: a decode step reads each slot's generated-token K/V in blocks of this many
        positions, only up to the longest busy row (engine_device.ATTENTION_BLOCK by default);
        0 reads all max_new_tokens positions every step (the reference the bounded one is
        tested and benchmarked against). Rows agree to float32 rounding.
    pair_batch: a variant held as low-rank deltas on the original's arrays
        (`lpe_jax.model.low_rank.as_low_rank(original, variant)`) decodes with the original as
        2S rows through one copy of the weights, so a step reads each shared weight once
        (`low_rank.paired_model`); each model keeps its own K/V. None (the default): whenever the
        variant allows it; True: required (ValueError saying why not); False: two passes.
        `self.paired` says which. Rows agree with two passes to float32 rounding.
    reserve_bytes: device bytes (per device) kept free for other work on the same device when
        slots or max_prompts are sized from memory, e.g. a device judge's batch
        (`memory.judge_batch_bytes`; its params are resident already, so not counted).

    One model (variant=None): every row is sampled from `original`'s own logits, one forward pass
    per token; the path only sets the alpha domain. A model whose class sets
    `conditioned_on_alpha = True` (lpe_jax.abliteration.direction_path.DirectionalQwen3) receives
    each row's alpha in `prefill(tokens, length, alpha=)` and `decode_step(..., alpha=)`, and its
    prompt K/V are prefilled per (prompt_key, alpha). Rollouts then carry no endpoint log-probs:
    logp_original / logp_variant (and their per-token forms) are NaN; token_logp_path is the row's
    own model's. Memory is planned for the one model's K/V.
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
        attention_block: int = dev.ATTENTION_BLOCK,
        pair_batch: bool | None = None,
        mesh_shape: tuple[int, int, int] | None = None,
        reserve_bytes: int = 0,
    ) -> None:
        before = compilations()
        self.reserve_bytes = as_int("reserve_bytes", reserve_bytes, 0)
        self.single = variant is None
        pair = (original, original if self.single else variant)
        eos = check_pair(*pair, max_new_tokens, eos_token_ids, temperature, tokenizer_ids)
        self.conditioned = bool(getattr(original, "conditioned_on_alpha", False))
        if self.conditioned and not self.single:
            raise ValueError("an alpha-conditioned model is sampled alone: pass variant=None.")
        cap = None if refills_per_step is None else as_int("refills_per_step", refills_per_step, 1)
        if pair_batch is not None and not isinstance(pair_batch, bool):
            raise ValueError(f"pair_batch must be None, True or False; got {pair_batch!r}.")
        if not isinstance(per_token, bool):
            raise ValueError(f"per_token must be a bool; got {per_token!r}.")
        self.path, self.per_token = as_path(path), per_token
        self.max_new_tokens = int(max_new_tokens)
        self.steps_per_call = as_int("steps_per_call", steps_per_call, 1)
        self.max_prompt_len = as_int("max_prompt_len", max_prompt_len, 1)
        self.prompt_slots = prompt_bucket(self.max_prompt_len)
        self._cfgs = (pair[0].cfg, pair[1].cfg)
        self._spec, self._params = dev.DeviceSpec.build(
            original, variant, self.path.fn, self.max_new_tokens, eos, float(temperature),
            sharding.pair_mesh(mesh_shape, devices, self._cfgs), attention_block, pair_batch,
        )  # fmt: skip
        self.paired = self._spec.pair_whole is not None
        self.slots, self.max_prompts = self._plan(slots, max_prompts)
        floor = min(self.slots, max(8, self.slots // 16))
        self._refills = _RefillCap(min(self.slots, cap or floor), floor, auto=cap is None)
        self._queue_rows = memory.QUEUE_ROWS_PER_SLOT * self.slots
        self._state = dev.init_state(
            spec=self._spec,
            slots=self.slots,
            prompts=self.max_prompts,
            prompt_slots=self.prompt_slots,
            queue_rows=self._queue_rows,
        )
        self._entries = _PromptEntries(self.max_prompts)
        self._handles = _Handles(self._queue_rows + self.slots, self.max_new_tokens, per_token)
        self._pending: collections.deque[_OpenBlock] = collections.deque()
        self._open: dict[int, _OpenBlock] = {}
        self._inflight: collections.deque[tuple[dev.StepOut, jax.Array, jax.Array]]
        self._inflight = collections.deque()
        self._prompts: dict[Hashable, np.ndarray] = {}  # every prompt_key seen -> its ids
        self._queued_total = 0  # rows sent to the device queue
        self._consumed = 0  # rows taken by slots, as of the last call read back
        self._outstanding = 0  # rows queued and not yet seen finished
        self._next_block = 0
        self.stats = EngineStats(slots=self.slots, refills_per_step=self._refills.cap)
        self.stats.compilations += compilations() - before

    def _plan(self, slots: int | None, max_prompts: int | None) -> tuple[int, int]:
        if slots is not None:
            as_int("slots", slots, 1)
        if max_prompts is not None:
            as_int("max_prompts", max_prompts, 1)
        mesh = self._spec.mesh
        shape = self.mesh_shape
        free = memory.device_free_bytes(mesh.devices.flat[0])
        n_slots, n_prompts = memory.plan_engine(
            free_bytes=None if free is None else max(0, free - self.reserve_bytes),
            slot_bytes=memory.split_over_tensor(self._slot_bytes(), shape),
            prompt_bytes=memory.split_over_tensor(
                memory.bytes_per_prompt(*self._kv_shapes(), self.prompt_slots), shape
            ),
            num_devices=sharding.row_groups(mesh),
            slots=slots,
            prompts=max_prompts,
        )
        return sharding.round_to_devices(n_slots, sharding.row_groups(mesh)), n_prompts

    def _kv_shapes(self) -> tuple:
        """(cfg_o, cfg_v, dtype_o, dtype_v), memory.py's argument order."""
        (cfg_o, dt_o), (cfg_v, dt_v) = self._spec.kv_shapes
        return cfg_o, cfg_v, dt_o, dt_v

    def _slot_bytes(self) -> int:
        return memory.bytes_per_slot(
            *self._kv_shapes(), self.max_new_tokens, self.prompt_slots, self.steps_per_call,
            attention_block=self._spec.attention_block,
        )  # fmt: skip

    @property
    def mesh_shape(self) -> tuple[int, int, int]:
        """(rows, tensor, experts): the device mesh the engine runs on."""
        return tuple(int(n) for n in self._spec.mesh.devices.shape)

    def memory_plan(self, weights: int | None = None) -> memory.MeshPlan:
        """Planned bytes on each device at this engine's slots and prompt-table size (weights:
        see `memory.plan_mesh`)."""
        (cfg_o, dt_o), (cfg_v, dt_v) = self._spec.kv_shapes
        return memory.plan_mesh(
            cfg_o, None if self.single else cfg_v, dt_o, dt_v, self.mesh_shape, self.slots,
            self.max_prompts, self.max_new_tokens, self.prompt_slots, self.steps_per_call,
            attention_block=self._spec.attention_block, weights=weights,
        )  # fmt: skip

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
            logp_p=np.zeros(count, np.float32),
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
        before = compilations()
        self._admit()
        if self._outstanding:
            self._dispatch()
        keep = 1 if self._outstanding else 0  # leave the newest call running on the device
        done: list[BlockResult] = []
        while len(self._inflight) > keep:
            done += self._harvest(*self._inflight.popleft())
        self._refills.update(self.slots, self.stats.tokens, self.stats.rows)
        self.stats.refills_per_step = self._refills.cap
        self.stats.compilations += compilations() - before
        return done

    def run(self) -> list[BlockResult]:
        """Poll until idle; every submitted block's result, in order of completion."""
        done: list[BlockResult] = []
        while not self.idle:
            done += self.poll()
        return done

    def planned_bytes(self) -> dict[str, int]:
        """Device bytes memory.py plans for this engine (per device for one device): params,
        prompt table, per slot, and the total."""
        table = self.max_prompts * memory.bytes_per_prompt(*self._kv_shapes(), self.prompt_slots)
        params = unique_bytes(self._params)  # a low-rank variant shares the original's arrays
        slot = self._slot_bytes()
        return dict(params=params, table=table, slot=slot, total=params + table + self.slots * slot)

    def compiled_bytes(self) -> int:
        """Device bytes XLA's memory analysis gives for one generate call at the current shapes
        (engine_device.generate_bytes; compiles the call once more)."""
        return dev.generate_bytes(
            self._spec, self._params, self._state, self.steps_per_call, self._refills.cap
        )

    # --- internals ---

    def _admit(self) -> None:
        """Move pending rows into the device queue while it has room and their prompt a table
        entry; blocks whose prompt cannot get an entry yet wait (later blocks may pass them)."""
        space = self._queue_rows - (self._queued_total - self._consumed)
        space = min(space, len(self._handles.free))
        rows: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        waiting: collections.deque[_OpenBlock] = collections.deque()
        while self._pending:
            ob = self._pending.popleft()
            entry = self._entry_for(ob) if space > 0 else None
            if entry is None:
                waiting.append(ob)
                continue
            n = min(ob.block.count - ob.queued, space)
            rows["handle"].append(self._handles.take(n, ob.bid, ob.queued, entry))
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
            self._entries.rows[entry] += n
            if ob.queued < ob.block.count:
                waiting.append(ob)
        self._pending = waiting
        if rows:
            self._insert({f: np.concatenate(v) for f, v in rows.items()})

    def _insert(self, rows: dict[str, np.ndarray]) -> None:
        """Queue rows on the device, padded to a power of two (>= 8) so few shapes compile."""
        n = rows["handle"].size
        bucket = max(8, 1 << (n - 1).bit_length())
        padded = {f: np.pad(v, (0, bucket - n)) for f, v in rows.items()}
        queue = dev.insert(queue=self._state.queue, rows=padded, n=np.int32(n))
        self._state = self._state.replace(queue=queue)
        self._queued_total += n
        self._outstanding += n

    def _entry_for(self, ob: _OpenBlock) -> int | None:
        """The table entry holding ob's prompt, prefilling it into a free (or the least recently
        used idle) entry if needed; None when every entry has rows on the device."""
        # A conditioned model's prompt K/V depend on the alpha: one entry per (prompt, alpha).
        key = (ob.block.prompt_key, ob.alpha_q) if self.conditioned else ob.block.prompt_key
        entry = self._entries.find(key)
        if entry is not None:
            return entry
        claimed = self._entries.claim(key)
        if claimed is None:
            return None
        entry, evicted = claimed
        self.stats.evictions += evicted
        padded = np.zeros(self.prompt_slots, np.int32)
        padded[: ob.ids.size] = ob.ids
        table = dev.prefill(
            spec=self._spec,
            params=self._params,
            table=self._state.prompts,
            entry=np.int32(entry),
            tokens=padded,
            length=np.int32(ob.ids.size),
            alpha=np.float32(ob.alpha),
        )
        self._state = self._state.replace(prompts=table)
        self.stats.prefills += 1
        return entry

    def _dispatch(self) -> None:
        self._state, out, steps, head = dev.generate(
            spec=self._spec,
            params=self._params,
            state=self._state,
            steps=self.steps_per_call,
            refills=self._refills.cap,
        )
        self._inflight.append((out, steps, head))

    def _harvest(self, out: dev.StepOut, steps: jax.Array, head: jax.Array) -> list[BlockResult]:
        """Read one call's stream: write kept tokens to their rows, close rows that ended."""
        n = int(steps)
        self._consumed = int(head)
        o = jax.tree.map(lambda a: np.asarray(a)[:n], out)
        self.stats.calls += 1
        self.stats.steps += n
        kept = (o.handle >= 0) & (o.token != PAD_ID)
        h, i = o.handle[kept], o.index[kept]
        self._handles.tokens[h, i] = o.token[kept]
        if self._handles.logp is not None:
            self._handles.logp[h, i] = o.logp[kept]
        self.stats.tokens += int(kept.sum())
        done = []
        for k, s in zip(*np.nonzero(o.ended), strict=True):
            result = self._close_row(o, int(k), int(s))
            if result is not None:
                done.append(result)
        return done

    def _close_row(self, o: dev.StepOut, k: int, s: int) -> BlockResult | None:
        hd = int(o.handle[k, s])
        hs = self._handles
        ob = self._open[int(hs.block[hd])]
        r = int(hs.row[hd])
        ob.tokens[r] = hs.tokens[hd]
        ob.lengths[r] = o.index[k, s] + (o.token[k, s] != PAD_ID)
        ob.logp_o[r], ob.logp_v[r] = (
            (np.nan, np.nan) if self.single else (o.sum_o[k, s], o.sum_v[k, s])
        )
        ob.logp_p[r] = o.sum_p[k, s]
        ob.nonfinite[r] = o.nonfinite[k, s]
        if hs.logp is not None:
            ob.tok_lp[:, r] = hs.logp[hd].T
            if self.single:  # no endpoint models: only the row's own log-probs are known
                ob.tok_lp[:2, r] = np.nan
        self._entries.row_done(int(hs.entry[hd]))
        hs.release(hd)
        self._outstanding -= 1
        self.stats.rows += 1
        ob.left -= 1
        return None if ob.left else self._close_block(ob)

    def _close_block(self, ob: _OpenBlock) -> BlockResult:
        del self._open[ob.bid]
        self.stats.blocks += 1
        rollouts = make_rollouts(
            tokens=ob.tokens[None],
            lengths=ob.lengths[None],
            logp_o=ob.logp_o[None],
            logp_v=ob.logp_v[None],
            logp_p=ob.logp_p[None],
            nonfinite=ob.nonfinite[None],
            alphas=np.array([ob.alpha]),
            rollout_offset=ob.block.rollout_start,
            eos=self._spec.eos,
            tok_lp=None if ob.tok_lp is None else ob.tok_lp[:, None],
        )
        return BlockResult(ob.block, rollouts)
