"""The lockstep decoder PairedSampler used before it became a thin API over the engine: kept as a
test oracle only (tests compare the engine's rows to it), never imported by lpe_jax.

One prompt; rows of a chunk decode together in one `lax.while_loop` over a `KVCache` (prompt
prefix shared, per-row caches donated) until every row is done.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from lpe_jax.decoding import memory, sharding
from lpe_jax.decoding.paths import PathFn, PathShape, as_path
from lpe_jax.decoding.rollouts import (
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
from lpe_jax.model.qwen3 import KVCache, Qwen3, Qwen3Config, empty_kv

_MIN_ROW_BUCKET = 8


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def row_bucket(rows: int, chunk: int, num_devices: int) -> int:
    """Static row count for a chunk of `rows`: next power of two (>= 8), a multiple of the device
    count, at most `chunk` (itself a multiple of the device count)."""
    b = max(_MIN_ROW_BUCKET, _next_pow2(rows))
    b = -(-b // num_devices) * num_devices
    return min(b, chunk)


# --- the oracle ---


@dataclasses.dataclass(frozen=True)
class _LoopSpec:
    """Everything static about a decode loop; hashable, so it keys jax's compilation cache."""

    gd_o: nnx.GraphDef
    gd_v: nnx.GraphDef
    path_fn: PathFn
    max_new_tokens: int
    eos: tuple[int, ...]
    temperature: float
    mesh: jax.sharding.Mesh
    kv_shapes: tuple[tuple[Qwen3Config, Any], tuple[Qwen3Config, Any]]  # (config, dtype) per model


@dataclasses.dataclass
class _Runtime:
    """A sampler's device-side pieces, built once in __post_init__."""

    spec: _LoopSpec
    params: tuple[nnx.State, nnx.State]  # replicated over the mesh
    auto_chunk: dict[tuple[int, bool], int]
    compiles: dict[str, int]


@dataclasses.dataclass(frozen=True)
class LockstepSampler:
    """Sample rollouts along `path` between `original` (alpha = 1) and `variant` (alpha = 0).

    original, variant: Qwen3 models with the same vocabulary (params are snapshotted here).
    path: a PathShape, a registered name, or a callable (l_o, l_v, alpha) -> logits.
    max_new_tokens: generated tokens per row at most. eos_token_ids: ids that end a row (kept).
    temperature: divides the path logits before sampling (> 0); log-probs stay at temperature 1.
    max_rows: rows per compiled chunk (rounded down to a multiple of the device count); None sizes
        it from free device memory (`memory.bytes_per_row`), or memory.DEFAULT_CPU_ROWS on CPU.
    devices: devices to shard rows over (default all local devices).
    tokenizer_ids: optional (original, variant) tokenizer names/hashes; must be equal.

    The engine (and so today's PairedSampler) must draw the same rows (same keys).
    """

    original: Qwen3
    variant: Qwen3
    path: PathShape | PathFn | str
    max_new_tokens: int
    eos_token_ids: Sequence[int]
    temperature: float = 1.0
    max_rows: int | None = None
    devices: Sequence[jax.Device] | None = None
    tokenizer_ids: tuple[str, str] | None = None
    _rt: _Runtime = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        eos = check_pair(
            self.original,
            self.variant,
            self.max_new_tokens,
            self.eos_token_ids,
            self.temperature,
            self.tokenizer_ids,
        )
        if self.max_rows is not None:
            as_int("max_rows", self.max_rows, 1)
        path = as_path(self.path)
        mesh = sharding.row_mesh(self.devices)
        rep = sharding.replicated(mesh)
        gd_o, st_o = nnx.split(self.original)
        gd_v, st_v = nnx.split(self.variant)
        kv_shapes = (
            (self.original.cfg, self.original.dtype),
            (self.variant.cfg, self.variant.dtype),
        )
        spec = _LoopSpec(
            gd_o, gd_v, path.fn, self.max_new_tokens, eos, float(self.temperature), mesh, kv_shapes
        )
        params = (jax.device_put(st_o, rep), jax.device_put(st_v, rep))
        object.__setattr__(self, "path", path)
        object.__setattr__(self, "_rt", _Runtime(spec, params, {}, {"loop": 0, "prefill": 0}))

    @property
    def num_devices(self) -> int:
        return self._rt.spec.mesh.size

    @property
    def num_compilations(self) -> int:
        """Decode loops compiled by this sampler's calls: one per (row bucket, prompt bucket,
        per_token). Samplers of identical shape share jax's cache, so a reused loop counts 0."""
        return self._rt.compiles["loop"]

    @property
    def num_prefill_compilations(self) -> int:
        """Prefills compiled by this sampler's calls: one per prompt bucket."""
        return self._rt.compiles["prefill"]

    def _counted(self, name: str, fn: Any, **kwargs: Any) -> Any:
        before = fn._cache_size()
        out = fn(**kwargs)
        self._rt.compiles[name] += fn._cache_size() - before
        return out

    def bytes_per_row(self, prompt_slots: int, per_token: bool = False) -> int:
        """Device bytes one row needs (see memory.bytes_per_row)."""
        return memory.bytes_per_row(
            self.original.cfg,
            self.variant.cfg,
            self.original.dtype,
            self.variant.dtype,
            self.max_new_tokens,
            prompt_slots,
            per_token,
        )

    def chunk_rows(self, prompt_slots: int, per_token: bool = False) -> int:
        """Rows per compiled chunk (max_rows or the memory budget), a multiple of the devices."""
        n_dev = self.num_devices
        if self.max_rows is not None:
            return sharding.round_to_devices(self.max_rows, n_dev)
        key = (prompt_slots, per_token)
        cache = self._rt.auto_chunk
        if key not in cache:  # sized once, so later calls reuse the same compiled chunk shape
            free = memory.device_free_bytes(self._rt.spec.mesh.devices.flat[0])
            if free is None:
                rows = memory.DEFAULT_CPU_ROWS
            else:
                fixed = memory.prompt_bytes(
                    self.original.cfg,
                    self.variant.cfg,
                    self.original.dtype,
                    self.variant.dtype,
                    prompt_slots,
                )
                per_dev = memory.rows_that_fit(
                    free, self.bytes_per_row(prompt_slots, per_token), fixed
                )
                rows = per_dev * n_dev
            cache[key] = sharding.round_to_devices(rows, n_dev)
        return cache[key]

    def sample(
        self,
        prompt_ids: Any,
        alphas: Any,
        rollouts_per_alpha: int,
        seed: int,
        rollout_offset: int = 0,
        per_token: bool = False,
    ) -> Rollouts:
        """Draw rollouts_per_alpha rollouts at each alpha for one prompt (int ids [P]).

        Row (a, r) uses rollout index rollout_offset + r: drawing r = 0..4 then (offset 5) 5..9
        equals drawing 0..9 at once. Returns Rollouts with arrays [A, R(, T)].
        """
        cfgs = (self.original.cfg, self.variant.cfg)
        ids = check_prompt(prompt_ids, cfgs, self.max_new_tokens)
        alphas_f, alphas_q = alpha_keys(self.path, alphas)
        r_n = as_int("rollouts_per_alpha", rollouts_per_alpha, 1)
        offset = as_int("rollout_offset", rollout_offset, 0, 2**32 - r_n)
        seed = as_int("seed", seed, 0, 2**32 - 1)
        if not isinstance(per_token, bool):
            raise ValueError(f"per_token must be a bool; got {per_token!r}.")

        spec = self._rt.spec
        rep, rows_sh = sharding.replicated(spec.mesh), sharding.rows_sharding(spec.mesh)
        st_o, st_v = self._rt.params
        slots = prompt_bucket(ids.size)
        padded = np.zeros(slots, np.int32)
        padded[: ids.size] = ids
        prompt, length = jax.device_put((padded, np.int32(ids.size)), rep)
        prefix_o, prefix_v = self._counted(
            "prefill", _prefill, spec=spec, st_o=st_o, st_v=st_v, prompt=prompt, length=length
        )

        a_n, t_n = alphas_f.size, self.max_new_tokens
        n_rows = a_n * r_n
        row_alpha = np.repeat(alphas_f.astype(np.float32), r_n)
        row_q = np.repeat(alphas_q, r_n)
        row_r = np.tile(np.arange(r_n, dtype=np.uint32) + np.uint32(offset), a_n)
        chunk = self.chunk_rows(slots, per_token)
        outs = []
        for start in range(0, n_rows, chunk):
            n = min(chunk, n_rows - start)
            b = row_bucket(n, chunk, self.num_devices)
            sl = slice(start, start + n)
            pad = b - n
            rows = _Rows(
                alpha=np.pad(row_alpha[sl], (0, pad), mode="edge"),
                alpha_q=np.pad(row_q[sl], (0, pad), mode="edge"),
                rollout=np.pad(row_r[sl], (0, pad)),
                pad_done=np.arange(b) >= n,  # padding rows start done
            )
            rows = jax.device_put(rows, rows_sh)
            cache_o, cache_v = empty_rows(
                kv_shapes=spec.kv_shapes, batch=b, capacity=t_n, mesh=spec.mesh
            )
            res, _, _ = self._counted(
                "loop",
                _decode_loop,
                spec=spec,
                per_token=per_token,
                st_o=st_o,
                st_v=st_v,
                prefix_o=prefix_o,
                prefix_v=prefix_v,
                rows_o=cache_o,
                rows_v=cache_v,
                rows=rows,
                seed=np.uint32(seed),
            )
            outs.append({k: np.asarray(v)[:n] for k, v in res.items()})
        cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        tok_lp = None
        if per_token:
            tok_lp = cat["tok_lp"].reshape(a_n, r_n, 3, t_n).transpose(2, 0, 1, 3)
        return make_rollouts(
            tokens=cat["tokens"].reshape(a_n, r_n, t_n),
            lengths=cat["lengths"].reshape(a_n, r_n),
            logp_o=cat["logp_o"].reshape(a_n, r_n),
            logp_v=cat["logp_v"].reshape(a_n, r_n),
            logp_p=cat["logp_p"].reshape(a_n, r_n),
            nonfinite=cat["nonfinite"].reshape(a_n, r_n),
            alphas=alphas_f,
            rollout_offset=offset,
            eos=spec.eos,
            tok_lp=tok_lp,
        )


@struct.dataclass
class _Rows:
    """Per-row inputs of one chunk, [B] each."""

    alpha: jax.Array  # f32
    alpha_q: jax.Array  # uint32 key word of the alpha
    rollout: jax.Array  # uint32 rollout index
    pad_done: jax.Array  # bool: padding rows start done


@struct.dataclass
class _LoopState:
    step: jax.Array  # int32 scalar: index of the token sampled next
    tokens: jax.Array  # int32 [B, T]
    last: jax.Array  # int32 [B]: the token decode consumes next
    done: jax.Array  # bool [B]
    lengths: jax.Array  # int32 [B]
    logp_o: jax.Array  # f32 [B]
    logp_v: jax.Array  # f32 [B]
    logp_p: jax.Array  # f32 [B]
    nonfinite: jax.Array  # bool [B]
    tok_lp: jax.Array | None  # f32 [B, 3, T] (original, variant, path) when per-token is on
    cache_o: KVCache
    cache_v: KVCache


@functools.partial(jax.jit, static_argnames=("kv_shapes", "batch", "capacity", "mesh"))
def empty_rows(
    kv_shapes: tuple[tuple[Qwen3Config, Any], ...],
    batch: int,
    capacity: int,
    mesh: jax.sharding.Mesh,
) -> tuple[tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]], ...]:
    """Zeroed per-row (k, v) caches [batch, kv, capacity, hd] per layer for each (config, dtype)
    in kv_shapes, created on device already split over the mesh's rows (one buffer each)."""
    rows_sh = sharding.rows_sharding(mesh)
    return tuple(
        jax.lax.with_sharding_constraint(empty_kv(cfg, dtype, batch, capacity), rows_sh)
        for cfg, dtype in kv_shapes
    )


@functools.partial(jax.jit, static_argnames=("spec",))
def _prefill(spec: _LoopSpec, st_o: nnx.State, st_v: nnx.State, prompt, length):
    """(params, prompt int [Pb], true length) -> per model (logits [V], ks, vs, length)."""
    out = []
    for gd, st in ((spec.gd_o, st_o), (spec.gd_v, st_v)):
        logits, ks, vs = nnx.merge(gd, st).prefill(prompt, length)
        out.append((logits, ks, vs, length))
    return tuple(out)


def _take(
    spec: _LoopSpec, state: _LoopState, l_o, l_v, alpha: jax.Array, keys: jax.Array
) -> _LoopState:
    """Sample token `state.step` of every row from the path logits and record it.

    A row whose path or model logits are invalid (NaN/+inf/all -inf) is flagged `nonfinite` and
    stopped; its token is neither sampled from those logits nor kept.
    """
    step = state.step
    s = sample_step(spec.path_fn, spec.temperature, l_o, l_v, alpha, keys, step)
    active = ~state.done & ~s.bad
    tok_lp = state.tok_lp
    if tok_lp is not None:
        col = jnp.stack([s.logp_o, s.logp_v, s.logp_path], axis=1) * active[:, None]
        tok_lp = jax.lax.dynamic_update_slice_in_dim(tok_lp, col[..., None], step, axis=2)
    ends = jnp.isin(s.token, np.asarray(spec.eos, np.int32)) if spec.eos else False
    kept = jnp.where(active, s.token, PAD_ID)[:, None]
    return state.replace(
        step=step + 1,
        tokens=jax.lax.dynamic_update_slice_in_dim(state.tokens, kept, step, axis=1),
        last=jnp.where(active, s.token, 0),
        done=state.done | s.bad | ends,
        lengths=state.lengths + active,
        logp_o=state.logp_o + jnp.where(active, s.logp_o, 0.0),
        logp_v=state.logp_v + jnp.where(active, s.logp_v, 0.0),
        logp_p=state.logp_p + jnp.where(active, s.logp_path, 0.0),
        nonfinite=state.nonfinite | (~state.done & s.bad),
        tok_lp=tok_lp,
    )


@functools.partial(
    jax.jit, static_argnames=("spec", "per_token"), donate_argnames=("rows_o", "rows_v")
)
def _decode_loop(
    spec: _LoopSpec,
    per_token: bool,
    st_o: nnx.State,
    st_v: nnx.State,
    prefix_o: tuple,
    prefix_v: tuple,
    rows_o: tuple,
    rows_v: tuple,
    rows: _Rows,
    seed: jax.Array,
) -> tuple[dict[str, jax.Array], tuple, tuple]:
    """Decode every row of one chunk until all are done; rows_o/rows_v (per-row K/V) are donated.

    Returns (row outputs [B] or [B, T] each, final rows_o, final rows_v); returning the caches
    lets XLA alias the donated buffers and update them in place.
    """
    t_n = spec.max_new_tokens
    rows_sh = sharding.rows_sharding(spec.mesh)

    def constrain(x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, rows_sh)

    m_o, m_v = nnx.merge(spec.gd_o, st_o), nnx.merge(spec.gd_v, st_v)
    b = rows.alpha.shape[0]
    keys = row_keys(seed, rows.alpha_q, rows.rollout)
    (lo0, pk_o, pv_o, n_o), (lv0, pk_v, pv_v, n_v) = prefix_o, prefix_v
    state = _LoopState(
        step=jnp.int32(0),
        tokens=constrain(jnp.full((b, t_n), PAD_ID, jnp.int32)),
        last=constrain(jnp.zeros((b,), jnp.int32)),
        done=rows.pad_done,
        lengths=constrain(jnp.zeros((b,), jnp.int32)),
        logp_o=constrain(jnp.zeros((b,), jnp.float32)),
        logp_v=constrain(jnp.zeros((b,), jnp.float32)),
        logp_p=constrain(jnp.zeros((b,), jnp.float32)),
        nonfinite=constrain(jnp.zeros((b,), bool)),
        tok_lp=constrain(jnp.zeros((b, 3, t_n), jnp.float32)) if per_token else None,
        cache_o=KVCache(pk_o, pv_o, n_o, *rows_o),
        cache_v=KVCache(pk_v, pv_v, n_v, *rows_v),
    )
    # Token 0 comes from the prompt's logits, shared by every row: no decode needed.
    l_o0 = jnp.broadcast_to(lo0, (b, lo0.shape[-1]))
    l_v0 = jnp.broadcast_to(lv0, (b, lv0.shape[-1]))
    state = _take(spec, state, l_o0, l_v0, rows.alpha, keys)

    def cond(s: _LoopState) -> jax.Array:
        return (s.step < t_n) & ~jnp.all(s.done)

    def body(s: _LoopState) -> _LoopState:
        # Feed token step-1 into generated slot step-1, then sample token `step`.
        l_o, cache_o = m_o.decode(s.last, s.step - 1, s.cache_o)
        l_v, cache_v = m_v.decode(s.last, s.step - 1, s.cache_v)
        return _take(spec, s.replace(cache_o=cache_o, cache_v=cache_v), l_o, l_v, rows.alpha, keys)

    state = jax.lax.while_loop(cond, body, state)
    res = dict(
        tokens=state.tokens,
        lengths=state.lengths,
        logp_o=state.logp_o,
        logp_v=state.logp_v,
        logp_p=state.logp_p,
        nonfinite=state.nonfinite,
    )
    if per_token:
        res["tok_lp"] = state.tok_lp
    return res, (state.cache_o.k, state.cache_o.v), (state.cache_v.k, state.cache_v.v)
